"""The thread pool of the CPU ops: element-wise passes split over the cores.

NumPy runs an element-wise operation on one core; only the matrix products (BLAS)
use them all.  So the CPU ops cut their large element-wise passes (batch norm's, the
ReLU's) into fixed pieces of the batch and hand the pieces to a small pool of
threads.  NumPy releases the GIL inside its loops, so the threads really run at the
same time.

    md.set_num_threads(2)      # or MINIDENSE_NUM_THREADS=2 in the environment
    md.get_num_threads()       # default: the cores this process may run on (under
                               # mpiexec, once distributed.init() has run, each
                               # rank's share of its machine's cores: share_cores)

Results do not depend on the number of threads.  Where a piece's result depends on
where the piece is cut (batch norm sums over pieces), the pieces depend on the array's
shape alone (``pieces``), each piece is computed by the same NumPy calls whichever
thread takes it, and the per-piece partial sums are added in piece order
(``map_pieces`` returns them in that order).  Where every element is computed the same
way wherever the cuts fall (copies, and additions of whole slices in a fixed order, as
in the convolution's grids), there is simply one piece per thread (``split``).  So a
run resumed with another thread count stays exact.

Global state, here only: the pool (a ``concurrent.futures.ThreadPoolExecutor``,
made on first use, replaced by ``set_num_threads``) and the thread count.  Given
CuPy arrays (``like``), ``map_split`` makes one call for the whole range on the calling
thread: the GPU has its own parallelism (batch norm and the ReLU never send CuPy work
here).

OpenBLAS's own threads spin on their cores after each matrix product and can take the
cores these threads need; the commands ask for a short spin (``minidense/process.py``
explains it).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

from . import backend

PIECE_BYTES = 1 << 19   # the size of a piece: half of a core's L2 cache here

_num_threads = None     # None: not chosen yet (MINIDENSE_NUM_THREADS, else the cores)
_pool = None            # ThreadPoolExecutor of _num_threads - 1 workers (the caller is one)
_lock = threading.Lock()
_inside = threading.local()   # set in a pool worker: nested map_pieces run serially


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


def _check(n, source) -> int:
    try:
        value = int(n)
    except (TypeError, ValueError):
        value = None
    if value is None or value < 1 or isinstance(n, bool) or (isinstance(n, float) and n != value):
        raise ValueError(f"{source}: the number of threads must be a whole number of at least 1, "
                         f"got {n!r}")
    return value


def get_num_threads() -> int:
    """The threads the CPU ops split their element-wise passes over."""
    global _num_threads
    if _num_threads is None:
        setting = os.environ.get("MINIDENSE_NUM_THREADS")
        _num_threads = _check(setting, "MINIDENSE_NUM_THREADS") if setting else available_cores()
    return _num_threads


def set_num_threads(n: int) -> None:
    """Split the CPU ops' element-wise passes over ``n`` threads (1: no pool)."""
    _set(_check(n, "set_num_threads"))


def share_cores(processes: int) -> None:
    """The default for one of ``processes`` processes sharing this machine (the ranks
    under mpiexec): its share of the machine's cores, and no more than it may run on.
    A count the user chose (``MINIDENSE_NUM_THREADS``, ``set_num_threads``) stays."""
    if _num_threads is None and not os.environ.get("MINIDENSE_NUM_THREADS"):
        _set(max(1, min(available_cores(), (os.cpu_count() or 1) // max(processes, 1))))


def _set(n: int) -> None:
    global _num_threads, _pool
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None
        _num_threads = n


def pieces(length: int, bytes_per_item: int) -> list:
    """Slices of ``range(length)`` of about PIECE_BYTES each (at least one item): they
    depend on the sizes alone, never on the thread count."""
    step = max(1, PIECE_BYTES // max(bytes_per_item, 1))
    return [slice(start, min(start + step, length)) for start in range(0, length, step)]


def batch_pieces(x) -> list:
    """``pieces`` of axis 0 of ``x`` (the batch): a few images at a time."""
    return pieces(len(x), x[:1].nbytes)


def split(length: int) -> list:
    """``range(length)`` cut into one contiguous slice per thread: for copies and
    additions whose every element is computed the same way wherever the cuts fall
    (fewer, larger pieces cost less Python than ``pieces``)."""
    parts = max(1, min(get_num_threads(), length))
    return [slice(length * t // parts, length * (t + 1) // parts) for t in range(parts)]


def map_split(fn, length: int, like) -> None:
    """fn(slice) over ``split(length)`` on the threads; on a GPU (``like`` a CuPy
    array) one call for the whole range, since one kernel launch does it all."""
    if backend.device_of(like) != "cpu":
        fn(slice(0, length))
    else:
        map_pieces(fn, split(length))


def map_pieces(fn, pieces) -> list:
    """``[fn(p) for p in pieces]``, the pieces dealt in contiguous runs to the threads
    (the calling thread takes the first run); results in piece order.  If a piece
    raises, the other runs are finished first, then the error is raised."""
    global _pool
    pieces = list(pieces)
    threads = min(get_num_threads(), len(pieces))
    if threads <= 1 or getattr(_inside, "worker", False):
        return [fn(p) for p in pieces]
    # Contiguous runs: neighbouring pieces share a thread (fewer hand-overs than one
    # task per piece); which thread runs a piece does not change its result.
    bounds = [len(pieces) * t // threads for t in range(threads + 1)]
    runs = [pieces[bounds[t]:bounds[t + 1]] for t in range(threads)]
    with _lock:   # so that set_num_threads cannot shut the pool down in between
        if _pool is None:
            _pool = ThreadPoolExecutor(get_num_threads() - 1, thread_name_prefix="minidense",
                                       initializer=_mark_worker)
        futures = [_pool.submit(_run, fn, run) for run in runs[1:]]
    try:
        results = _run(fn, runs[0])
    finally:
        wait(futures)   # no piece may still be writing when this returns or raises
    for future in futures:
        results += future.result()
    return results


def _forget_pool_in_child():
    # A forked child has none of the pool's threads: it makes a pool of its own.
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _run(fn, run):
    return [fn(p) for p in run]


def _mark_worker():
    _inside.worker = True

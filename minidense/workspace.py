"""The workspace: reusable host buffers for the large temporaries of the CPU ops.

A large new NumPy array is mapped fresh from the operating system, which zeroes each
page on first touch: for the kh*kw-times expanded matrices of conv2d that costs about
as much as writing them.  So on the CPU a temporary that never leaves the op asking
for it is cut from a named buffer of this workspace, grown as needed and reused by the
next call.  Arrays handed out under one name share memory: an op uses each name for
one live array at a time.

    md.workspace.nbytes()    # bytes the workspace holds (every thread's buffers)
    md.workspace.free()      # give them back (the next conv2d grows them again)

Buffers are per thread: each thread has its own under each name (the thread pool's
threads keep piece-sized ones for batch norm), and ``nbytes`` and ``free`` cover them
all.  Temporaries over ``KEEP_LIMIT`` bytes (a huge evaluation
batch) are allocated afresh instead, so as not to hold that memory for good.  On
CuPy the memory pool already recycles device memory: there ``get`` is ``xp.empty``.

The same page-zeroing cost hits every array a training step makes; a program can ask
glibc's malloc to keep freed memory for reuse with ``md.tune_process()``
(``minidense/process.py`` explains it).  ``freed_memory_kept`` records whether that
was done: False until then, as importing minidense leaves malloc alone.
"""
from __future__ import annotations

import math
import threading
import weakref

import numpy as np

from . import backend

KEEP_LIMIT = 256 * 2 ** 20   # bytes: larger temporaries are not kept between calls

_buffers = threading.local()

# Whether glibc's malloc keeps freed memory: set by process.tune_process() alone.
freed_memory_kept = False


def get(name: str, shape, dtype, like):
    """An uninitialised array of ``shape`` and ``dtype`` on the device of ``like``, from
    the buffer ``name`` (see the module's docstring)."""
    xp = backend.get_array_module(like)
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    # Per backend: only host memory is kept here (CuPy's pool recycles device memory).
    if backend.device_of(like) != "cpu" or nbytes > KEEP_LIMIT:
        return xp.empty(shape, dtype=dtype)
    kept = _kept()
    buffer = kept.get(name)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = kept[name] = np.empty(nbytes, dtype=np.uint8)
    return buffer[:nbytes].view(dtype).reshape(shape)


def nbytes() -> int:
    """Bytes held by the workspace buffers of every thread."""
    return sum(buffer.nbytes for kept in list(_every_thread) for buffer in list(kept.values()))


def free() -> None:
    """Drop every thread's buffers (arrays still using one keep it alive until they go)."""
    for kept in list(_every_thread):
        kept.clear()


class _Kept(dict):
    """One thread's buffers by name (a dict that a WeakSet can hold: hashed by identity)."""

    __hash__ = object.__hash__
    __eq__ = object.__eq__


_every_thread = weakref.WeakSet()   # each live thread's _Kept, for nbytes() and free()


def _kept() -> dict:
    kept = getattr(_buffers, "kept", None)
    if kept is None:
        kept = _buffers.kept = _Kept()
        _every_thread.add(kept)
    return kept

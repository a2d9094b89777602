"""``md.profiler``: where the time of a forward, backward and optimizer step goes.

    with md.profiler() as prof:
        loss = md.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    print(prof.table())                    # one row per op, sorted by time
    prof.export_chrome_trace("trace.json")  # open in https://ui.perfetto.dev or chrome://tracing

While a profiler is recording, ``Function.__call__`` times every op's ``forward``,
the backward pass times every node's ``backward``, and ``Optimizer.step`` times
itself.  For each op the table gives calls, forward and backward time, and the bytes
it kept for backward: the arrays passed to ``save_for_backward``, counted once per
op (an array two ops keep, such as a ReLU output that the next convolution keeps
as its input, is counted by both).  ``region(name)`` times a stretch of your own
code (the trainer marks each step).

On CuPy an op only queues kernels, so its time is the launch's, not the GPU's;
``synchronize=True`` waits for the GPU before every clock reading, which gives each
op its GPU time (and slows the run down).  Nothing waits unless asked.

The clock is a parameter (``clock=``, seconds as a float) so that the bookkeeping can
be tested with a fake clock.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from . import autograd, backend
from .files import atomic_write

# The recording profiler, or None: the one global that ``region`` (the optimizer, the
# trainer) reads.  While it records, the profiler is also ``autograd.observer``, the
# engine's hook, so the engine needs to know nothing of this module.  Process-wide, not
# per thread: one profiler records every thread's ops.
active = None


class Profiler:
    """Records ops, backward nodes, optimizer steps and named regions between
    ``__enter__`` and ``__exit__`` (or ``start()`` and ``stop()``); it may be entered
    several times, and the records add up."""

    def __init__(self, synchronize: bool = False, clock=time.perf_counter):
        self.synchronize = synchronize
        self.clock = clock
        self.stats = {}     # name -> {"calls", "forward_s", "backward_s", "kept_bytes"}
        self.events = []    # (name, category, start_s, duration_s, args) for the trace
        self.recorded_s = 0.0
        self._origin = None
        self._started = None

    # -- recording -------------------------------------------------------------
    def start(self) -> "Profiler":
        global active
        if active is not None and active is not self:
            raise RuntimeError("md.profiler: another profiler is already recording")
        active = autograd.observer = self
        self._started = self.now()
        if self._origin is None:
            self._origin = self._started
        return self

    def stop(self) -> None:
        global active
        if active is self:
            self.recorded_s += self.now() - self._started
            active = autograd.observer = None

    __enter__ = start

    def __exit__(self, *exc):
        self.stop()
        return False

    def now(self) -> float:
        """The clock, after waiting for the GPU when asked to."""
        if self.synchronize and backend.cuda_available():
            backend.synchronize("cuda")
        return self.clock()

    def _row(self, name):
        row = self.stats.get(name)
        if row is None:
            row = self.stats[name] = {"calls": 0, "forward_s": 0.0, "backward_s": 0.0,
                                      "kept_bytes": 0}
        return row

    def record_forward(self, name, start, kept_bytes) -> None:
        """An op's forward ran from ``start`` (a ``now()`` reading) until now."""
        end = self.now()
        row = self._row(name)
        row["calls"] += 1
        row["forward_s"] += end - start
        row["kept_bytes"] += kept_bytes
        self.events.append((name, "forward", start, end - start, {"kept_bytes": kept_bytes}))

    def record_backward(self, name, start) -> None:
        end = self.now()
        self._row(name)["backward_s"] += end - start
        self.events.append((name, "backward", start, end - start, {}))

    @contextlib.contextmanager
    def region(self, name, category="region", own_row=False):
        """Time the body under ``name``: a span of the trace, and with ``own_row`` a row
        of the table too (for work outside the ops, such as the optimizer's update; a
        region that encloses ops would count their time twice)."""
        start = self.now()
        try:
            yield
        finally:
            end = self.now()
            if own_row:
                row = self._row(name)
                row["calls"] += 1
                row["forward_s"] += end - start
            self.events.append((name, category, start, end - start, {}))

    # -- reporting -------------------------------------------------------------
    def rows(self):
        """The table's rows, most time first: dicts with name, calls, forward_s,
        backward_s, total_s, kept_bytes."""
        rows = [dict(name=name, total_s=r["forward_s"] + r["backward_s"], **r)
                for name, r in self.stats.items()]
        return sorted(rows, key=lambda r: (-r["total_s"], r["name"]))

    def table(self, limit=None) -> str:
        """One line per op, sorted by forward + backward time, and what the ops do not
        account for (Python between ops, data loading) as "other"."""
        rows = self.rows()
        timed = sum(r["total_s"] for r in rows)
        total = max(self.recorded_s, timed) or 1.0
        lines = [f"{'op':<22}{'calls':>8}{'forward ms':>12}{'backward ms':>13}{'total ms':>11}"
                 f"{'%':>7}{'kept MB':>10}"]
        for r in rows[:limit]:
            lines.append(f"{r['name']:<22}{r['calls']:>8}{r['forward_s'] * 1e3:>12.2f}"
                         f"{r['backward_s'] * 1e3:>13.2f}{r['total_s'] * 1e3:>11.2f}"
                         f"{100 * r['total_s'] / total:>7.1f}{r['kept_bytes'] / 2 ** 20:>10.1f}")
        other = self.recorded_s - timed
        if other > 0:
            lines.append(f"{'(other)':<22}{'':>8}{'':>12}{'':>13}{other * 1e3:>11.2f}"
                         f"{100 * other / total:>7.1f}")
        lines.append(f"recorded {self.recorded_s * 1e3:.2f} ms" +
                     (" (each op's time includes waiting for the GPU)" if self.synchronize else ""))
        return "\n".join(lines)

    def chrome_trace(self) -> dict:
        """The events in the Trace Event Format (complete events, microseconds)."""
        origin = self._origin or 0.0
        return {"displayTimeUnit": "ms", "traceEvents": [
            {"name": name, "cat": category, "ph": "X", "pid": 0, "tid": 0,
             "ts": (start - origin) * 1e6, "dur": duration * 1e6, "args": args}
            for name, category, start, duration, args in self.events]}

    def export_chrome_trace(self, path) -> Path:
        """Write ``chrome_trace()`` as JSON to ``path`` (atomically: a temporary file,
        then a rename)."""
        path = Path(path)
        with atomic_write(path) as f:
            f.write(json.dumps(self.chrome_trace()).encode())
        return path


def profiler(synchronize: bool = False, clock=time.perf_counter) -> Profiler:
    """A :class:`Profiler`, to use as ``with md.profiler() as prof:``."""
    return Profiler(synchronize=synchronize, clock=clock)


def region(name: str, category: str = "region", own_row: bool = False):
    """``active.region(...)`` when a profiler is recording, else nothing: for code that
    marks its stretches whether or not anyone profiles it."""
    return contextlib.nullcontext() if active is None else active.region(name, category, own_row)

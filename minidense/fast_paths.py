"""The switch between the plain algorithms and the fast paths.

Every op is written plain first: its textbook algorithm, generic over NumPy and CuPy
(``xp``), is what the op's class shows.  Where that is slow, a fast path computes the
same thing another way: batch norm and the ReLU in cache-sized pieces on the thread
pool (``functions/cpu_pieces.py``), fused CUDA kernels, convolution by phase grids or
Winograd, pooling by strided views.  Each op says where it takes which.

    with md.plain_ops():
        loss = md.cross_entropy(model(x), y)   # every op on its plain algorithm
        loss.backward()

Inside the block every op takes its plain algorithm (convolution: im2col, whatever
``md.conv_algorithm`` says), so a learner can step through the textbook code in a
debugger, and a test can check that the fast paths give the same numbers.  The
results agree to float32 rounding, not bitwise: the fast paths add in other orders.

Global state: one flag per thread (a thread pool worker, or another thread training a
model, is not switched by this thread's block).
"""
from __future__ import annotations

import contextlib
import threading


class _ThreadState(threading.local):
    plain = False   # every new thread starts on the fast paths


_state = _ThreadState()


def fast_paths_enabled() -> bool:
    """False inside ``plain_ops()`` (in this thread)."""
    return not _state.plain


@contextlib.contextmanager
def plain_ops(enabled: bool = True):
    """Run every op on its plain algorithm inside the block (in this thread);
    ``plain_ops(False)`` switches the fast paths back on inside an outer block."""
    previous, _state.plain = _state.plain, bool(enabled)
    try:
        yield
    finally:
        _state.plain = previous

"""Recomputation ("gradient checkpointing"): trade compute for memory.

``recompute(fn, *inputs)`` (also ``md.checkpoint``, PyTorch's name) returns
``fn(*inputs)`` but keeps nothing of ``fn``'s inside for backward: the forward runs
under ``no_grad``, so every intermediate array is freed at once, and the node keeps
only its inputs.  When the backward pass reaches the node, it runs ``fn`` again with
the graph recorded and backpropagates through that small graph (Chen et al. 2016,
"Training Deep Nets with Sublinear Memory Cost"; Chainer's ``F.forget``,
``torch.utils.checkpoint``).

Two things must not differ between the two runs of ``fn``:

* random draws: the device generator is snapshotted before the forward run and a copy
  of the snapshot replaces it during the recomputation, so dropout draws the same mask
  and the global generator's stream is the same as without recomputation;
* side effects: batch norm updates its running statistics in the forward run only.
  The per-thread flag below tells it that a recomputation is under way.

Parameters: ``fn`` may close over parameters (a Module's).  Their gradients are
accumulated into ``.grad`` by the inner backward, as the ordinary pass does; they are
also given to the node as extra inputs (``params``, or the Module's parameters), so
that the node is recorded even when no input needs a gradient.
"""
from __future__ import annotations

import contextlib
import threading

from . import backend
from .autograd import Function, Tensor, backward_mode, enable_grad, is_grad_enabled, no_grad

# Global state, per thread: True while a recompute node runs its function again in
# backward (in the thread running that backward).  Read by BatchNorm
# (functions/normalization.py) to skip the running-statistics update.
class _ThreadState(threading.local):
    recomputing = False


_state = _ThreadState()


def is_recomputing() -> bool:
    """True inside the second run of a recomputed function (during backward)."""
    return _state.recomputing


@contextlib.contextmanager
def _recomputation():
    previous, _state.recomputing = _state.recomputing, True
    try:
        yield
    finally:
        _state.recomputing = previous


class Recompute(Function):
    """One node for the whole of ``fn``.  Keeps: its inputs (the arrays, not copies),
    the function and, when asked, a snapshot of the device's generator."""

    def __init__(self, fn, num_inputs, preserve_rng_state):
        self.fn, self.num_inputs, self.preserve_rng_state = fn, num_inputs, preserve_rng_state

    def forward(self, *arrays):
        inputs = arrays[:self.num_inputs]   # the rest are the parameters, passed for the edges
        self.device = backend.device_of(inputs[0])
        self.rng = backend.rng_snapshot(self.device) if self.preserve_rng_state else None
        with no_grad():   # no graph: fn's intermediate arrays are freed as soon as they are used
            y = self.fn(*[Tensor(a) for a in inputs])
        self.save_for_backward(*inputs)
        return y.data

    def backward(self, gy):
        create_graph, returns_gradients = backward_mode()
        if create_graph or returns_gradients:
            # Its backward runs a backward pass of its own, which puts the parameters'
            # gradients in their .grad: neither a graph of gradients nor md.grad's
            # returned gradients would see them.
            raise RuntimeError("md.recompute (the memory-efficient DenseNet) supports only "
                               "loss.backward() without create_graph; for create_graph=True or "
                               "md.grad, run the model without recomputation "
                               "(memory_efficient=False)")
        sinks = [_GradSink() if need else None for need in self.needs_input_grad[:self.num_inputs]]
        rng = backend.replay_rng(self.device, self.rng) if self.rng is not None else contextlib.nullcontext()
        with enable_grad(), _recomputation(), rng:
            inputs = [sink(Tensor(a, requires_grad=True)) if sink else Tensor(a)
                      for a, sink in zip(self.saved, sinks)]
            y = self.fn(*inputs)
        if y.requires_grad:
            # A backward pass of its own over fn's small graph (one level deep, not a
            # recursion over the model); parameter gradients land in their .grad.
            y.backward(gy)
        grads = tuple(sink.grad if sink else None for sink in sinks)
        return grads + (None,) * (len(self.needs_input_grad) - self.num_inputs)

    def release(self):
        super().release()
        self.fn = self.rng = None   # the closure may hold modules; the snapshot is not small


class _GradSink(Function):
    """The identity, whose backward keeps the gradient it receives and passes nothing
    on: how Recompute collects its inputs' gradients without copying them into a leaf's
    .grad (a copy as large as the input, at the moment of the step's peak memory)."""

    grad = None

    def forward(self, x):
        return x

    def backward(self, gy):
        self.grad = gy
        return None


def recompute(fn, *inputs, params=None, preserve_rng_state=True):
    """``fn(*inputs)``, a single Tensor, recomputed in backward instead of stored.

    ``fn``: any function of Tensors, or a Module.  ``params``: the parameters ``fn`` uses
    (default: the Module's, or none).  ``preserve_rng_state``: replay the generator's
    draws in the recomputation (needed when ``fn`` has dropout).  Without grad mode, or
    when nothing needs a gradient, this is just ``fn(*inputs)``.
    """
    if not inputs:
        raise ValueError("recompute: needs at least one input tensor (the node keeps its inputs)")
    if params is None:
        params = list(fn.parameters()) if hasattr(fn, "parameters") else []
    params = [p for p in params if p.requires_grad]
    tensors = [x if isinstance(x, Tensor) else Tensor(x) for x in inputs]
    if not is_grad_enabled() or not (params or any(t.requires_grad for t in tensors)):
        return fn(*tensors)
    return Recompute(fn, len(tensors), preserve_rng_state)(*tensors, *params)


checkpoint = recompute

"""Activation functions."""
from __future__ import annotations

from .. import backend
from ..autograd import Function, Tensor
from ..fast_paths import fast_paths_enabled
from . import cpu_pieces
from .math import Step


class ReLU(Function):
    """max(x, 0).  Keeps: its output (y > 0 is the mask).

    Plain: ``xp.maximum(x, 0)``, and gy where y > 0.  Fast path on NumPy batches: a few
    images at a time on the thread pool (``cpu_pieces.relu_forward``)."""

    def forward(self, x):
        if fast_paths_enabled() and cpu_pieces.applies_to(x):
            y = cpu_pieces.relu_forward(x)
        else:
            y = backend.get_array_module(x).maximum(x, 0)
        self.save_for_backward(y)
        return y

    def backward(self, gy):
        (y,) = self.saved
        if fast_paths_enabled() and cpu_pieces.applies_to(gy):
            return cpu_pieces.relu_backward(gy, y)
        return gy * (y > 0)

    differentiable = True

    def differentiable_backward(self, gy):
        (y,) = self.saved_tensors()   # piecewise linear: the mask's derivative is zero
        return gy * Step()(y)


class Hardtanh(Function):
    """x clamped to [min_val, max_val]; its gradient passes where min_val < x < max_val
    (PyTorch's hardtanh; ``relu6`` is [0, 6]).  Keeps: its output (min_val < y < max_val
    exactly where min_val < x < max_val)."""

    def __init__(self, min_val=-1.0, max_val=1.0):
        if not min_val < max_val:
            raise ValueError(f"hardtanh: min_val ({min_val}) must be less than max_val ({max_val})")
        self.min_val, self.max_val = min_val, max_val

    def forward(self, x):
        y = backend.get_array_module(x).clip(x, self.min_val, self.max_val)
        self.save_for_backward(y)
        return y

    def backward(self, gy):
        (y,) = self.saved
        return gy * ((y > self.min_val) & (y < self.max_val))

    differentiable = True

    def differentiable_backward(self, gy):
        (y,) = self.saved   # piecewise linear: the mask is a constant
        return gy * Tensor(((y > self.min_val) & (y < self.max_val)).astype(gy.dtype))


class Sigmoid(Function):
    """1 / (1 + exp(-x)), computed without overflow.  Keeps: its output."""

    def forward(self, x):
        xp = backend.get_array_module(x)
        e = xp.exp(-xp.abs(x))
        y = xp.where(x >= 0, 1 / (1 + e), e / (1 + e))
        self.save_for_backward(y)
        return y

    def backward(self, gy):
        (y,) = self.saved
        return gy * y * (1 - y)

    differentiable = True

    def differentiable_backward(self, gy):
        (y,) = self.saved_tensors()
        return gy * y * (1 - y)


class Tanh(Function):
    def forward(self, x):
        y = backend.get_array_module(x).tanh(x)
        self.save_for_backward(y)
        return y

    def backward(self, gy):
        (y,) = self.saved
        return gy * (1 - y * y)

    differentiable = True

    def differentiable_backward(self, gy):
        (y,) = self.saved_tensors()
        return gy * (1 - y * y)


def relu(input):
    return ReLU()(input)


def hardtanh(input, min_val=-1.0, max_val=1.0):
    return Hardtanh(min_val, max_val)(input)


def relu6(input):
    """min(max(x, 0), 6): MobileNet's activation, which keeps activations in a range that
    low-precision arithmetic represents well (Howard et al. 2017; Sandler et al. 2018)."""
    return Hardtanh(0.0, 6.0)(input)


def sigmoid(input):
    return Sigmoid()(input)


def tanh(input):
    return Tanh()(input)

"""Softmax and log-softmax along one dim."""
from __future__ import annotations

import warnings

from .. import backend
from ..autograd import Function, as_tensor


def log_softmax_array(logits, axis=-1):
    """log softmax along ``axis``, by log-sum-exp (no overflow for large logits)."""
    xp = backend.get_array_module(logits)
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


class LogSoftmax(Function):
    """y = x - log sum exp x along ``axis``; dx = gy - softmax * sum(gy).  Keeps: y."""

    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        y = log_softmax_array(x, self.axis)
        self.save_for_backward(y)
        return y

    def backward(self, gy):
        (y,) = self.saved
        xp = backend.get_array_module(y)
        return gy - xp.exp(y) * gy.sum(axis=self.axis, keepdims=True)

    differentiable = True

    def differentiable_backward(self, gy):
        (y,) = self.saved_tensors()
        return gy - y.exp() * gy.sum(axis=self.axis, keepdims=True)


class Softmax(Function):
    """y = exp(x) / sum exp(x) along ``axis``; dx = y * (gy - sum(gy * y)).  Keeps: y."""

    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        y = backend.get_array_module(x).exp(log_softmax_array(x, self.axis))
        self.save_for_backward(y)
        return y

    def backward(self, gy):
        (y,) = self.saved
        return y * (gy - (gy * y).sum(axis=self.axis, keepdims=True))

    differentiable = True

    def differentiable_backward(self, gy):
        (y,) = self.saved_tensors()
        return y * (gy - (gy * y).sum(axis=self.axis, keepdims=True))


def _softmax_dim(op, x, dim):
    """PyTorch's (deprecated) implicit dim: 0 for 0-, 1- and 3-D inputs, else 1."""
    if dim is None:
        warnings.warn(f"{op}: implicit dimension choice is deprecated (as in PyTorch); "
                      f"pass dim=", stacklevel=3)
        dim = 0 if x.ndim in (0, 1, 3) else 1
    if not -max(x.ndim, 1) <= dim < max(x.ndim, 1):
        raise IndexError(f"{op}: dim {dim} is out of range for shape {tuple(x.shape)}")
    return dim


def softmax(input, dim=None, *, dtype=None):
    x = as_tensor(input)
    x = x if dtype is None else x.to(dtype=dtype)
    return Softmax(_softmax_dim("softmax", x, dim))(x)


def log_softmax(input, dim=None, *, dtype=None):
    x = as_tensor(input)
    x = x if dtype is None else x.to(dtype=dtype)
    return LogSoftmax(_softmax_dim("log_softmax", x, dim))(x)

"""Tensor methods built from the ops, with PyTorch's arguments and meanings.

``x.size(0)``, ``x.view(x.size(0), -1)``, ``x.transpose(0, 1)``, ``x.flatten(1)``,
``x.sum(dim=1, keepdim=True)``, ``values, indices = x.max(1)``, ``x.eq(y)`` ... mean
what they mean in PyTorch.  Reductions also take NumPy's ``axis=``/``keepdims=`` as
aliases (PyTorch accepts them too); for NumPy's other meanings use NumPy on ``x.numpy()``.
"""
from __future__ import annotations

import operator

import numpy as np

from .. import backend
from ..autograd import Tensor, _check_same_device, device_and_dtype
from . import array, math
from .activation import relu, sigmoid, tanh
from .softmax import log_softmax, softmax


def _shape(op, shape):
    """The sizes a method got as ``x.view(2, 3)`` or ``x.view((2, 3))``."""
    shape = array.as_tuple(shape)
    for size in shape:
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool):
            raise TypeError(f"{op}: sizes must be ints, got {shape!r}"
                            + ("; view(dtype) is not supported" if len(shape) == 1 else ""))
    return shape


def view(self, *shape):
    return array.view(self, _shape("view", shape))


def reshape(self, *shape):
    return array.reshape(self, _shape("reshape", shape))


def view_as(self, other):
    return array.view(self, other.shape)


def reshape_as(self, other):
    return array.reshape(self, other.shape)


def expand_as(self, other):
    return array.expand(self, other.shape)


def permute(self, *dims):
    return array.permute(self, array.as_tuple(dims))


def split(self, split_size, dim=0):
    return array.split(self, split_size, dim)


def T(self):
    """The dims reversed (a 2-D tensor's transpose)."""
    return array.Transpose(None)(self)


def _compare(op):
    def method(self, other):
        if isinstance(other, Tensor):
            _check_same_device(op.__name__, [self, other])
            other = other.data
        elif backend.is_array(other):  # a NumPy array against a CUDA tensor: CuPy won't mix them
            other = backend.to_device(other, self.device)
        return Tensor(op(self.data, other))
    method.__name__ = op.__name__
    return method


def to(self, device=None, dtype=None):
    """A copy on ``device`` and/or in ``dtype`` (self when nothing changes).

    Gradients flow back through the move, so a model can be moved mid-graph.
    ``x.to(np.float64)`` casts, as PyTorch's ``x.to(torch.float64)``."""
    device, dtype = device_and_dtype(device, dtype)
    device = backend.check_device(device) if device is not None else self.device
    if device == self.device and (dtype is None or np.dtype(dtype) == self.dtype):
        return self
    return array.to_device_and_dtype(self, device, dtype)


def install(T_):
    """Attach the methods to ``Tensor``."""
    T_.to = to
    T_.cpu, T_.cuda = (lambda self: self.to("cpu")), (lambda self: self.to("cuda"))
    T_.float, T_.double = (lambda self: self.to(dtype=np.float32)), (lambda self: self.to(dtype=np.float64))
    T_.astype = lambda self, dtype: self.to(dtype=dtype)
    T_.view, T_.reshape, T_.view_as, T_.reshape_as = view, reshape, view_as, reshape_as
    T_.transpose, T_.permute, T_.flatten, T_.unflatten = (array.transpose, permute, array.flatten,
                                                          array.unflatten)
    T_.squeeze, T_.unsqueeze, T_.split, T_.chunk = array.squeeze, array.unsqueeze, split, array.chunk
    T_.clone, T_.contiguous = array.clone, array.contiguous
    T_.expand, T_.expand_as = array.expand, expand_as
    T_.T = property(T)
    T_.sum, T_.mean = math.sum, math.mean
    T_.max, T_.min, T_.amax, T_.amin = math.max, math.min, math.amax, math.amin
    T_.argmax, T_.argmin = math.argmax, math.argmin
    T_.exp, T_.log, T_.sqrt, T_.abs, T_.pow = math.exp, math.log, math.sqrt, math.abs, math.pow
    T_.clamp = T_.clip = math.clamp
    T_.norm = math.norm
    T_.add, T_.sub, T_.mul, T_.div, T_.neg, T_.matmul = (math.add, math.sub, math.mul, math.div,
                                                         math.neg, math.matmul)
    T_.relu, T_.sigmoid, T_.tanh = relu, sigmoid, tanh
    T_.softmax, T_.log_softmax = softmax, log_softmax
    for name, op in (("eq", operator.eq), ("ne", operator.ne), ("lt", operator.lt),
                     ("le", operator.le), ("gt", operator.gt), ("ge", operator.ge)):
        method = _compare(op)
        setattr(T_, name, method)
        setattr(T_, f"__{name}__", method)
    T_.__hash__ = object.__hash__

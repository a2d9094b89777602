"""All ops, grouped by family as in Chainer, and the Tensor operators built on them."""
from __future__ import annotations

import numpy as np

from .. import backend
from ..autograd import Tensor, _check_same_device
from .activation import hardtanh, relu, relu6, sigmoid, tanh
from .array import concat, flatten, getitem, reshape, to_device_and_dtype, transpose
from .connection import CONV_ALGORITHMS, conv2d, conv_algorithm, linear
from .loss import cross_entropy, log_softmax_array
from .math import add, div, exp, log, matmul, max, mean, mul, neg, pow, sqrt, sub, sum
from .noise import dropout
from .normalization import batch_norm, batch_norm_relu
from .pooling import avg_pool2d, global_avg_pool2d, max_pool2d


def _reflected(fn):
    """``other <op> tensor`` for a non-Tensor ``other`` (Python's reflected operators)."""
    return lambda self, other: fn(other, self)


def _compare(op):
    def method(self, other):
        if isinstance(other, Tensor):
            _check_same_device(op.__name__, [self, other])
            other = other.data
        elif backend.is_array(other):  # a NumPy array against a CUDA tensor: CuPy won't mix them
            other = backend.to_device(other, self.device)
        return Tensor(op(self.data, other))
    return method


def _argmax(self, axis=None):
    return Tensor(self.data.argmax(axis=axis))


def _to(self, device=None, dtype=None):
    """A copy on ``device`` and/or in ``dtype`` (self when nothing changes).

    Gradients flow back through the move, so a model can be moved mid-graph."""
    device = backend.check_device(device) if device is not None else self.device
    if device == self.device and (dtype is None or np.dtype(dtype) == self.dtype):
        return self
    return to_device_and_dtype(self, device, dtype)


def _install_tensor_methods():
    import operator
    T = Tensor
    T.__add__, T.__radd__ = add, _reflected(add)
    T.__sub__, T.__rsub__ = sub, _reflected(sub)
    T.__mul__, T.__rmul__ = mul, _reflected(mul)
    T.__truediv__, T.__rtruediv__ = div, _reflected(div)
    T.__matmul__, T.__rmatmul__ = matmul, _reflected(matmul)
    T.__pow__ = pow
    T.__rpow__ = _reflected(pow)
    T.__neg__ = neg
    T.__getitem__ = getitem
    for name, op in (("__eq__", operator.eq), ("__ne__", operator.ne), ("__lt__", operator.lt),
                     ("__le__", operator.le), ("__gt__", operator.gt), ("__ge__", operator.ge)):
        setattr(T, name, _compare(op))
    T.__hash__ = object.__hash__
    T.sum, T.mean, T.max = sum, mean, max
    T.exp, T.log, T.sqrt, T.relu = exp, log, sqrt, relu
    T.reshape, T.transpose, T.flatten = reshape, transpose, flatten
    T.T = property(lambda self: transpose(self))
    T.argmax = _argmax
    T.to = _to
    T.cpu = lambda self: self.to("cpu")
    T.cuda = lambda self: self.to("cuda")
    T.float = lambda self: self.to(dtype=np.float32)
    T.double = lambda self: self.to(dtype=np.float64)
    T.astype = lambda self, dtype: self.to(dtype=dtype)


_install_tensor_methods()

__all__ = [
    "relu", "relu6", "hardtanh", "sigmoid", "tanh", "concat", "flatten", "getitem", "reshape", "transpose",
    "to_device_and_dtype", "conv2d", "linear", "cross_entropy", "log_softmax_array", "add", "div",
    "exp", "log", "matmul", "max", "mean", "mul", "neg", "pow", "sqrt", "sub", "sum", "dropout",
    "batch_norm", "batch_norm_relu", "avg_pool2d", "global_avg_pool2d", "max_pool2d", "backend",
]

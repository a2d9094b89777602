"""All ops, grouped by family as in Chainer, and the Tensor operators built on them."""
from __future__ import annotations

from .. import backend
from ..autograd import Tensor
from . import tensor_methods
from .activation import hardtanh, relu, relu6, sigmoid, tanh
from .array import (cat, chunk, clone, concat, concatenate, flatten, getitem, pad, permute, reshape,
                    split, squeeze, stack, to_device_and_dtype, transpose, unflatten, unsqueeze)
from .connection import CONV_ALGORITHMS, conv2d, conv_algorithm, linear
from .loss import cross_entropy, mse_loss, nll_loss
from .math import (abs, add, amax, amin, argmax, argmin, clamp, clip, div, exp, log, matmul, max,
                   mean, min, mul, neg, norm, pow, sqrt, sub, sum)
from .softmax import log_softmax, log_softmax_array, softmax
from .noise import dropout
from .normalization import batch_norm, batch_norm_relu
from .pooling import adaptive_avg_pool2d, avg_pool2d, global_avg_pool2d, max_pool2d


def _reflected(fn):
    """``other <op> tensor`` for a non-Tensor ``other`` (Python's reflected operators)."""
    return lambda self, other: fn(other, self)


def _install_tensor_methods():
    T = Tensor
    T.__add__, T.__radd__ = add, _reflected(add)
    T.__sub__, T.__rsub__ = sub, _reflected(sub)
    T.__mul__, T.__rmul__ = mul, _reflected(mul)
    T.__truediv__, T.__rtruediv__ = div, _reflected(div)
    T.__matmul__, T.__rmatmul__ = matmul, _reflected(matmul)
    T.__pow__ = pow
    T.__rpow__ = _reflected(pow)
    T.__neg__ = neg
    T.__abs__ = abs
    T.__getitem__ = getitem
    tensor_methods.install(T)   # view, size-aware reductions, comparisons, to, ...


_install_tensor_methods()

__all__ = [
    "relu", "relu6", "hardtanh", "sigmoid", "tanh", "cat", "chunk", "clone", "concat", "concatenate", "flatten",
    "getitem", "pad", "permute", "reshape", "split", "squeeze", "stack", "transpose", "unflatten",
    "unsqueeze", "to_device_and_dtype", "conv2d", "linear", "cross_entropy", "mse_loss",
    "nll_loss", "log_softmax", "log_softmax_array", "softmax", "abs", "add", "amax", "amin",
    "argmax", "argmin", "clamp", "clip", "div", "exp", "log", "matmul", "max", "mean", "min",
    "mul", "neg", "norm", "pow", "sqrt", "sub", "sum", "dropout", "batch_norm",
    "batch_norm_relu", "adaptive_avg_pool2d", "avg_pool2d", "global_avg_pool2d", "max_pool2d",
    "backend", "CONV_ALGORITHMS", "conv_algorithm",
]

"""``minidense.nn.functional``: the ops with ``torch.nn.functional``'s names, arguments
and meanings, so that ``import minidense.nn.functional as F`` serves PyTorch code.

Arguments minidense does not support (``groups``, ``dilation``, ``ceil_mode`` ...) are
accepted at their defaults and raise a clear error otherwise; ``inplace=True`` is
accepted and runs out of place (the result is returned; the input is unchanged).
"""
from __future__ import annotations

from .. import backend
from ..autograd import Tensor, as_tensor
from ..functions import (adaptive_avg_pool2d, avg_pool2d, conv2d, cross_entropy, linear,
                         log_softmax, mse_loss, nll_loss, pad, sigmoid, softmax, tanh)
from ..functions import max_pool2d as _max_pool2d
from ..functions import batch_norm as _batch_norm
from ..functions import dropout as _dropout
from ..functions import relu as _relu


def relu(input, inplace=False):
    return _relu(input)


def dropout(input, p=0.5, training=True, inplace=False):
    return _dropout(input, p, training)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    if return_indices:
        raise NotImplementedError("max_pool2d: return_indices=True is not supported by minidense")
    return _max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Batch normalisation over dim 1 with PyTorch's argument order (running statistics
    first; ``weight``/``bias`` default to 1 and 0).  In training mode the running
    statistics, when given, are updated in place."""
    x = as_tensor(input)
    xp = backend.get_array_module(x.data)
    channels = x.shape[1]
    weight = Tensor(xp.ones(channels, dtype=x.dtype)) if weight is None else weight
    bias = Tensor(xp.zeros(channels, dtype=x.dtype)) if bias is None else bias
    return _batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps)


__all__ = ["adaptive_avg_pool2d", "avg_pool2d", "batch_norm", "conv2d", "cross_entropy", "dropout",
           "linear", "log_softmax", "max_pool2d", "mse_loss", "nll_loss", "pad", "relu", "sigmoid",
           "softmax", "tanh"]

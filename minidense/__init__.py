"""minidense: a from-scratch reverse-mode autograd engine on NumPy and CuPy.

    import minidense as md
    x = md.tensor([[1.0, 2.0]], requires_grad=True)
    (x * x).sum().backward()
    x.grad  # tensor([[2., 4.]])
"""
from . import backend
from .autograd import Function, Tensor, as_tensor, enable_grad, is_grad_enabled, no_grad, tensor
from .backend import cuda_available, manual_seed
from .functions import (
    add, avg_pool2d, batch_norm, concat, conv2d, cross_entropy, div, dropout, exp, flatten,
    global_avg_pool2d, linear, log, matmul, max, max_pool2d, mean, mul, neg, pow, relu, reshape,
    sigmoid, sqrt, sub, sum, tanh, transpose,
)
from .gradcheck import GradcheckError, gradcheck
from . import nn
from . import models
from . import data, optim
from .summary import summary
from .viz import render_dot, to_dot
from .io import load, save

__version__ = "0.1.0"


def zeros(*shape, dtype=None, device="cpu", requires_grad=False):
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    xp = backend.array_module(device)
    return Tensor(xp.zeros(shape, dtype=dtype or "float32"), requires_grad=requires_grad)


def ones(*shape, dtype=None, device="cpu", requires_grad=False):
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    xp = backend.array_module(device)
    return Tensor(xp.ones(shape, dtype=dtype or "float32"), requires_grad=requires_grad)


def randn(*shape, dtype=None, device="cpu", requires_grad=False):
    """Standard normal samples from minidense's seeded generator."""
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    data = backend.generator(device).standard_normal(shape, dtype=dtype or "float32")
    return Tensor(data, requires_grad=requires_grad)

"""minidense: a from-scratch reverse-mode autograd engine on NumPy and CuPy.

    import minidense as md
    x = md.tensor([[1.0, 2.0]], requires_grad=True)
    (x * x).sum().backward()
    x.grad  # tensor([[2., 4.]])
"""
import os as _os
import sys as _sys

# OpenBLAS's threads spin on their cores for up to about 0.1 s after each matrix product,
# taking the cores that minidense's own threads (threads.py) need for the element-wise
# passes in between.  The shortest spin is asked for here, before NumPy loads OpenBLAS
# (later it has no effect), unless the user has chosen a value.
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from . import backend
from .autograd import Function, Tensor, as_tensor, enable_grad, is_grad_enabled, no_grad, tensor
from .backend import cuda_available, manual_seed
from .fast_paths import plain_ops
from .functions.array import as_tuple as _as_tuple
from .functions import (
    CONV_ALGORITHMS, add, avg_pool2d, batch_norm, batch_norm_relu, concat, conv2d, conv_algorithm,
    cross_entropy, div, dropout, exp, flatten, global_avg_pool2d, hardtanh, linear, log, matmul, max, max_pool2d, mean, mul, neg, pow, relu, relu6, reshape,
    sigmoid, sqrt, sub, sum, tanh, transpose,
)
from .gradcheck import GradcheckError, gradcheck
from .recompute import checkpoint, recompute
from . import nn
from . import models
from . import data, optim
from .summary import summary
from .viz import render_dot, to_dot
from .io import load, save
from .profiling import Profiler, profiler
from . import workspace
from .threads import get_num_threads, set_num_threads

__version__ = "0.1.0"


def zeros(*shape, dtype=None, device="cpu", requires_grad=False):
    """A tensor of zeros; ``md.zeros(2, 3)`` or ``md.zeros((2, 3))``; float32 by default."""
    return _filled(0, shape, dtype, device, requires_grad)


def ones(*shape, dtype=None, device="cpu", requires_grad=False):
    """A tensor of ones; ``md.ones(2, 3)`` or ``md.ones((2, 3))``; float32 by default."""
    return _filled(1, shape, dtype, device, requires_grad)


def _filled(value, shape, dtype, device, requires_grad):
    xp = backend.array_module(device)
    return Tensor(xp.full(_as_tuple(shape), value, dtype=dtype or "float32"), requires_grad=requires_grad)


def randn(*shape, dtype=None, device="cpu", requires_grad=False):
    """Standard normal samples from minidense's seeded generator."""
    data = backend.generator(device).standard_normal(_as_tuple(shape), dtype=dtype or "float32")
    return Tensor(data, requires_grad=requires_grad)

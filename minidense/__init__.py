"""minidense: a from-scratch reverse-mode autograd engine on NumPy and CuPy.

    import minidense as md
    x = md.tensor([[1.0, 2.0]], requires_grad=True)
    (x * x).sum().backward()
    x.grad  # tensor([[2., 4.]])
"""
from . import backend
from . import autograd
from .autograd import Function, Tensor, enable_grad, grad, is_grad_enabled, no_grad, once_differentiable
from .backend import cuda_available, manual_seed
from .fast_paths import plain_ops
from .functions import (
    CONV_ALGORITHMS, abs, add, amax, amin, argmax, argmin, avg_pool2d, batch_norm, batch_norm_relu,
    cat, chunk, clamp, clip, clone, concat, concatenate, conv2d, conv_algorithm, cross_entropy, div,
    dropout, exp, flatten, global_avg_pool2d, hardtanh, linear, log, log_softmax, matmul, max, max_pool2d,
    mean, min, mul, neg, norm, permute, pow, relu, relu6, reshape, sigmoid, softmax, split, sqrt, squeeze,
    stack, sub, sum, tanh, transpose, unflatten, unsqueeze,
)
from .creation import (arange, as_tensor, double, empty, float16, float32, float64, from_numpy, full,
                       half, int32, int64, long, ones, ones_like, rand, randint, randn, tensor,
                       uint8, zeros, zeros_like)
from . import cuda
from .gradcheck import GradcheckError, gradcheck, gradgradcheck

# As in PyTorch, the checks are also md.autograd.gradcheck and md.autograd.gradgradcheck
# (set here: autograd itself imports nothing but the backend).
autograd.gradcheck, autograd.gradgradcheck = gradcheck, gradgradcheck
from .recompute import checkpoint, recompute
from . import nn
from . import models
from . import data, optim
from .summary import summary
from .viz import render_dot, to_dot
from .io import load, save
from . import files
from .profiling import Profiler, profiler
from . import workspace
from .process import tune_process
from .threads import get_num_threads, set_num_threads
from . import onnx   # md.onnx.export; the onnx package itself is imported on first use
from ._version import __version__

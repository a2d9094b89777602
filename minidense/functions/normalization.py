"""Batch normalisation (Ioffe and Szegedy, 2015).

The plain algorithm is the op's own code (``BatchNorm``): Algorithm 1 of the paper
and its gradient, generic over NumPy and CuPy.  Two fast paths compute the same:

* on NumPy, cache-sized pieces on the thread pool (``cpu_pieces.py``);
* on CuPy, fused kernels (the end of this file).

``md.plain_ops()`` turns both off.  ``minidense.testing.batch_norm_reference`` is the
independent reference every path is tested against.
"""
from __future__ import annotations

from .. import backend
from ..autograd import Function, Tensor
from ..fast_paths import fast_paths_enabled
from ..recompute import is_recomputing
from . import cpu_pieces
from ._utils import expect_one_dtype
from .math import Step


class BatchNorm(Function):
    """Normalise each channel (axis 1) over the batch and spatial axes, then scale
    and shift (Algorithm 1 of the paper), m values per channel:

        mean = sum(x) / m,   var = sum((x - mean)^2) / m
        x_hat = (x - mean) / sqrt(var + eps)
        y = gamma * x_hat + beta

    Training mode uses the batch's statistics (biased variance) and updates the
    running statistics in place, as PyTorch does (running_var gets the unbiased
    variance).  Eval mode uses the running statistics.  The gradient (the paper's
    Section 3), with the sums over the same m values:

        gbeta = sum(gy),   ggamma = sum(gy * x_hat)
        gx = gamma / sqrt(var + eps) * (gy - gbeta / m - x_hat * ggamma / m)

    where the last two terms are the gradient through the batch's mean and variance;
    in eval mode the statistics are constants and gx = gamma / sqrt(var + eps) * gy.

    Keeps: x, the mean and 1/sqrt(var + eps) per channel, gamma (and beta when a ReLU
    follows); backward recomputes x_hat, which costs one pass and keeps no new array
    (in a DenseNet, x is a view of the block's storage).

    ``values_per_channel``, ``sum_over_batch`` and ``statistics_gradient_sums`` are where
    the batch's values are counted and summed; ``minidense.distributed.
    SyncBatchNormFunction`` overrides them to sum over every process's batch.
    """

    relu = False  # BatchNormReLU: relu(batch_norm(x)) in the same op

    def __init__(self, running_mean=None, running_var=None, training=True, momentum=0.1, eps=1e-5):
        self.running_mean, self.running_var = running_mean, running_var
        self.training, self.momentum, self.eps = training, momentum, eps

    def forward(self, x, gamma, beta):
        _check(x, gamma, beta)
        xp = backend.get_array_module(x)
        self.path = _path(x)
        if self.training:
            if x.size // x.shape[1] < 2:
                raise ValueError(f"batch_norm: training needs more than one value per channel, "
                                 f"got input of shape {tuple(x.shape)}")
            mean, var = self.batch_statistics(x)
            self.update_running_statistics(mean, var, self.values_per_channel(x))
        else:
            if self.running_mean is None or self.running_var is None:
                raise ValueError("batch_norm: eval mode (training=False) needs running_mean and running_var")
            mean, var = self.running_mean, self.running_var
        mean = mean.astype(x.dtype, copy=False)
        inv_std = (1.0 / xp.sqrt(var + self.eps)).astype(x.dtype, copy=False)
        self.save_for_backward(x, mean, inv_std, gamma, *([beta] if self.relu else []))
        if self.path == "cpu_pieces":
            return cpu_pieces.batch_norm_forward(x, mean, inv_std, gamma, beta, self.relu)
        if self.path == "cuda_fused":
            return _fused_forward(x, mean, inv_std, gamma, beta, self.relu)
        # The plain algorithm.
        mean, inv_std, gamma, beta = (_per_channel(a, x) for a in (mean, inv_std, gamma, beta))
        x_hat = (x - mean) * inv_std
        y = gamma * x_hat + beta
        return xp.maximum(y, 0) if self.relu else y

    def batch_statistics(self, x):
        """The batch's mean and biased variance per channel (two passes: the mean, then
        the squared deviations about it)."""
        if self.path == "cpu_pieces":
            return cpu_pieces.batch_statistics(self, x)
        count = self.values_per_channel(x)
        mean = self.sum_over_batch(_channel_sum(x)) / count
        if self.path == "cuda_fused":
            squares = _reduce("channel_squared_deviation", x, mean)
        else:
            squares = _channel_sum((x - _per_channel(mean, x)) ** 2)
        return mean, self.sum_over_batch(squares) / count

    def update_running_statistics(self, mean, var, count):
        """running = (1 - momentum) * running + momentum * batch, in place; the variance
        unbiased (m / (m - 1)), as PyTorch."""
        if is_recomputing():   # md.recompute runs this forward again in backward: update once
            return
        m = self.momentum
        if self.running_mean is not None:
            self.running_mean *= 1 - m
            self.running_mean += m * mean
        if self.running_var is not None:
            self.running_var *= 1 - m
            self.running_var += m * var * (count / (count - 1))

    def backward(self, gy):
        x, mean, inv_std, gamma, *beta = self.saved
        beta = beta[0] if self.relu else None
        count = self.values_per_channel(x) if self.training else None
        if self.path == "cpu_pieces":
            return cpu_pieces.batch_norm_backward(self, gy, x, mean, inv_std, gamma, beta,
                                                  self.relu, count)
        if self.path == "cuda_fused":
            return _fused_backward(self, gy, x, mean, inv_std, gamma, beta, count)
        # The plain algorithm.
        x_hat = (x - _per_channel(mean, x)) * _per_channel(inv_std, x)
        if self.relu:   # the ReLU's gradient first: gy where the output was positive
            gy = gy * (_per_channel(gamma, x) * x_hat + _per_channel(beta, x) > 0)
        gbeta = _channel_sum(gy)
        ggamma = _channel_sum(gy * x_hat)
        scale = _per_channel(gamma * inv_std, x)
        if not self.training:
            return scale * gy, ggamma, gbeta
        sum_gy, sum_gy_x_hat = self.statistics_gradient_sums(gbeta, ggamma)
        gx = scale * (gy - _per_channel(sum_gy / count, x) - x_hat * _per_channel(sum_gy_x_hat / count, x))
        return gx, ggamma, gbeta

    differentiable = True

    def differentiable_backward(self, gy):
        """The plain algorithm's gradient with ops on Tensors (create_graph=True).  In
        training mode the mean and the variance are recomputed from x with ops: they are
        functions of x, which a second derivative must see (the saved mean and 1/std
        would be constants to it)."""
        x, mean, inv_std, gamma, *beta = self.saved_tensors()
        axes = (0,) + tuple(range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if self.training:
            centred = x - x.mean(axis=axes, keepdims=True)
            inv_std = ((centred * centred).mean(axis=axes, keepdims=True) + self.eps) ** -0.5
        else:   # the running statistics: constants
            centred, inv_std = x - mean.reshape(shape), inv_std.reshape(shape)
        x_hat = centred * inv_std
        gamma = gamma.reshape(shape)
        if self.relu:   # the ReLU's mask (its derivative is zero)
            gy = gy * Step()(gamma * x_hat + beta[0].reshape(shape))
        gbeta, ggamma = gy.sum(axis=axes), (gy * x_hat).sum(axis=axes)
        if not self.training:
            return gamma * inv_std * gy, ggamma, gbeta
        m = self.values_per_channel(x.data)
        gx = gamma * inv_std * (gy - gbeta.reshape(shape) / m - x_hat * ggamma.reshape(shape) / m)
        return gx, ggamma, gbeta

    # -- the hooks of SyncBatchNorm ---------------------------------------------------
    def values_per_channel(self, x):
        """How many values each channel's batch statistics are taken over (m)."""
        return x.size // x.shape[1]

    def sum_over_batch(self, sums):
        """Per-channel sums over this process's batch, as sums over the whole batch."""
        return sums

    def statistics_gradient_sums(self, gbeta, ggamma):
        """The sums over the batch of gy and of gy * x_hat that the gradient through the
        batch statistics needs (here the parameter gradients themselves)."""
        return gbeta, ggamma


class BatchNormReLU(BatchNorm):
    """relu(batch_norm(x)) as one op: the same algorithm, the ReLU applied to y, and its
    mask recomputed in backward from x by the forward's own operations.  Keeps: what
    BatchNorm keeps, and beta; no ReLU output (``nn.BatchNormReLU2d``)."""

    relu = True


def batch_norm(input, weight, bias, running_mean=None, running_var=None, training=True,
               momentum=0.1, eps=1e-5):
    """Batch normalisation over axis 1.  ``running_mean``/``running_var`` (Tensors or
    arrays) are updated in place in training mode and used in eval mode."""
    rm = running_mean.data if isinstance(running_mean, Tensor) else running_mean
    rv = running_var.data if isinstance(running_var, Tensor) else running_var
    return BatchNorm(rm, rv, training, momentum, eps)(input, weight, bias)


def batch_norm_relu(input, weight, bias, running_mean=None, running_var=None, training=True,
                    momentum=0.1, eps=1e-5):
    """``relu(batch_norm(x, ...))`` as one op (the pre-activation of DenseNet's layers):
    the same arguments as ``batch_norm``; on the fast paths one pass fewer each way."""
    rm = running_mean.data if isinstance(running_mean, Tensor) else running_mean
    rv = running_var.data if isinstance(running_var, Tensor) else running_var
    return BatchNormReLU(rm, rv, training, momentum, eps)(input, weight, bias)


# ---------------------------------------------------------------------------
# Helpers of the plain algorithm
# ---------------------------------------------------------------------------
def _check(x, gamma, beta):
    expect_one_dtype("batch_norm", input=x, gamma=gamma, beta=beta)
    if x.ndim < 2:
        raise ValueError(f"batch_norm: input must have a channel axis (N, C, ...), "
                         f"got shape {tuple(x.shape)}")
    c = x.shape[1]
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p.shape != (c,):
            raise ValueError(f"batch_norm: {name} must have shape ({c},) for input of shape "
                             f"{tuple(x.shape)}, got {tuple(p.shape)}")


def _path(x) -> str:
    """Which algorithm runs, chosen per backend here: "cpu_pieces" on NumPy batches,
    "cuda_fused" on CuPy, "plain" under ``md.plain_ops()`` (and for anything else)."""
    if not fast_paths_enabled():
        return "plain"
    if cpu_pieces.applies_to(x):
        return "cpu_pieces"
    return "cuda_fused" if backend.device_of(x) == "cuda" else "plain"


def _per_channel(values, like):
    """Per-channel ``values`` (C,) shaped (1, C, 1, ...) to broadcast against ``like``."""
    return values.reshape((1, -1) + (1,) * (like.ndim - 2))


def _channel_sum(x):
    """Sum over every axis but 1 (channels).  On CuPy, as matrix-vector products with
    ones: faster than a sum over the strided axes (0, 2, 3)."""
    if backend.device_of(x) == "cuda":
        xp = backend.get_array_module(x)
        n, c = x.shape[:2]
        rows = x.reshape(n * c, -1)
        return (rows @ xp.ones(rows.shape[1], dtype=x.dtype)).reshape(n, c).sum(axis=0)
    return x.sum(axis=(0,) + tuple(range(2, x.ndim)))


# ---------------------------------------------------------------------------
# The fast path on CuPy: fused kernels.  Per-channel reductions over axes (0, 2) of
# (N, C, L) views, and one element-wise pass each way with per-channel (1, C, 1)
# arrays broadcast.  x - mean is recomputed inside each kernel, and the ReLU's mask
# from it, gamma and beta, with the forward's own expression, as on the CPU path.
# ---------------------------------------------------------------------------
_BN_FORWARD_BODY = """
    T v = (x - mean) * scale + beta;
    y = (RELU && !(v > (T)0)) ? (T)0 : v;
"""

_BN_BACKWARD_BODY = """
    T centred = x - mean;
    T r = (RELU && !(centred * scale + beta > (T)0)) ? (T)0 : gy;
    gx = ((r - mean_gy) + centred * k_centred) * scale;
"""

_RELU_MASKED = "((x - mean) * scale + beta > (T)0 ? gy : (T)0)"

_DECLARED = dict(where=__name__, reduce_axes=(0, 2))
backend.register_cuda_kernel("channel_squared_deviation", "reduction", "T x, T mean", "T y",
                             ("(x - mean) * (x - mean)", "a + b", "y = a", "0"), **_DECLARED)
backend.register_cuda_kernel("channel_centred_dot", "reduction", "T gy, T x, T mean", "T y",
                             ("gy * (x - mean)", "a + b", "y = a", "0"), **_DECLARED)
backend.register_cuda_kernel("relu_masked_sum", "reduction", "T gy, T x, T mean, T scale, T beta",
                             "T y", (_RELU_MASKED, "a + b", "y = a", "0"), **_DECLARED)
backend.register_cuda_kernel("relu_masked_centred_dot", "reduction",
                             "T gy, T x, T mean, T scale, T beta", "T y",
                             (_RELU_MASKED + " * (x - mean)", "a + b", "y = a", "0"), **_DECLARED)
backend.register_cuda_kernel("bn_forward", "elementwise", "T x, T mean, T scale, T beta, bool RELU",
                             "T y", _BN_FORWARD_BODY, scalars=("RELU",), where=__name__)
backend.register_cuda_kernel("bn_backward", "elementwise",
                             "T gy, T x, T mean, T scale, T beta, T mean_gy, T k_centred, bool RELU",
                             "T gx", _BN_BACKWARD_BODY, scalars=("RELU",), where=__name__)


def _fused_forward(x, mean, inv_std, gamma, beta, relu):
    y = backend.get_array_module(x).empty_like(x)
    backend.cuda_kernel("bn_forward")(*_channels_view(x, mean, gamma * inv_std, beta), relu, y)
    return y


def _fused_backward(op, gy, x, mean, inv_std, gamma, beta, count):
    xp = backend.get_array_module(gy)
    scale = gamma * inv_std
    if op.relu:
        masked = (gy, x, mean, scale, beta)
        gbeta = _reduce("relu_masked_sum", *masked)
        ggamma = _reduce("relu_masked_centred_dot", *masked) * inv_std
    else:
        beta = xp.zeros_like(gamma)   # unread, but of the declared type
        gbeta = _channel_sum(gy)
        ggamma = _reduce("channel_centred_dot", gy, x, mean) * inv_std
    if op.training:
        sum_gy, sum_gy_x_hat = op.statistics_gradient_sums(gbeta, ggamma)
        mean_gy, k_centred = sum_gy / count, -sum_gy_x_hat / count * inv_std
    else:
        mean_gy, k_centred = xp.zeros_like(gbeta), xp.zeros_like(ggamma)
    gx = xp.empty_like(gy)
    backend.cuda_kernel("bn_backward")(gy, *_channels_view(x, mean, scale, beta),
                                       mean_gy.reshape(_bshape(x)), k_centred.reshape(_bshape(x)),
                                       op.relu, gx)
    return gx, ggamma, gbeta


def _bshape(x):
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _channels_view(x, *per_channel):
    """x, then per-channel arrays shaped to broadcast against it."""
    return (x,) + tuple(a.reshape(_bshape(x)) for a in per_channel)


def _reduce(name, *arrays):
    """A per-channel reduction kernel over every axis but 1, on (N, C, L) views
    (per-channel arrays as (1, C, 1), broadcast)."""
    n, c = arrays[0].shape[:2]
    views = [a.reshape(n, c, -1) if a.size == arrays[0].size else a.reshape(1, c, 1)
             for a in arrays]
    return backend.cuda_kernel(name)(*views, axis=(0, 2))

"""Batch normalisation (Ioffe and Szegedy, 2015)."""
from __future__ import annotations

import numpy as np

from .. import backend
from ..autograd import Function, Tensor
from ..recompute import is_recomputing


class BatchNorm(Function):
    """Normalise each channel (axis 1) over the batch and spatial axes, then scale
    and shift: y = gamma * (x - mean) / sqrt(var + eps) + beta.

    Training mode uses the batch's statistics (biased variance) and updates the
    running statistics in place, as PyTorch does (running_var gets the unbiased
    variance).  Eval mode uses the running statistics.
    Keeps: the normalised input x_hat, 1/sqrt(var + eps) per channel, and gamma.

    Chosen per backend: on NumPy, NumPy expressions and BLAS sums; on CuPy, fused
    kernels (backend's "bn_forward", "bn_backward" and per-channel reductions): the
    mean, then the variance in one reduction pass, then one pass writing x_hat and y;
    backward, two reductions and one pass.

    ``batch_statistics`` and ``statistics_gradient_sums`` are the two places where the
    batch's values are summed; ``minidense.distributed.SyncBatchNormFunction`` overrides
    them to sum over every process's batch.
    """

    relu = False  # BatchNormReLU: relu(batch_norm(x)) in the same passes

    def __init__(self, running_mean=None, running_var=None, training=True, momentum=0.1, eps=1e-5):
        self.running_mean, self.running_var = running_mean, running_var
        self.training, self.momentum, self.eps = training, momentum, eps

    def forward(self, x, gamma, beta):
        if x.ndim < 2:
            raise ValueError(f"batch_norm: input must have a channel axis (N, C, ...), "
                             f"got shape {tuple(x.shape)}")
        c = x.shape[1]
        for name, p in (("gamma", gamma), ("beta", beta)):
            if p.shape != (c,):
                raise ValueError(f"batch_norm: {name} must have shape ({c},) for input of shape "
                                 f"{tuple(x.shape)}, got {tuple(p.shape)}")
        xp = backend.get_array_module(x)
        fused = backend.device_of(x) == "cuda"
        bshape = (1, c) + (1,) * (x.ndim - 2)
        count = x.size // c
        centred = None
        if self.training:
            if count < 2:
                raise ValueError(f"batch_norm: training needs more than one value per channel, "
                                 f"got input of shape {tuple(x.shape)}")
            mean, centred, var, count = self.batch_statistics(x, bshape, fused)
            self.count = count
            # md.recompute runs this forward a second time in backward: update once.
            update = not is_recomputing()
            if update and self.running_mean is not None:
                m = self.momentum
                self.running_mean *= 1 - m
                self.running_mean += m * mean
            if update and self.running_var is not None:
                self.running_var *= 1 - self.momentum
                self.running_var += self.momentum * var * (count / (count - 1))
        else:
            if self.running_mean is None or self.running_var is None:
                raise ValueError("batch_norm: eval mode (training=False) needs running_mean and running_var")
            mean, var = self.running_mean, self.running_var
            if not fused:
                centred = x - mean.reshape(bshape).astype(x.dtype, copy=False)
        inv_std = (1.0 / xp.sqrt(var + self.eps)).astype(x.dtype, copy=False)
        self.bshape = bshape
        if fused:
            x_hat, y = xp.empty_like(x), xp.empty_like(x)
            backend.cuda_kernel("bn_forward")(
                x, mean.astype(x.dtype, copy=False).reshape(bshape), inv_std.reshape(bshape),
                gamma.reshape(bshape), beta.reshape(bshape), self.relu, x_hat, y)
        else:
            x_hat = centred                      # a fresh array: normalised in place
            y = xp.empty(x_hat.shape, dtype=np.result_type(x_hat, gamma, beta))
            inv_std_b = inv_std.reshape(bshape)
            gamma_b, beta_b = gamma.reshape(bshape), beta.reshape(bshape)
            # Image by image (a few at a time): x_hat, y and the ReLU while the piece is
            # in cache, one pass over memory instead of four.
            for part in _pieces(x_hat):
                x_hat[part] *= inv_std_b
                y_part = y[part]
                xp.multiply(x_hat[part], gamma_b, out=y_part)
                y_part += beta_b
                if self.relu:
                    xp.maximum(y_part, 0, out=y_part)
        self.save_for_backward(x_hat, inv_std, gamma, *((beta,) if self.relu else ()))
        return y

    def backward(self, gy):
        x_hat, inv_std, gamma, *rest = self.saved
        bshape = self.bshape
        scale = (gamma * inv_std).reshape(bshape)
        count = self.count if self.training else gy.size // gy.shape[1]
        if backend.device_of(gy) == "cuda":
            beta = rest[0] if self.relu else _zeros_like(gamma)
            per_channel = (gamma.reshape(bshape), beta.reshape(bshape))
            if self.relu:
                gbeta = _reduce("relu_masked_sum", gy, x_hat, *per_channel)
                ggamma = _reduce("relu_masked_dot", gy, x_hat, *per_channel)
            else:
                gbeta, ggamma = _channel_sum(gy), _channel_dot(gy, x_hat)
            if self.training:
                sum_gy, sum_gy_x_hat = self.statistics_gradient_sums(gbeta, ggamma)
                mean_gy, neg_mean_gxh = sum_gy / count, -sum_gy_x_hat / count
            else:
                mean_gy, neg_mean_gxh = _zeros_like(gbeta), _zeros_like(ggamma)
            gx = backend.get_array_module(gy).empty_like(gy)
            backend.cuda_kernel("bn_backward")(
                gy, x_hat, *per_channel, scale, mean_gy.reshape(bshape), neg_mean_gxh.reshape(bshape),
                self.relu, gx)
            return gx, ggamma, gbeta
        # Piece by piece (a few images at a time, in cache): the ReLU's mask, recomputed
        # from the forward's own expression, then the two per-channel sums, added up in
        # piece order; and below, gx in one pass.
        gx = np.empty(gy.shape, dtype=np.result_type(gy, x_hat, scale))   # first: the masked gy
        gbeta = ggamma = 0
        for part in _pieces(gy):
            g = gy[part]
            if self.relu:
                g = np.multiply(g, x_hat[part] * gamma.reshape(bshape) + rest[0].reshape(bshape) > 0,
                                out=gx[part])
            gbeta = gbeta + _channel_sum(g)
            ggamma = ggamma + _channel_dot(g, x_hat[part])
        if self.relu:
            gy = gx
        if self.training:
            # d/dx of the batch statistics: remove the mean and the x_hat component,
            # gx = scale * (gy - gbeta/count - x_hat * ggamma/count).
            sum_gy, sum_gy_x_hat = self.statistics_gradient_sums(gbeta, ggamma)
            k_x_hat = (-sum_gy_x_hat / count).reshape(bshape)
            k_gy = (sum_gy / count).reshape(bshape)
            for part in _pieces(gy):
                out = gx[part]
                g = gy[part] - k_gy if not self.relu else np.subtract(gy[part], k_gy, out=out)
                np.add(np.multiply(x_hat[part], k_x_hat), g, out=out)
                out *= scale
        else:
            np.multiply(gy, scale, out=gx)
        return gx, ggamma, gbeta

    def batch_statistics(self, x, bshape, fused):
        """(mean, x - mean, biased variance, values per channel) over every axis but 1.
        ``fused`` (CuPy): the squared deviations are summed in one reduction kernel, and
        no centred array is made (None in its place)."""
        count = x.size // x.shape[1]
        mean = _channel_sum(x) / count
        if fused:
            return mean, None, _reduce("channel_squared_deviation", x, mean.reshape(bshape)) / count, count
        centred = x - mean.reshape(bshape)
        return mean, centred, _channel_dot(centred, centred) / count, count

    def statistics_gradient_sums(self, gbeta, ggamma):
        """The sums over the batch of gy and of gy * x_hat that the gradient through the
        batch statistics needs (here the parameter gradients themselves)."""
        return gbeta, ggamma


class BatchNormReLU(BatchNorm):
    """relu(batch_norm(x)) as one op: the same passes as BatchNorm, the ReLU applied in
    the forward pass and its mask recomputed in backward from x_hat, gamma and beta.
    Keeps: what BatchNorm keeps, and beta; no ReLU output."""

    relu = True


PIECE_BYTES = 1 << 19   # pieces of the batch that the passes of batch norm share in cache


def _pieces(x):
    """Slices of axis 0 (the batch) of about PIECE_BYTES each; they depend on the shape
    alone, so the sums over pieces are the same from run to run."""
    per_image = max(x[:1].nbytes, 1)
    step = max(1, PIECE_BYTES // per_image)
    return [slice(start, start + step) for start in range(0, x.shape[0], step)]


def _zeros_like(a):
    return backend.get_array_module(a).zeros_like(a)


def _reduce(name, *arrays):
    """A per-channel CuPy reduction kernel over every axis but 1, on (N, C, L) views
    (per-channel arrays as (1, C, 1), broadcast)."""
    n, c = arrays[0].shape[:2]
    views = [a.reshape(n, c, -1) if a.size == arrays[0].size else a.reshape(1, c, 1)
             for a in arrays]
    return backend.cuda_kernel(name)(*views, axis=(0, 2))


def _channel_sum(x):
    """Sum over every axis but 1 (channels), as matrix-vector products with ones:
    BLAS sums faster than ndarray.sum over the strided axes (0, 2, 3)."""
    xp = backend.get_array_module(x)
    n, c = x.shape[:2]
    rows = x.reshape(n * c, -1)
    return (rows @ xp.ones(rows.shape[1], dtype=x.dtype)).reshape(n, c).sum(axis=0)


def _channel_dot(a, b):
    """Per channel, the sum of a*b over every axis but 1, with no temporary array:
    einsum on NumPy; on CuPy, whose einsum copies both operands, a reduction kernel
    (chosen per backend here)."""
    if backend.device_of(a) == "cuda":
        return _reduce("channel_dot", a, b)
    n, c = a.shape[:2]
    return np.einsum("ncl,ncl->c", a.reshape(n, c, -1), b.reshape(n, c, -1))


def batch_norm(x, gamma, beta, running_mean=None, running_var=None, training=True,
               momentum=0.1, eps=1e-5):
    """Batch normalisation over axis 1.  ``running_mean``/``running_var`` (Tensors or
    arrays) are updated in place in training mode and used in eval mode."""
    rm = running_mean.data if isinstance(running_mean, Tensor) else running_mean
    rv = running_var.data if isinstance(running_var, Tensor) else running_var
    return BatchNorm(rm, rv, training, momentum, eps)(x, gamma, beta)


def batch_norm_relu(x, gamma, beta, running_mean=None, running_var=None, training=True,
                    momentum=0.1, eps=1e-5):
    """``relu(batch_norm(x, ...))`` as one op (the pre-activation of DenseNet's layers):
    the same arguments as ``batch_norm``; less memory (no ReLU output is kept) and, on
    the GPU, one fused kernel per pass."""
    rm = running_mean.data if isinstance(running_mean, Tensor) else running_mean
    rv = running_var.data if isinstance(running_var, Tensor) else running_var
    return BatchNormReLU(rm, rv, training, momentum, eps)(x, gamma, beta)

"""Batch normalisation (Ioffe and Szegedy, 2015)."""
from __future__ import annotations

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
    """

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
        bshape = (1, c) + (1,) * (x.ndim - 2)
        count = x.size // c
        if self.training:
            if count < 2:
                raise ValueError(f"batch_norm: training needs more than one value per channel, "
                                 f"got input of shape {tuple(x.shape)}")
            mean = _channel_sum(x) / count
            centred = x - mean.reshape(bshape)
            var = _channel_dot(centred, centred) / count
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
            centred = x - mean.reshape(bshape).astype(x.dtype, copy=False)
        inv_std = (1.0 / xp.sqrt(var + self.eps)).astype(x.dtype, copy=False)
        x_hat = centred                      # a fresh array: normalise it in place
        x_hat *= inv_std.reshape(bshape)
        self.bshape = bshape
        self.save_for_backward(x_hat, inv_std, gamma)
        y = x_hat * gamma.reshape(bshape)
        y += beta.reshape(bshape)
        return y

    def backward(self, gy):
        x_hat, inv_std, gamma = self.saved
        bshape = self.bshape
        gbeta = _channel_sum(gy)
        ggamma = _channel_dot(gy, x_hat)
        scale = (gamma * inv_std).reshape(bshape)
        if self.training:
            # d/dx of the batch statistics: remove the mean and the x_hat component,
            # gx = scale * (gy - gbeta/count - x_hat * ggamma/count), in place on one array.
            count = gy.size // gy.shape[1]
            gx = x_hat * (-ggamma / count).reshape(bshape)
            gx += gy
            gx -= (gbeta / count).reshape(bshape)
            gx *= scale
        else:
            gx = gy * scale
        return gx, ggamma, gbeta


def _channel_sum(x):
    """Sum over every axis but 1 (channels), as matrix-vector products with ones:
    BLAS sums faster than ndarray.sum over the strided axes (0, 2, 3)."""
    xp = backend.get_array_module(x)
    n, c = x.shape[:2]
    rows = x.reshape(n * c, -1)
    return (rows @ xp.ones(rows.shape[1], dtype=x.dtype)).reshape(n, c).sum(axis=0)


def _channel_dot(a, b):
    """Per channel, the sum of a*b over every axis but 1, with no temporary array."""
    xp = backend.get_array_module(a)
    n, c = a.shape[:2]
    return xp.einsum("ncl,ncl->c", a.reshape(n, c, -1), b.reshape(n, c, -1))


def batch_norm(x, gamma, beta, running_mean=None, running_var=None, training=True,
               momentum=0.1, eps=1e-5):
    """Batch normalisation over axis 1.  ``running_mean``/``running_var`` (Tensors or
    arrays) are updated in place in training mode and used in eval mode."""
    rm = running_mean.data if isinstance(running_mean, Tensor) else running_mean
    rv = running_var.data if isinstance(running_var, Tensor) else running_var
    return BatchNorm(rm, rv, training, momentum, eps)(x, gamma, beta)

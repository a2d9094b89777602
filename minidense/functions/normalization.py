"""Batch normalisation (Ioffe and Szegedy, 2015)."""
from __future__ import annotations

from .. import backend
from ..autograd import Function, Tensor


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
        self.axes = (0,) + tuple(range(2, x.ndim))
        bshape = (1, c) + (1,) * (x.ndim - 2)
        if self.training:
            count = x.size // c
            if count < 2:
                raise ValueError(f"batch_norm: training needs more than one value per channel, "
                                 f"got input of shape {tuple(x.shape)}")
            mean = x.mean(axis=self.axes)
            centred = x - mean.reshape(bshape)
            var = (centred * centred).mean(axis=self.axes)
            if self.running_mean is not None:
                m = self.momentum
                self.running_mean *= 1 - m
                self.running_mean += m * mean
            if self.running_var is not None:
                self.running_var *= 1 - self.momentum
                self.running_var += self.momentum * var * (count / (count - 1))
        else:
            if self.running_mean is None or self.running_var is None:
                raise ValueError("batch_norm: eval mode (training=False) needs running_mean and running_var")
            mean, var = self.running_mean, self.running_var
            centred = x - mean.reshape(bshape)
        inv_std = (1.0 / xp.sqrt(var + self.eps)).astype(x.dtype, copy=False)
        x_hat = centred * inv_std.reshape(bshape)
        del centred
        self.bshape = bshape
        self.save_for_backward(x_hat, inv_std, gamma)
        return x_hat * gamma.reshape(bshape) + beta.reshape(bshape)

    def backward(self, gy):
        x_hat, inv_std, gamma = self.saved
        bshape = self.bshape
        gbeta = gy.sum(axis=self.axes)
        ggamma = (gy * x_hat).sum(axis=self.axes)
        scale = (gamma * inv_std).reshape(bshape)
        if self.training:
            # d/dx of the batch statistics: remove the mean and the x_hat component.
            count = gy.size // gy.shape[1]
            gx = scale * (gy - (gbeta / count).reshape(bshape) - x_hat * (ggamma / count).reshape(bshape))
        else:
            gx = gy * scale
        return gx, ggamma, gbeta


def batch_norm(x, gamma, beta, running_mean=None, running_var=None, training=True,
               momentum=0.1, eps=1e-5):
    """Batch normalisation over axis 1.  ``running_mean``/``running_var`` (Tensors or
    arrays) are updated in place in training mode and used in eval mode."""
    rm = running_mean.data if isinstance(running_mean, Tensor) else running_mean
    rv = running_var.data if isinstance(running_var, Tensor) else running_var
    return BatchNorm(rm, rv, training, momentum, eps)(x, gamma, beta)

"""Hypothesis strategies for checking ops, yours included, against finite differences.

    from hypothesis import given
    from minidense.testing import conv_cases, tensors_from
    import minidense as md

    @given(conv_cases())
    def test_my_conv(case):
        x, w = tensors_from(case.x, case.w)
        assert md.gradcheck(lambda x, w: my_conv(x, w, case.stride, case.padding), [x, w])

Values are drawn in float64 and kept away from the kinks of piecewise-linear ops
(ReLU at 0, ties inside a max-pool window), where a finite difference straddles two
linear pieces and disagrees with any one-sided derivative.  Needs ``hypothesis``
(``pip install 'minidense[test]'``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:
    from hypothesis import strategies as st
except ImportError as error:  # pragma: no cover - only without the test extra
    raise ImportError("minidense.testing needs hypothesis: pip install 'minidense[test]'") from error

from . import backend
from .autograd import Tensor
from .functions._utils import output_size


def shapes(min_dims=1, max_dims=4, min_side=1, max_side=5):
    """Array shapes with every side in [min_side, max_side]."""
    return st.lists(st.integers(min_side, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


@st.composite
def arrays(draw, shape, low=-2.0, high=2.0, margin=0.0):
    """A float64 array of ``shape`` with values in [low, high]; with ``margin`` > 0, every
    value is at least ``margin`` away from zero (for ReLU and friends)."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    values = rng.uniform(low, high, size=shape)
    if margin > 0:
        values = np.where(values >= 0, values + margin, values - margin)
    return values


@st.composite
def distinct_arrays(draw, shape, spacing=0.05):
    """Values on a shuffled grid of step ``spacing``, each moved by at most spacing/4,
    so any two are at least spacing/2 apart (no ties for max or max-pool to split, and
    finite differences of step eps << spacing/2 never swap a window's maximum)."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape)) if len(shape) else 1
    values = rng.permutation(size) * spacing
    values = values - values.mean() + rng.uniform(-spacing / 4, spacing / 4, size)
    return values.reshape(shape)


def broadcastable_shapes(max_dims=3, max_side=4):
    """Two shapes that broadcast together (some sides 1, some leading axes missing)."""
    @st.composite
    def build(draw):
        full = draw(shapes(1, max_dims, 1, max_side))
        other = []
        for side in full[draw(st.integers(0, len(full) - 1)):]:
            other.append(draw(st.sampled_from([side, 1])))
        return full, tuple(other)
    return build()


def conv2d_loops(x, w, b=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """conv2d by its definition, the reference every algorithm is tested against:
    ``y[n, o, i, j] = b[o] + sum over c, ky, kx of w[o, c, ky, kx] *
    x[n, g*C/G + c, i*sy + ky*dy - ph, j*sx + kx*dx - pw]`` (x read as zero outside the
    image), where output channel o belongs to group g = o // (O/G) and reads only that
    group's C/G input channels; (dy, dx) is the dilation, the spacing of the taps.
    Plain loops over groups, output pixels and taps; it shares no code with the ops."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sy, sx), (ph, pw), (dy, dx) = stride, padding, dilation
    og = o // groups
    oh = (h + 2 * ph - dy * (kh - 1) - 1) // sy + 1
    ow = (wd + 2 * pw - dx * (kw - 1) - 1) // sx + 1
    y = np.zeros((n, o, oh, ow), dtype=np.result_type(x, w))
    for g in range(groups):
        ins, outs = slice(g * cg, (g + 1) * cg), slice(g * og, (g + 1) * og)
        for i in range(oh):
            for j in range(ow):
                for ky in range(kh):
                    for kx in range(kw):
                        row, col = i * sy + ky * dy - ph, j * sx + kx * dx - pw
                        if 0 <= row < h and 0 <= col < wd:   # else: a zero of the padding
                            y[:, outs, i, j] += x[:, ins, row, col] @ w[outs, :, ky, kx].T
    if b is not None:
        y += b.reshape(1, o, 1, 1)
    return y


def conv2d_loops_backward(x, w, gy, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """(dx, dw) of ``conv2d_loops`` for the output gradient ``gy``, by the same loops:
    every product ``w[o, c, ky, kx] * x[n, c, row, col]`` sends ``gy[n, o, i, j]`` times
    the other factor to each factor's gradient."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sy, sx), (ph, pw), (dy, dx) = stride, padding, dilation
    og = o // groups
    gx, gw = np.zeros_like(x), np.zeros_like(w)
    for g in range(groups):
        ins, outs = slice(g * cg, (g + 1) * cg), slice(g * og, (g + 1) * og)
        for i in range(gy.shape[2]):
            for j in range(gy.shape[3]):
                for ky in range(kh):
                    for kx in range(kw):
                        row, col = i * sy + ky * dy - ph, j * sx + kx * dx - pw
                        if 0 <= row < h and 0 <= col < wd:
                            gx[:, ins, row, col] += gy[:, outs, i, j] @ w[outs, :, ky, kx]
                            gw[outs, :, ky, kx] += gy[:, outs, i, j].T @ x[:, ins, row, col]
    return gx, gw


@dataclass
class BatchNormReference:
    """What ``batch_norm_reference`` computes: the output, the running statistics after
    the step, and (given an output gradient) the three gradients."""
    y: np.ndarray
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    gx: np.ndarray | None = None
    ggamma: np.ndarray | None = None
    gbeta: np.ndarray | None = None


def batch_norm_reference(x, gamma, beta, running_mean=None, running_var=None, training=True,
                         momentum=0.1, eps=1e-5, gy=None, relu=False):
    """Batch norm over axis 1 by Ioffe and Szegedy's equations, in plain NumPy: the
    reference the op and its fast paths are tested against.  It shares no code with the
    op.  Forward (Algorithm 1), over the m values of each channel:

        mu = 1/m sum x_i,  var = 1/m sum (x_i - mu)^2,  x_hat_i = (x_i - mu) / sqrt(var + eps)
        y_i = gamma x_hat_i + beta                      (then max(y, 0) with ``relu``)

    Backward (the chain rule as Section 3 of the paper writes it out):

        dx_hat_i = dy_i gamma
        dvar = sum dx_hat_i (x_i - mu) (-1/2) (var + eps)^(-3/2)
        dmu = sum dx_hat_i (-1 / sqrt(var + eps)) + dvar (1/m) sum -2 (x_i - mu)
        dx_i = dx_hat_i / sqrt(var + eps) + dvar 2 (x_i - mu) / m + dmu / m
        dgamma = sum dy_i x_hat_i,   dbeta = sum dy_i

    In eval mode mu and var are the running statistics, constants: dx_i = dx_hat_i /
    sqrt(var + eps).  Training updates copies of the running statistics as PyTorch
    does: (1 - momentum) * running + momentum * batch, the variance unbiased."""
    x = np.asarray(x)
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    m = x.size // x.shape[1]
    rm = None if running_mean is None else np.array(running_mean, dtype=np.float64)
    rv = None if running_var is None else np.array(running_var, dtype=np.float64)
    if training:
        mu = x.mean(axis=axes)
        var = ((x - mu.reshape(shape)) ** 2).mean(axis=axes)
        if rm is not None:
            rm = (1 - momentum) * rm + momentum * mu
        if rv is not None:
            rv = (1 - momentum) * rv + momentum * var * m / (m - 1)
    else:
        mu, var = np.asarray(running_mean), np.asarray(running_var)
    mu, var = mu.reshape(shape), var.reshape(shape)
    g, b = np.asarray(gamma).reshape(shape), np.asarray(beta).reshape(shape)
    x_hat = (x - mu) / np.sqrt(var + eps)
    y = g * x_hat + b
    out = BatchNormReference(np.maximum(y, 0) if relu else y, rm, rv)
    if gy is None:
        return out
    dy = np.where(y > 0, gy, 0) if relu else np.asarray(gy)
    dx_hat = dy * g
    if training:
        dvar = (dx_hat * (x - mu) * -0.5 * (var + eps) ** -1.5).sum(axis=axes, keepdims=True)
        dmu = ((dx_hat * -1 / np.sqrt(var + eps)).sum(axis=axes, keepdims=True)
               + dvar * (-2 * (x - mu)).sum(axis=axes, keepdims=True) / m)
        out.gx = dx_hat / np.sqrt(var + eps) + dvar * 2 * (x - mu) / m + dmu / m
    else:
        out.gx = dx_hat / np.sqrt(var + eps)
    out.ggamma, out.gbeta = (dy * x_hat).sum(axis=axes), dy.sum(axis=axes)
    return out


@st.composite
def batch_norm_cases(draw, max_batch=4, max_channels=4, max_side=5):
    """(x, gamma, beta, running_mean, running_var, gy) for a batch norm: NCHW or NC
    inputs with at least two values per channel, gamma of either sign."""
    spatial = draw(st.sampled_from([(), (1, 1), None]))
    if spatial is None:
        spatial = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    c = draw(st.integers(1, max_channels))
    n = draw(st.integers(2 if int(np.prod(spatial)) == 1 else 1, max_batch))   # m >= 2
    shape = (n, c) + spatial
    return (draw(arrays(shape, -3, 3)), draw(arrays((c,), -2, 2)), draw(arrays((c,), -1, 1)),
            draw(arrays((c,), -1, 1)), draw(arrays((c,), 0.5, 2)), draw(arrays(shape)))


@dataclass
class ConvCase:
    x: np.ndarray
    w: np.ndarray
    b: np.ndarray | None
    stride: tuple
    padding: tuple
    dilation: tuple = (1, 1)
    groups: int = 1

    @property
    def options(self) -> dict:
        """stride, padding, dilation and groups, as keyword arguments of conv2d (and of
        ``conv2d_loops``)."""
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)


@st.composite
def conv_cases(draw, max_batch=3, max_channels=4, max_side=7, max_kernel=3, bias=None,
               max_groups=1, max_dilation=1, depthwise=False):
    """Inputs and hyperparameters of a conv2d whose output is at least 1x1: non-square
    images and kernels, stride 1-3, padding 0-2, 1x1 kernels, batch of 1.  With
    ``max_groups`` > 1, grouped convolutions too: 1 to ``max_groups`` groups of 1 to
    ``max_channels`` input and output channels each (one input channel per group is the
    depthwise case; ``depthwise=True`` draws only that); with ``max_dilation`` > 1, taps
    1 to ``max_dilation`` apart."""
    n = draw(st.integers(1, max_batch))
    groups = draw(st.integers(1, max_groups))
    c = groups * (1 if depthwise else draw(st.integers(1, max_channels)))
    o = groups * draw(st.integers(1, max_channels))
    kh, kw = draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel))
    dy, dx = draw(st.integers(1, max_dilation)), draw(st.integers(1, max_dilation))
    ph, pw = draw(st.integers(0, min(2, kh))), draw(st.integers(0, min(2, kw)))
    sy, sx = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    # the dilated kernel spans dy*(kh - 1) + 1 rows: the padded image must hold it
    h = draw(st.integers(max(1, dy * (kh - 1) + 1 - 2 * ph), max(max_side, dy * (kh - 1) + 1)))
    w = draw(st.integers(max(1, dx * (kw - 1) + 1 - 2 * pw), max(max_side, dx * (kw - 1) + 1)))
    use_bias = draw(st.booleans()) if bias is None else bias
    return ConvCase(
        x=draw(arrays((n, c, h, w))), w=draw(arrays((o, c // groups, kh, kw), -1, 1)),
        b=draw(arrays((o,))) if use_bias else None, stride=(sy, sx), padding=(ph, pw),
        dilation=(dy, dx), groups=groups)


@dataclass
class PoolCase:
    x: np.ndarray
    kernel: tuple
    stride: tuple
    padding: tuple


@st.composite
def pool_cases(draw, max_batch=2, max_channels=3, max_side=7, max_kernel=3, distinct=True):
    """Inputs and hyperparameters of a 2-D pooling whose windows fit; padding at most half
    the kernel (as PyTorch requires).  With ``distinct``, no ties inside any window."""
    n, c = draw(st.integers(1, max_batch)), draw(st.integers(1, max_channels))
    kh, kw = draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    sy, sx = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h = draw(st.integers(max(1, kh - 2 * ph), max_side))
    w = draw(st.integers(max(1, kw - 2 * pw), max_side))
    assert output_size(h, kh, sy, ph) >= 1 and output_size(w, kw, sx, pw) >= 1
    x = draw(distinct_arrays((n, c, h, w)) if distinct else arrays((n, c, h, w)))
    return PoolCase(x=x, kernel=(kh, kw), stride=(sy, sx), padding=(ph, pw))


def tensors_from(*arrays_, device="cpu", requires_grad=True):
    """float64 Tensors (on ``device``) from NumPy arrays; None stays None."""
    out = tuple(None if a is None else
                Tensor(backend.to_device(np.asarray(a, dtype=np.float64), device),
                       requires_grad=requires_grad)
                for a in arrays_)
    return out if len(out) != 1 else out[0]

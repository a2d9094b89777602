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


def conv2d_loops(x, w, b=None, stride=(1, 1), padding=(0, 0)):
    """conv2d by its definition, the reference every algorithm is tested against:
    ``y[n, o, i, j] = b[o] + sum over c, ky, kx of w[o, c, ky, kx] *
    x[n, c, i*sy + ky - ph, j*sx + kx - pw]`` (x read as zero outside the image).
    Plain loops over output pixels and taps; it shares no code with the ops."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    (sy, sx), (ph, pw) = stride, padding
    oh, ow = (h + 2 * ph - kh) // sy + 1, (wd + 2 * pw - kw) // sx + 1
    y = np.zeros((n, o, oh, ow), dtype=np.result_type(x, w))
    for i in range(oh):
        for j in range(ow):
            for ky in range(kh):
                for kx in range(kw):
                    row, col = i * sy + ky - ph, j * sx + kx - pw
                    if 0 <= row < h and 0 <= col < wd:   # else: a zero of the padding
                        y[:, :, i, j] += x[:, :, row, col] @ w[:, :, ky, kx].T
    if b is not None:
        y += b.reshape(1, o, 1, 1)
    return y


def conv2d_loops_backward(x, w, gy, stride=(1, 1), padding=(0, 0)):
    """(dx, dw) of ``conv2d_loops`` for the output gradient ``gy``, by the same loops:
    every product ``w[o, c, ky, kx] * x[n, c, row, col]`` sends ``gy[n, o, i, j]`` times
    the other factor to each factor's gradient."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    (sy, sx), (ph, pw) = stride, padding
    gx, gw = np.zeros_like(x), np.zeros_like(w)
    for i in range(gy.shape[2]):
        for j in range(gy.shape[3]):
            for ky in range(kh):
                for kx in range(kw):
                    row, col = i * sy + ky - ph, j * sx + kx - pw
                    if 0 <= row < h and 0 <= col < wd:
                        gx[:, :, row, col] += gy[:, :, i, j] @ w[:, :, ky, kx]
                        gw[:, :, ky, kx] += gy[:, :, i, j].T @ x[:, :, row, col]
    return gx, gw


@dataclass
class ConvCase:
    x: np.ndarray
    w: np.ndarray
    b: np.ndarray | None
    stride: tuple
    padding: tuple


@st.composite
def conv_cases(draw, max_batch=3, max_channels=4, max_side=7, max_kernel=3, bias=None):
    """Inputs and hyperparameters of a conv2d whose output is at least 1x1: non-square
    images and kernels, stride 1-3, padding 0-2, 1x1 kernels, batch of 1."""
    n = draw(st.integers(1, max_batch))
    c = draw(st.integers(1, max_channels))
    o = draw(st.integers(1, max_channels))
    kh, kw = draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel))
    ph, pw = draw(st.integers(0, min(2, kh))), draw(st.integers(0, min(2, kw)))
    sy, sx = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h = draw(st.integers(max(1, kh - 2 * ph), max_side))
    w = draw(st.integers(max(1, kw - 2 * pw), max_side))
    use_bias = draw(st.booleans()) if bias is None else bias
    return ConvCase(
        x=draw(arrays((n, c, h, w))), w=draw(arrays((o, c, kh, kw), -1, 1)),
        b=draw(arrays((o,))) if use_bias else None, stride=(sy, sx), padding=(ph, pw))


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

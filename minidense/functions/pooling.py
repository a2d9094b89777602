"""Average, max, global and adaptive average pooling over NCHW images."""
from __future__ import annotations

import numpy as np

from .. import backend
from ..autograd import Function, as_tensor
from ..fast_paths import fast_paths_enabled
from ._utils import col2im, expect_ndim, im2col, output_size, pair
from .array import Reshape, broadcast_to, stack


class _Pool2d(Function):
    def __init__(self, kernel_size, stride=None, padding=0):
        self.kernel = pair(kernel_size, "kernel_size")
        self.stride = pair(stride if stride is not None else kernel_size, "stride")
        self.padding = pair(padding, "padding")
        name = type(self).__name__
        if min(self.kernel) < 1 or min(self.stride) < 1:
            raise ValueError(f"{name}: kernel_size and stride must be positive, got "
                             f"{self.kernel} and {self.stride}")
        if any(p > k // 2 for p, k in zip(self.padding, self.kernel)):
            raise ValueError(f"{name}: padding {self.padding} must be at most half the kernel "
                             f"{self.kernel}")

    def _check(self, x):
        name = type(self).__name__
        expect_ndim(name, "input", x, 4, "N, C, H, W")
        (kh, kw), (sy, sx), (ph, pw) = self.kernel, self.stride, self.padding
        oh, ow = output_size(x.shape[2], kh, sy, ph), output_size(x.shape[3], kw, sx, pw)
        if oh <= 0 or ow <= 0:
            raise ValueError(f"{name}: a {kh}x{kw} window does not fit an input of shape "
                             f"{tuple(x.shape)}")
        self.input_shape = x.shape
        # The fast path: windows that tile the image exactly need no im2col.
        self.tiles = (fast_paths_enabled() and self.kernel == self.stride and self.padding == (0, 0)
                      and x.shape[2] % kh == 0 and x.shape[3] % kw == 0)
        return oh, ow

    def _tiled(self, x):
        n, c, h, w = x.shape
        kh, kw = self.kernel
        return x.reshape(n, c, h // kh, kh, w // kw, kw)


class AvgPool2d(_Pool2d):
    """Mean over each window; padding counts as zeros (PyTorch's default).  Keeps: nothing.

    Plain: the windows by im2col, and their mean; backward spreads each output's
    gradient evenly over its window (col2im).  Fast path, for windows that tile the
    image exactly (DenseNet's transitions): one strided add per window offset, since
    NumPy reduces a 6-D view over two tiny axes slowly (5x PyTorch), while kh*kw
    whole-image adds are fast."""

    def forward(self, x):
        self._check(x)
        if self.tiles:
            return self._forward_tiled(x)
        col = im2col(x, self.kernel, self.stride, self.padding, writable=False)
        return col.mean(axis=(2, 3))

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        (kh, kw) = self.kernel
        g = gy * (1.0 / (kh * kw))
        if self.tiles:
            return self._backward_tiled(g)
        gcol = xp.broadcast_to(g[:, :, None, None], g.shape[:2] + (kh, kw) + g.shape[2:])
        return col2im(gcol, self.input_shape, self.stride, self.padding)

    differentiable = True

    def differentiable_backward(self, gy):
        return _PoolGrad(self)(gy)

    def _forward_tiled(self, x):
        kh, kw = self.kernel
        y = x[:, :, 0::kh, 0::kw].copy()
        for i in range(kh):
            for j in range(kw):
                if i or j:
                    y += x[:, :, i::kh, j::kw]
        y *= 1.0 / (kh * kw)
        return y

    def _backward_tiled(self, g):   # every input pixel is in exactly one window
        kh, kw = self.kernel
        gx = backend.get_array_module(g).empty(self.input_shape, dtype=g.dtype)
        for i in range(kh):
            for j in range(kw):
                gx[:, :, i::kh, j::kw] = g
        return gx


class MaxPool2d(_Pool2d):
    """Maximum over each window; padding is -inf.  Keeps: the argmax within each window
    (one small integer per output pixel).

    Plain: the windows by im2col, their argmax and maximum; backward sends each output's
    gradient to its window's argmax (col2im).  Fast path, for windows that tile the
    image exactly: the windows as a reshaped view, with no im2col copy."""

    def forward(self, x):
        oh, ow = self._check(x)
        xp = backend.get_array_module(x)
        n, c = x.shape[:2]
        kh, kw = self.kernel
        if self.tiles:
            windows, axis = self._tiled(x).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, oh, ow, kh * kw), 4
        else:
            windows, axis = im2col(x, self.kernel, self.stride, self.padding, pad_value=-np.inf,
                                   writable=False).reshape(n, c, kh * kw, oh, ow), 2
        index = windows.argmax(axis=axis)
        # The maxima: on NumPy gathered at the argmax (take_along_axis is a cheap gather
        # there); on CuPy a second reduction, which beats take_along_axis's fancy-index
        # arrays (chosen per backend here).
        if xp is np:
            y = np.take_along_axis(windows, np.expand_dims(index, axis), axis=axis).squeeze(axis)
        else:
            y = windows.max(axis=axis)
        self.save_for_backward(index.astype(np.int16 if kh * kw < 2 ** 15 else np.int64))
        return y

    def backward(self, gy):
        return self.scatter_to_argmax(gy, self.saved[0])

    def scatter_to_argmax(self, gy, index):
        """Each output's gradient sent to the argmax of its window."""
        xp = backend.get_array_module(gy)
        n, c, oh, ow = gy.shape
        kh, kw = self.kernel
        # Each output's gradient goes to the argmax of its window: a one-hot mask over the
        # window positions times gy.  (A comparison and a product: faster on NumPy than
        # put_along_axis, and on CuPy they need no recent version and no scatter.)
        positions = xp.arange(kh * kw, dtype=index.dtype)
        if self.tiles:
            windows = (index[..., None] == positions) * gy[..., None]  # (N, C, OH, OW, taps)
            windows = windows.reshape(n, c, oh, ow, kh, kw).transpose(0, 1, 2, 4, 3, 5)
            return windows.reshape(self.input_shape)
        gcol = (index[:, :, None] == positions[:, None, None]) * gy[:, :, None]  # (N, C, taps, OH, OW)
        return col2im(gcol.reshape(n, c, kh, kw, oh, ow), self.input_shape, self.stride,
                      self.padding)

    differentiable = True

    def differentiable_backward(self, gy):
        return _PoolGrad(self)(gy)

    def gather_at_argmax(self, g, index):
        """g (shaped like the input) at each window's argmax: the backward's adjoint (a
        max pooling whose choices are fixed), linear in g."""
        xp = backend.get_array_module(g)
        n, c, oh, ow = index.shape
        kh, kw = self.kernel
        if self.tiles:
            windows = self._tiled(g).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, oh, ow, kh * kw)
            return xp.take_along_axis(windows, index[..., None].astype(np.int64), axis=4)[..., 0]
        windows = im2col(g, self.kernel, self.stride, self.padding, writable=False)
        windows = windows.reshape(n, c, kh * kw, oh, ow)
        return xp.take_along_axis(windows, index[:, :, None].astype(np.int64), axis=2)[:, :, 0]


class _PoolGrad(Function):
    """A pooling's backward as an op (create_graph=True): gx from gy, linear in gy, the
    windows (and for max pooling the argmax) those of ``pool``'s forward.  Its own
    backward is the pooling again with those windows: AvgPool2d's forward, or
    MaxPool2d's ``gather_at_argmax``; and that one's is this op."""

    differentiable = True

    def __init__(self, pool, adjoint=False, index=None):
        # The argmax, held here: the pooling node may be released before this one runs.
        self.pool, self.adjoint = pool, adjoint
        self.index = pool.saved[0] if index is None and isinstance(pool, MaxPool2d) else index

    def forward(self, g):
        if isinstance(self.pool, MaxPool2d):
            return (self.pool.gather_at_argmax(g, self.index) if self.adjoint
                    else self.pool.scatter_to_argmax(g, self.index))
        if self.adjoint:
            return AvgPool2d(self.pool.kernel, self.pool.stride, self.pool.padding).forward(g)
        return self.pool.backward(g)

    def backward(self, g):
        return _PoolGrad(self.pool, not self.adjoint, self.index).forward(g)

    def differentiable_backward(self, g):
        return _PoolGrad(self.pool, not self.adjoint, self.index)(g)


class GlobalAvgPool2d(Function):
    """Mean over the whole image: (N, C, H, W) -> (N, C).  Keeps: nothing."""

    def forward(self, x):
        expect_ndim("global_avg_pool2d", "input", x, 4, "N, C, H, W")
        self.input_shape = x.shape
        return x.mean(axis=(2, 3))

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        n, c, h, w = self.input_shape
        return xp.broadcast_to((gy * (1.0 / (h * w)))[:, :, None, None], self.input_shape).copy()

    differentiable = True

    def differentiable_backward(self, gy):
        n, c, h, w = self.input_shape
        return broadcast_to(Reshape((n, c, 1, 1))(gy) * (1.0 / (h * w)), self.input_shape)


def _unsupported(op, **settings):
    """A clear error for a PyTorch pooling argument that is not at its default."""
    defaults = {"ceil_mode": False, "count_include_pad": True, "divisor_override": None,
                "dilation": 1}
    for name, value in settings.items():
        if value != defaults[name] and not (name == "dilation" and pair(value, name) == (1, 1)):
            raise NotImplementedError(f"{op}: {name}={value!r} is not supported by minidense "
                                      f"(only {name}={defaults[name]!r})")


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """The mean over each window; padding counts as zeros (count_include_pad)."""
    _unsupported("avg_pool2d", ceil_mode=ceil_mode, count_include_pad=count_include_pad,
                 divisor_override=divisor_override)
    return AvgPool2d(kernel_size, stride, padding)(input)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """The maximum over each window; padding is -inf."""
    _unsupported("max_pool2d", dilation=dilation, ceil_mode=ceil_mode)
    return MaxPool2d(kernel_size, stride, padding)(input)


def global_avg_pool2d(input):
    """(N, C, H, W) -> (N, C): the mean of each channel."""
    return GlobalAvgPool2d()(input)


def adaptive_avg_pool2d(input, output_size):
    """Means over windows that divide the image into ``output_size`` (an int, a pair, or
    None for the input's size) as PyTorch's: window i spans [floor(i*H/out),
    ceil((i+1)*H/out)).  Sizes that divide the image are one average pooling."""
    x = as_tensor(input)
    expect_ndim("adaptive_avg_pool2d", "input", x, 4, "N, C, H, W")
    h, w = x.shape[2:]
    sizes = output_size if isinstance(output_size, (tuple, list)) else (output_size, output_size)
    oh, ow = (size if out is None else int(out) for out, size in zip(sizes, (h, w)))
    if oh <= 0 or ow <= 0:
        raise ValueError(f"adaptive_avg_pool2d: output_size must be positive, got {output_size!r}")
    if (oh, ow) == (1, 1):
        return GlobalAvgPool2d()(x).reshape(x.shape[0], x.shape[1], 1, 1)
    if h % oh == 0 and w % ow == 0:
        return AvgPool2d((h // oh, w // ow))(x)
    rows = []
    for i in range(oh):
        top, bottom = (i * h) // oh, -((-(i + 1) * h) // oh)
        cells = [x[:, :, top:bottom, (j * w) // ow:-((-(j + 1) * w) // ow)].mean((2, 3))
                 for j in range(ow)]
        rows.append(stack(cells, -1))
    return stack(rows, -2)

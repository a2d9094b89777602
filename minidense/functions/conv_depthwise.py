"""conv2d for the depthwise case by per-channel shifted multiply-adds: an optimization
of im2col, on NumPy and CuPy.

Read ``Conv2d`` in ``connection.py`` first: the textbook algorithm is im2col and one
matrix product per group.  A *depthwise* convolution has as many groups as input
channels (``groups == in_channels``, MobileNet's 3x3 layers): output channel o reads
input channel o // m alone (m = out_channels / in_channels, the channel multiplier,
usually 1).  Its per-group products have one row each, and im2col would write a
patch matrix kh*kw times the size of x (9x for a 3x3 kernel) to feed them.  Here the
same sums are taken tap by tap instead, with nothing expanded:

    y[n, o] = sum over taps (ky, kx) of  w[o, 0, ky, kx] * window(x_pad[n, o // m], ky, kx)

where ``window`` is the strided slice that tap reads for every output pixel:
rows ky*dy, ky*dy + sy, ..., columns kx*dx, kx*dx + sx, ... of the zero-padded image
(dy, dx the dilation, sy, sx the stride).  Backward takes the same windows:

    gw[o, 0, ky, kx] = sum over n, i, j of gy[n, o, i, j] * window(x_pad[n, o // m], ky, kx)[i, j]
    window(gx_pad[n, c], ky, kx) += sum over the m outputs o of c of w[o, 0, ky, kx] * gy[n, o]

Keeps: x and w (no patch matrix, no padded copy).

* NumPy: a few images at a time (``threads.pieces``, about half a core's L2 cache), so
  that the kh*kw passes over a piece find it in cache, the pieces spread over the
  thread pool; the per-piece weight gradients are added in piece order (the result
  does not depend on the thread count).  Narrow maps are laid out channels-last for
  the passes (``_Geometry``).
* CuPy: three kernels, registered below: the forward (one thread per output element),
  the input gradient (one per input element, a gather as col2im's, so no atomics) and
  the weight gradient (one per image, weight and tap, its sum over the output pixels;
  the images' partial sums are then added).
"""
from __future__ import annotations

import numpy as np

from .. import backend, threads, workspace
from ._utils import output_size


def applies(x_shape, w_shape, groups) -> bool:
    """True for a depthwise convolution: one input channel per group."""
    return groups == x_shape[1] and w_shape[1] == 1


def forward(x, w, stride, padding, dilation):
    """y of a depthwise convolution of x (N, C, H, W) with w (C*m, 1, kh, kw)."""
    geometry = _Geometry(x.shape, w.shape, stride, padding, dilation)
    xp = backend.get_array_module(x)
    y = xp.empty((geometry.n, geometry.o, geometry.oh, geometry.ow), dtype=np.result_type(x, w))
    if backend.device_of(x) != "cpu":   # per backend: a kernel on CuPy
        backend.index_kernel("depthwise_forward", x.size, y.size)(
            xp.ascontiguousarray(x), xp.ascontiguousarray(w), *geometry.scalars(), y)
        return y
    tap_weights = geometry.tap_weights(w)

    def piece(images):
        x_pad = geometry.padded(x, images, "depthwise_x")
        target = geometry.per_channel(y[images])                     # (p, C, m, OH, OW)
        out = geometry.buffer("depthwise_y", target.shape, y.dtype, x) if geometry.channels_last else target
        product = geometry.buffer("depthwise_product", target.shape, y.dtype, x)
        for k, (ky, kx) in enumerate(geometry.taps):
            window = geometry.window(x_pad, ky, kx)[:, :, None]      # (p, C, 1, OH, OW)
            if k == 0:
                np.multiply(window, tap_weights[k], out=out)
            else:
                np.multiply(window, tap_weights[k], out=product)
                out += product
        if out is not target:
            target[...] = out
    threads.map_pieces(piece, geometry.pieces(y))
    return y


def backward(x, w, gy, stride, padding, dilation, want_gx, want_gw):
    """(gx, gw) of a depthwise convolution, either None when not wanted."""
    geometry = _Geometry(x.shape, w.shape, stride, padding, dilation)
    xp = backend.get_array_module(gy)
    dtype = np.result_type(x, w, gy)
    if backend.device_of(gy) != "cpu":
        return _backward_cuda(x, w, gy, geometry, want_gx, want_gw, dtype)
    gx = xp.empty(x.shape, dtype=x.dtype) if want_gx else None
    tap_weights = geometry.tap_weights(w)
    ph, pw = geometry.padding
    h, wd = x.shape[2:]

    def piece(images):
        g = geometry.per_channel(gy[images])                         # (p, C, m, OH, OW)
        if geometry.channels_last:
            g = geometry.copy_to_buffer(g, "depthwise_gy")
        part = None
        if want_gw:
            x_pad = geometry.padded(x, images, "depthwise_x")
            part = np.empty((len(geometry.taps), geometry.c, geometry.m), dtype=dtype)
        if want_gx:
            gx_pad = geometry.buffer("depthwise_gx", (len(g),) + geometry.padded_shape, dtype, x)
            gx_pad[...] = 0
            product = geometry.buffer("depthwise_product", g.shape[:2] + g.shape[3:], dtype, x)
        for k, (ky, kx) in enumerate(geometry.taps):
            if want_gw:
                part[k] = np.einsum("ncjhw,nchw->cj", g, geometry.window(x_pad, ky, kx))
            if want_gx:
                window = geometry.window(gx_pad, ky, kx)
                for j in range(geometry.m):
                    np.multiply(g[:, :, j], tap_weights[k][:, j], out=product)
                    window += product
        if want_gx:
            gx[images] = gx_pad[:, :, ph:ph + h, pw:pw + wd]
        return part

    parts = threads.map_pieces(piece, geometry.pieces(gy))
    gw = None
    if want_gw:
        gw = parts[0]
        for part in parts[1:]:   # in piece order: the same sums for any thread count
            gw += part
        gw = gw.transpose(1, 2, 0).reshape(w.shape).astype(w.dtype, copy=False)
    return gx, gw


def _backward_cuda(x, w, gy, geometry, want_gx, want_gw, dtype):
    xp = backend.get_array_module(gy)
    gy = xp.ascontiguousarray(gy)
    gx = gw = None
    if want_gx:   # x's shape alone: the second-order ops pass a stand-in for x
        gx = xp.empty(x.shape, dtype=dtype)
        backend.index_kernel("depthwise_backward_input", gy.size, gx.size)(
            gy, xp.ascontiguousarray(w), *geometry.scalars(), gx)
    if want_gw:   # w's shape alone, likewise
        x = xp.ascontiguousarray(x)
        kh, kw = w.shape[2:]
        partial = xp.empty((geometry.n, geometry.o, kh, kw), dtype=dtype)   # per image
        backend.index_kernel("depthwise_backward_weight", x.size, gy.size, partial.size)(
            gy, x, *geometry.scalars(), partial)
        gw = partial.sum(axis=0).reshape(w.shape)
    return gx, gw


class _Geometry:
    """The sizes of one depthwise convolution, its taps, the windows they read, and the
    layout of the NumPy path's buffers.

    NumPy's loops run along the innermost axis, and their overhead is per loop.  In
    NCHW the innermost axis is an image row, with one weight along it; on maps narrower
    than ``NARROW`` the rows are short and the loops' overhead dominates (4x4 maps ran
    6x slower than channels-last).  There the buffers are laid out channels-last (NHWC):
    the innermost axis is the channels, one weight each, as long as the layer is wide.
    The buffers are handed out as views in NCHW order, so that the tap loop is the same
    for both layouts; the copies in and out transpose.  On 32x32 maps channels-last
    gains nothing and its transposes cost (1.2-1.5x slower), so NCHW stays: windows
    are strided views of the padded images, and the output is written in place."""

    NARROW = 32

    def __init__(self, x_shape, w_shape, stride, padding, dilation):
        self.n, self.c, self.h, self.w = x_shape
        self.o, _, self.kh, self.kw = w_shape
        self.m = self.o // self.c
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        (sy, sx), (ph, pw), (dy, dx) = self.stride, self.padding, self.dilation
        self.oh = output_size(self.h, self.kh, sy, ph, dy)
        self.ow = output_size(self.w, self.kw, sx, pw, dx)
        self.padded_shape = (self.c, self.h + 2 * ph, self.w + 2 * pw)
        self.taps = [(ky, kx) for ky in range(self.kh) for kx in range(self.kw)]
        self.channels_last = self.w < self.NARROW

    def scalars(self):
        """The geometry as the CUDA kernels take it."""
        (sy, sx), (ph, pw), (dy, dx) = self.stride, self.padding, self.dilation
        return (self.n, self.c, self.h, self.w, self.oh, self.ow, self.kh, self.kw,
                sy, sx, ph, pw, dy, dx, self.m)

    def per_channel(self, a):
        """Images (p, C*m, OH, OW) as (p, C, m, OH, OW): the m outputs of each input channel."""
        return a.reshape((a.shape[0], self.c, self.m) + a.shape[2:])

    def tap_weights(self, w):
        """The weights (C*m, 1, kh, kw) as one contiguous (C, m, 1, 1) array per tap, to
        broadcast against (p, C, m, OH, OW)."""
        by_tap = w.reshape(self.o, len(self.taps)).T
        return np.ascontiguousarray(by_tap).reshape(len(self.taps), self.c, self.m, 1, 1)

    def pieces(self, like):
        """Slices of the batch of about ``threads.PIECE_BYTES`` of padded input and output."""
        itemsize = np.dtype(like.dtype).itemsize
        per_image = (np.prod(self.padded_shape) + self.o * self.oh * self.ow) * itemsize
        return threads.pieces(self.n, int(per_image))

    def buffer(self, name, shape, dtype, like):
        """A workspace buffer of ``shape`` (p, C, ..., rows, columns), stored NHWC when
        ``channels_last``, as a view in the order of ``shape``."""
        if not self.channels_last:
            return workspace.get(name, shape, dtype, like)
        channel_axes = list(range(1, len(shape) - 2))
        order = [0, len(shape) - 2, len(shape) - 1] + channel_axes             # NHWC
        stored = workspace.get(name, tuple(shape[a] for a in order), dtype, like)
        return stored.transpose(np.argsort(order))

    def copy_to_buffer(self, a, name):
        out = self.buffer(name, a.shape, a.dtype, a)
        out[...] = a
        return out

    def padded(self, x, images, name):
        """Images ``images`` of x with their zero padding: a view of x itself when no copy
        is needed (no padding, NCHW), else a copy into the buffer ``name``."""
        (ph, pw) = self.padding
        part = x[images]
        if ph == pw == 0:
            return self.copy_to_buffer(part, name) if self.channels_last else part
        out = self.buffer(name, (len(part),) + self.padded_shape, part.dtype, x)
        out[:, :, :ph] = 0
        out[:, :, ph + self.h:] = 0
        out[:, :, ph:ph + self.h, :pw] = 0
        out[:, :, ph:ph + self.h, pw + self.w:] = 0
        out[:, :, ph:ph + self.h, pw:pw + self.w] = part
        return out

    def window(self, padded, ky, kx):
        """What tap (ky, kx) reads of ``padded`` (p, C, H + 2ph, W + 2pw) for every output
        pixel: a strided view (p, C, OH, OW)."""
        (sy, sx), (dy, dx) = self.stride, self.dilation
        top, left = ky * dy, kx * dx
        return padded[:, :, top:top + sy * (self.oh - 1) + 1:sy, left:left + sx * (self.ow - 1) + 1:sx]


# ---------------------------------------------------------------------------
# The CuPy kernels.  Geometry as ``_Geometry.scalars``: O = C*M output channels.
# Flat indices are IDX (int or ptrdiff_t, see backend.index_kernel); coordinates int.
# ---------------------------------------------------------------------------
_GEOMETRY = ("int32 N, int32 C, int32 H, int32 W, int32 OH, int32 OW, int32 KH, int32 KW, "
             "int32 SY, int32 SX, int32 PH, int32 PW, int32 DY, int32 DX, int32 M")
_GEOMETRY_NAMES = tuple(p.split()[-1] for p in _GEOMETRY.split(", "))

# One thread per output element (n, o, oy, ox): the sum over the taps.
_FORWARD_BODY = """
    IDX t = i;
    int ox = t % OW; t /= OW;
    int oy = t % OH; t /= OH;
    int o = t % (C * M);
    IDX n = t / (C * M);
    IDX image = (n * C + o / M) * H * W;
    IDX taps = (IDX)o * KH * KW;
    T acc = 0;
    for (int ky = 0; ky < KH; ++ky) {
        int row = oy * SY - PH + ky * DY;
        if (row < 0 || row >= H) continue;
        for (int kx = 0; kx < KW; ++kx) {
            int col = ox * SX - PW + kx * DX;
            if (col < 0 || col >= W) continue;
            acc += x[image + row * W + col] * w[taps + ky * KW + kx];
        }
    }
    y = acc;
"""

# One thread per input element (n, c, row, col): the sum over the m outputs of channel c
# and the taps that read it (a gather, as col2im's: deterministic, no atomics).
_BACKWARD_INPUT_BODY = """
    IDX t = i;
    int col = t % W; t /= W;
    int row = t % H; t /= H;
    int c = t % C;
    IDX n = t / C;
    T acc = 0;
    for (int j = 0; j < M; ++j) {
        int o = c * M + j;
        IDX g = (n * C * M + o) * OH * OW;
        IDX taps = (IDX)o * KH * KW;
        for (int ky = 0; ky < KH; ++ky) {
            int oy = row + PH - ky * DY;
            if (oy < 0 || oy % SY != 0) continue;
            oy /= SY;
            if (oy >= OH) continue;
            for (int kx = 0; kx < KW; ++kx) {
                int ox = col + PW - kx * DX;
                if (ox < 0 || ox % SX != 0) continue;
                ox /= SX;
                if (ox >= OW) continue;
                acc += gy[g + oy * OW + ox] * w[taps + ky * KW + kx];
            }
        }
    }
    gx = acc;
"""

# One thread per (n, o, ky, kx): image n's share of gw[o, 0, ky, kx], the sum over the
# output pixels of gy times the pixel the tap reads.  The caller adds the images' shares.
_BACKWARD_WEIGHT_BODY = """
    IDX t = i;
    int kx = t % KW; t /= KW;
    int ky = t % KH; t /= KH;
    int o = t % (C * M);
    IDX n = t / (C * M);
    IDX g = (n * C * M + o) * OH * OW;
    IDX image = (n * C + o / M) * H * W;
    T acc = 0;
    for (int oy = 0; oy < OH; ++oy) {
        int row = oy * SY - PH + ky * DY;
        if (row < 0 || row >= H) continue;
        for (int ox = 0; ox < OW; ++ox) {
            int col = ox * SX - PW + kx * DX;
            if (col < 0 || col >= W) continue;
            acc += gy[g + oy * OW + ox] * x[image + row * W + col];
        }
    }
    gw_partial = acc;
"""

_DECLARED = dict(scalars=_GEOMETRY_NAMES, where=__name__)
backend.register_index_variants("depthwise_forward", "raw T x, raw T w, " + _GEOMETRY, "T y",
                                _FORWARD_BODY, **_DECLARED)
backend.register_index_variants("depthwise_backward_input", "raw T gy, raw T w, " + _GEOMETRY,
                                "T gx", _BACKWARD_INPUT_BODY, **_DECLARED)
backend.register_index_variants("depthwise_backward_weight", "raw T gy, raw T x, " + _GEOMETRY,
                                "T gw_partial", _BACKWARD_WEIGHT_BODY, **_DECLARED)

"""Helpers shared by the ops: shape checks, broadcasting, im2col and col2im."""
from __future__ import annotations

import numpy as np

from .. import backend


def pair(value, name="value"):
    """An int or a pair of ints as a pair (kernel sizes, strides, padding)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        a, b = value
    else:
        a = b = value
    return int(a), int(b)


def expect_ndim(op: str, name: str, array, ndim: int, layout: str = "") -> None:
    if array.ndim != ndim:
        hint = f" ({layout})" if layout else ""
        raise ValueError(f"{op}: {name} must be {ndim}-D{hint}, got shape {tuple(array.shape)}")


def sum_to(grad, shape):
    """Sum ``grad`` down to ``shape``: the backward of NumPy broadcasting."""
    if grad.shape == tuple(shape):
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, n in enumerate(shape) if n == 1 and grad.shape[i + lead] != 1)
    grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape) if lead else grad


def output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def im2col(x, kernel, stride, pad, pad_value=0.0, writable=True):
    """Patches of ``x`` (N, C, H, W) as an array of shape (N, C, KH, KW, OH, OW).

    ``col[n, c, ky, kx, oy, ox] = x_padded[n, c, oy*SY + ky, ox*SX + kx]``.  On NumPy a
    strided view of the padded input is taken and, if ``writable``, copied once; on
    CuPy one gather kernel writes it.
    """
    (kh, kw), (sy, sx), (ph, pw) = kernel, stride, pad
    n, c, h, w = x.shape
    oh, ow = output_size(h, kh, sy, ph), output_size(w, kw, sx, pw)
    xp = backend.get_array_module(x)
    if xp is not np and pad_value == 0:
        col = xp.empty((n, c, kh, kw, oh, ow), dtype=x.dtype)
        backend.cuda_kernel("im2col")(xp.ascontiguousarray(x), h, w, oh, ow, kh, kw, sy, sx, ph, pw, col)
        return col
    if ph or pw:
        x = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    s0, s1, s2, s3 = x.strides
    view = xp.lib.stride_tricks.as_strided(
        x, (n, c, kh, kw, oh, ow), (s0, s1, s2, s3, s2 * sy, s3 * sx))
    return view.copy() if writable else view


def col2im(col, image_shape, stride, pad):
    """The adjoint of ``im2col``: sums every patch back onto the image (N, C, H, W)."""
    n, c, kh, kw, oh, ow = col.shape
    (sy, sx), (ph, pw) = stride, pad
    h, w = image_shape[2], image_shape[3]
    xp = backend.get_array_module(col)
    if xp is not np:
        x = xp.empty((n, c, h, w), dtype=col.dtype)
        backend.cuda_kernel("col2im")(xp.ascontiguousarray(col), h, w, oh, ow, kh, kw,
                                      sy, sx, ph, pw, x)
        return x
    # One strided add per kernel offset: vectorised over images and pixels.
    padded = xp.zeros((n, c, h + 2 * ph + sy - 1, w + 2 * pw + sx - 1), dtype=col.dtype)
    for ky in range(kh):
        for kx in range(kw):
            padded[:, :, ky:ky + sy * oh:sy, kx:kx + sx * ow:sx] += col[:, :, ky, kx]
    return padded[:, :, ph:ph + h, pw:pw + w]


class TapGrid:
    """Flat grids on which every tap of a (strided) convolution is a plain shift.

    A convolution with stride (sy, sx) reads the zero-padded image at row
    ``oy*sy + ky`` and column ``ox*sx + kx``.  Split the padded image into its
    sy*sx *phases* (rows ``a, a+sy, ...`` and columns ``b, b+sx, ...``): tap
    (ky, kx) then reads phase (ky % sy, kx % sx) at (oy + ky // sy, ox + kx // sx),
    a stride-1 shift.  (With stride 1 there is one phase: the padded image.)

    Each phase is stored channel-major and flattened over (image, row, column),
    shape (C, N*GH*GW) with GH x GW the grid of one image.  In those flat
    coordinates the 2-D shift (dy, dx) is the 1-D offset ``dy*GW + dx``, so the
    values one tap sees for *every* output pixel of the batch are one slice
    ``phase[:, offset:offset + span]``: im2col becomes kh*kw contiguous copies.
    Results are computed for every grid position ``p < span`` and the output
    pixels (rows < OH, columns < OW of each image's grid) are cropped at the end;
    the extra grid positions cost about ((OH+kh-1)/OH)**2 more work, which is
    why 1x1 convolutions skip all this.

    Taps are listed grouped by phase: tap k is ``taps[k] = (ky, kx)``, reads phase
    ``tap_phase[k]`` at ``offsets[k]``, and ``phase_taps[f]`` is the slice of the
    taps that read phase f.
    """

    def __init__(self, image_shape, kernel, stride, pad):
        n, c, h, w = image_shape
        (kh, kw), (sy, sx), (ph, pw) = kernel, stride, pad
        self.image_shape, self.stride, self.pad = tuple(image_shape), (sy, sx), (ph, pw)
        self.oh, self.ow = output_size(h, kh, sy, ph), output_size(w, kw, sx, pw)
        self.gh, self.gw = self.oh + (kh - 1) // sy, self.ow + (kw - 1) // sx
        self.size = n * self.gh * self.gw
        self.taps, self.offsets, self.tap_phase, self.phase_taps = [], [], [], []
        for a in range(sy):
            for b in range(sx):
                first = len(self.taps)
                for ky in range(a, kh, sy):
                    for kx in range(b, kw, sx):
                        self.taps.append((ky, kx))
                        self.offsets.append((ky // sy) * self.gw + kx // sx)
                        self.tap_phase.append(a * sx + b)
                self.phase_taps.append(slice(first, len(self.taps)))
        self.span = self.size - max(self.offsets)

    def _phase_slices(self, a, b):
        """(grid index, image index) slices of the image pixels that phase (a, b) holds."""
        n, c, h, w = self.image_shape
        rows = _phase_slice(h, self.pad[0], self.stride[0], a, self.gh)
        cols = _phase_slice(w, self.pad[1], self.stride[1], b, self.gw)
        if rows is None or cols is None:
            return None
        return (slice(None), slice(None), rows[0], cols[0]), (slice(None), slice(None), rows[1], cols[1])

    def phases(self, x, dtype=None):
        """The phases of zero-padded ``x`` (N, C, H, W): shape (sy*sx, C, N*GH*GW)."""
        xp = backend.get_array_module(x)
        n, c = x.shape[:2]
        sy, sx = self.stride
        grids = xp.zeros((sy * sx, c, n, self.gh, self.gw), dtype=dtype or x.dtype)
        channel_major = x.transpose(1, 0, 2, 3)
        for f in range(sy * sx):
            where = self._phase_slices(*divmod(f, sx))
            if where is not None:
                grids[f][where[0]] = channel_major[where[1]]
        return grids.reshape(sy * sx, c, self.size)

    def image_from_phases(self, grids, dtype=None):
        """The adjoint of ``phases``: the image (N, C, H, W) whose phases are ``grids``;
        the padding is dropped (its gradient goes nowhere)."""
        xp = backend.get_array_module(grids)
        n, c, h, w = self.image_shape
        sy, sx = self.stride
        image = xp.zeros((n, c, h, w), dtype=dtype or grids.dtype)
        channel_major = image.transpose(1, 0, 2, 3)
        for f in range(sy * sx):
            where = self._phase_slices(*divmod(f, sx))
            if where is not None:
                grid = grids[f].reshape(c, n, self.gh, self.gw)
                channel_major[where[1]] = grid[where[0]]
        return image

    def on_grid(self, y, dtype=None):
        """Outputs (N, O, OH, OW) placed on the flat output grid (O, N*GH*GW), zeros elsewhere."""
        xp = backend.get_array_module(y)
        n, o = y.shape[:2]
        grid = xp.zeros((o, n, self.gh, self.gw), dtype=dtype or y.dtype)
        grid[:, :, :self.oh, :self.ow] = y.transpose(1, 0, 2, 3)
        return grid.reshape(o, self.size)

    def crop(self, grid):
        """The outputs (N, O, OH, OW) of a flat output grid (O, N*GH*GW), as a fresh array."""
        xp = backend.get_array_module(grid)
        o, n = grid.shape[0], self.image_shape[0]
        outputs = grid.reshape(o, n, self.gh, self.gw)[:, :, :self.oh, :self.ow]
        return xp.ascontiguousarray(outputs.transpose(1, 0, 2, 3))


def _phase_slice(size, pad, stride, phase, grid):
    """Grid index i of one phase holds padded coordinate i*stride + phase, that is image
    coordinate i*stride + phase - pad: the (grid, image) slices of the valid ones."""
    first = max(0, -((phase - pad) // stride))          # ceil((pad - phase) / stride)
    last = min(grid, (size - 1 + pad - phase) // stride + 1)
    if last <= first:
        return None
    start = first * stride + phase - pad
    return slice(first, last), slice(start, start + (last - first - 1) * stride + 1, stride)

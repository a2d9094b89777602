"""Helpers shared by the ops: shape checks, broadcasting, im2col and col2im."""
from __future__ import annotations

import math
import threading

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


def im2col(x, kernel, stride, pad, pad_value=0.0, writable=True, rows=False):
    """Patches of ``x`` (N, C, H, W) as an array of shape (N, C, KH, KW, OH, OW).

    ``col[n, c, ky, kx, oy, ox] = x_padded[n, c, oy*SY + ky, ox*SX + kx]``.  With
    ``rows`` the patches come as the (C*KH*KW, N*OH*OW) matrix of a convolution
    instead (axes ordered C, KH, KW, N, OH, OW), so that it takes 2-D matrix products
    only.  On NumPy a strided view of the padded input is taken and, if ``writable``
    or ``rows``, copied once; on CuPy one gather kernel writes it (whatever
    ``pad_value``, so max pooling's -inf padding needs no padded copy there).
    """
    (kh, kw), (sy, sx), (ph, pw) = kernel, stride, pad
    n, c, h, w = x.shape
    oh, ow = output_size(h, kh, sy, ph), output_size(w, kw, sx, pw)
    xp = backend.get_array_module(x)
    if xp is not np:
        shape = (c, kh, kw, n, oh, ow) if rows else (n, c, kh, kw, oh, ow)
        col = xp.empty(shape, dtype=x.dtype)
        backend.index_kernel("im2col", x.size, col.size)(
            xp.ascontiguousarray(x), n, c, h, w, oh, ow, kh, kw, sy, sx, ph, pw, rows, pad_value, col)
        return col.reshape(c * kh * kw, n * oh * ow) if rows else col
    if ph or pw:
        x = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    s0, s1, s2, s3 = x.strides
    view = xp.lib.stride_tricks.as_strided(
        x, (n, c, kh, kw, oh, ow), (s0, s1, s2, s3, s2 * sy, s3 * sx))
    if rows:
        return view.transpose(1, 2, 3, 0, 4, 5).reshape(c * kh * kw, n * oh * ow)  # a copy
    return view.copy() if writable else view


def col2im(col, image_shape, stride, pad, rows=False):
    """The adjoint of ``im2col``: sums every patch back onto the image (N, C, H, W).
    ``col`` is (N, C, KH, KW, OH, OW), or with ``rows`` the (C*KH*KW, N*OH*OW) matrix
    of ``im2col(..., rows=True)`` given with its kernel as ``(KH, KW)`` in ``rows``."""
    (sy, sx), (ph, pw) = stride, pad
    n, c, h, w = image_shape
    if rows:
        kh, kw = rows
        oh, ow = output_size(h, kh, sy, ph), output_size(w, kw, sx, pw)
        col = col.reshape(c, kh, kw, n, oh, ow)
    else:
        n, c, kh, kw, oh, ow = col.shape
    xp = backend.get_array_module(col)
    if xp is not np:
        x = xp.empty((n, c, h, w), dtype=col.dtype)
        backend.index_kernel("col2im", x.size, col.size)(
            xp.ascontiguousarray(col), n, c, h, w, oh, ow, kh, kw, sy, sx, ph, pw, bool(rows), x)
        return x
    if rows:
        col = col.transpose(3, 0, 1, 2, 4, 5)
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

    Each phase is stored channel-major and flattened over (image, row, column), one
    GH x GW cell per image, so that the 2-D shift (dy, dx) is the 1-D offset
    ``dy*GW + dx``: what one tap sees for *every* output pixel of the batch is the
    slice ``phase[:, offset:offset + size]`` (size = N*GH*GW), and im2col becomes
    kh*kw contiguous copies.  Outputs are computed at every cell position and the
    OH x OW corner of each cell is cropped at the end.  Rows and images share their
    zero padding (a 3x3 'same' convolution needs one zero row between images and one
    zero column between rows, not two): the cell is the smallest for which no output
    reads a pixel of another row or image, so the wasted positions cost about
    (H+ph)(W+pw)/(H*W) - 1 more work at stride 1; 1x1 convolutions skip all this.

    Taps are listed grouped by phase: tap k is ``taps[k] = (ky, kx)``, reads phase
    ``tap_phase[k]`` at ``offsets[k]``, and ``phase_taps[f]`` is the slice of the
    taps that read phase f.  Phase grids have ``input_size`` = size + the largest
    offset columns (a zero tail that the last image's taps read).
    """

    def __init__(self, image_shape, kernel, stride, pad):
        n, c, h, w = image_shape
        (kh, kw), (sy, sx), (ph, pw) = kernel, stride, pad
        self.image_shape, self.stride, self.pad = tuple(image_shape), (sy, sx), (ph, pw)
        self.oh, self.ow = output_size(h, kh, sy, ph), output_size(w, kw, sx, pw)
        self.gh = _cell_length(h, kh, sy, ph, self.oh)
        self.gw = _cell_length(w, kw, sx, pw, self.ow)
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
        self.input_size = self.size + max(self.offsets)

    def _phase_cells(self, grids):
        """For each phase that some tap reads: the view of its cells (C, N, rows, columns)
        that hold image pixels, and the index of those pixels in the channel-major
        image (C, N, H, W)."""
        n, c, h, w = self.image_shape
        (sy, sx), (ph, pw) = self.stride, self.pad
        for f, taps in enumerate(self.phase_taps):
            rows = _phase_slice(h, ph, sy, f // sx)
            cols = _phase_slice(w, pw, sx, f % sx)
            if rows is None or cols is None or taps.stop == taps.start:
                continue
            cells = grids[f, :, :self.size].reshape(c, n, self.gh, self.gw)
            yield cells[:, :, rows[0], cols[0]], (slice(None), slice(None), rows[1], cols[1])

    def phases(self, x, out):
        """Fill ``out`` (sy*sx, C, input_size) with the phases of zero-padded ``x`` (N, C, H, W)
        (only those that some tap reads)."""
        out.fill(0)
        channel_major = x.transpose(1, 0, 2, 3)
        for cells, pixels in self._phase_cells(out):
            cells[...] = channel_major[pixels]
        return out

    def image_from_phases(self, grids, dtype):
        """The adjoint of ``phases``: a fresh image (N, C, H, W) from its phase grids.
        The padding is dropped (its gradient goes nowhere), and phases that no tap
        reads are not looked at (their gradient is zero)."""
        xp = backend.get_array_module(grids)
        image = xp.zeros(self.image_shape, dtype=dtype)
        channel_major = image.transpose(1, 0, 2, 3)
        for cells, pixels in self._phase_cells(grids):
            channel_major[pixels] = cells
        return image

    def on_grid(self, y, out):
        """Fill ``out`` (O, N*GH*GW) with outputs ``y`` (N, O, OH, OW), zeros elsewhere."""
        n, o = y.shape[:2]
        out.fill(0)
        out.reshape(o, n, self.gh, self.gw)[:, :, :self.oh, :self.ow] = y.transpose(1, 0, 2, 3)
        return out

    def crop(self, grid):
        """The outputs (N, O, OH, OW) of a flat output grid (O, N*GH*GW), as a fresh array."""
        o, n = grid.shape[0], self.image_shape[0]
        outputs = grid.reshape(o, n, self.gh, self.gw)[:, :, :self.oh, :self.ow]
        return outputs.transpose(1, 0, 2, 3).copy()  # a copy even when no cropping is needed


_scratch_buffers = threading.local()
SCRATCH_KEEP_LIMIT = 256 * 2 ** 20  # bytes: larger temporaries are not kept between calls


def scratch(xp, name, shape, dtype):
    """An uninitialised array for a temporary that never leaves the op asking for it.

    A large new NumPy array is mapped fresh from the operating system, which zeroes
    each page on first touch: for the kh*kw-times expanded matrices of conv2d that
    costs about as much as writing them.  So on NumPy each ``name`` keeps one buffer
    (per thread), grown as needed and reused by the next call; arrays handed out
    under one name share memory, so an op uses each name for one live array at a
    time.  Temporaries over SCRATCH_KEEP_LIMIT (a huge evaluation batch) are
    allocated afresh instead, so as not to hold that memory for good.  CuPy's memory
    pool already recycles device memory: there it is xp.empty.
    """
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if xp is not np or nbytes > SCRATCH_KEEP_LIMIT:
        return xp.empty(shape, dtype=dtype)
    buffer = getattr(_scratch_buffers, name, None)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = np.empty(nbytes, dtype=np.uint8)
        setattr(_scratch_buffers, name, buffer)
    return buffer[:nbytes].view(dtype).reshape(shape)


def _cell_length(size, kernel, stride, pad, out):
    """Rows (or columns) per image cell of the flat phase grids: the fewest for which
    no output reads another image's (or row's) pixels.

    In phase a, image row r sits at cell row (r + pad) // stride, so its pixels fill
    cell rows first..last; outputs 0..out-1 read cell rows 0..out-1+reach, reach
    = (kernel-1-a) // stride.  Reads past the cell land in the next cell, which must
    still be padding there: the cell must hold ``out + reach - first`` rows, and the
    pixels themselves (``last + 1``).
    """
    length = out
    for a in range(min(stride, kernel)):
        reach = (kernel - 1 - a) // stride
        rows = _phase_slice(size, pad, stride, a)
        if rows is not None:
            first, last = rows[0].start, rows[0].stop - 1
            length = max(length, out + reach - first, last + 1)
    return length


def _phase_slice(size, pad, stride, phase):
    """Cell index i of one phase holds padded coordinate i*stride + phase, that is image
    coordinate i*stride + phase - pad: the (cell, image) slices of the valid ones."""
    first = max(0, -((phase - pad) // stride))          # ceil((pad - phase) / stride)
    last = (size - 1 + pad - phase) // stride + 1
    if last <= first:
        return None
    start = first * stride + phase - pad
    return slice(first, last), slice(start, start + (last - first - 1) * stride + 1, stride)

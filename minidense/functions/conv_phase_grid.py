"""conv2d on phase grids: an optimization of im2col for the CPU (NumPy).

The basic algorithm, im2col + one matrix product + col2im, is ``Conv2d`` in
``connection.py``: read it first.  This module computes the same convolution with
the same matrix products, but cuts the patches from *phase grids* (``TapGrid``), on
which the patch of one kernel tap for the whole batch is a single contiguous slice:
im2col becomes kh*kw contiguous copies instead of a strided gather, and col2im
kh*kw contiguous additions.  It also expands whichever side of each product has
fewer channels (C in, O out), which halves the memory traffic that dominates these
products when C and O differ (DenseNet's 48 -> 12 3x3 conv expands 12 channels, not 48):

* forward, O <= C: *output shifts*.  Z = W_taps (kh*kw*O, C) @ x_grid gives each
  tap's contribution at every grid position; y is the sum of the kh*kw slices of Z
  shifted by each tap's offset.
* forward, O > C: *im2col*: copy the kh*kw shifted slices of x_grid into a
  (kh*kw*C, size) matrix and multiply by W (O, kh*kw*C).
* backward, O <= C: *expand the output gradient*, the transposed convolution: G
  holds gy shifted by each tap's offset, (kh*kw*O, size); dx_grid = W (C, kh*kw*O)
  @ G and dW = G @ x_grid^T, one expansion serving both.
* backward, O > C: *expand x*: dW = gy_grid @ patches^T, and dx is the col2im of
  W^T @ gy_grid, a shifted add per tap on the phase grids.

1x1 convolutions with stride 1 and no padding need no patches at all: one matrix
product per image (``forward_pointwise``, ``backward_pointwise``).  The expanded
matrices and grids are temporaries in ``minidense.workspace`` buffers.  The copies and
shifted additions run on ``minidense.threads``, one slice of the images or of the grid
columns per thread (the matrix products are BLAS's, threaded by BLAS); each element
gets the same additions in the same order wherever the slices are cut.
"""
from __future__ import annotations

import numpy as np

from .. import backend, threads, workspace
from ._utils import output_size


def is_pointwise(kernel, stride, padding) -> bool:
    return tuple(kernel) + tuple(stride) + tuple(padding) == (1, 1, 1, 1, 0, 0)


def forward_pointwise(x, w):
    """y of a 1x1 convolution with stride 1 and no padding: W (O, C) @ x per image."""
    xp = backend.get_array_module(x)
    n, c, h, wd = x.shape
    o = w.shape[0]
    return xp.matmul(w.reshape(o, c), x.reshape(n, c, h * wd)).reshape(n, o, h, wd)


def forward(x, w, stride, padding, expands=None, dilation=(1, 1)):
    """y = conv2d(x, w) on phase grids; ``expands``: "output" (output shifts) or "input"
    (im2col on the grids), None choosing the side with fewer channels."""
    xp = backend.get_array_module(x)
    o, c = w.shape[:2]
    grid = TapGrid(x.shape, w.shape[2:], stride, padding, dilation)
    size = grid.size
    dtype = np.result_type(x.dtype, w.dtype)
    x_grids = grid.phases(
        x, workspace.get("x_grids", (len(grid.phase_taps), c, grid.input_size), dtype, x))
    w_taps = _weight_taps(w, grid, dtype)                 # (O, C, taps)
    y_grid = workspace.get("y_grid", (o, size), dtype, x)
    if (expands or ("output" if o <= c else "input")) == "output":
        first = True   # the first tap's slice is copied into y_grid, the others added
        for f, taps in enumerate(grid.phase_taps):
            if taps.stop == taps.start:
                continue
            w_f = w_taps[:, :, taps].transpose(2, 0, 1).reshape(-1, c)
            z = workspace.get("expanded", (len(w_f), grid.input_size), dtype, x)
            xp.matmul(w_f, x_grids[f], out=z)
            z = z.reshape(-1, o, grid.input_size)         # (taps of phase f, O, input_size)

            def add_shifted(cols, z=z, offsets=grid.offsets[taps], first=first):
                y = y_grid[:, cols]
                for t, offset in enumerate(offsets):
                    shifted = z[t, :, cols.start + offset:cols.stop + offset]
                    if first and t == 0:
                        y[...] = shifted
                    else:
                        y += shifted
            threads.map_split(add_shifted, size, like=x)
            first = False
    else:  # im2col
        patches = _patches(x_grids, grid)                 # (taps*C, size)
        w_mat = w_taps.transpose(0, 2, 1).reshape(o, -1)  # (O, taps*C)
        xp.matmul(w_mat, patches, out=y_grid)
    return grid.crop(y_grid)


def backward(x, w, gy, stride, padding, want_gx, want_gw, expands=None, dilation=(1, 1)):
    """(gx, gw) on phase grids; ``expands``: "gy" (the transposed convolution) or "x"
    (patches and col2im), None choosing the side with fewer channels."""
    xp = backend.get_array_module(gy)
    o, c = w.shape[:2]
    grid = TapGrid(x.shape, w.shape[2:], stride, padding, dilation)
    phases, taps, size, input_size = len(grid.phase_taps), len(grid.taps), grid.size, grid.input_size
    dtype = np.result_type(x.dtype, w.dtype, gy.dtype)
    if want_gw:
        x_grids = grid.phases(x, workspace.get("x_grids", (phases, c, input_size), dtype, x))
        gw_taps = xp.empty((taps, o, c), dtype=dtype)
    if want_gx:
        gx_grids = workspace.get("gx_grids", (phases, c, input_size), dtype, x)
    w_taps = _weight_taps(w, grid, dtype)
    gy_grid = grid.on_grid(gy, workspace.get("y_grid", (o, size), dtype, x))
    if (expands or ("gy" if o <= c else "x")) == "gy":
        # Transposed convolution: gy shifted by each tap's offset, (taps, O, input_size).
        gy_shifted = workspace.get("expanded", (taps, o, input_size), dtype, x)

        def shift(cols):   # column j of tap k's row block is gy_grid's column j - offset
            for k, offset in enumerate(grid.offsets):
                lo, hi = _shifted_overlap(cols, offset, size)
                if hi <= lo:
                    gy_shifted[k, :, cols] = 0
                    continue
                gy_shifted[k, :, cols.start:lo] = 0
                gy_shifted[k, :, lo:hi] = gy_grid[:, lo - offset:hi - offset]
                gy_shifted[k, :, hi:cols.stop] = 0
        threads.map_split(shift, input_size, like=x)
        for f, phase_taps in enumerate(grid.phase_taps):
            g = gy_shifted[phase_taps].reshape(-1, input_size)  # (taps of f * O, input_size)
            if len(g) == 0:
                continue
            if want_gw:
                gw_taps[phase_taps] = xp.matmul(g, x_grids[f].T).reshape(-1, o, c)
            if want_gx:
                w_f = w_taps[:, :, phase_taps].transpose(1, 2, 0).reshape(c, -1)
                xp.matmul(w_f, g, out=gx_grids[f])
    else:
        if want_gw:
            patches = _patches(x_grids, grid)
            gw_taps[...] = xp.matmul(gy_grid, patches.T).reshape(o, -1, c).transpose(1, 0, 2)
            del patches  # its buffer is reused just below
        if want_gx:  # col2im: each tap's patch gradient added back at its offset
            w_mat = w_taps.transpose(0, 2, 1).reshape(o, -1)
            patch_grads = workspace.get("expanded", (taps * c, size), dtype, x)
            xp.matmul(w_mat.T, gy_grid, out=patch_grads)
            patch_grads = patch_grads.reshape(taps, c, size)

            def col2im(cols):   # gx_grids' columns cols: each tap's patch gradient added
                gx_grids[:, :, cols] = 0
                for k, (f, offset) in enumerate(zip(grid.tap_phase, grid.offsets)):
                    lo, hi = _shifted_overlap(cols, offset, size)
                    if lo < hi:
                        gx_grids[f][:, lo:hi] += patch_grads[k][:, lo - offset:hi - offset]
            threads.map_split(col2im, input_size, like=x)
    gx = gw = None
    if want_gx:
        gx = grid.image_from_phases(gx_grids, x.dtype)
    if want_gw:
        gw = xp.zeros(w.shape, dtype=w.dtype)
        kys, kxs = zip(*grid.taps)
        gw[:, :, list(kys), list(kxs)] = gw_taps.transpose(1, 2, 0)
    return gx, gw


def backward_pointwise(x, w, gy, want_gx, want_gw):
    """(gx, gw) of a 1x1 convolution with stride 1 and no padding: matrix products per
    image, no patches."""
    xp = backend.get_array_module(gy)
    n, c, h, wd = x.shape
    o = w.shape[0]
    gy_mat = gy.reshape(n, o, h * wd)
    gx = xp.matmul(w.reshape(o, c).T, gy_mat).reshape(x.shape) if want_gx else None
    gw = None
    if want_gw and h * wd < 64:
        # Small maps (MobileNet's 4x4): one product over the whole batch, (O, N*H*W) @
        # (N*H*W, C), after two small copies, instead of N products whose inner
        # dimension H*W is too short for BLAS to run well (2.5x faster at 4x4).
        gy_rows = xp.ascontiguousarray(gy_mat.transpose(1, 0, 2)).reshape(o, n * h * wd)
        x_rows = xp.ascontiguousarray(x.reshape(n, c, h * wd).transpose(1, 0, 2)).reshape(c, n * h * wd)
        gw = xp.matmul(gy_rows, x_rows.T).reshape(w.shape)
    elif want_gw:
        gw = xp.matmul(gy_mat, x.reshape(n, c, h * wd).transpose(0, 2, 1)).sum(axis=0)
        gw = gw.reshape(w.shape)
    return gx, gw


def _shifted_overlap(cols, offset, size):
    """The columns of ``cols`` that a slice of ``size`` columns shifted by ``offset``
    covers, as (lo, hi); empty when hi <= lo."""
    return max(cols.start, offset), min(cols.stop, offset + size)


def _weight_taps(w, grid, dtype):
    """The weights (O, C, kh, kw) as (O, C, taps), taps in the grid's order."""
    kys, kxs = zip(*grid.taps)
    return w[:, :, list(kys), list(kxs)].astype(dtype, copy=False)


def _patches(x_grids, grid):
    """im2col on phase grids: (taps*C, size), row block k = the slice tap k reads."""
    c = x_grids.shape[1]
    patches = workspace.get("expanded", (len(grid.taps), c, grid.size), x_grids.dtype, x_grids)

    def copy(cols):
        for k, (f, offset) in enumerate(zip(grid.tap_phase, grid.offsets)):
            patches[k][:, cols] = x_grids[f][:, cols.start + offset:cols.stop + offset]
    threads.map_split(copy, grid.size, like=x_grids)
    return patches.reshape(-1, grid.size)


class TapGrid:
    """Flat grids on which every tap of a (strided) convolution is a plain shift.

    A convolution with stride (sy, sx) and dilation (dy, dx) reads the zero-padded
    image at row ``oy*sy + ry`` and column ``ox*sx + rx``, where (ry, rx) = (ky*dy,
    kx*dx) is where tap (ky, kx) sits.  Split the padded image into its sy*sx *phases*
    (rows ``a, a+sy, ...`` and columns ``b, b+sx, ...``): the tap then reads phase
    (ry % sy, rx % sx) at (oy + ry // sy, ox + rx // sx), a stride-1 shift.  (With
    stride 1 there is one phase: the padded image.)

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

    def __init__(self, image_shape, kernel, stride, pad, dilation=(1, 1)):
        n, c, h, w = image_shape
        (kh, kw), (sy, sx), (ph, pw), (dy, dx) = kernel, stride, pad, dilation
        self.image_shape, self.stride, self.pad = tuple(image_shape), (sy, sx), (ph, pw)
        self.oh, self.ow = output_size(h, kh, sy, ph, dy), output_size(w, kw, sx, pw, dx)
        # The cells as for an undilated kernel of the dilated one's span (enough room)
        self.gh = _cell_length(h, dy * (kh - 1) + 1, sy, ph, self.oh)
        self.gw = _cell_length(w, dx * (kw - 1) + 1, sx, pw, self.ow)
        self.size = n * self.gh * self.gw
        self.taps, self.offsets, self.tap_phase, self.phase_taps = [], [], [], []
        for a in range(sy):
            for b in range(sx):
                first = len(self.taps)
                for ky in (ky for ky in range(kh) if ky * dy % sy == a):
                    for kx in (kx for kx in range(kw) if kx * dx % sx == b):
                        self.taps.append((ky, kx))
                        self.offsets.append((ky * dy // sy) * self.gw + kx * dx // sx)
                        self.tap_phase.append(a * sx + b)
                self.phase_taps.append(slice(first, len(self.taps)))
        self.input_size = self.size + max(self.offsets)

    def _phase_cells(self, grids):
        """For each phase that some tap reads: the view of its cells (C, N, rows, columns)
        that hold image pixels, and the rows and columns of those pixels in the image."""
        n, c, h, w = self.image_shape
        (sy, sx), (ph, pw) = self.stride, self.pad
        found = []
        for f, taps in enumerate(self.phase_taps):
            rows = _phase_slice(h, ph, sy, f // sx)
            cols = _phase_slice(w, pw, sx, f % sx)
            if rows is None or cols is None or taps.stop == taps.start:
                continue
            cells = grids[f, :, :self.size].reshape(c, n, self.gh, self.gw)
            found.append((cells[:, :, rows[0], cols[0]], rows[1], cols[1]))
        return found

    def _on_images(self, fn, like):
        """fn(slice of images) over the batch, one slice per thread."""
        threads.map_split(fn, self.image_shape[0], like=like)

    def phases(self, x, out):
        """Fill ``out`` (sy*sx, C, input_size) with the phases of zero-padded ``x`` (N, C, H, W)
        (only those that some tap reads)."""
        cell = self.gh * self.gw
        out[:, :, self.size:] = 0      # the zero tail that the last image's taps read
        channel_major = x.transpose(1, 0, 2, 3)
        phase_cells = self._phase_cells(out)

        def copy(images):
            out[:, :, images.start * cell:images.stop * cell] = 0
            for cells, rows, cols in phase_cells:
                cells[:, images] = channel_major[:, images, rows, cols]
        self._on_images(copy, x)
        return out

    def image_from_phases(self, grids, dtype):
        """The adjoint of ``phases``: a fresh image (N, C, H, W) from its phase grids.
        The padding is dropped (its gradient goes nowhere), and phases that no tap
        reads are not looked at (their gradient is zero)."""
        xp = backend.get_array_module(grids)
        image = xp.empty(self.image_shape, dtype=dtype)
        channel_major = image.transpose(1, 0, 2, 3)
        phase_cells = self._phase_cells(grids)

        def copy(images):
            image[images] = 0
            for cells, rows, cols in phase_cells:
                channel_major[:, images, rows, cols] = cells[:, images]
        self._on_images(copy, grids)
        return image

    def on_grid(self, y, out):
        """Fill ``out`` (O, N*GH*GW) with outputs ``y`` (N, O, OH, OW), zeros elsewhere."""
        n, o = y.shape[:2]
        cells = out.reshape(o, n, self.gh, self.gw)

        def copy(images):
            cells[:, images, self.oh:] = 0
            cells[:, images, :self.oh, self.ow:] = 0
            cells[:, images, :self.oh, :self.ow] = y[images].transpose(1, 0, 2, 3)
        self._on_images(copy, y)
        return out

    def crop(self, grid):
        """The outputs (N, O, OH, OW) of a flat output grid (O, N*GH*GW), as a fresh array."""
        xp = backend.get_array_module(grid)
        o, n = grid.shape[0], self.image_shape[0]
        outputs = grid.reshape(o, n, self.gh, self.gw)[:, :, :self.oh, :self.ow]
        y = xp.empty((n, o, self.oh, self.ow), dtype=grid.dtype)

        def copy(images):
            y[images] = outputs[:, images].transpose(1, 0, 2, 3)
        self._on_images(copy, grid)
        return y


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

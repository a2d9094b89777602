"""Layers that connect every input unit to output units: convolution and linear."""
from __future__ import annotations

import numpy as np

from .. import backend
from ..autograd import Function
from ._utils import TapGrid, col2im, expect_ndim, im2col, output_size, pair, scratch


class Conv2d(Function):
    """2-D convolution (cross-correlation, as in every framework) by patch matrices
    and matrix products.

    Forward: every output pixel is the dot product of the weights, viewed as
    (out, in*kh*kw), with the patch of the input under the kernel; laying the
    patches side by side (im2col) makes the whole layer one matrix product.
    Backward: dW is the product of the output gradient with the same patches
    (recomputed: they are kh*kw times larger than x, so they are never kept), and
    dx is W^T times the output gradient, summed back onto the image (col2im).
    Keeps: x and W.

    How, on NumPy.  Patches are cut from :class:`TapGrid` phase grids, on which the
    patch of one kernel tap for the whole batch is a single contiguous slice (a
    stride-s convolution becomes s*s stride-1 ones, one per phase of the image), and
    the product is one large matrix product rather than one per image.  Either side
    of a product can be the one expanded kh*kw times; the side with fewer channels
    is (C in, O out), which halves the memory traffic that dominates these products
    when C and O differ (DenseNet's 48 -> 12 3x3 conv expands 12 channels, not 48):

    * forward, O <= C: *output shifts*.  Z = W_taps (kh*kw*O, C) @ x_grid gives each
      tap's contribution at every grid position; y is the sum of the kh*kw slices
      of Z shifted by each tap's offset.
    * forward, O > C: *im2col*: copy the kh*kw shifted slices of x_grid into a
      (kh*kw*C, size) matrix and multiply by W (O, kh*kw*C).
    * backward, O <= C: *expand the output gradient*, the transposed convolution:
      G holds gy shifted by each tap's offset, (kh*kw*O, size); dx_grid = W (C,
      kh*kw*O) @ G and dW = G @ x_grid^T, one expansion serving both.
    * backward, O > C: *expand x*: dW = gy_grid @ patches^T, and dx is the col2im
      of W^T @ gy_grid, a shifted add per tap on the phase grids.

    The expanded matrices and grids are temporaries in ``scratch`` buffers, reused
    from call to call instead of being freshly mapped (and zeroed) by the OS.

    On NumPy, 1x1 convolutions with stride 1 and no padding need no patches at all:
    one batched product per image.  On CuPy (the "gather" layout, chosen per backend
    in ``_on_grid``), im2col and col2im are the gather kernels of ``backend`` writing
    a (C*kh*kw, N*OH*OW) patch matrix, 1x1 convolutions included (their im2col is a
    transpose), and every product is one 2-D GEMM.
    """

    # None chooses as described above; set on an instance to force a path (tests do,
    # to check every path on NumPy).
    layout = None            # "grid" (NumPy's choice) or "gather" (CuPy's)
    forward_expands = None   # "output" or "input"
    backward_expands = None  # "gy" or "x"

    def __init__(self, stride=1, padding=0):
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")

    def _on_grid(self, xp):
        return (self.layout or ("grid" if xp is np else "gather")) == "grid"

    def forward(self, x, w, b=None):
        expect_ndim("conv2d", "input", x, 4, "N, C, H, W")
        expect_ndim("conv2d", "weight", w, 4, "out_channels, in_channels, kh, kw")
        n, c, h, wd = x.shape
        o, ci, kh, kw = w.shape
        if c != ci:
            raise ValueError(f"conv2d: input has {c} channels (shape {tuple(x.shape)}) but the weight "
                             f"expects {ci} (weight shape {tuple(w.shape)})")
        if b is not None and b.shape != (o,):
            raise ValueError(f"conv2d: bias must have shape ({o},), got {tuple(b.shape)}")
        (sy, sx), (ph, pw) = self.stride, self.padding
        oh, ow = output_size(h, kh, sy, ph), output_size(wd, kw, sx, pw)
        if oh <= 0 or ow <= 0:
            raise ValueError(f"conv2d: a {kh}x{kw} kernel with padding {self.padding} does not fit "
                             f"an input of shape {tuple(x.shape)}")
        self.save_for_backward(x, w)
        xp = backend.get_array_module(x)
        if not self._on_grid(xp):
            y = self._forward_gather(x, w)
        elif (kh, kw, sy, sx, ph, pw) == (1, 1, 1, 1, 0, 0):
            y = xp.matmul(w.reshape(o, c), x.reshape(n, c, h * wd)).reshape(n, o, h, wd)
        else:
            y = self._forward_on_grid(x, w)
        if b is not None:
            y += b.reshape(1, o, 1, 1)
        return y

    def backward(self, gy):
        x, w = self.saved
        want_gx, want_gw = self.needs_input_grad[:2]
        kh, kw = w.shape[2:]
        xp = backend.get_array_module(gy)
        if not self._on_grid(xp):
            gx, gw = self._backward_gather(x, w, gy, want_gx, want_gw)
        elif (kh, kw) + self.stride + self.padding == (1, 1, 1, 1, 0, 0):
            gx, gw = self._backward_pointwise(x, w, gy, want_gx, want_gw)
        else:
            gx, gw = self._backward_on_grid(x, w, gy, want_gx, want_gw)
        if len(self.needs_input_grad) == 2:
            return gx, gw
        gb = gy.sum(axis=(0, 2, 3)) if self.needs_input_grad[2] else None
        return gx, gw, gb

    # -- NumPy: phase grids ---------------------------------------------------------
    def _forward_on_grid(self, x, w):
        xp = backend.get_array_module(x)
        o, c = w.shape[:2]
        grid = TapGrid(x.shape, w.shape[2:], self.stride, self.padding)
        size = grid.size
        dtype = np.result_type(x.dtype, w.dtype)
        x_grids = grid.phases(x, scratch(xp, "x_grids", (len(grid.phase_taps), c, grid.input_size), dtype))
        w_taps = _weight_taps(w, grid, dtype)                 # (O, C, taps)
        y_grid = scratch(xp, "y_grid", (o, size), dtype)
        if (self.forward_expands or ("output" if o <= c else "input")) == "output":
            y_grid.fill(0)
            for f, taps in enumerate(grid.phase_taps):
                if taps.stop == taps.start:
                    continue
                w_f = w_taps[:, :, taps].transpose(2, 0, 1).reshape(-1, c)
                z = scratch(xp, "expanded", (len(w_f), grid.input_size), dtype)
                xp.matmul(w_f, x_grids[f], out=z)
                z = z.reshape(-1, o, grid.input_size)         # (taps of phase f, O, input_size)
                for t, offset in enumerate(grid.offsets[taps]):
                    y_grid += z[t, :, offset:offset + size]
        else:  # im2col
            patches = _patches(x_grids, grid)                 # (taps*C, size)
            w_mat = w_taps.transpose(0, 2, 1).reshape(o, -1)  # (O, taps*C)
            xp.matmul(w_mat, patches, out=y_grid)
        return grid.crop(y_grid)

    def _backward_on_grid(self, x, w, gy, want_gx, want_gw):
        xp = backend.get_array_module(gy)
        o, c = w.shape[:2]
        grid = TapGrid(x.shape, w.shape[2:], self.stride, self.padding)
        phases, taps, size, input_size = len(grid.phase_taps), len(grid.taps), grid.size, grid.input_size
        dtype = np.result_type(x.dtype, w.dtype, gy.dtype)
        if want_gw:
            x_grids = grid.phases(x, scratch(xp, "x_grids", (phases, c, input_size), dtype))
            gw_taps = xp.empty((taps, o, c), dtype=dtype)
        if want_gx:
            gx_grids = scratch(xp, "gx_grids", (phases, c, input_size), dtype)
        w_taps = _weight_taps(w, grid, dtype)
        gy_grid = grid.on_grid(gy, scratch(xp, "y_grid", (o, size), dtype))
        if (self.backward_expands or ("gy" if o <= c else "x")) == "gy":
            # Transposed convolution: gy shifted by each tap's offset, (taps, O, input_size).
            gy_shifted = scratch(xp, "expanded", (taps, o, input_size), dtype)
            for k, offset in enumerate(grid.offsets):
                gy_shifted[k, :, :offset] = 0
                gy_shifted[k, :, offset:offset + size] = gy_grid
                gy_shifted[k, :, offset + size:] = 0
            for f, phase_taps in enumerate(grid.phase_taps):
                g = gy_shifted[phase_taps].reshape(-1, input_size)  # (taps of f * O, input_size)
                if len(g) == 0:
                    continue
                if want_gw:
                    gw_taps[phase_taps] = (g @ x_grids[f].T).reshape(-1, o, c)
                if want_gx:
                    w_f = w_taps[:, :, phase_taps].transpose(1, 2, 0).reshape(c, -1)
                    xp.matmul(w_f, g, out=gx_grids[f])
        else:
            if want_gw:
                patches = _patches(x_grids, grid)
                gw_taps[...] = (gy_grid @ patches.T).reshape(o, -1, c).transpose(1, 0, 2)
                del patches  # its buffer is reused just below
            if want_gx:  # col2im: each tap's patch gradient added back at its offset
                w_mat = w_taps.transpose(0, 2, 1).reshape(o, -1)
                patch_grads = scratch(xp, "expanded", (taps * c, size), dtype)
                xp.matmul(w_mat.T, gy_grid, out=patch_grads)
                patch_grads = patch_grads.reshape(taps, c, size)
                gx_grids.fill(0)
                for k, (f, offset) in enumerate(zip(grid.tap_phase, grid.offsets)):
                    gx_grids[f][:, offset:offset + size] += patch_grads[k]
        gx = gw = None
        if want_gx:
            gx = grid.image_from_phases(gx_grids, x.dtype)
        if want_gw:
            gw = xp.zeros(w.shape, dtype=w.dtype)
            kys, kxs = zip(*grid.taps)
            gw[:, :, list(kys), list(kxs)] = gw_taps.transpose(1, 2, 0)
        return gx, gw

    # -- 1x1, stride 1, no padding: no patches --------------------------------------
    def _backward_pointwise(self, x, w, gy, want_gx, want_gw):
        xp = backend.get_array_module(gy)
        n, c, h, wd = x.shape
        o = w.shape[0]
        gy_mat = gy.reshape(n, o, h * wd)
        gx = xp.matmul(w.reshape(o, c).T, gy_mat).reshape(x.shape) if want_gx else None
        gw = None
        if want_gw:
            gw = xp.matmul(gy_mat, x.reshape(n, c, h * wd).transpose(0, 2, 1)).sum(axis=0)
            gw = gw.reshape(w.shape)
        return gx, gw

    # -- CuPy: im2col and col2im gather kernels -------------------------------------
    # The patch matrix is (C*kh*kw, N*OH*OW), so that forward and both gradients are
    # single 2-D GEMMs: cuBLAS takes the transposes (W^T, patches^T) as flags, with no
    # copy, where batched products per image would copy patches^T and take the
    # pointer-array batched GEMM for the broadcast weights.
    def _forward_gather(self, x, w):
        xp = backend.get_array_module(x)
        n = x.shape[0]
        o, c, kh, kw = w.shape
        oh, ow = (output_size(s, k, st, p) for s, k, st, p in
                  zip(x.shape[2:], (kh, kw), self.stride, self.padding))
        cols = im2col(x, (kh, kw), self.stride, self.padding, rows=True)
        y = xp.matmul(w.reshape(o, -1), cols)                             # (O, N*OH*OW)
        return xp.ascontiguousarray(y.reshape(o, n, oh, ow).transpose(1, 0, 2, 3))

    def _backward_gather(self, x, w, gy, want_gx, want_gw):
        xp = backend.get_array_module(gy)
        n, o, oh, ow = gy.shape
        kh, kw = w.shape[2:]
        gy_mat = xp.ascontiguousarray(gy.transpose(1, 0, 2, 3)).reshape(o, n * oh * ow)
        gx = gw = None
        if want_gw:
            cols = im2col(x, (kh, kw), self.stride, self.padding, rows=True)
            gw = xp.matmul(gy_mat, cols.T).reshape(w.shape)
            del cols
        if want_gx:
            gcols = xp.matmul(w.reshape(o, -1).T, gy_mat)                  # (C*kh*kw, N*OH*OW)
            gx = col2im(gcols, x.shape, self.stride, self.padding, rows=(kh, kw))
        return gx, gw


def _weight_taps(w, grid, dtype):
    """The weights (O, C, kh, kw) as (O, C, taps), taps in the grid's order."""
    kys, kxs = zip(*grid.taps)
    return w[:, :, list(kys), list(kxs)].astype(dtype, copy=False)


def _patches(x_grids, grid):
    """im2col on phase grids: (taps*C, size), row block k = the slice tap k reads."""
    xp = backend.get_array_module(x_grids)
    c = x_grids.shape[1]
    patches = scratch(xp, "expanded", (len(grid.taps), c, grid.size), x_grids.dtype)
    for k, (f, offset) in enumerate(zip(grid.tap_phase, grid.offsets)):
        patches[k] = x_grids[f][:, offset:offset + grid.size]
    return patches.reshape(-1, grid.size)


class Linear(Function):
    """y = x W^T + b, with W of shape (out_features, in_features) as in PyTorch.
    Keeps: x and W."""

    def forward(self, x, w, b=None):
        expect_ndim("linear", "weight", w, 2, "out_features, in_features")
        if x.ndim < 1 or x.shape[-1] != w.shape[1]:
            raise ValueError(f"linear: input has {x.shape[-1] if x.ndim else 0} features "
                             f"(shape {tuple(x.shape)}) but the weight expects {w.shape[1]} "
                             f"(weight shape {tuple(w.shape)})")
        if b is not None and b.shape != (w.shape[0],):
            raise ValueError(f"linear: bias must have shape ({w.shape[0]},), got {tuple(b.shape)}")
        self.save_for_backward(x, w)
        y = x @ w.T
        if b is not None:
            y += b
        return y

    def backward(self, gy):
        x, w = self.saved
        gx = gy @ w if self.needs_input_grad[0] else None
        gw = None
        if self.needs_input_grad[1]:
            gw = gy.reshape(-1, gy.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        grads = (gx, gw)
        if len(self.needs_input_grad) == 3:
            gb = gy.reshape(-1, gy.shape[-1]).sum(axis=0) if self.needs_input_grad[2] else None
            grads += (gb,)
        return grads


def conv2d(x, w, b=None, stride=1, padding=0):
    """2-D convolution of x (N, C, H, W) with w (out, C, kh, kw), optional bias b (out,)."""
    op = Conv2d(stride, padding)
    return op(x, w) if b is None else op(x, w, b)


def linear(x, w, b=None):
    """x W^T + b."""
    return Linear()(x, w) if b is None else Linear()(x, w, b)

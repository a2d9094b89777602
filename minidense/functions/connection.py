"""Layers that connect every input unit to output units: convolution and linear."""
from __future__ import annotations

from .. import backend
from ..autograd import Function
from ._utils import col2im, expect_ndim, im2col, output_size, pair


class Conv2d(Function):
    """2-D convolution (cross-correlation, as in every framework) by im2col.

    Forward: the patches of x become the columns of a matrix (im2col) and one matrix
    product with the weights, viewed as (out, in*kh*kw), gives every output pixel.
    Backward: dW is a product of the output gradient with the patches (recomputed:
    the patch matrix is kh*kw times larger than x, so it is never kept), and dx is
    the product of W^T with the output gradient, summed back onto the image (col2im).
    A 1x1 convolution with stride 1 and no padding needs no im2col at all.
    Keeps: x and W.
    """

    def __init__(self, stride=1, padding=0):
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")

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
        self.pointwise = (kh, kw, sy, sx, ph, pw) == (1, 1, 1, 1, 0, 0)
        self.save_for_backward(x, w)
        xp = backend.get_array_module(x)
        cols = self._columns(x, kh, kw)                    # (N, C*kh*kw, OH*OW)
        y = xp.matmul(w.reshape(o, -1), cols)              # (N, O, OH*OW)
        y = y.reshape(n, o, oh, ow)
        if b is not None:
            y += b.reshape(1, o, 1, 1)
        return y

    def _columns(self, x, kh, kw):
        n, c = x.shape[:2]
        if self.pointwise:
            return x.reshape(n, c, -1)
        col = im2col(x, (kh, kw), self.stride, self.padding)
        return col.reshape(n, c * kh * kw, -1)

    def backward(self, gy):
        x, w = self.saved
        xp = backend.get_array_module(gy)
        n, o, oh, ow = gy.shape
        kh, kw = w.shape[2:]
        gy_mat = gy.reshape(n, o, oh * ow)
        gx = gw = gb = None
        if self.needs_input_grad[1]:
            cols = self._columns(x, kh, kw)
            gw = xp.matmul(gy_mat, cols.transpose(0, 2, 1)).sum(axis=0).reshape(w.shape)
            del cols
        if self.needs_input_grad[0]:
            gcols = xp.matmul(w.reshape(o, -1).T, gy_mat)    # (N, C*kh*kw, OH*OW)
            if self.pointwise:
                gx = gcols.reshape(x.shape)
            else:
                gcols = gcols.reshape(n, x.shape[1], kh, kw, oh, ow)
                gx = col2im(gcols, x.shape, self.stride, self.padding)
        if len(self.needs_input_grad) == 3 and self.needs_input_grad[2]:
            gb = gy.sum(axis=(0, 2, 3))
        return (gx, gw) if len(self.needs_input_grad) == 2 else (gx, gw, gb)


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

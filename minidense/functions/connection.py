"""Layers that connect every input unit to output units: convolution and linear."""
from __future__ import annotations

import contextlib
import threading

from .. import backend
from ..autograd import Function
from ..fast_paths import fast_paths_enabled
from . import conv_phase_grid as phase_grid
from . import conv_winograd as winograd
from ._utils import col2im, expect_ndim, expect_one_dtype, im2col, output_size, pair
from .array import transpose
from .math import matmul


# The algorithms conv2d can use, the basic one first; ``conv_algorithm`` chooses.
CONV_ALGORITHMS = ("im2col", "phase_grid", "winograd")


class _ThreadState(threading.local):
    algorithm = None   # the choice of the innermost ``conv_algorithm`` block; None: per device


_state = _ThreadState()


@contextlib.contextmanager
def conv_algorithm(name):
    """Run conv2d with algorithm ``name`` inside the block, in this thread (``with
    md.conv_algorithm("im2col"):`` trains a model on the textbook path); None restores
    the default, chosen per device.  Each conv2d keeps the algorithm of its forward for
    its backward.  ``md.plain_ops()`` overrides it: im2col."""
    if name is not None and name not in CONV_ALGORITHMS:
        raise ValueError(f"conv_algorithm: unknown algorithm {name!r}; expected one of "
                         f"{', '.join(CONV_ALGORITHMS)} (or None for the default)")
    previous, _state.algorithm = _state.algorithm, name
    try:
        yield
    finally:
        _state.algorithm = previous


def chosen_conv_algorithm(x) -> str:
    """The algorithm a conv2d on ``x`` takes now: im2col under ``md.plain_ops()``, else
    the innermost ``conv_algorithm`` block's choice, else the device's default."""
    if not fast_paths_enabled():
        return "im2col"
    return _state.algorithm or default_conv_algorithm(x)


def default_conv_algorithm(x) -> str:
    """Chosen per backend, here and only here: phase grids on the CPU (NumPy), where a
    forward + backward takes 1.1x (64 channels, 8x8) to 3.7x (32x32 images) less time
    than the textbook path; im2col on CuPy, whose gather kernels write the patch
    matrix in one pass."""
    return "phase_grid" if backend.device_of(x) == "cpu" else "im2col"


class Conv2d(Function):
    """2-D convolution (cross-correlation, as in every framework) by im2col and one
    matrix product.

    The textbook algorithm (``_forward_im2col``, ``_backward_im2col``):

    * forward: every output pixel is the dot product of the weights, viewed as
      (O, C*kh*kw), with the patch of the input under the kernel.  im2col lays the
      patches of the whole batch side by side as the columns of one (C*kh*kw,
      N*OH*OW) matrix, so the layer is one matrix product: y = W @ cols.
    * backward: dW = gy @ cols^T (the patches recomputed: they are kh*kw times larger
      than x, so they are never kept), and dx = col2im(W^T @ gy), col2im summing each
      patch's gradient back onto the pixels it came from (the adjoint of im2col).

    Keeps: x and W.  The reference it is tested against is ``minidense.testing.
    conv2d_loops``, plain loops over pixels and taps.

    ``conv_algorithm`` chooses the algorithm; by default it is chosen per device
    (``default_conv_algorithm``): on CuPy im2col and col2im are the gather kernels of
    ``backend``; on NumPy, conv2d takes an optimization of the same products, the
    phase grids of ``conv_phase_grid.py``.  ``conv_winograd.py`` is a third algorithm,
    for stride-1 3x3 kernels on NumPy (others fall back to the device's default).
    """

    # Set on an instance to force a path (tests do): the algorithm, and which side of
    # the products the phase-grid algorithm expands ("output"/"input", "gy"/"x").
    algorithm = None
    forward_expands = None
    backward_expands = None

    def __init__(self, stride=1, padding=0):
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")

    def forward(self, x, w, b=None):
        expect_ndim("conv2d", "input", x, 4, "N, C, H, W")
        expect_ndim("conv2d", "weight", w, 4, "out_channels, in_channels, kh, kw")
        expect_one_dtype("conv2d", input=x, weight=w, bias=b)
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
        # Fixed now, so that backward takes the same algorithm wherever it runs.
        self.algorithm = self.algorithm or chosen_conv_algorithm(x)
        if self.algorithm == "winograd" and not (winograd.applies((kh, kw), self.stride)
                                                 and backend.device_of(x) == "cpu"):
            # Winograd covers stride-1 3x3 kernels on NumPy; others take the device's default.
            self.algorithm = "phase_grid" if backend.device_of(x) == "cpu" else "im2col"
        if self.algorithm == "winograd":
            y = winograd.forward(x, w, self.padding)
        elif self.algorithm == "im2col":
            y = self._forward_im2col(x, w)
        elif phase_grid.is_pointwise((kh, kw), self.stride, self.padding):
            y = phase_grid.forward_pointwise(x, w)
        else:
            y = phase_grid.forward(x, w, self.stride, self.padding, self.forward_expands)
        if b is not None:
            y += b.reshape(1, o, 1, 1)
        return y

    def backward(self, gy):
        x, w = self.saved
        want_gx, want_gw = self.needs_input_grad[:2]
        if self.algorithm == "winograd":
            gx, gw = winograd.backward(x, w, gy, self.padding, want_gx, want_gw)
        elif self.algorithm == "im2col":
            gx, gw = self._backward_im2col(x, w, gy, want_gx, want_gw)
        elif phase_grid.is_pointwise(w.shape[2:], self.stride, self.padding):
            gx, gw = phase_grid.backward_pointwise(x, w, gy, want_gx, want_gw)
        else:
            gx, gw = phase_grid.backward(x, w, gy, self.stride, self.padding, want_gx, want_gw,
                                         self.backward_expands)
        if len(self.needs_input_grad) == 2:
            return gx, gw
        gb = gy.sum(axis=(0, 2, 3)) if self.needs_input_grad[2] else None
        return gx, gw, gb

    # -- The basic algorithm: im2col, one matrix product, col2im --------------------
    # The patch matrix is (C*kh*kw, N*OH*OW), so that forward and both gradients are
    # single 2-D GEMMs: cuBLAS takes the transposes (W^T, patches^T) as flags, with no
    # copy, where batched products per image would copy patches^T and take the
    # pointer-array batched GEMM for the broadcast weights.  (im2col and col2im are
    # CuPy kernels on the GPU, strided NumPy copies on the CPU: see _utils.)
    def _forward_im2col(self, x, w):
        xp = backend.get_array_module(x)
        n = x.shape[0]
        o, c, kh, kw = w.shape
        oh, ow = (output_size(s, k, st, p) for s, k, st, p in
                  zip(x.shape[2:], (kh, kw), self.stride, self.padding))
        cols = im2col(x, (kh, kw), self.stride, self.padding, rows=True)
        y = xp.matmul(w.reshape(o, -1), cols)                             # (O, N*OH*OW)
        return xp.ascontiguousarray(y.reshape(o, n, oh, ow).transpose(1, 0, 2, 3))

    def _backward_im2col(self, x, w, gy, want_gx, want_gw):
        gw = self._weight_grad_im2col(x, gy, w.shape) if want_gw else None
        gx = self._input_grad_im2col(gy, w, x.shape) if want_gx else None
        return gx, gw

    def _weight_grad_im2col(self, x, gy, w_shape):
        """dW = gy @ patches^T."""
        xp = backend.get_array_module(gy)
        cols = im2col(x, w_shape[2:], self.stride, self.padding, rows=True)
        return xp.matmul(_gy_matrix(gy), cols.T).reshape(w_shape)

    def _input_grad_im2col(self, gy, w, x_shape):
        """dx = col2im(W^T @ gy): the transposed convolution of gy by W."""
        xp = backend.get_array_module(gy)
        o = w.shape[0]
        gcols = xp.matmul(w.reshape(o, -1).T, _gy_matrix(gy))              # (C*kh*kw, N*OH*OW)
        return col2im(gcols, x_shape, self.stride, self.padding, rows=tuple(w.shape[2:]))

    # -- Differentiable twice (create_graph=True) -------------------------------------
    # The gradients are ops themselves, which close on each other as in Chainer: the
    # input gradient is a transposed convolution (Conv2dGradInput), the weight gradient
    # an op of its own (Conv2dGradWeight), and each one's backward is made of
    # convolutions and the other.  They run the basic algorithm.
    differentiable = True

    def differentiable_backward(self, gy):
        x, w = self.saved_tensors()
        want_gx, want_gw = self.needs_input_grad[:2]
        gx = Conv2dGradInput(x.shape, self.stride, self.padding)(gy, w) if want_gx else None
        gw = Conv2dGradWeight(w.shape, self.stride, self.padding)(x, gy) if want_gw else None
        if len(self.needs_input_grad) == 2:
            return gx, gw
        return gx, gw, (gy.sum(axis=(0, 2, 3)) if self.needs_input_grad[2] else None)


def _gy_matrix(gy):
    """gy (N, O, OH, OW) as the (O, N*OH*OW) matrix of the products."""
    n, o, oh, ow = gy.shape
    return backend.get_array_module(gy).ascontiguousarray(gy.transpose(1, 0, 2, 3)).reshape(o, n * oh * ow)


class Conv2dGradInput(Function):
    """gx = the transposed convolution of gy by W (conv2d's input gradient), as an op.
    Linear in each of gy and W: d/dgy is conv2d by W, d/dW is Conv2dGradWeight."""

    differentiable = True

    def __init__(self, x_shape, stride, padding):
        self.x_shape, self.conv = tuple(x_shape), Conv2d(stride, padding)

    def forward(self, gy, w):
        self.save_for_backward(gy, w)
        return self.conv._input_grad_im2col(gy, w, self.x_shape)

    def backward(self, g):
        gy, w = self.saved
        ggy = self.conv._forward_im2col(g, w) if self.needs_input_grad[0] else None
        gw = self.conv._weight_grad_im2col(g, gy, w.shape) if self.needs_input_grad[1] else None
        return ggy, gw

    def differentiable_backward(self, g):
        gy, w = self.saved_tensors()
        stride, padding = self.conv.stride, self.conv.padding
        ggy = Conv2d(stride, padding)(g, w) if self.needs_input_grad[0] else None
        gw = Conv2dGradWeight(w.shape, stride, padding)(g, gy) if self.needs_input_grad[1] else None
        return ggy, gw


class Conv2dGradWeight(Function):
    """gW = gy @ patches(x)^T (conv2d's weight gradient), as an op.  Linear in each of x
    and gy: d/dx is Conv2dGradInput of gy by the upstream g, d/dgy is conv2d of x by g."""

    differentiable = True

    def __init__(self, w_shape, stride, padding):
        self.w_shape, self.conv = tuple(w_shape), Conv2d(stride, padding)

    def forward(self, x, gy):
        self.save_for_backward(x, gy)
        return self.conv._weight_grad_im2col(x, gy, self.w_shape)

    def backward(self, g):
        x, gy = self.saved
        gx = self.conv._input_grad_im2col(gy, g, x.shape) if self.needs_input_grad[0] else None
        ggy = self.conv._forward_im2col(x, g) if self.needs_input_grad[1] else None
        return gx, ggy

    def differentiable_backward(self, g):
        x, gy = self.saved_tensors()
        stride, padding = self.conv.stride, self.conv.padding
        gx = Conv2dGradInput(x.shape, stride, padding)(gy, g) if self.needs_input_grad[0] else None
        ggy = Conv2d(stride, padding)(x, g) if self.needs_input_grad[1] else None
        return gx, ggy


class Linear(Function):
    """y = x W^T + b, with W of shape (out_features, in_features) as in PyTorch.
    Keeps: x and W."""

    def forward(self, x, w, b=None):
        expect_ndim("linear", "weight", w, 2, "out_features, in_features")
        expect_one_dtype("linear", input=x, weight=w, bias=b)
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

    differentiable = True

    def differentiable_backward(self, gy):
        x, w = self.saved_tensors()
        gx = matmul(gy, w) if self.needs_input_grad[0] else None
        rows = gy.reshape(-1, gy.shape[-1])
        gw = matmul(transpose(rows, 1, 0), x.reshape(-1, x.shape[-1])) if self.needs_input_grad[1] else None
        grads = (gx, gw)
        if len(self.needs_input_grad) == 3:
            grads += (rows.sum(axis=0) if self.needs_input_grad[2] else None,)
        return grads


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution of ``input`` (N, C, H, W) with ``weight`` (out, C, kh, kw) and an
    optional ``bias`` (out,).  ``padding``: an int, a pair, or "valid" (0) or "same" (odd
    kernels, stride 1).  Only dilation 1 and groups 1 are supported."""
    if pair(dilation, "dilation") != (1, 1) or groups != 1:
        raise NotImplementedError(f"conv2d: dilation={dilation!r} and groups={groups!r} are not "
                                  f"supported; minidense has dilation=1 and groups=1 only")
    if isinstance(padding, str):
        padding = same_padding("conv2d", padding, weight.shape[2:], stride)
    op = Conv2d(stride, padding)
    return op(input, weight) if bias is None else op(input, weight, bias)


def same_padding(op, padding, kernel_size, stride):
    """PyTorch's padding="valid" (none) and "same" (the output keeps the input's size)."""
    if padding == "valid":
        return 0
    if padding != "same":
        raise ValueError(f"{op}: padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    kh, kw = pair(kernel_size, "kernel_size")
    if pair(stride, "stride") != (1, 1) or kh % 2 == 0 or kw % 2 == 0:
        raise NotImplementedError(f"{op}: padding='same' is supported for stride 1 and odd kernel "
                                  f"sizes only, got stride={stride!r}, kernel_size={(kh, kw)}")
    return kh // 2, kw // 2


def linear(input, weight, bias=None):
    """input W^T + b."""
    return Linear()(input, weight) if bias is None else Linear()(input, weight, bias)

"""Layers that connect every input unit to output units: convolution and linear."""
from __future__ import annotations

import contextlib
import math
import threading

import numpy as np

from .. import backend
from ..autograd import Function
from ..fast_paths import fast_paths_enabled
from . import conv_depthwise as depthwise
from . import conv_phase_grid as phase_grid
from . import conv_winograd as winograd
from ._utils import col2im, expect_ndim, expect_one_dtype, im2col, output_size, pair
from .array import transpose
from .math import matmul


# The algorithms conv2d can use, the basic one first; ``conv_algorithm`` chooses.
# "depthwise" computes depthwise convolutions only (groups == in_channels).
CONV_ALGORITHMS = ("im2col", "phase_grid", "winograd", "depthwise")


class _ThreadState(threading.local):
    algorithm = None   # the choice of the innermost ``conv_algorithm`` block; None: per device


_state = _ThreadState()


@contextlib.contextmanager
def conv_algorithm(name):
    """Run conv2d with algorithm ``name`` inside the block, in this thread (``with
    md.conv_algorithm("im2col"):`` trains a model on the textbook path); None restores
    the default, chosen per device and per convolution.  Each conv2d keeps the
    algorithm of its forward for its backward.  ``md.plain_ops()`` overrides it: im2col.
    "depthwise" refuses a convolution that is not depthwise; "winograd" leaves those
    that are not 3x3 with stride 1 on NumPy to the default."""
    if name is not None and name not in CONV_ALGORITHMS:
        raise ValueError(f"conv_algorithm: unknown algorithm {name!r}; expected one of "
                         f"{', '.join(CONV_ALGORITHMS)} (or None for the default)")
    previous, _state.algorithm = _state.algorithm, name
    try:
        yield
    finally:
        _state.algorithm = previous


def chosen_conv_algorithm(x, w=None, groups=1) -> str:
    """The algorithm a conv2d of ``x`` (with weights ``w`` and ``groups``) takes now:
    im2col under ``md.plain_ops()``, else the innermost ``conv_algorithm`` block's
    choice, else the default (``default_conv_algorithm``)."""
    if not fast_paths_enabled():
        return "im2col"
    return _state.algorithm or default_conv_algorithm(x, w, groups)


def default_conv_algorithm(x, w=None, groups=1) -> str:
    """Chosen here and only here: depthwise convolutions (more than one group, one input
    channel each) by per-channel shifted multiply-adds, on either backend; the others per
    backend: phase grids on the CPU (NumPy), where a forward + backward takes 1.1x (64
    channels, 8x8) to 3.7x (32x32 images) less time than the textbook path; im2col on
    CuPy, whose gather kernels write the patch matrix in one pass."""
    if w is not None and groups > 1 and depthwise.applies(x.shape, w.shape, groups):
        return "depthwise"
    return "phase_grid" if backend.device_of(x) == "cpu" else "im2col"


class Conv2d(Function):
    """2-D convolution (cross-correlation, as in every framework) by im2col and one
    matrix product per group of channels.

    The textbook algorithm (``_forward_im2col``, ``_backward_im2col``):

    * forward: every output pixel is the dot product of the weights, viewed as
      (O, C*kh*kw), with the patch of the input under the kernel.  im2col lays the
      patches of the whole batch side by side as the columns of one (C*kh*kw,
      N*OH*OW) matrix, so the layer is one matrix product: y = W @ cols.
    * backward: dW = gy @ cols^T (the patches recomputed: they are kh*kw times larger
      than x, so they are never kept), and dx = col2im(W^T @ gy), col2im summing each
      patch's gradient back onto the pixels it came from (the adjoint of im2col).
    * groups: the channels are cut into ``groups`` equal groups, and output group g
      sees input group g alone.  The weights are (O, C/groups, kh, kw); the patch
      matrix's rows come channel by channel, so group g's patches are its g-th block
      of rows, and the layer is one batched product of the groups' blocks: y_g = W_g
      @ cols_g.  (groups == C is a *depthwise* convolution: one channel per group.)
    * dilation (dy, dx): the taps of the kernel sit dy rows and dx columns apart, so
      a kh x kw kernel spans dy*(kh-1)+1 rows; im2col reads the patches that way.

    Keeps: x and W.  The reference it is tested against is ``minidense.testing.
    conv2d_loops``, plain loops over groups, pixels and taps.

    ``conv_algorithm`` chooses the algorithm; by default it is chosen per device and
    convolution (``default_conv_algorithm``): on CuPy im2col and col2im are the gather
    kernels of ``_utils``; on NumPy, conv2d takes an optimization of the same products,
    the phase grids of ``conv_phase_grid.py``.  ``conv_winograd.py`` is a third
    algorithm, for stride-1 3x3 kernels on NumPy (others fall back to the default);
    these two take one group at a time.  Depthwise convolutions take
    ``conv_depthwise.py`` by default, on either backend: per-channel shifted
    multiply-adds, with no patch matrix.
    """

    # Set on an instance to force a path (tests do): the algorithm, and which side of
    # the products the phase-grid algorithm expands ("output"/"input", "gy"/"x").
    algorithm = None
    forward_expands = None
    backward_expands = None

    def __init__(self, stride=1, padding=0, dilation=1, groups=1):
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        self.dilation = pair(dilation, "dilation")
        self.groups = groups
        check_conv_options("conv2d", self.stride, self.padding, self.dilation, groups)

    def forward(self, x, w, b=None):
        expect_ndim("conv2d", "input", x, 4, "N, C, H, W")
        expect_ndim("conv2d", "weight", w, 4, "out_channels, in_channels / groups, kh, kw")
        expect_one_dtype("conv2d", input=x, weight=w, bias=b)
        c = x.shape[1]
        o, ci, kh, kw = w.shape
        g = self.groups
        if c % g:
            raise ValueError(f"conv2d: the input's {c} channels (shape {tuple(x.shape)}) are not "
                             f"divisible by groups={g}")
        if o % g:
            raise ValueError(f"conv2d: the weight's {o} output channels (weight shape "
                             f"{tuple(w.shape)}) are not divisible by groups={g}")
        if c != ci * g:
            per_group = f" ({ci} per group, groups={g})" if g > 1 else ""
            raise ValueError(f"conv2d: input has {c} channels (shape {tuple(x.shape)}) but the weight "
                             f"expects {ci * g}{per_group} (weight shape {tuple(w.shape)})")
        if b is not None and b.shape != (o,):
            raise ValueError(f"conv2d: bias must have shape ({o},), got {tuple(b.shape)}")
        oh, ow = self._output_size(x.shape, w.shape)
        if oh <= 0 or ow <= 0:
            spread = f" with dilation {self.dilation}" if self.dilation != (1, 1) else ""
            raise ValueError(f"conv2d: a {kh}x{kw} kernel{spread} and padding {self.padding} do "
                             f"not fit an input of shape {tuple(x.shape)}")
        self.save_for_backward(x, w)
        # Fixed now, so that backward takes the same algorithm wherever it runs.
        self.algorithm = self._algorithm(x, w)
        y = self._convolve(x, w)
        if b is not None:
            y += b.reshape(1, o, 1, 1)
        return y

    def _convolve(self, x, w):
        """y = x convolved by w (no bias) by this convolution's algorithm, already chosen."""
        if self.algorithm == "depthwise":
            return depthwise.forward(x, w, self.stride, self.padding, self.dilation)
        if self.algorithm == "im2col":
            return self._forward_im2col(x, w)
        if self.groups == 1:
            return self._forward_one_group(x, w)
        # phase grids and Winograd: one group at a time
        n, c = x.shape[:2]
        o = w.shape[0]
        oh, ow = self._output_size(x.shape, w.shape)
        y = backend.get_array_module(x).empty((n, o, oh, ow), dtype=np.result_type(x, w))
        for ins, outs in _group_slices(c, o, self.groups):
            y[:, outs] = self._forward_one_group(x[:, ins], w[outs])
        return y

    def _output_size(self, x_shape, w_shape):
        """(OH, OW) of this convolution of an input of x_shape by weights of w_shape."""
        return tuple(output_size(s, k, st, p, d) for s, k, st, p, d in
                     zip(x_shape[2:], w_shape[2:], self.stride, self.padding, self.dilation))

    def _algorithm(self, x, w):
        """The algorithm of this convolution: the instance's, else the chosen one, with
        Winograd's fallback, and a clear error where the choice cannot compute it."""
        name = self.algorithm or chosen_conv_algorithm(x, w, self.groups)
        if name == "depthwise" and not depthwise.applies(x.shape, w.shape, self.groups):
            raise ValueError(f"conv2d: the depthwise algorithm computes depthwise convolutions "
                             f"only (groups == in_channels, one input channel per group); this "
                             f"one has groups={self.groups}, input shape {tuple(x.shape)} and "
                             f"weight shape {tuple(w.shape)}: choose another algorithm with "
                             f"md.conv_algorithm, or None for the default")
        if name == "winograd" and not (winograd.applies(w.shape[2:], self.stride)
                                       and backend.device_of(x) == "cpu"):
            # Winograd covers stride-1 3x3 kernels on NumPy; others take the default.
            name = default_conv_algorithm(x, w, self.groups)
        return name

    def _forward_one_group(self, x, w):
        """y of one group by phase grids or Winograd."""
        if self.algorithm == "winograd":
            return winograd.forward(x, w, self.padding, self.dilation)
        if phase_grid.is_pointwise(w.shape[2:], self.stride, self.padding):
            return phase_grid.forward_pointwise(x, w)
        return phase_grid.forward(x, w, self.stride, self.padding, self.forward_expands,
                                  self.dilation)

    def backward(self, gy):
        x, w = self.saved
        gx, gw = self._gradients(x, w, gy, *self.needs_input_grad[:2])
        if len(self.needs_input_grad) == 2:
            return gx, gw
        gb = gy.sum(axis=(0, 2, 3)) if self.needs_input_grad[2] else None
        return gx, gw, gb

    def _gradients(self, x, w, gy, want_gx, want_gw):
        """(gx, gw) by this convolution's algorithm, either None when not wanted.  gx
        reads only x's shape and dtype, and gw only w's."""
        if self.algorithm == "depthwise":
            return depthwise.backward(x, w, gy, self.stride, self.padding, self.dilation,
                                      want_gx, want_gw)
        if self.algorithm == "im2col":
            return self._backward_im2col(x, w, gy, want_gx, want_gw)
        if self.groups == 1:
            return self._backward_one_group(x, w, gy, want_gx, want_gw)
        # phase grids and Winograd: one group at a time
        xp = backend.get_array_module(gy)
        gx = xp.empty(x.shape, dtype=x.dtype) if want_gx else None
        gw = xp.empty(w.shape, dtype=w.dtype) if want_gw else None
        for ins, outs in _group_slices(x.shape[1], w.shape[0], self.groups):
            gx_g, gw_g = self._backward_one_group(x[:, ins], w[outs], gy[:, outs], want_gx, want_gw)
            if want_gx:
                gx[:, ins] = gx_g
            if want_gw:
                gw[outs] = gw_g
        return gx, gw

    def _backward_one_group(self, x, w, gy, want_gx, want_gw):
        """(gx, gw) of one group by phase grids or Winograd."""
        if self.algorithm == "winograd":
            return winograd.backward(x, w, gy, self.padding, want_gx, want_gw, self.dilation)
        if phase_grid.is_pointwise(w.shape[2:], self.stride, self.padding):
            return phase_grid.backward_pointwise(x, w, gy, want_gx, want_gw)
        return phase_grid.backward(x, w, gy, self.stride, self.padding, want_gx, want_gw,
                                   self.backward_expands, self.dilation)

    # -- The basic algorithm: im2col, one matrix product per group, col2im ------------
    # The patch matrix is (C*kh*kw, N*OH*OW), so that forward and both gradients are
    # single 2-D GEMMs with one group (cuBLAS takes the transposes, W^T and patches^T,
    # as flags, with no copy, where batched products per image would copy patches^T),
    # and one batched GEMM over the groups' blocks of rows with several.  (im2col and
    # col2im are CuPy kernels on the GPU, strided NumPy copies on the CPU: see _utils.)
    def _forward_im2col(self, x, w):
        xp = backend.get_array_module(x)
        n, g = x.shape[0], self.groups
        o, ci, kh, kw = w.shape
        oh, ow = self._output_size(x.shape, w.shape)
        cols = im2col(x, (kh, kw), self.stride, self.padding, rows=True, dilation=self.dilation)
        y = _matmul_per_group(w.reshape(g, o // g, ci * kh * kw),
                              cols.reshape(g, ci * kh * kw, n * oh * ow))   # (G, O/G, N*OH*OW)
        return xp.ascontiguousarray(y.reshape(o, n, oh, ow).transpose(1, 0, 2, 3))

    def _backward_im2col(self, x, w, gy, want_gx, want_gw):
        gw = self._weight_grad_im2col(x, gy, w.shape) if want_gw else None
        gx = self._input_grad_im2col(gy, w, x.shape) if want_gx else None
        return gx, gw

    def _weight_grad_im2col(self, x, gy, w_shape):
        """dW = gy @ patches^T, group by group."""
        n, o, oh, ow = gy.shape
        g, rows = self.groups, math.prod(w_shape[1:])                    # C/G*kh*kw
        cols = im2col(x, w_shape[2:], self.stride, self.padding, rows=True,
                      dilation=self.dilation).reshape(g, rows, n * oh * ow)
        return _matmul_per_group(_gy_matrix(gy, g), cols.transpose(0, 2, 1)).reshape(w_shape)

    def _input_grad_im2col(self, gy, w, x_shape):
        """dx = col2im(W^T @ gy), group by group: the transposed convolution of gy by W."""
        n, o, oh, ow = gy.shape
        g, rows = self.groups, w[0].size
        w_t = w.reshape(g, o // g, rows).transpose(0, 2, 1)
        gcols = _matmul_per_group(w_t, _gy_matrix(gy, g))                 # (G, C/G*kh*kw, N*OH*OW)
        return col2im(gcols.reshape(g * rows, n * oh * ow), x_shape, self.stride, self.padding,
                      rows=tuple(w.shape[2:]), dilation=self.dilation)

    def options(self):
        """(stride, padding, dilation, groups)."""
        return self.stride, self.padding, self.dilation, self.groups

    # -- Differentiable twice (create_graph=True) -------------------------------------
    # The gradients are ops themselves, which close on each other as in Chainer: the
    # input gradient is a transposed convolution (Conv2dGradInput), the weight gradient
    # an op of its own (Conv2dGradWeight), and each one's backward is made of
    # convolutions and the other.  They compute with this convolution's algorithm.
    differentiable = True

    def differentiable_backward(self, gy):
        x, w = self.saved_tensors()
        want_gx, want_gw = self.needs_input_grad[:2]
        gx = Conv2dGradInput(x.shape, self)(gy, w) if want_gx else None
        gw = Conv2dGradWeight(w.shape, self)(x, gy) if want_gw else None
        if len(self.needs_input_grad) == 2:
            return gx, gw
        return gx, gw, (gy.sum(axis=(0, 2, 3)) if self.needs_input_grad[2] else None)

    def _same_convolution(self):
        """A Conv2d with this one's options and algorithm, already chosen: the
        arithmetic of the gradient ops, whose own gradients are this convolution's."""
        twin = Conv2d(*self.options())
        twin.algorithm = self.algorithm
        twin.forward_expands, twin.backward_expands = self.forward_expands, self.backward_expands
        return twin


def _gy_matrix(gy, groups):
    """gy (N, O, OH, OW) as the groups' (O/G, N*OH*OW) matrices of the products."""
    n, o, oh, ow = gy.shape
    xp = backend.get_array_module(gy)
    return xp.ascontiguousarray(gy.transpose(1, 0, 2, 3)).reshape(groups, o // groups, n * oh * ow)


def _stand_in(shape, like):
    """An array of ``shape`` that holds no memory (a broadcast zero): the algorithms'
    input gradient needs only x's shape and dtype, and their weight gradient only w's."""
    xp = backend.get_array_module(like)
    return xp.broadcast_to(xp.zeros((), dtype=like.dtype), shape)


class Conv2dGradInput(Function):
    """gx = the transposed convolution of gy by W (conv2d's input gradient), as an op.
    Linear in each of gy and W: d/dgy is conv2d by W, d/dW is Conv2dGradWeight."""

    differentiable = True

    def __init__(self, x_shape, conv):
        self.x_shape, self.conv = tuple(x_shape), conv._same_convolution()

    def forward(self, gy, w):
        self.save_for_backward(gy, w)
        return self.conv._gradients(_stand_in(self.x_shape, gy), w, gy, True, False)[0]

    def backward(self, g):
        gy, w = self.saved
        ggy = self.conv._convolve(g, w) if self.needs_input_grad[0] else None
        gw = (self.conv._gradients(g, _stand_in(w.shape, w), gy, False, True)[1]
              if self.needs_input_grad[1] else None)
        return ggy, gw

    def differentiable_backward(self, g):
        gy, w = self.saved_tensors()
        ggy = Conv2d(*self.conv.options())(g, w) if self.needs_input_grad[0] else None
        gw = Conv2dGradWeight(w.shape, self.conv)(g, gy) if self.needs_input_grad[1] else None
        return ggy, gw


class Conv2dGradWeight(Function):
    """gW = gy @ patches(x)^T (conv2d's weight gradient), as an op.  Linear in each of x
    and gy: d/dx is Conv2dGradInput of gy by the upstream g, d/dgy is conv2d of x by g."""

    differentiable = True

    def __init__(self, w_shape, conv):
        self.w_shape, self.conv = tuple(w_shape), conv._same_convolution()

    def forward(self, x, gy):
        self.save_for_backward(x, gy)
        return self.conv._gradients(x, _stand_in(self.w_shape, x), gy, False, True)[1]

    def backward(self, g):
        x, gy = self.saved
        gx = (self.conv._gradients(_stand_in(x.shape, x), g, gy, True, False)[0]
              if self.needs_input_grad[0] else None)
        ggy = self.conv._convolve(x, g) if self.needs_input_grad[1] else None
        return gx, ggy

    def differentiable_backward(self, g):
        x, gy = self.saved_tensors()
        gx = Conv2dGradInput(x.shape, self.conv)(gy, g) if self.needs_input_grad[0] else None
        ggy = Conv2d(*self.conv.options())(x, g) if self.needs_input_grad[1] else None
        return gx, ggy


def _matmul_per_group(a, b):
    """a[g] @ b[g] for every group g, as one batched product; with one group a 2-D
    product (on CuPy that one takes TF32 when it is on, the batched one does not)."""
    if len(a) == 1:
        return backend.get_array_module(a).matmul(a[0], b[0])[None]
    return backend.get_array_module(a).matmul(a, b)


def _group_slices(in_channels, out_channels, groups):
    """(input channels, output channels) of each group, as slices."""
    ci, co = in_channels // groups, out_channels // groups
    return [(slice(k * ci, (k + 1) * ci), slice(k * co, (k + 1) * co)) for k in range(groups)]


def check_conv_options(op, stride, padding, dilation, groups):
    """Clear errors for hyperparameters no convolution has (as PyTorch's checks)."""
    if min(stride) < 1:
        raise ValueError(f"{op}: stride must be positive, got {stride}")
    if min(padding) < 0:
        raise ValueError(f"{op}: padding must be non-negative, got {padding}")
    if min(dilation) < 1:
        raise ValueError(f"{op}: dilation must be positive, got {dilation}")
    if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive integer, got {groups!r}")


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
    """2-D convolution of ``input`` (N, C, H, W) with ``weight`` (out_channels, C / groups,
    kh, kw) and an optional ``bias`` (out_channels,), as PyTorch's: ``stride``, ``padding``
    (an int, a pair, "valid" or "same") and ``dilation`` (the spacing of the taps) each an
    int or a pair; ``groups`` splits the channels into that many groups convolved
    separately (``groups == C``: depthwise)."""
    if isinstance(padding, str):
        (dy, dx), (kh, kw) = pair(dilation, "dilation"), weight.shape[2:]
        padding = same_padding("conv2d", padding, (dy * (kh - 1) + 1, dx * (kw - 1) + 1), stride)
    op = Conv2d(stride, padding, dilation, groups)
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

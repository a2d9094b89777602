"""Elementwise arithmetic, matrix product and reductions."""
from __future__ import annotations

import collections

import numpy as np

from .. import backend
from ..autograd import Function, Tensor, as_tensor
from ._utils import sum_to
from .array import Reshape, Transpose, broadcast_to, sum_to_shape


class Add(Function):
    differentiable = True

    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, gy):
        return sum_to(gy, self.shapes[0]), sum_to(gy, self.shapes[1])

    def differentiable_backward(self, gy):
        return sum_to_shape(gy, self.shapes[0]), sum_to_shape(gy, self.shapes[1])


class Sub(Function):
    differentiable = True

    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, gy):
        return sum_to(gy, self.shapes[0]), sum_to(-gy, self.shapes[1])

    def differentiable_backward(self, gy):
        return sum_to_shape(gy, self.shapes[0]), sum_to_shape(-gy, self.shapes[1])


class Mul(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        self.save_for_backward(a if self.needs_input_grad[1] else None,
                               b if self.needs_input_grad[0] else None)
        return a * b

    def backward(self, gy):
        a, b = self.saved
        ga = sum_to(gy * b, self.shapes[0]) if b is not None else None
        gb = sum_to(gy * a, self.shapes[1]) if a is not None else None
        return ga, gb

    differentiable = True

    def differentiable_backward(self, gy):
        a, b = self.saved_tensors()
        ga = sum_to_shape(gy * b, self.shapes[0]) if b is not None else None
        gb = sum_to_shape(gy * a, self.shapes[1]) if a is not None else None
        return ga, gb


class Div(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        y = a / b
        self.save_for_backward(b, y if self.needs_input_grad[1] else None)
        return y

    def backward(self, gy):
        b, y = self.saved
        ga = sum_to(gy / b, self.shapes[0]) if self.needs_input_grad[0] else None
        gb = sum_to(-gy * y / b, self.shapes[1]) if y is not None else None
        return ga, gb

    differentiable = True

    def differentiable_backward(self, gy):
        b, y = self.saved_tensors()   # y: the output, a function of a and b in the graph
        ga = sum_to_shape(gy / b, self.shapes[0]) if self.needs_input_grad[0] else None
        gb = sum_to_shape(-gy * y / b, self.shapes[1]) if y is not None else None
        return ga, gb


class Neg(Function):
    differentiable = True

    def forward(self, x):
        return -x

    def backward(self, gy):
        return -gy

    def differentiable_backward(self, gy):
        return -gy


class PowScalar(Function):
    """x ** c for a constant exponent c."""

    def __init__(self, exponent):
        self.exponent = exponent

    def forward(self, x):
        self.save_for_backward(x)
        return x ** self.exponent

    def backward(self, gy):
        (x,) = self.saved
        c = self.exponent
        return gy * (c * x ** (c - 1))

    differentiable = True

    def differentiable_backward(self, gy):
        (x,) = self.saved_tensors()
        c = self.exponent
        return gy * (c * x ** (c - 1))


class Pow(Function):
    """a ** b for two tensors.  d/da = b a^(b-1) needs a and b; d/db = y log a needs
    a and the output y.  Keeps: a, and b or y only when their gradient is wanted."""

    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        y = a ** b
        want_ga, want_gb = self.needs_input_grad
        self.save_for_backward(a, b if want_ga else None, y if want_gb else None)
        return y

    def backward(self, gy):
        a, b, y = self.saved
        xp = backend.get_array_module(a)
        ga = sum_to(gy * b * a ** (b - 1), self.shapes[0]) if b is not None else None
        gb = None
        if y is not None:
            log_a = xp.where(a > 0, xp.log(xp.where(a > 0, a, 1)), 0)  # 0 where a <= 0
            gb = sum_to(gy * y * log_a, self.shapes[1])
        return ga, gb

    differentiable = True

    def differentiable_backward(self, gy):
        a, b, y = self.saved_tensors()
        ga = sum_to_shape(gy * b * a ** (b - 1), self.shapes[0]) if b is not None else None
        gb = None
        if y is not None:
            positive = Tensor((a.data > 0).astype(a.dtype))   # a constant mask: log a, 0 where a <= 0
            log_a = log(a * positive + (1 - positive)) * positive
            gb = sum_to_shape(gy * y * log_a, self.shapes[1])
        return ga, gb


class MatMul(Function):
    """a @ b for arrays of two or more dimensions, batch dimensions broadcast."""

    def forward(self, a, b):
        if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
            raise ValueError(f"matmul: cannot multiply shapes {tuple(a.shape)} and {tuple(b.shape)}: "
                             f"the last axis of the first must equal the second-to-last of the second")
        self.save_for_backward(a if self.needs_input_grad[1] else None,
                               b if self.needs_input_grad[0] else None)
        self.shapes = a.shape, b.shape
        return a @ b

    def backward(self, gy):
        a, b = self.saved
        ga = sum_to(gy @ b.swapaxes(-1, -2), self.shapes[0]) if b is not None else None
        gb = sum_to(a.swapaxes(-1, -2) @ gy, self.shapes[1]) if a is not None else None
        return ga, gb

    differentiable = True

    def differentiable_backward(self, gy):
        a, b = self.saved_tensors()
        ga = sum_to_shape(MatMul()(gy, _swap_last_axes(b)), self.shapes[0]) if b is not None else None
        gb = sum_to_shape(MatMul()(_swap_last_axes(a), gy), self.shapes[1]) if a is not None else None
        return ga, gb


class Exp(Function):
    differentiable = True

    def forward(self, x):
        y = backend.get_array_module(x).exp(x)
        self.save_for_backward(y)
        return y

    def backward(self, gy):
        (y,) = self.saved
        return gy * y

    def differentiable_backward(self, gy):
        (y,) = self.saved_tensors()
        return gy * y


class Log(Function):
    differentiable = True

    def forward(self, x):
        self.save_for_backward(x)
        return backend.get_array_module(x).log(x)

    def backward(self, gy):
        (x,) = self.saved
        return gy / x

    def differentiable_backward(self, gy):
        (x,) = self.saved_tensors()
        return gy / x


class Sqrt(Function):
    differentiable = True

    def forward(self, x):
        y = backend.get_array_module(x).sqrt(x)
        self.save_for_backward(y)
        return y

    def backward(self, gy):
        (y,) = self.saved
        return gy / (2 * y)

    def differentiable_backward(self, gy):
        (y,) = self.saved_tensors()
        return gy / (2 * y)


def _normalise_axis(axis, ndim, op):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"{op}: dim {a} is out of range for a tensor with {ndim} dimensions")
        out.append(a % ndim)
    return tuple(sorted(set(out)))


class Sum(Function):
    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.axes = _normalise_axis(self.axis, x.ndim, "sum")
        self.input_shape = x.shape
        return x.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        if not self.keepdims:
            gy = xp.expand_dims(gy, self.axes)
        return xp.broadcast_to(gy, self.input_shape).copy()

    differentiable = True

    def differentiable_backward(self, gy):
        return broadcast_to(_with_reduced_axes(gy, self.axes, self.input_shape), self.input_shape)


class Max(Function):
    """Maximum over axes (PyTorch's ``amax``, and ``max()`` over every element); tied
    maxima share the gradient equally, as in PyTorch."""

    reduce = "max"

    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.axes = _normalise_axis(self.axis, x.ndim, self.reduce)
        y = getattr(x, self.reduce)(axis=self.axes, keepdims=True)
        mask = x == y
        # The tie count in x's dtype: an int64 count would turn the gradient into float64.
        self.save_for_backward(mask, mask.sum(axis=self.axes, keepdims=True, dtype=x.dtype))
        return y if self.keepdims else y.squeeze(self.axes)

    def backward(self, gy):
        mask, count = self.saved
        xp = backend.get_array_module(gy)
        if not self.keepdims:
            gy = xp.expand_dims(gy, self.axes)
        return mask * (gy / count)

    differentiable = True

    def differentiable_backward(self, gy):
        # Piecewise linear: the mask and the tie count are constants.
        mask, count = self.saved
        share = Tensor((mask / count).astype(gy.dtype, copy=False))
        return share * _with_reduced_axes(gy, self.axes, mask.shape)


class Step(Function):
    """(x > 0) as x's dtype: the ReLU's mask.  Its derivative is zero (almost
    everywhere), but the mask stays a function of x in the graph, as PyTorch's
    threshold_backward keeps it: a gradient with respect to a tensor that only the mask
    depends on is zero rather than missing."""

    differentiable = True

    def forward(self, x):
        self.shape = x.shape
        return (x > 0).astype(x.dtype)

    def backward(self, gy):
        return backend.get_array_module(gy).zeros(self.shape, dtype=gy.dtype)

    def differentiable_backward(self, gy):
        return gy * 0.0


def _with_reduced_axes(gy, axes, shape):
    """A reduction's gradient with its reduced axes put back as size 1 (a Reshape)."""
    kept = tuple(1 if i in axes else n for i, n in enumerate(shape))
    return gy if tuple(gy.shape) == kept else Reshape(kept)(gy)


def _swap_last_axes(t):
    axes = list(range(t.ndim))
    axes[-1], axes[-2] = axes[-2], axes[-1]
    return Transpose(axes)(t)


class Min(Max):
    reduce = "min"


class MaxAlong(Function):
    """The maximum along one dim and where it is (the first, on ties): two outputs,
    (values, indices), as PyTorch's ``max(dim)``.  The gradient goes to that index only.
    Keeps: the indices."""

    reduce = "argmax"

    def __init__(self, dim, keepdim=False):
        self.dim, self.keepdim = dim, keepdim

    def forward(self, x):
        (self.axis,) = _normalise_axis(self.dim, x.ndim, self.reduce[3:])
        xp = backend.get_array_module(x)
        index = xp.expand_dims(getattr(x, self.reduce)(axis=self.axis), self.axis)
        values = xp.take_along_axis(x, index, axis=self.axis)
        self.input_shape = x.shape
        self.save_for_backward(index)
        if not self.keepdim:
            values, index = values.squeeze(self.axis), index.squeeze(self.axis)
        return values, index.astype(np.int64, copy=False)

    def backward(self, gy, _):
        xp = backend.get_array_module(gy)
        if not self.keepdim:
            gy = xp.expand_dims(gy, self.axis)
        return self._one_hot() * gy

    def _one_hot(self):
        """A one-hot mask along the dim at the index (as max pooling's backward has)."""
        (index,) = self.saved
        xp = backend.get_array_module(index)
        shape = [1] * len(self.input_shape)
        shape[self.axis] = self.input_shape[self.axis]
        return xp.arange(self.input_shape[self.axis]).reshape(shape) == index

    differentiable = True

    def differentiable_backward(self, gy, _):
        mask = Tensor(self._one_hot().astype(gy.dtype))   # piecewise linear: a constant
        return mask * _with_reduced_axes(gy, (self.axis,), self.input_shape)


class MinAlong(MaxAlong):
    reduce = "argmin"


class Abs(Function):
    def forward(self, x):
        self.save_for_backward(x)
        return backend.get_array_module(x).abs(x)

    def backward(self, gy):
        (x,) = self.saved
        return gy * backend.get_array_module(x).sign(x)

    differentiable = True

    def differentiable_backward(self, gy):
        (x,) = self.saved
        return gy * Tensor(backend.get_array_module(x).sign(x))   # piecewise linear


class Clamp(Function):
    """x limited to [min, max]; the gradient passes where min <= x <= max (PyTorch's
    rule at the bounds).  Keeps: that mask."""

    def __init__(self, low=None, high=None):
        self.low, self.high = low, high

    def forward(self, x):
        xp = backend.get_array_module(x)
        y = x
        keep = xp.ones(x.shape, dtype=bool)
        if self.low is not None:
            keep &= x >= self.low
            y = xp.maximum(y, x.dtype.type(self.low))
        if self.high is not None:
            keep &= x <= self.high
            y = xp.minimum(y, x.dtype.type(self.high))
        self.save_for_backward(keep)
        return y if y is not x else x.copy()

    def backward(self, gy):
        (keep,) = self.saved
        return gy * keep

    differentiable = True

    def differentiable_backward(self, gy):
        (keep,) = self.saved
        return gy * Tensor(keep.astype(gy.dtype))   # piecewise linear: a constant mask


class Norm(Function):
    """The p-norm over axes, (sum |x|^p)^(1/p), p > 0 or inf.  The gradient is
    x |x|^(p-2) / y^(p-1) (x / y for p = 2), zero where the norm is zero, as in
    PyTorch; for p = inf, sign(x) shared among the tied maxima of |x|.  Keeps: x and y."""

    def __init__(self, p=2, axis=None, keepdims=False):
        self.p, self.axis, self.keepdims = p, axis, keepdims

    def forward(self, x):
        xp = backend.get_array_module(x)
        self.axes = _normalise_axis(self.axis, x.ndim, "norm")
        a, p = xp.abs(x), self.p
        if p == float("inf"):
            y = a.max(axis=self.axes, keepdims=True)
        elif p == 1:
            y = a.sum(axis=self.axes, keepdims=True)
        elif p == 2:
            y = xp.sqrt((x * x).sum(axis=self.axes, keepdims=True))
        else:
            y = (a ** p).sum(axis=self.axes, keepdims=True) ** (1.0 / p)
        self.save_for_backward(x, y)
        return y if self.keepdims else y.squeeze(self.axes)

    def backward(self, gy):
        x, y = self.saved
        xp = backend.get_array_module(x)
        if not self.keepdims:
            gy = xp.expand_dims(gy, self.axes)
        p = self.p
        if p == float("inf"):
            mask = xp.abs(x) == y
            return xp.sign(x) * mask * (gy / mask.sum(axis=self.axes, keepdims=True, dtype=x.dtype))
        if p == 1:
            return xp.sign(x) * gy
        safe = xp.where(y == 0, 1, y)
        scale = xp.where(y == 0, 0, gy / (safe if p == 2 else safe ** (p - 1)))
        return x * scale if p == 2 else x * xp.abs(x) ** (p - 2) * scale

    differentiable = True

    def differentiable_backward(self, gy):
        x, _ = self.saved_tensors()
        # The saved y (kept with its reduced axes) is not this node's output, so it would
        # be a constant here: the norm again, from x, with ops.
        y = Norm(self.p, self.axes, keepdims=True)(x)
        xp = backend.get_array_module(x.data)
        gy = _with_reduced_axes(gy, self.axes, x.shape)
        p = self.p
        if p == float("inf") or p == 1:   # piecewise linear: sign and mask are constants
            sign = xp.sign(x.data)
            if p == 1:
                return Tensor(sign) * gy
            mask = xp.abs(x.data) == y.data
            return Tensor(sign * mask / mask.sum(axis=self.axes, keepdims=True, dtype=x.dtype)) * gy
        nonzero = Tensor((y.data != 0).astype(x.dtype))   # the gradient is zero where y is
        safe = y * nonzero + (1 - nonzero)
        scale = gy * nonzero / (safe if p == 2 else safe ** (p - 1))
        return x * scale if p == 2 else x * abs(x) ** (p - 2) * scale


# ---------------------------------------------------------------------------
# Functional forms
# ---------------------------------------------------------------------------
def _operands(a, b):
    """a and b as Tensors.  A Python number takes the dtype and device of the other
    operand, in either position, so ``2 * x`` and ``md.mul(2, x)`` stay float32."""
    if isinstance(a, Tensor):
        return a, as_tensor(b, like=a)
    b = as_tensor(b)
    return as_tensor(a, like=b), b


def add(input, other):
    """input + other with broadcasting (the residual connection of ResNet)."""
    return Add()(*_operands(input, other))


def sub(input, other):
    return Sub()(*_operands(input, other))


def mul(input, other):
    return Mul()(*_operands(input, other))


def div(input, other):
    return Div()(*_operands(input, other))


def neg(input):
    return Neg()(input)


def pow(input, exponent):
    """input ** exponent; a constant Python exponent is folded into the op (PowScalar)."""
    if isinstance(exponent, Tensor) or backend.is_array(exponent):
        return Pow()(*_operands(input, exponent))
    return PowScalar(exponent)(input)


def matmul(input, other):
    """Matrix product; a 1-D operand is treated as a row (left) or column (right) vector."""
    a, b = as_tensor(input), as_tensor(other)
    squeeze_a, squeeze_b = a.ndim == 1, b.ndim == 1
    if squeeze_a:
        a = a.reshape(1, -1)
    if squeeze_b:
        b = b.reshape(-1, 1)
    y = MatMul()(a, b)
    if squeeze_a:
        y = y.reshape(y.shape[:-2] + y.shape[-1:])
    if squeeze_b:
        y = y.reshape(y.shape[:-1])
    return y


def exp(input):
    return Exp()(input)


def log(input):
    return Log()(input)


def sqrt(input):
    return Sqrt()(input)


def _dims(op, dim, keepdim, axis, keepdims):
    """PyTorch's ``dim=`` and ``keepdim=``, or their NumPy aliases ``axis=`` and
    ``keepdims=`` (PyTorch accepts those too); not both."""
    if axis is not None:
        if dim is not None:
            raise TypeError(f"{op}: got both dim={dim!r} and its alias axis={axis!r}")
        dim = axis
    if keepdims is not None:
        keepdim = keepdims
    return dim, bool(keepdim)


def _cast(input, dtype):
    return input if dtype is None else as_tensor(input).to(dtype=dtype)


def sum(input, dim=None, keepdim=False, *, dtype=None, axis=None, keepdims=None):
    """The sum over ``dim`` (an int, a tuple of ints, or None for every element)."""
    dim, keepdim = _dims("sum", dim, keepdim, axis, keepdims)
    return Sum(dim, keepdim)(_cast(input, dtype))


def mean(input, dim=None, keepdim=False, *, dtype=None, axis=None, keepdims=None):
    dim, keepdim = _dims("mean", dim, keepdim, axis, keepdims)
    x = _cast(as_tensor(input), dtype)
    axes = _normalise_axis(dim, x.ndim, "mean")
    count = 1
    for a in axes:
        count *= x.shape[a]
    return Sum(axes, keepdim)(x) * (1.0 / count)


MaxResult = collections.namedtuple("max", ["values", "indices"])
MinResult = collections.namedtuple("min", ["values", "indices"])


def _extremum(op, full, along, result, input, dim, keepdim, axis, keepdims):
    dim, keepdim = _dims(op, dim, keepdim, axis, keepdims)
    if isinstance(dim, Tensor) or backend.is_array(dim):
        raise TypeError(f"{op}(input, other), the element-wise {op}imum of two tensors, is not "
                        f"supported by minidense")
    if dim is None:
        return full(None, False)(input)
    if not isinstance(dim, (int, np.integer)):
        raise TypeError(f"{op}: dim must be an int (the values and indices along it), got "
                        f"{dim!r}; use a{op}(input, dim) for the {op}imum over several dims")
    return result(*along(int(dim), keepdim)(input))


def max(input, dim=None, keepdim=False, *, axis=None, keepdims=None):
    """As PyTorch: ``max(x)`` is the largest element; ``max(x, dim)`` is the named tuple
    (values, indices) along ``dim``."""
    return _extremum("max", Max, MaxAlong, MaxResult, input, dim, keepdim, axis, keepdims)


def min(input, dim=None, keepdim=False, *, axis=None, keepdims=None):
    return _extremum("min", Min, MinAlong, MinResult, input, dim, keepdim, axis, keepdims)


def amax(input, dim=None, keepdim=False, *, axis=None, keepdims=None):
    """The maximum over one or several dims (None or ``()``: every dim); ties share the
    gradient."""
    dim, keepdim = _dims("amax", dim, keepdim, axis, keepdims)
    return Max(None if dim == () else dim, keepdim)(input)


def amin(input, dim=None, keepdim=False, *, axis=None, keepdims=None):
    dim, keepdim = _dims("amin", dim, keepdim, axis, keepdims)
    return Min(None if dim == () else dim, keepdim)(input)


def _arg(op, input, dim, keepdim, axis, keepdims):
    dim, keepdim = _dims(op, dim, keepdim, axis, keepdims)
    x = as_tensor(input).data
    if dim is None:  # the index into the flattened tensor
        index = getattr(x, op)()
        return Tensor(index.reshape((1,) * x.ndim) if keepdim else index).to(dtype=np.int64)
    (axis,) = _normalise_axis(dim, x.ndim, op)
    index = getattr(x, op)(axis=axis)
    xp = backend.get_array_module(x)
    return Tensor((xp.expand_dims(index, axis) if keepdim else index).astype(np.int64))


def argmax(input, dim=None, keepdim=False, *, axis=None, keepdims=None):
    """Where the maximum is (the first, on ties), as int64; over every element when dim is None."""
    return _arg("argmax", input, dim, keepdim, axis, keepdims)


def argmin(input, dim=None, keepdim=False, *, axis=None, keepdims=None):
    return _arg("argmin", input, dim, keepdim, axis, keepdims)


def abs(input):
    return Abs()(input)


def clamp(input, min=None, max=None):
    if min is None and max is None:
        raise ValueError("clamp: at least one of min and max must be given")
    for name, bound in (("min", min), ("max", max)):
        if isinstance(bound, Tensor) or backend.is_array(bound):
            raise TypeError(f"clamp: {name} must be a number; tensor bounds are not supported")
    return Clamp(min, max)(input)


clip = clamp


def norm(input, p="fro", dim=None, keepdim=False, *, axis=None, keepdims=None):
    """The p-norm over ``dim`` (every element when None): p = "fro" or 2 (Euclidean),
    1, inf, or any p > 0.  The nuclear norm and p <= 0 are not supported."""
    dim, keepdim = _dims("norm", dim, keepdim, axis, keepdims)
    if p == "fro":
        p = 2
    if isinstance(p, str) or not (p > 0):
        raise ValueError(f"norm: p={p!r} is not supported; minidense has p > 0, inf and 'fro'")
    return Norm(float(p), dim, keepdim)(input)

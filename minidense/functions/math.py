"""Elementwise arithmetic, matrix product and reductions."""
from __future__ import annotations

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
            raise ValueError(f"{op}: axis {a} is out of range for a tensor with {ndim} dimensions")
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
    """Maximum over axes; tied maxima share the gradient equally."""

    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.axes = _normalise_axis(self.axis, x.ndim, "max")
        y = x.max(axis=self.axes, keepdims=True)
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


def add(a, b):
    """a + b with broadcasting (the residual connection of ResNet)."""
    return Add()(*_operands(a, b))


def sub(a, b):
    return Sub()(*_operands(a, b))


def mul(a, b):
    return Mul()(*_operands(a, b))


def div(a, b):
    return Div()(*_operands(a, b))


def neg(x):
    return Neg()(x)


def pow(x, exponent):
    """x ** exponent; a constant Python exponent is folded into the op (PowScalar)."""
    if isinstance(exponent, Tensor) or backend.is_array(exponent):
        return Pow()(*_operands(x, exponent))
    return PowScalar(exponent)(x)


def matmul(a, b):
    """Matrix product; a 1-D operand is treated as a row (left) or column (right) vector."""
    a, b = as_tensor(a), as_tensor(b)
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


def exp(x):
    return Exp()(x)


def log(x):
    return Log()(x)


def sqrt(x):
    return Sqrt()(x)


def sum(x, axis=None, keepdims=False):
    return Sum(axis, keepdims)(x)


def mean(x, axis=None, keepdims=False):
    x = as_tensor(x)
    axes = _normalise_axis(axis, x.ndim, "mean")
    count = 1
    for a in axes:
        count *= x.shape[a]
    return Sum(axes, keepdims)(x) * (1.0 / count)


def max(x, axis=None, keepdims=False):
    return Max(axis, keepdims)(x)

"""Shape and layout ops: reshape, transpose, indexing, concatenation, device moves."""
from __future__ import annotations

import itertools

import numpy as np

from .. import backend
from ..autograd import Function, Tensor, as_tensor
from ._utils import sum_to


class Reshape(Function):
    differentiable = True

    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.input_shape = x.shape
        try:
            return x.reshape(self.shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape a tensor of shape {tuple(x.shape)} "
                             f"({x.size} elements) to {self.shape}") from None

    def backward(self, gy):
        return gy.reshape(self.input_shape)

    def differentiable_backward(self, gy):
        return Reshape(self.input_shape)(gy)


class Transpose(Function):
    differentiable = True

    def __init__(self, axes=None):
        self.axes = axes

    def forward(self, x):
        axes = tuple(range(x.ndim))[::-1] if self.axes is None else tuple(self.axes)
        if sorted(a % x.ndim for a in axes) != list(range(x.ndim)):
            raise ValueError(f"transpose: axes {axes} are not a permutation of the "
                             f"{x.ndim} axes of shape {tuple(x.shape)}")
        self.inverse = tuple(int(i) for i in np.argsort([a % x.ndim for a in axes]))
        return x.transpose(axes)

    def backward(self, gy):
        return gy.transpose(self.inverse)

    def differentiable_backward(self, gy):
        return Transpose(self.inverse)(gy)


def _is_basic_index(index) -> bool:
    """Slices, integers, None and Ellipsis never select one element twice."""
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (slice, int, np.integer, type(None), type(Ellipsis))) for i in items)


class GetItem(Function):
    """x[index].  Backward: the gradient scattered into zeros of x's shape
    (``GetItemGrad``, whose own backward is this gather again)."""

    differentiable = True

    def __init__(self, index):
        self.index = index

    def forward(self, x):
        self.input_shape, self.input_dtype = x.shape, x.dtype
        return x[self.index]

    def backward(self, gy):
        return _scatter(gy, self.index, self.input_shape, self.input_dtype)

    def differentiable_backward(self, gy):
        return GetItemGrad(self.index, self.input_shape, self.input_dtype)(gy)


class GetItemGrad(Function):
    """zeros(shape) with ``gy`` added at ``index``: GetItem's backward as an op (linear
    in gy; its backward is the gather ``GetItem``)."""

    differentiable = True

    def __init__(self, index, shape, dtype):
        self.index, self.shape, self.dtype = index, shape, dtype

    def forward(self, gy):
        return _scatter(gy, self.index, self.shape, self.dtype)

    def backward(self, ggx):
        return ggx[self.index]

    def differentiable_backward(self, ggx):
        return GetItem(self.index)(ggx)


def _scatter(values, index, shape, dtype):
    """zeros(shape) with ``values`` added at ``index`` (repeated indices add up)."""
    out = backend.get_array_module(values).zeros(shape, dtype=dtype)
    if _is_basic_index(index):
        out[index] = values
    else:
        backend.scatter_add(out, index, values)
    return out


class Concat(Function):
    """Concatenation along one axis; keeps only the inputs' sizes on that axis.

    When the inputs are views that already lie side by side in one array (a DenseNet
    block's features in its shared storage), the result is a view of them: the same
    values, no copy (``backend.joined_view``).  The gradient is split alike either way."""

    def __init__(self, axis=1):
        self.axis = axis

    def forward(self, *xs):
        if not xs:
            raise ValueError("concat: needs at least one tensor")
        first = xs[0]
        if not -first.ndim <= self.axis < first.ndim:
            raise ValueError(f"concat: axis {self.axis} is out of range for shape {tuple(first.shape)}")
        axis = self.axis % first.ndim
        for x in xs[1:]:
            if x.ndim != first.ndim or any(a != b for i, (a, b) in enumerate(zip(x.shape, first.shape))
                                           if i != axis):
                shapes = ", ".join(str(tuple(t.shape)) for t in xs)
                raise ValueError(f"concat: all inputs must have the same shape except on axis {axis}, "
                                 f"got {shapes}")
        self.axis_ = axis
        self.sizes = [x.shape[axis] for x in xs]
        joined = backend.joined_view(xs, axis)
        if joined is not None:
            return joined
        return backend.get_array_module(first).concatenate(xs, axis=axis)

    def backward(self, gy):
        bounds = list(itertools.accumulate(self.sizes))[:-1]  # where each input's part starts
        xp = backend.get_array_module(gy)
        return tuple(xp.split(gy, bounds, axis=self.axis_))

    differentiable = True

    def differentiable_backward(self, gy):
        starts = [0] + list(itertools.accumulate(self.sizes))
        lead = (slice(None),) * self.axis_
        return tuple(GetItem(lead + (slice(a, b),))(gy) for a, b in zip(starts, starts[1:]))


class ToDeviceAndDtype(Function):
    """A copy on another device or in another dtype; the gradient goes back."""

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype

    def forward(self, x):
        self.source = backend.device_of(x), x.dtype
        y = backend.to_device(x, self.device)
        return y if self.dtype is None else y.astype(self.dtype)

    def backward(self, gy):
        device, dtype = self.source
        return backend.to_device(gy, device).astype(dtype, copy=False)

    differentiable = True

    def differentiable_backward(self, gy):
        device, dtype = self.source
        return ToDeviceAndDtype(device, dtype)(gy)


class BroadcastTo(Function):
    """x broadcast to ``shape`` (a copy); backward: the gradient summed back to x's shape.
    The backward of a sum, and of broadcasting in the element-wise ops."""

    differentiable = True

    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, x):
        self.input_shape = x.shape
        return backend.get_array_module(x).broadcast_to(x, self.shape).copy()

    def backward(self, gy):
        return sum_to(gy, self.input_shape)

    def differentiable_backward(self, gy):
        return sum_to_shape(gy, self.input_shape)


class SumTo(Function):
    """x summed down to ``shape``, the axes NumPy broadcasting added or stretched; backward:
    the gradient broadcast back.  The backward of broadcasting."""

    differentiable = True

    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, x):
        self.input_shape = x.shape
        return sum_to(x, self.shape)

    def backward(self, gy):
        return backend.get_array_module(gy).broadcast_to(gy, self.input_shape).copy()

    def differentiable_backward(self, gy):
        return broadcast_to(gy, self.input_shape)


def broadcast_to(x, shape):
    x = as_tensor(x)
    return x if tuple(x.shape) == tuple(shape) else BroadcastTo(shape)(x)


def sum_to_shape(x, shape):
    """``x`` (a Tensor) summed down to ``shape``: differentiable ``_utils.sum_to``."""
    return x if tuple(x.shape) == tuple(shape) else SumTo(shape)(x)


def as_tuple(args):
    """The sizes or axes a function got as ``f(2, 3)`` or as ``f((2, 3))``, as one tuple."""
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return tuple(args[0])
    return tuple(args)


def reshape(x, *shape):
    return Reshape(as_tuple(shape))(x)


def flatten(x, start_axis=1):
    x = as_tensor(x)
    return Reshape(x.shape[:start_axis] + (-1,))(x)


def transpose(x, *axes):
    return Transpose(as_tuple(axes) or None)(x)


def getitem(x, index):
    """x[index]; Tensors inside the index are used as their arrays."""
    if isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    elif isinstance(index, Tensor):
        index = index.data
    return GetItem(index)(x)


def concat(xs, axis=1):
    """Concatenate tensors along ``axis`` (DenseNet's dense connectivity)."""
    return Concat(axis)(*xs)


def to_device_and_dtype(x, device, dtype=None):
    return ToDeviceAndDtype(device, dtype)(x)

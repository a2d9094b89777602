"""Shape and layout ops: reshape and view, transpose and permute, indexing, joining
and splitting, copies, device moves; with PyTorch's arguments (``dim``, not ``axis``)."""
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

    def __init__(self, axis=0):
        self.axis = axis

    def forward(self, *xs):
        if not xs:
            raise ValueError("concat: needs at least one tensor")
        first = xs[0]
        if not -first.ndim <= self.axis < first.ndim:
            raise IndexError(f"concat: dim {self.axis} is out of range for shape {tuple(first.shape)}")
        axis = self.axis % first.ndim
        for x in xs[1:]:
            if x.ndim != first.ndim or any(a != b for i, (a, b) in enumerate(zip(x.shape, first.shape))
                                           if i != axis):
                shapes = ", ".join(str(tuple(t.shape)) for t in xs)
                raise ValueError(f"concat: all inputs must have the same shape except in dim {axis}, "
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


class Split(Function):
    """Pieces of ``sizes`` along ``axis`` (views of the input); backward joins their
    gradients (zeros for a piece that got none)."""

    def __init__(self, sizes, axis):
        self.sizes, self.axis = sizes, axis

    def forward(self, x):
        if sum(self.sizes) != x.shape[self.axis]:
            raise ValueError(f"split: sizes {list(self.sizes)} do not add up to "
                             f"{x.shape[self.axis]}, the size of dim {self.axis} of shape {tuple(x.shape)}")
        bounds = list(itertools.accumulate(self.sizes))[:-1]
        return tuple(backend.get_array_module(x).split(x, bounds, axis=self.axis))

    def backward(self, *gys):
        return backend.get_array_module(gys[0]).concatenate(gys, axis=self.axis)

    differentiable = True

    def differentiable_backward(self, *gys):
        return Concat(self.axis)(*gys)


class Pad(Function):
    """``value`` around the input: ``widths`` holds (before, after) for every axis.
    The gradient is the middle of gy."""

    def __init__(self, widths, value=0.0):
        self.widths, self.value = widths, value

    def forward(self, x):
        return backend.get_array_module(x).pad(x, self.widths, constant_values=self.value)

    def backward(self, gy):
        return gy[self._middle(gy.shape)]

    differentiable = True

    def differentiable_backward(self, gy):
        return GetItem(self._middle(gy.shape))(gy)

    def _middle(self, shape):
        return tuple(slice(a, shape[i] - b) for i, (a, b) in enumerate(self.widths))


class BroadcastTo(Function):
    """The input repeated along size-1 (or new leading) dims up to ``shape``, as a
    read-only view; backward sums the gradient back (``sum_to``)."""

    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.input_shape = x.shape
        try:
            return backend.get_array_module(x).broadcast_to(x, self.shape)
        except ValueError:
            raise ValueError(f"expand: a tensor of shape {tuple(x.shape)} cannot be expanded to "
                             f"{self.shape} (only size-1 dims grow)") from None

    def backward(self, gy):
        return sum_to(gy, self.input_shape)

    differentiable = True

    def differentiable_backward(self, gy):
        return sum_to_shape(gy, self.input_shape)


class Copy(Function):
    """A contiguous copy (``clone``, ``contiguous``); the gradient passes unchanged."""

    differentiable = True

    def forward(self, x):
        return backend.get_array_module(x).array(x, copy=True, order="C")

    def backward(self, gy):
        return gy

    def differentiable_backward(self, gy):
        return gy


def as_tuple(args):
    """The sizes or axes a function got as ``f(2, 3)`` or as ``f((2, 3))``, as one tuple."""
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return tuple(args[0])
    return tuple(args)


def _dim(op, dim, ndim):
    """``dim`` in [0, ndim), from PyTorch's [-ndim, ndim)."""
    if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool):
        raise TypeError(f"{op}: dim must be an int, got {dim!r}")
    if not -ndim <= dim < ndim:
        raise IndexError(f"{op}: dim {dim} is out of range for a tensor with {ndim} dimensions "
                         f"(expected [{-ndim}, {ndim - 1}])")
    return int(dim) % ndim


def reshape(input, shape):
    """The same elements in ``shape`` (one entry may be -1); a view when the layout allows."""
    return Reshape(tuple(shape) if isinstance(shape, (tuple, list)) else (shape,))(input)


def view_strides_exist(shape, strides, new_shape) -> bool:
    """Whether ``new_shape`` can be a view of an array with ``shape`` and ``strides``,
    PyTorch's rule (``computeStride``): every run of old dims that the new shape merges
    or splits must lie contiguously in memory."""
    if 0 in shape or not shape:
        return True
    new_shape = [n for n in new_shape]
    view_d, chunk_stride = len(new_shape) - 1, strides[-1]
    tensor_numel = view_numel = 1
    for d in range(len(shape) - 1, -1, -1):
        tensor_numel *= shape[d]
        if d == 0 or (shape[d - 1] != 1 and strides[d - 1] != tensor_numel * chunk_stride):
            while view_d >= 0 and (view_numel < tensor_numel or new_shape[view_d] == 1):
                view_numel *= new_shape[view_d]
                view_d -= 1
            if view_numel != tensor_numel:
                return False
            if d > 0:
                chunk_stride, tensor_numel, view_numel = strides[d - 1], 1, 1
    return view_d == -1


def view(input, shape):
    """``reshape`` that refuses, as PyTorch's ``view`` does, when the layout would need a copy."""
    x = as_tensor(input)
    shape = tuple(shape)
    try:
        new_shape = np.empty(x.shape, dtype=np.bool_).reshape(shape).shape  # resolves -1
    except ValueError:
        raise RuntimeError(f"view: shape {list(shape)} is invalid for input of shape "
                           f"{tuple(x.shape)} ({x.numel()} elements)") from None
    if not view_strides_exist(x.shape, x.data.strides, new_shape):
        raise RuntimeError(f"view: a tensor of shape {tuple(x.shape)} and strides "
                           f"{tuple(s // x.data.itemsize for s in x.data.strides)} cannot be viewed "
                           f"as {list(shape)} without a copy (its layout is not contiguous over "
                           f"the dims merged); use .reshape(...) instead")
    return Reshape(new_shape)(x)


def flatten(input, start_dim=0, end_dim=-1):
    """Dims ``start_dim`` to ``end_dim`` (both included) merged into one."""
    x = as_tensor(input)
    if x.ndim == 0:
        return Reshape((1,))(x)
    start, end = _dim("flatten", start_dim, x.ndim), _dim("flatten", end_dim, x.ndim)
    if start > end:
        raise ValueError(f"flatten: start_dim {start_dim} comes after end_dim {end_dim} "
                         f"for shape {tuple(x.shape)}")
    return Reshape(x.shape[:start] + (-1,) + x.shape[end + 1:])(x)


def unflatten(input, dim, sizes):
    x = as_tensor(input)
    d = _dim("unflatten", dim, x.ndim)
    return Reshape(x.shape[:d] + tuple(sizes) + x.shape[d + 1:])(x)


def transpose(input, dim0, dim1):
    """``input`` with dims ``dim0`` and ``dim1`` swapped (a view)."""
    x = as_tensor(input)
    if x.ndim == 0:
        return x
    axes = list(range(x.ndim))
    a, b = _dim("transpose", dim0, x.ndim), _dim("transpose", dim1, x.ndim)
    axes[a], axes[b] = axes[b], axes[a]
    return Transpose(tuple(axes))(x)


def permute(input, dims):
    """``input`` with its dims in the order ``dims`` (a view)."""
    x = as_tensor(input)
    dims = tuple(dims)
    if len(dims) != x.ndim:
        raise ValueError(f"permute: dims {dims} must name each of the {x.ndim} dims of shape "
                         f"{tuple(x.shape)} once")
    return Transpose(tuple(_dim("permute", d, x.ndim) for d in dims))(x)


def squeeze(input, dim=None):
    """``input`` without its size-1 dims (or only those of ``dim``, an int or a tuple;
    a named dim whose size is not 1 stays, as in PyTorch)."""
    x = as_tensor(input)
    if dim is None:
        dims = range(x.ndim)
    elif x.ndim == 0:
        dims = ()
    else:
        dims = [_dim("squeeze", d, x.ndim) for d in (dim if isinstance(dim, (tuple, list)) else (dim,))]
    drop = {d for d in dims if x.shape[d] == 1}
    return Reshape(tuple(n for d, n in enumerate(x.shape) if d not in drop))(x)


def unsqueeze(input, dim):
    """``input`` with a size-1 dim inserted at ``dim`` (in [-ndim-1, ndim])."""
    x = as_tensor(input)
    d = _dim("unsqueeze", dim, x.ndim + 1)
    return Reshape(x.shape[:d] + (1,) + x.shape[d:])(x)


def getitem(x, index):
    """x[index]; Tensors inside the index are used as their arrays."""
    if isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    elif isinstance(index, Tensor):
        index = index.data
    return GetItem(index)(x)


def cat(tensors, dim=0, *, axis=None):
    """Tensors joined along ``dim`` (DenseNet's dense connectivity is ``cat(xs, 1)``)."""
    if axis is not None:
        dim = axis
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat: expected a non-empty sequence of tensors")
    return Concat(dim)(*tensors)


concat = cat


def concatenate(tensors, axis=0):
    """``cat`` under NumPy's name and argument name, as PyTorch has it."""
    return cat(tensors, axis)


def stack(tensors, dim=0):
    """Tensors of one shape joined along a new dim ``dim``."""
    tensors = [as_tensor(t) for t in tensors]
    if not tensors:
        raise ValueError("stack: expected a non-empty sequence of tensors")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"stack: all tensors must have the same shape, got "
                         f"{', '.join(str(tuple(t.shape)) for t in tensors)}")
    return Concat(_dim("stack", dim, tensors[0].ndim + 1))(*[unsqueeze(t, dim) for t in tensors])


def split(tensor, split_size_or_sections, dim=0):
    """Pieces along ``dim``: of ``split_size_or_sections`` each (an int; the last may be
    smaller), or of the sizes in that list."""
    x = as_tensor(tensor)
    d = _dim("split", dim, x.ndim)
    n = x.shape[d]
    if isinstance(split_size_or_sections, (int, np.integer)):
        size = int(split_size_or_sections)
        if size <= 0:
            raise ValueError(f"split: split_size must be positive, got {size}")
        sizes = [size] * (n // size) + ([n % size] if n % size else [])
    else:
        sizes = [int(s) for s in split_size_or_sections]
    pieces = Split(sizes or [0], d)(x)
    return pieces if isinstance(pieces, tuple) else (pieces,)


def chunk(input, chunks, dim=0):
    """``chunks`` pieces along ``dim`` (fewer when the size does not divide), as PyTorch."""
    x = as_tensor(input)
    if chunks <= 0:
        raise ValueError(f"chunk: chunks must be positive, got {chunks}")
    n = x.shape[_dim("chunk", dim, x.ndim)]
    return split(x, max(-(-n // chunks), 1), dim)


def pad(input, pad, mode="constant", value=None):
    """Constant padding, PyTorch's way: ``pad`` lists (before, after) widths from the last
    dim backwards, (left, right, top, bottom, ...).  Other modes and negative widths
    (cropping) are not supported."""
    x = as_tensor(input)
    if mode != "constant":
        raise NotImplementedError(f"pad: mode={mode!r} is not supported; minidense has mode='constant'")
    pad = [int(p) for p in pad]
    if len(pad) % 2 or len(pad) // 2 > x.ndim or min(pad, default=0) < 0:
        raise ValueError(f"pad: expected an even number (at most {2 * x.ndim}) of non-negative "
                         f"widths for shape {tuple(x.shape)}, got {pad}")
    widths = [(0, 0)] * x.ndim
    for i in range(len(pad) // 2):
        widths[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    return Pad(tuple(widths), 0.0 if value is None else value)(x)


def expand(input, *size):
    """``input`` repeated, without a copy, along its size-1 dims up to ``size`` (-1 keeps
    a dim's size), as PyTorch's ``Tensor.expand``."""
    x = as_tensor(input)
    sizes = as_tuple(size)
    lead = len(sizes) - x.ndim
    if lead < 0:
        raise ValueError(f"expand: {len(sizes)} sizes for a tensor with {x.ndim} dims")
    shape = tuple(x.shape[i - lead] if s == -1 and i >= lead else s for i, s in enumerate(sizes))
    return BroadcastTo(shape)(x)


def clone(input):
    return Copy()(input)


def contiguous(input):
    """``input`` itself when its layout is already row-major, else a row-major copy."""
    x = as_tensor(input)
    return x if x.data.flags.c_contiguous else Copy()(x)


def to_device_and_dtype(x, device, dtype=None):
    return ToDeviceAndDtype(device, dtype)(x)

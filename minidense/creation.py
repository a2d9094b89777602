"""Creating tensors, with PyTorch's arguments: sizes as ``zeros(2, 3)`` or
``zeros((2, 3))``, and ``dtype``, ``device`` and ``requires_grad`` by keyword.
Floating-point results are float32 unless ``dtype`` says otherwise; random ones come
from minidense's seeded generators (``md.manual_seed``)."""
from __future__ import annotations

import numpy as np

from . import backend
from .autograd import Tensor
from .autograd import tensor as _tensor
from .functions.array import as_tuple

DEFAULT_DTYPE = "float32"

# PyTorch's dtype names, as NumPy dtypes: ``x.to(md.float64)``, ``md.zeros(2, dtype=md.int64)``.
float16, float32, float64 = np.float16, np.float32, np.float64
half, double = float16, float64
uint8, int32, int64 = np.uint8, np.int32, np.int64
long = int64


def _made(array, requires_grad):
    return Tensor(array, requires_grad=requires_grad)


def tensor(data, *, dtype=None, device=None, requires_grad=False):
    """A new tensor holding a copy of ``data`` (a list, a number, an array or a tensor);
    float32 for Python floats, int64 for Python ints (PyTorch's rule)."""
    return _tensor(data, requires_grad=requires_grad, dtype=dtype, device=device)


def as_tensor(data, *, dtype=None, device=None):
    """``data`` as a tensor, sharing its memory where it can (an array of the same dtype
    on the same device, or a tensor)."""
    if isinstance(data, Tensor):
        return data if dtype is None and device is None else data.to(device, dtype)
    return Tensor(data, dtype=dtype, device=device)


def from_numpy(ndarray):
    """A tensor sharing ``ndarray``'s memory and dtype."""
    if not isinstance(ndarray, np.ndarray):
        raise TypeError(f"from_numpy: expected a numpy.ndarray, got {type(ndarray).__name__}")
    return Tensor(ndarray)


def _filled(size, value, dtype, device, requires_grad):
    xp = backend.array_module(device or "cpu")
    return _made(xp.full(size, value, dtype=dtype), requires_grad)


def zeros(*size, dtype=None, device=None, requires_grad=False):
    """A tensor of zeros: ``md.zeros(2, 3)`` or ``md.zeros((2, 3))``."""
    return _filled(as_tuple(size), 0, dtype or DEFAULT_DTYPE, device, requires_grad)


def ones(*size, dtype=None, device=None, requires_grad=False):
    return _filled(as_tuple(size), 1, dtype or DEFAULT_DTYPE, device, requires_grad)


def empty(*size, dtype=None, device=None, requires_grad=False):
    """A tensor whose values are not to be relied on (zeros here)."""
    return zeros(*size, dtype=dtype, device=device, requires_grad=requires_grad)


def full(size, fill_value, *, dtype=None, device=None, requires_grad=False):
    """A tensor of ``size`` filled with ``fill_value``; its dtype follows the value (bool,
    int64 for an int, float32 for a float) unless ``dtype`` is given."""
    if dtype is None:
        kind = np.asarray(fill_value).dtype.kind
        dtype = np.bool_ if kind == "b" else np.int64 if kind in "iu" else DEFAULT_DTYPE
    return _filled(as_tuple((size,)), fill_value, dtype, device, requires_grad)


def zeros_like(input, *, dtype=None, device=None, requires_grad=False):
    return _filled(input.shape, 0, dtype or input.dtype, device or input.device, requires_grad)


def ones_like(input, *, dtype=None, device=None, requires_grad=False):
    return _filled(input.shape, 1, dtype or input.dtype, device or input.device, requires_grad)


def rand(*size, generator=None, dtype=None, device=None, requires_grad=False):
    """Uniform samples in [0, 1)."""
    gen = generator or backend.generator(device or "cpu")
    data = gen.random(as_tuple(size), dtype=dtype or DEFAULT_DTYPE)
    return _made(backend.to_device(data, device or "cpu"), requires_grad)


def randn(*size, generator=None, dtype=None, device=None, requires_grad=False):
    """Standard normal samples."""
    gen = generator or backend.generator(device or "cpu")
    data = gen.standard_normal(as_tuple(size), dtype=dtype or DEFAULT_DTYPE)
    return _made(backend.to_device(data, device or "cpu"), requires_grad)


def randint(low=0, high=None, size=None, *, generator=None, dtype=None, device=None,
            requires_grad=False):
    """Integers in [low, high): ``randint(10, (3,))`` or ``randint(2, 10, (3,))``."""
    if size is None:   # randint(high, size), PyTorch's first form
        low, high, size = 0, low, high
    if high is None or size is None:
        raise TypeError("randint: expected randint(high, size) or randint(low, high, size)")
    gen = generator or backend.generator(device or "cpu")
    data = gen.integers(low, high, tuple(size)).astype(dtype or np.int64)
    return _made(backend.to_device(data, device or "cpu"), requires_grad)


def arange(start=0, end=None, step=1, *, dtype=None, device=None, requires_grad=False):
    """``arange(end)`` or ``arange(start, end, step)``: int64 for ints, else float32."""
    if end is None:
        start, end = 0, start
    if dtype is None:
        ints = all(isinstance(v, (int, np.integer)) for v in (start, end, step))
        dtype = np.int64 if ints else DEFAULT_DTYPE
    xp = backend.array_module(device or "cpu")
    return _made(xp.arange(start, end, step, dtype=dtype), requires_grad)

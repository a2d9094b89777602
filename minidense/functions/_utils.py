"""Helpers shared by the ops: shape checks, broadcasting, im2col and col2im."""
from __future__ import annotations

import numpy as np

from .. import backend


def pair(value, name="value"):
    """An int or a pair of ints as a pair (kernel sizes, strides, padding)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        a, b = value
    else:
        a = b = value
    return int(a), int(b)


def expect_ndim(op: str, name: str, array, ndim: int, layout: str = "") -> None:
    if array.ndim != ndim:
        hint = f" ({layout})" if layout else ""
        raise ValueError(f"{op}: {name} must be {ndim}-D{hint}, got shape {tuple(array.shape)}")


def sum_to(grad, shape):
    """Sum ``grad`` down to ``shape``: the backward of NumPy broadcasting."""
    if grad.shape == tuple(shape):
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, n in enumerate(shape) if n == 1 and grad.shape[i + lead] != 1)
    grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape) if lead else grad


def output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def im2col(x, kernel, stride, pad, pad_value=0.0, writable=True, rows=False):
    """Patches of ``x`` (N, C, H, W) as an array of shape (N, C, KH, KW, OH, OW).

    ``col[n, c, ky, kx, oy, ox] = x_padded[n, c, oy*SY + ky, ox*SX + kx]``.  With
    ``rows`` the patches come as the (C*KH*KW, N*OH*OW) matrix of a convolution
    instead (axes ordered C, KH, KW, N, OH, OW), so that it takes 2-D matrix products
    only.  On NumPy a strided view of the padded input is taken and, if ``writable``
    or ``rows``, copied once; on CuPy one gather kernel writes it (whatever
    ``pad_value``, so max pooling's -inf padding needs no padded copy there).
    """
    (kh, kw), (sy, sx), (ph, pw) = kernel, stride, pad
    n, c, h, w = x.shape
    oh, ow = output_size(h, kh, sy, ph), output_size(w, kw, sx, pw)
    xp = backend.get_array_module(x)
    if backend.device_of(x) != "cpu":   # per backend: a gather kernel on CuPy
        shape = (c, kh, kw, n, oh, ow) if rows else (n, c, kh, kw, oh, ow)
        col = xp.empty(shape, dtype=x.dtype)
        backend.index_kernel("im2col", x.size, col.size)(
            xp.ascontiguousarray(x), n, c, h, w, oh, ow, kh, kw, sy, sx, ph, pw, rows, pad_value, col)
        return col.reshape(c * kh * kw, n * oh * ow) if rows else col
    if ph or pw:
        x = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    s0, s1, s2, s3 = x.strides
    view = xp.lib.stride_tricks.as_strided(
        x, (n, c, kh, kw, oh, ow), (s0, s1, s2, s3, s2 * sy, s3 * sx))
    if rows:
        return view.transpose(1, 2, 3, 0, 4, 5).reshape(c * kh * kw, n * oh * ow)  # a copy
    return view.copy() if writable else view


def col2im(col, image_shape, stride, pad, rows=False):
    """The adjoint of ``im2col``: sums every patch back onto the image (N, C, H, W).
    ``col`` is (N, C, KH, KW, OH, OW), or with ``rows`` the (C*KH*KW, N*OH*OW) matrix
    of ``im2col(..., rows=True)`` given with its kernel as ``(KH, KW)`` in ``rows``."""
    (sy, sx), (ph, pw) = stride, pad
    n, c, h, w = image_shape
    if rows:
        kh, kw = rows
        oh, ow = output_size(h, kh, sy, ph), output_size(w, kw, sx, pw)
        col = col.reshape(c, kh, kw, n, oh, ow)
    else:
        n, c, kh, kw, oh, ow = col.shape
    xp = backend.get_array_module(col)
    if backend.device_of(col) != "cpu":   # per backend: a gather kernel on CuPy
        x = xp.empty((n, c, h, w), dtype=col.dtype)
        backend.index_kernel("col2im", x.size, col.size)(
            xp.ascontiguousarray(col), n, c, h, w, oh, ow, kh, kw, sy, sx, ph, pw, bool(rows), x)
        return x
    if rows:
        col = col.transpose(3, 0, 1, 2, 4, 5)
    # One strided add per kernel offset: vectorised over images and pixels.
    padded = xp.zeros((n, c, h + 2 * ph + sy - 1, w + 2 * pw + sx - 1), dtype=col.dtype)
    for ky in range(kh):
        for kx in range(kw):
            padded[:, :, ky:ky + sy * oh:sy, kx:kx + sx * ow:sx] += col[:, :, ky, kx]
    return padded[:, :, ph:ph + h, pw:pw + w]

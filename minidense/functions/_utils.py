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


def im2col(x, kernel, stride, pad, pad_value=0.0, writable=True):
    """Patches of ``x`` (N, C, H, W) as an array of shape (N, C, KH, KW, OH, OW).

    ``col[n, c, ky, kx, oy, ox] = x_padded[n, c, oy*SY + ky, ox*SX + kx]``.  On NumPy a
    strided view of the padded input is taken and, if ``writable``, copied once; on
    CuPy one gather kernel writes it.
    """
    (kh, kw), (sy, sx), (ph, pw) = kernel, stride, pad
    n, c, h, w = x.shape
    oh, ow = output_size(h, kh, sy, ph), output_size(w, kw, sx, pw)
    xp = backend.get_array_module(x)
    if xp is not np and pad_value == 0:
        col = xp.empty((n, c, kh, kw, oh, ow), dtype=x.dtype)
        backend.cuda_kernel("im2col")(xp.ascontiguousarray(x), h, w, oh, ow, kh, kw, sy, sx, ph, pw, col)
        return col
    if ph or pw:
        x = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    s0, s1, s2, s3 = x.strides
    view = xp.lib.stride_tricks.as_strided(
        x, (n, c, kh, kw, oh, ow), (s0, s1, s2, s3, s2 * sy, s3 * sx))
    return view.copy() if writable else view


def col2im(col, image_shape, stride, pad):
    """The adjoint of ``im2col``: sums every patch back onto the image (N, C, H, W)."""
    n, c, kh, kw, oh, ow = col.shape
    (sy, sx), (ph, pw) = stride, pad
    h, w = image_shape[2], image_shape[3]
    xp = backend.get_array_module(col)
    if xp is not np:
        x = xp.empty((n, c, h, w), dtype=col.dtype)
        backend.cuda_kernel("col2im")(xp.ascontiguousarray(col), h, w, oh, ow, kh, kw,
                                      sy, sx, ph, pw, x)
        return x
    # One strided add per kernel offset: vectorised over images and pixels.
    padded = xp.zeros((n, c, h + 2 * ph + sy - 1, w + 2 * pw + sx - 1), dtype=col.dtype)
    for ky in range(kh):
        for kx in range(kw):
            padded[:, :, ky:ky + sy * oh:sy, kx:kx + sx * ow:sx] += col[:, :, ky, kx]
    return padded[:, :, ph:ph + h, pw:pw + w]

"""Helpers shared by the ops: shape checks, broadcasting, im2col and col2im (with
the CUDA kernels that do them on CuPy)."""
from __future__ import annotations


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


def expect_one_dtype(op: str, **arrays) -> None:
    """The arrays of one op (None for an absent bias) all of one dtype, or a TypeError
    naming the op and every dtype.  As PyTorch, conv2d, linear and batch norm do not
    promote (a float64 input into a float32 model is an error there, not a float64
    result), and neither can their CUDA kernels: CuPy gives every ``T`` argument one
    type ("Type is mismatched").  The element-wise arithmetic still promotes, as
    PyTorch's does."""
    present = {name: a for name, a in arrays.items() if a is not None}
    if len({a.dtype for a in present.values()}) > 1:
        got = ", ".join(f"{name} {a.dtype}" for name, a in present.items())
        raise TypeError(f"{op}: expected one dtype for all inputs, got {got}; convert the "
                        f"input (x.to(dtype=...)) or the model (model.float(), model.double()) "
                        f"so that they agree")


def sum_to(grad, shape):
    """Sum ``grad`` down to ``shape``: the backward of NumPy broadcasting."""
    if grad.shape == tuple(shape):
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, n in enumerate(shape) if n == 1 and grad.shape[i + lead] != 1)
    grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape) if lead else grad


def output_size(size: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
    """Output length of a window of ``kernel`` taps ``dilation`` apart sliding with
    ``stride`` over ``size`` values padded by ``pad`` at each end (PyTorch's formula)."""
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


# ---------------------------------------------------------------------------
# im2col and col2im
# ---------------------------------------------------------------------------
# im2col: one thread per element of col; a gather from x, PAD outside the image (0, or
# -inf for max pooling).  Tap (ky, kx) of output (oy, ox) reads row oy*SY - PH + ky*DY
# and column ox*SX - PW + kx*DX (DY, DX: the dilation).  Two layouts of col:
# "image" (N, C, KH, KW, OH, OW), for pooling, and "rows" (C, KH, KW, N, OH, OW), the
# (C*KH*KW, N*OH*OW) patch matrix of a convolution, which then needs only 2-D GEMMs.
# col2im: one thread per element of x (N, C, H, W); a gather from col, so the
# result is deterministic (no atomics), as in Chainer.  Coordinates within an image
# are int; flat indices are IDX (int or ptrdiff_t, see index_kernel).
_IM2COL_BODY = """
    IDX t = i;
    int ox = t % OW; t /= OW;
    int oy = t % OH; t /= OH;
    IDX nc;
    int ky, kx;
    if (ROWS) {
        IDX n = t % N; t /= N;
        kx = t % KW; t /= KW;
        ky = t % KH;
        nc = n * C + t / KH;
    } else {
        kx = t % KW; t /= KW;
        ky = t % KH;
        nc = t / KH;
    }
    int y = oy * SY - PH + ky * DY;
    int x_ = ox * SX - PW + kx * DX;
    col = (0 <= y && y < H && 0 <= x_ && x_ < W) ? x[(nc * H + y) * W + x_] : PAD;
"""

_COL2IM_BODY = """
    IDX t = i;
    int xx = t % W + PW; t /= W;
    int yy = t % H + PH;
    IDX nc = t / H;
    IDX base, ky_stride;        // col index of (nc, ky=0, kx=0, oy=0, ox=0), and per ky
    IDX kx_stride;
    if (ROWS) {
        IDX n = nc / C, c = nc % C;
        kx_stride = (IDX)N * OH * OW;
        ky_stride = kx_stride * KW;
        base = c * KH * ky_stride + n * OH * OW;
    } else {
        kx_stride = (IDX)OH * OW;
        ky_stride = kx_stride * KW;
        base = nc * KH * ky_stride;
    }
    T acc = 0;
    for (int ky = 0; ky < KH; ++ky) {
        int oy = yy - ky * DY;
        if (oy < 0 || oy % SY != 0) continue;
        oy /= SY;
        if (oy >= OH) continue;
        for (int kx = 0; kx < KW; ++kx) {
            int ox = xx - kx * DX;
            if (ox < 0 || ox % SX != 0) continue;
            ox /= SX;
            if (ox >= OW) continue;
            acc += col[base + ky * ky_stride + kx * kx_stride + (IDX)oy * OW + ox];
        }
    }
    x = acc;
"""

_GEOMETRY = ("int32 N, int32 C, int32 H, int32 W, int32 OH, int32 OW, int32 KH, int32 KW, "
             "int32 SY, int32 SX, int32 PH, int32 PW, int32 DY, int32 DX, bool ROWS")
_GEOMETRY_NAMES = tuple(p.split()[-1] for p in _GEOMETRY.split(", "))

backend.register_index_variants(
    "im2col", "raw T x, " + _GEOMETRY + ", T PAD", "T col", _IM2COL_BODY,
    scalars=_GEOMETRY_NAMES + ("PAD",), where=__name__)
backend.register_index_variants(
    "col2im", "raw T col, " + _GEOMETRY, "T x", _COL2IM_BODY,
    scalars=_GEOMETRY_NAMES, where=__name__)


def im2col(x, kernel, stride, pad, pad_value=0.0, writable=True, rows=False, dilation=(1, 1)):
    """Patches of ``x`` (N, C, H, W) as an array of shape (N, C, KH, KW, OH, OW).

    ``col[n, c, ky, kx, oy, ox] = x_padded[n, c, oy*SY + ky*DY, ox*SX + kx*DX]`` (DY, DX:
    the ``dilation``).  With ``rows`` the patches come as the (C*KH*KW, N*OH*OW) matrix
    of a convolution instead (axes ordered C, KH, KW, N, OH, OW), so that it takes 2-D
    matrix products only (and, C being its outer axis, one batched product per group
    of channels).  On NumPy a strided view of the padded input is taken and, if
    ``writable`` or ``rows``, copied once; on CuPy one gather kernel writes it
    (whatever ``pad_value``, so max pooling's -inf padding needs no padded copy there).
    """
    (kh, kw), (sy, sx), (ph, pw), (dy, dx) = kernel, stride, pad, dilation
    n, c, h, w = x.shape
    oh, ow = output_size(h, kh, sy, ph, dy), output_size(w, kw, sx, pw, dx)
    xp = backend.get_array_module(x)
    if backend.device_of(x) != "cpu":   # per backend: a gather kernel on CuPy
        shape = (c, kh, kw, n, oh, ow) if rows else (n, c, kh, kw, oh, ow)
        col = xp.empty(shape, dtype=x.dtype)
        backend.index_kernel("im2col", x.size, col.size)(
            xp.ascontiguousarray(x), n, c, h, w, oh, ow, kh, kw, sy, sx, ph, pw, dy, dx, rows,
            pad_value, col)
        return col.reshape(c * kh * kw, n * oh * ow) if rows else col
    if ph or pw:
        x = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    s0, s1, s2, s3 = x.strides
    view = xp.lib.stride_tricks.as_strided(
        x, (n, c, kh, kw, oh, ow), (s0, s1, s2 * dy, s3 * dx, s2 * sy, s3 * sx))
    if rows:
        return view.transpose(1, 2, 3, 0, 4, 5).reshape(c * kh * kw, n * oh * ow)  # a copy
    return view.copy() if writable else view


def col2im(col, image_shape, stride, pad, rows=False, dilation=(1, 1)):
    """The adjoint of ``im2col``: sums every patch back onto the image (N, C, H, W).
    ``col`` is (N, C, KH, KW, OH, OW), or with ``rows`` the (C*KH*KW, N*OH*OW) matrix
    of ``im2col(..., rows=True)`` given with its kernel as ``(KH, KW)`` in ``rows``."""
    (sy, sx), (ph, pw), (dy, dx) = stride, pad, dilation
    n, c, h, w = image_shape
    if rows:
        kh, kw = rows
        oh, ow = output_size(h, kh, sy, ph, dy), output_size(w, kw, sx, pw, dx)
        col = col.reshape(c, kh, kw, n, oh, ow)
    else:
        n, c, kh, kw, oh, ow = col.shape
    xp = backend.get_array_module(col)
    if backend.device_of(col) != "cpu":   # per backend: a gather kernel on CuPy
        x = xp.empty((n, c, h, w), dtype=col.dtype)
        backend.index_kernel("col2im", x.size, col.size)(
            xp.ascontiguousarray(col), n, c, h, w, oh, ow, kh, kw, sy, sx, ph, pw, dy, dx,
            bool(rows), x)
        return x
    if rows:
        col = col.transpose(3, 0, 1, 2, 4, 5)
    # One strided add per kernel offset: vectorised over images and pixels.
    padded = xp.zeros((n, c, h + 2 * ph + sy - 1, w + 2 * pw + sx - 1), dtype=col.dtype)
    for ky in range(kh):
        for kx in range(kw):
            top, left = ky * dy, kx * dx
            padded[:, :, top:top + sy * oh:sy, left:left + sx * ow:sx] += col[:, :, ky, kx]
    return padded[:, :, ph:ph + h, pw:pw + w]

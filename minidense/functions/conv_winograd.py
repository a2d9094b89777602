"""conv2d by Winograd's minimal filtering F(2x2, 3x3): an optimization for stride-1 3x3
convolutions on the CPU (NumPy).  Lavin and Gray, "Fast Algorithms for Convolutional
Neural Networks" (CVPR 2016).

Read ``Conv2d`` in ``connection.py`` (im2col, one matrix product) first.  Here the
output is cut into 2x2 tiles; each reads a 4x4 input tile d (tiles overlap by 2), and

    Y = A^T [ (G g G^T) * (B^T d B) ] A                    (Lavin and Gray, Eq. 8)

with g the 3x3 kernel and * element-wise: 16 multiplications per tile and channel pair
where the direct product takes 4*9 = 36 (2.25x fewer).  Summed over input channels, the
16 element-wise products become 16 matrix products, one per tile position (xi, nu):

    M[xi, nu] (O, P) = U[xi, nu] (O, C) @ V[xi, nu] (C, P),   P = N * tiles per image,

U the transformed weights and V the transformed input tiles.  The transforms are
additions only, done separably (rows, then columns) on strided views of whole arrays.

* backward, weights: M = U * V per tile, so with gM = A gY A^T (each 2x2 output
  gradient tile spread to 4x4), gU[xi, nu] = gM[xi, nu] @ V[xi, nu]^T and
  gW = G^T gU G.  V is recomputed from x (not kept).
* backward, input: dx is the full correlation of gy with the kernel turned 180 degrees
  and its channel axes swapped, again a stride-1 3x3 convolution: ``forward`` on gy.

The transform matrices hold only 0, +-1 and +-1/2, so in float64 the result is within
rounding of the direct path; float32 loses a little more in the transforms' additions.

A dilated kernel (taps d apart, stride 1) reads, for the outputs in rows a, a+d, ...
and columns b, b+d, ..., only the padded input's rows a, a+d, ... and columns b, b+d,
...: on that phase of the input it is an ordinary 3x3 convolution.  So a dilated
convolution is d*d undilated ones, one per phase (``_dilated_forward``, ``_dilated_backward``).
Groups are the caller's (``connection.py``: one call per group).
"""
from __future__ import annotations

import numpy as np

# F(2x2, 3x3): B^T (4x4), G (4x3), A^T (2x4).  G's halves are exact in binary.
G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])


def applies(kernel, stride) -> bool:
    """Winograd F(2x2, 3x3) here covers 3x3 kernels with stride 1 (any padding)."""
    return tuple(kernel) + tuple(stride) == (3, 3, 1, 1)


def forward(x, w, padding, dilation=(1, 1)):
    """y = conv2d(x, w, stride 1, padding, dilation) for a 3x3 kernel w: (N, C, H, W) ->
    (N, O, OH, OW)."""
    if tuple(dilation) != (1, 1):
        return _dilated_forward(x, w, padding, dilation)
    n = x.shape[0]
    o, c = w.shape[:2]
    (ph, pw) = padding
    oh, ow = x.shape[2] + 2 * ph - 2, x.shape[3] + 2 * pw - 2
    th, tw = -(-oh // 2), -(-ow // 2)
    v = _input_tiles(x, (ph, pw), th, tw)                              # (16, C, P)
    m = np.matmul(_weight_transform(w, x.dtype), v)                     # (16, O, P)
    return _output_transform(m.reshape(4, 4, o, n, th, tw), (oh, ow))


def backward(x, w, gy, padding, want_gx, want_gw, dilation=(1, 1)):
    if tuple(dilation) != (1, 1):
        return _dilated_backward(x, w, gy, padding, want_gx, want_gw, dilation)
    gx = gw = None
    if want_gw:
        n, o, oh, ow = gy.shape
        th, tw = -(-oh // 2), -(-ow // 2)
        v = _input_tiles(x, padding, th, tw)                           # (16, C, P)
        gm = _output_gradient_tiles(gy, th, tw).reshape(16, o, n * th * tw)
        gu = np.matmul(gm, v.transpose(0, 2, 1)).reshape(4, 4, o, w.shape[1])
        del v, gm
        gw = np.einsum("ik,ijoc,jl->ockl", G.astype(gu.dtype), gu, G.astype(gu.dtype))
    if want_gx:
        # Full correlation with the flipped, transposed kernel: pad gy by 2 - p; where
        # p > 2, correlate unpadded and crop the p - 2 extra rows/columns at each side.
        h, wd = x.shape[2:]
        w_t = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
        pads = [max(2 - p, 0) for p in padding]
        gx = forward(gy, w_t, pads)
        cy, cx = (max(p - 2, 0) for p in padding)
        if cy or cx:
            gx = np.ascontiguousarray(gx[:, :, cy:cy + h, cx:cx + wd])
    return gx, gw


def _phases(dilation, out_shape):
    """The phases (a, b) that hold outputs, as (rows, columns) slices: the same select
    the phase's outputs and the padded input's pixels they read."""
    (dy, dx), (oh, ow) = dilation, out_shape
    for a in range(min(dy, oh)):
        for b in range(min(dx, ow)):
            yield slice(a, None, dy), slice(b, None, dx)


def _dilated_forward(x, w, padding, dilation):
    (ph, pw), (dy, dx) = padding, dilation
    x_pad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    oh, ow = x_pad.shape[2] - 2 * dy, x_pad.shape[3] - 2 * dx
    y = np.empty((x.shape[0], w.shape[0], oh, ow), dtype=np.result_type(x, w))
    for rows, cols in _phases(dilation, (oh, ow)):
        y[:, :, rows, cols] = forward(x_pad[:, :, rows, cols], w, (0, 0))
    return y


def _dilated_backward(x, w, gy, padding, want_gx, want_gw, dilation):
    (ph, pw) = padding
    h, wd = x.shape[2:]
    x_pad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    gx_pad = np.zeros(x_pad.shape, dtype=np.result_type(x, gy)) if want_gx else None
    gw = np.zeros(w.shape, dtype=np.result_type(w, gy)) if want_gw else None
    for rows, cols in _phases(dilation, gy.shape[2:]):
        gx_phase, gw_phase = backward(x_pad[:, :, rows, cols], w, np.ascontiguousarray(gy[:, :, rows, cols]),
                                      (0, 0), want_gx, want_gw)
        if want_gx:   # the phases are disjoint: each pixel gets its phase's gradient
            gx_pad[:, :, rows, cols] = gx_phase
        if want_gw:
            gw += gw_phase
    gx = np.ascontiguousarray(gx_pad[:, :, ph:ph + h, pw:pw + wd]) if want_gx else None
    return gx, gw


def _weight_transform(w, dtype):
    """U = G g G^T for every (out, in) channel pair, as (16, O, C)."""
    g = G.astype(dtype)
    o, c = w.shape[:2]
    return np.ascontiguousarray(np.einsum("ik,ockl,jl->ijoc", g, w, g)).reshape(16, o, c)


def _input_tiles(x, padding, th, tw):
    """V = B^T d B for every 4x4 input tile d (stride 2), as (16, C, N*th*tw)."""
    n, c, h, wd = x.shape
    ph, pw = padding
    # Channels first, so that each V[xi, nu] is (C, P) as the matrix product wants; the
    # zero border covers the padding and the last tile's overhang.
    xp = np.zeros((c, n, 2 * th + 2, 2 * tw + 2), x.dtype)             # 2*th + 2 >= h + 2*ph
    xp[:, :, ph:ph + h, pw:pw + wd] = x.transpose(1, 0, 2, 3)
    rows = [xp[:, :, k:k + 2 * th:2] for k in range(4)]                # tile row k of every tile
    v = np.empty((4, 4, c, n, th, tw), x.dtype)
    for i, t in enumerate(_b_transpose(rows)):                          # B^T along rows,
        _b_transpose([t[..., k:k + 2 * tw:2] for k in range(4)], v[i])  # then B along columns
    return v.reshape(16, c, n * th * tw)


def _b_transpose(d, out=None):
    """B^T applied along the list d of four tile rows (or columns): d0 - d2, d1 + d2,
    d2 - d1, d1 - d3; into out[0..3] when given."""
    ops = ((np.subtract, 0, 2), (np.add, 1, 2), (np.subtract, 2, 1), (np.subtract, 1, 3))
    return [f(d[a], d[b], out=None if out is None else out[k]) for k, (f, a, b) in enumerate(ops)]


def _output_transform(m, out_size):
    """Y = A^T M A per tile: m (4, 4, O, N, th, tw) -> y (N, O, OH, OW)."""
    _, _, o, n, th, tw = m.shape
    s = [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]                        # A^T along rows
    y = np.empty((n, o, th, 2, tw, 2), m.dtype)
    for a in range(2):
        np.add(s[a][0] + s[a][1], s[a][2], out=y[:, :, :, a, :, 0].transpose(1, 0, 2, 3))
        np.subtract(s[a][1] - s[a][2], s[a][3], out=y[:, :, :, a, :, 1].transpose(1, 0, 2, 3))
    y = y.reshape(n, o, 2 * th, 2 * tw)
    oh, ow = out_size
    return y if (oh, ow) == (2 * th, 2 * tw) else np.ascontiguousarray(y[:, :, :oh, :ow])


def _output_gradient_tiles(gy, th, tw):
    """gM = A gY A^T per 2x2 tile of gy: (N, O, OH, OW) -> (4, 4, O, N, th, tw)."""
    n, o, oh, ow = gy.shape
    g = np.zeros((o, n, 2 * th, 2 * tw), gy.dtype)                     # odd sizes: a zero overhang
    g[:, :, :oh, :ow] = gy.transpose(1, 0, 2, 3)
    gm = np.empty((4, 4, o, n, th, tw), gy.dtype)
    for i, r in enumerate(_a(g[:, :, 0::2], g[:, :, 1::2])):            # A along rows,
        _a(r[..., 0::2], r[..., 1::2], gm[i])                           # then along columns
    return gm


def _a(g0, g1, out=None):
    """A applied to the pair (g0, g1): g0, g0 + g1, g0 - g1, -g1; into out[0..3] when given."""
    if out is None:
        return [g0, g0 + g1, g0 - g1, -g1]
    np.copyto(out[0], g0)
    np.add(g0, g1, out=out[1])
    np.subtract(g0, g1, out=out[2])
    np.negative(g1, out=out[3])

"""The CPU fast path of batch norm and the ReLU: element-wise passes in cache-sized
pieces of the batch, spread over ``minidense.threads``.

The plain algorithms are in ``normalization.py`` and ``activation.py``; these compute
the same on NumPy, faster, and the ops call them when ``md.plain_ops()`` is off.  What
makes them faster, in order of what it gains:

* **Pieces on the threads.**  NumPy runs an element-wise pass on one core.  The batch
  is cut into pieces of a few images (``threads.batch_pieces``, about half a core's L2
  cache), each visited while it is in cache, and the pieces are spread over the
  thread pool.  Per-piece partial sums are added in piece order, so the result is the
  same for any thread count.
* **One pass for the statistics** (batch norm): the sums of each piece's deviations
  from a per-channel shift K (the first image's mean) and of their squares give the
  mean and the variance without a second pass over memory (the "shifted data"
  algorithm).  It loses precision to cancellation when K lies far from the batch mean
  (an unusual first image), so then, and only then, a second pass sums the squared
  deviations about the mean itself; an overflowing sum of squares stays infinite.
* **Per-channel constants written out over one image** (``per_image``): NumPy's loops
  run about twice as fast on two full operands as on a per-channel operand broadcast
  along each row (a stride-0 inner loop), and ``np.maximum(x, 0)`` 2.5x slower than
  against an array of zeros.
* **x - mean recomputed in backward**, piece by piece in cache, rather than an x_hat
  kept in memory; the ReLU's mask recomputed by the forward's own operations.

Per-channel sums (``channel_sum``, ``channel_dot``) run along each image's contiguous
rows on the calling thread: BLAS would hand a piece to its own threads while the
pool's threads wait.
"""
from __future__ import annotations

import numpy as np

from .. import backend, threads, workspace


# ---------------------------------------------------------------------------
# Batch norm
# ---------------------------------------------------------------------------
def batch_statistics(op, x):
    """(mean, biased variance) per channel of ``x`` in one pass (see the module's
    docstring); the sums through ``op.sum_over_batch`` (SyncBatchNorm's hook)."""
    count = op.values_per_channel(x)
    n = x.size // x.shape[1]                     # values per channel here
    shift = channel_sum(x[:1]) / (n // len(x))
    shift_i = per_image(shift, x)

    def piece_sums(part):
        shifted = _centred(x, part, shift_i)
        return channel_sum(shifted), channel_dot(shifted, shifted)

    pieces = threads.batch_pieces(x)
    sums = threads.map_pieces(piece_sums, pieces)
    s1, s2 = _sum_in_order(s for s, _ in sums), _sum_in_order(q for _, q in sums)
    mean = op.sum_over_batch(n * shift + s1) / count
    d = mean - shift
    with np.errstate(invalid="ignore", over="ignore"):
        spread = n * d * d
        squares = np.where(np.isfinite(s2), s2 - 2 * d * s1 + spread, s2)  # sum of (x - mean)^2
    # Cancellation costs about eps * spread / squares of relative precision: past
    # 16x (a few float32 units), sum the squared deviations about the mean itself.
    if np.any(spread > 16 * squares):
        mean_i = per_image(mean.astype(x.dtype, copy=False), x)

        def squared_deviations(part):
            centred = _centred(x, part, mean_i)
            return channel_dot(centred, centred)
        squares = _sum_in_order(threads.map_pieces(squared_deviations, pieces))
    return mean, np.maximum(op.sum_over_batch(squares) / count, 0)


def batch_norm_forward(x, mean, inv_std, gamma, beta, relu):
    """y = (x - mean) * (gamma * inv_std) + beta, then the ReLU when ``relu``."""
    y = np.empty(x.shape, dtype=np.result_type(x, gamma, beta))
    mean_i, scale_i = per_image(mean, x), per_image(gamma * inv_std, x)
    beta_i = per_image(beta, x)
    zeros_i = np.zeros_like(beta_i) if relu else None

    def normalise(part):
        out = np.subtract(x[part], mean_i, out=y[part])
        out *= scale_i
        out += beta_i
        if relu:
            np.maximum(out, zeros_i, out=out)
    threads.map_pieces(normalise, threads.batch_pieces(x))
    return y


def batch_norm_backward(op, gy, x, mean, inv_std, gamma, beta, relu, count):
    """(gx, ggamma, gbeta) of batch norm (with the ReLU when ``relu``): the plain
    algorithm's formulas, piece by piece; the batch-statistics term when ``op.training``,
    its sums through ``op.statistics_gradient_sums``."""
    scale = gamma * inv_std
    mean_i, scale_i = per_image(mean, x), per_image(scale, x)
    beta_i = per_image(beta, x) if relu else None
    gx = np.empty(gy.shape, dtype=np.result_type(gy, x, scale))   # first: the masked gy

    # Piece by piece (in cache, on the threads): x - mean recomputed, the ReLU's mask
    # recomputed by the forward's own operations, and the two per-channel sums.
    def sums(part):
        centred = _centred(x, part, mean_i)
        g = gy[part]
        if relu:
            before_relu = np.multiply(centred, scale_i, out=_scratch(x[part], "mask"))  # as forward
            before_relu += beta_i
            g = np.multiply(g, before_relu > 0, out=gx[part], dtype=gx.dtype)
        return channel_sum(g), channel_dot(g, centred)

    pieces = threads.batch_pieces(gy)
    partial = threads.map_pieces(sums, pieces)
    gbeta = _sum_in_order(p[0] for p in partial)
    ggamma = _sum_in_order(p[1] for p in partial) * inv_std   # sum of gy * x_hat
    if relu:
        gy = gx
    if op.training:
        # gx = scale * (gy - sum(gy)/count - x_hat * sum(gy * x_hat)/count),
        # with x_hat * (...) written as (x - mean) * (inv_std * ...).
        sum_gy, sum_gy_x_hat = op.statistics_gradient_sums(gbeta, ggamma)
        k_gy = per_image((sum_gy / count).astype(gx.dtype, copy=False), x)
        k_centred = per_image((-sum_gy_x_hat / count * inv_std).astype(gx.dtype, copy=False), x)

        def input_gradient(part):
            centred = _centred(x, part, mean_i)
            centred *= k_centred
            out = np.subtract(gy[part], k_gy, out=gx[part])
            out += centred
            out *= scale_i
    else:
        def input_gradient(part):
            np.multiply(gy[part], scale_i, out=gx[part])
    threads.map_pieces(input_gradient, pieces)
    return gx, ggamma, gbeta


# ---------------------------------------------------------------------------
# ReLU
# ---------------------------------------------------------------------------
def applies_to(x) -> bool:
    """These paths take NumPy batches (2 or more axes); anything else, the plain path."""
    return backend.device_of(x) == "cpu" and x.ndim >= 2


def relu_forward(x):
    """max(x, 0) a few images at a time on the threads, against one image of zeros."""
    y = np.empty_like(x)
    zeros = np.zeros_like(x[:1])
    threads.map_pieces(lambda part: np.maximum(x[part], zeros, out=y[part]),
                       threads.batch_pieces(x))
    return y


def relu_backward(gy, y):
    """gy where y > 0, else 0, a few images at a time on the threads.  The explicit
    dtype picks NumPy's direct float*bool loop: 30% faster than gy * mask."""
    gx = np.empty_like(gy)
    threads.map_pieces(lambda part: np.multiply(gy[part], y[part] > 0, out=gx[part],
                                                dtype=gy.dtype), threads.batch_pieces(gy))
    return gx


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def _sum_in_order(parts):
    """The per-piece partial sums added in piece order (the same for any thread count)."""
    total = 0
    for part in parts:
        total = total + part
    return total


def _centred(x, part, shift_image):
    """x[part] - shift, in this thread's scratch buffer (the piece stays in cache)."""
    return np.subtract(x[part], shift_image, out=_scratch(x[part]))


def _scratch(piece, name="centred"):
    """A buffer the shape of one piece, this thread's own (``minidense.workspace``
    buffers are per thread), for a temporary that lives in cache."""
    return workspace.get("batch_norm_" + name, piece.shape, piece.dtype, piece)


def per_image(values, like):
    """Per-channel ``values`` (C,) written out over one image's shape (1, C, H, W)."""
    bshape = (1, like.shape[1]) + (1,) * (like.ndim - 2)
    return np.ascontiguousarray(np.broadcast_to(values.reshape(bshape), (1,) + like.shape[1:]))


def channel_sum(x):
    """Sum over every axis but 1 (channels), along each image's contiguous rows first."""
    n, c = x.shape[:2]
    return np.add.reduce(x.reshape(n, c, -1), axis=2).sum(axis=0)


def channel_dot(a, b):
    """Per channel, the sum of a*b over every axis but 1, with no product array: a row
    times a column per (image, channel), matmul's stacked dot products (1.7x faster than
    einsum; a piece whose images are not contiguous is copied first)."""
    n, c = a.shape[:2]
    return np.matmul(a.reshape(n, c, 1, -1), b.reshape(n, c, -1, 1)).reshape(n, c).sum(axis=0)

"""Batch normalisation (Ioffe and Szegedy, 2015)."""
from __future__ import annotations

import numpy as np

from .. import backend, threads, workspace
from ..autograd import Function, Tensor
from ..recompute import is_recomputing


class BatchNorm(Function):
    """Normalise each channel (axis 1) over the batch and spatial axes, then scale
    and shift: y = gamma * (x - mean) / sqrt(var + eps) + beta.

    Training mode uses the batch's statistics (biased variance) and updates the
    running statistics in place, as PyTorch does (running_var gets the unbiased
    variance).  Eval mode uses the running statistics.

    Chosen per backend:

    * NumPy: the batch is worked through a few images at a time
      (``threads.batch_pieces``), each piece visited while it is in cache and the
      pieces spread over ``minidense.threads``.  The statistics take one pass (the sums
      of each piece's deviations from a per-channel shift, and of their squares), y one
      more.  Per-channel constants are written out over one image (``_per_image``).
      Keeps: x itself (in a DenseNet a view of the block's shared storage, so no new
      memory), the mean and 1/sqrt(var + eps) per channel, gamma; backward recomputes
      x - mean piece by piece in cache.
    * CuPy: fused kernels (backend's "bn_forward", "bn_backward" and per-channel
      reductions): the mean, then the variance in one reduction pass, then one pass
      writing x_hat and y; backward, two reductions and one pass.  Keeps: the
      normalised input x_hat, 1/sqrt(var + eps) per channel, and gamma.

    ``sum_over_batch`` (and ``values_per_channel``) and ``statistics_gradient_sums``
    are where the batch's values are summed; ``minidense.distributed.
    SyncBatchNormFunction`` overrides them to sum over every process's batch.
    """

    relu = False  # BatchNormReLU: relu(batch_norm(x)) in the same passes

    def __init__(self, running_mean=None, running_var=None, training=True, momentum=0.1, eps=1e-5):
        self.running_mean, self.running_var = running_mean, running_var
        self.training, self.momentum, self.eps = training, momentum, eps

    def forward(self, x, gamma, beta):
        if x.ndim < 2:
            raise ValueError(f"batch_norm: input must have a channel axis (N, C, ...), "
                             f"got shape {tuple(x.shape)}")
        c = x.shape[1]
        for name, p in (("gamma", gamma), ("beta", beta)):
            if p.shape != (c,):
                raise ValueError(f"batch_norm: {name} must have shape ({c},) for input of shape "
                                 f"{tuple(x.shape)}, got {tuple(p.shape)}")
        xp = backend.get_array_module(x)
        fused = backend.device_of(x) == "cuda"
        bshape = (1, c) + (1,) * (x.ndim - 2)
        count = x.size // c
        if self.training:
            if count < 2:
                raise ValueError(f"batch_norm: training needs more than one value per channel, "
                                 f"got input of shape {tuple(x.shape)}")
            mean, var, count = self.batch_statistics(x, bshape, fused)
            self.count = count
            # md.recompute runs this forward a second time in backward: update once.
            update = not is_recomputing()
            if update and self.running_mean is not None:
                m = self.momentum
                self.running_mean *= 1 - m
                self.running_mean += m * mean
            if update and self.running_var is not None:
                self.running_var *= 1 - self.momentum
                self.running_var += self.momentum * var * (count / (count - 1))
        else:
            if self.running_mean is None or self.running_var is None:
                raise ValueError("batch_norm: eval mode (training=False) needs running_mean and running_var")
            mean, var = self.running_mean, self.running_var
        mean = mean.astype(x.dtype, copy=False)
        inv_std = (1.0 / xp.sqrt(var + self.eps)).astype(x.dtype, copy=False)
        self.bshape = bshape
        relu_args = (beta,) if self.relu else ()
        if fused:
            x_hat, y = xp.empty_like(x), xp.empty_like(x)
            backend.cuda_kernel("bn_forward")(
                x, mean.reshape(bshape), inv_std.reshape(bshape),
                gamma.reshape(bshape), beta.reshape(bshape), self.relu, x_hat, y)
            self.save_for_backward(x_hat, inv_std, gamma, *relu_args)
            return y
        y = np.empty(x.shape, dtype=np.result_type(x, gamma, beta))
        mean_i, scale_i = _per_image(mean, x), _per_image(gamma * inv_std, x)
        beta_i = _per_image(beta, x)
        zeros_i = np.zeros_like(beta_i) if self.relu else None

        def normalise(part):   # y = (x - mean) * (gamma / std) + beta, then the ReLU
            out = np.subtract(x[part], mean_i, out=y[part])
            out *= scale_i
            out += beta_i
            if self.relu:
                np.maximum(out, zeros_i, out=out)
        threads.map_pieces(normalise, threads.batch_pieces(x))
        self.save_for_backward(x, mean, inv_std, gamma, *relu_args)
        return y

    def backward(self, gy):
        count = self.count if self.training else gy.size // gy.shape[1]
        if backend.device_of(gy) == "cuda":
            return self._backward_cuda(gy, count)
        x, mean, inv_std, gamma, *rest = self.saved
        scale = gamma * inv_std
        mean_i, scale_i = _per_image(mean, x), _per_image(scale, x)
        beta_i = _per_image(rest[0], x) if self.relu else None
        gx = np.empty(gy.shape, dtype=np.result_type(gy, x, scale))   # first: the masked gy

        # Piece by piece (in cache, on the threads): x - mean recomputed, the ReLU's mask
        # recomputed by the forward's own operations, and the two per-channel sums.
        def sums(part):
            centred = _centred(x, part, mean_i)
            g = gy[part]
            if self.relu:
                before_relu = np.multiply(centred, scale_i, out=_scratch(x[part], "mask"))  # as forward
                before_relu += beta_i
                g = np.multiply(g, before_relu > 0, out=gx[part], dtype=gx.dtype)
            return _channel_sum(g), _channel_dot(g, centred)

        pieces = threads.batch_pieces(gy)
        partial = threads.map_pieces(sums, pieces)
        gbeta = _sum_in_order(p[0] for p in partial)
        ggamma = _sum_in_order(p[1] for p in partial) * inv_std   # sum of gy * x_hat
        if self.relu:
            gy = gx
        if self.training:
            # d/dx of the batch statistics: remove the mean and the x_hat component,
            # gx = scale * (gy - gbeta/count - x_hat * ggamma/count), x_hat = (x - mean) * inv_std.
            sum_gy, sum_gy_x_hat = self.statistics_gradient_sums(gbeta, ggamma)
            k_gy = _per_image((sum_gy / count).astype(gx.dtype, copy=False), x)
            k_centred = _per_image((-sum_gy_x_hat / count * inv_std).astype(gx.dtype, copy=False), x)

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

    def _backward_cuda(self, gy, count):
        x_hat, inv_std, gamma, *rest = self.saved
        bshape = self.bshape
        scale = (gamma * inv_std).reshape(bshape)
        beta = rest[0] if self.relu else _zeros_like(gamma)
        per_channel = (gamma.reshape(bshape), beta.reshape(bshape))
        if self.relu:
            gbeta = _reduce("relu_masked_sum", gy, x_hat, *per_channel)
            ggamma = _reduce("relu_masked_dot", gy, x_hat, *per_channel)
        else:
            gbeta, ggamma = _channel_sum(gy), _channel_dot(gy, x_hat)
        if self.training:
            sum_gy, sum_gy_x_hat = self.statistics_gradient_sums(gbeta, ggamma)
            mean_gy, neg_mean_gxh = sum_gy / count, -sum_gy_x_hat / count
        else:
            mean_gy, neg_mean_gxh = _zeros_like(gbeta), _zeros_like(ggamma)
        gx = backend.get_array_module(gy).empty_like(gy)
        backend.cuda_kernel("bn_backward")(
            gy, x_hat, *per_channel, scale, mean_gy.reshape(bshape), neg_mean_gxh.reshape(bshape),
            self.relu, gx)
        return gx, ggamma, gbeta

    def batch_statistics(self, x, bshape, fused):
        """(mean, biased variance, values per channel) over every axis but 1, the sums
        through ``sum_over_batch``.  ``fused`` (CuPy): the mean, then the squared
        deviations in one reduction kernel.  NumPy: one visit per piece, in cache, gives
        the sums of x - K and of its squares, K per channel the first image's mean (the
        "shifted data" algorithm); the squared deviations about the batch mean follow
        from them without a second pass over memory.  That loses precision to
        cancellation when K lies far from the batch mean (an unusual first image), so
        then, and only then, a second pass sums (x - mean)^2 itself; an overflowing sum
        of squares stays infinite, never NaN."""
        count = self.values_per_channel(x)
        if fused:
            mean = self.sum_over_batch(_channel_sum(x)) / count
            squares = _reduce("channel_squared_deviation", x, mean.reshape(bshape))
            return mean, self.sum_over_batch(squares) / count, count

        n = x.size // x.shape[1]                     # values per channel here
        shift = _channel_sum(x[:1]) / (n // len(x))
        shift_i = _per_image(shift, x)

        def piece_sums(part):
            shifted = _centred(x, part, shift_i)
            return _channel_sum(shifted), _channel_dot(shifted, shifted)

        pieces = threads.batch_pieces(x)
        sums = threads.map_pieces(piece_sums, pieces)
        s1, s2 = _sum_in_order(s for s, _ in sums), _sum_in_order(q for _, q in sums)
        mean = self.sum_over_batch(n * shift + s1) / count
        d = mean - shift
        with np.errstate(invalid="ignore", over="ignore"):
            spread = n * d * d
            squares = np.where(np.isfinite(s2), s2 - 2 * d * s1 + spread, s2)  # sum of (x - mean)^2
        # Cancellation costs about eps * spread / squares of relative precision: past
        # 16x (a few float32 units), sum the squared deviations about the mean itself.
        if np.any(spread > 16 * squares):
            mean_i = _per_image(mean.astype(x.dtype, copy=False), x)

            def squared_deviations(part):
                centred = _centred(x, part, mean_i)
                return _channel_dot(centred, centred)
            squares = _sum_in_order(threads.map_pieces(squared_deviations, pieces))
        return mean, np.maximum(self.sum_over_batch(squares) / count, 0), count

    def values_per_channel(self, x):
        """How many values each channel's batch statistics are taken over."""
        return x.size // x.shape[1]

    def sum_over_batch(self, sums):
        """Per-channel sums over this process's batch, as sums over the whole batch."""
        return sums

    def statistics_gradient_sums(self, gbeta, ggamma):
        """The sums over the batch of gy and of gy * x_hat that the gradient through the
        batch statistics needs (here the parameter gradients themselves)."""
        return gbeta, ggamma


class BatchNormReLU(BatchNorm):
    """relu(batch_norm(x)) as one op: the same passes as BatchNorm, the ReLU applied in
    the forward pass and its mask recomputed in backward by the forward's own operations
    (on CuPy from x_hat, gamma and beta).  Keeps: what BatchNorm keeps, and beta; no
    ReLU output."""

    relu = True


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


def _per_image(values, like):
    """Per-channel ``values`` (C,) written out over one image's shape (1, C, H, W).
    NumPy's element-wise loops run about twice as fast on two full operands as on a
    per-channel operand broadcast along each row (a stride-0 inner loop), and one image
    of constants costs little next to the batch."""
    bshape = (1, like.shape[1]) + (1,) * (like.ndim - 2)
    return np.ascontiguousarray(np.broadcast_to(values.reshape(bshape), (1,) + like.shape[1:]))


def _zeros_like(a):
    return backend.get_array_module(a).zeros_like(a)


def _reduce(name, *arrays):
    """A per-channel CuPy reduction kernel over every axis but 1, on (N, C, L) views
    (per-channel arrays as (1, C, 1), broadcast)."""
    n, c = arrays[0].shape[:2]
    views = [a.reshape(n, c, -1) if a.size == arrays[0].size else a.reshape(1, c, 1)
             for a in arrays]
    return backend.cuda_kernel(name)(*views, axis=(0, 2))


def _channel_sum(x):
    """Sum over every axis but 1 (channels).  Chosen per backend: on NumPy, along each
    image's contiguous rows (N, C, H*W) first, which is fast and stays on the calling
    thread (BLAS would hand a piece to its own threads while the pool's threads wait);
    on CuPy, as matrix-vector products with ones, faster than a sum over the strided
    axes (0, 2, 3)."""
    xp = backend.get_array_module(x)
    n, c = x.shape[:2]
    if backend.device_of(x) == "cpu":
        return np.add.reduce(x.reshape(n, c, -1), axis=2).sum(axis=0)
    rows = x.reshape(n * c, -1)
    return (rows @ xp.ones(rows.shape[1], dtype=x.dtype)).reshape(n, c).sum(axis=0)


def _channel_dot(a, b):
    """Per channel, the sum of a*b over every axis but 1, with no product array.
    Chosen per backend: on NumPy, a row times a column per (image, channel), matmul's
    stacked dot products (1.7x faster than einsum; a piece whose images are not
    contiguous is copied first); on CuPy, whose einsum copies both operands, a
    reduction kernel."""
    if backend.device_of(a) == "cuda":
        return _reduce("channel_dot", a, b)
    n, c = a.shape[:2]
    return np.matmul(a.reshape(n, c, 1, -1), b.reshape(n, c, -1, 1)).reshape(n, c).sum(axis=0)


def batch_norm(input, weight, bias, running_mean=None, running_var=None, training=True,
               momentum=0.1, eps=1e-5):
    """Batch normalisation over axis 1.  ``running_mean``/``running_var`` (Tensors or
    arrays) are updated in place in training mode and used in eval mode."""
    rm = running_mean.data if isinstance(running_mean, Tensor) else running_mean
    rv = running_var.data if isinstance(running_var, Tensor) else running_var
    return BatchNorm(rm, rv, training, momentum, eps)(input, weight, bias)


def batch_norm_relu(input, weight, bias, running_mean=None, running_var=None, training=True,
                    momentum=0.1, eps=1e-5):
    """``relu(batch_norm(x, ...))`` as one op (the pre-activation of DenseNet's layers):
    the same arguments as ``batch_norm``; less memory (no ReLU output is kept) and, on
    the GPU, one fused kernel per pass."""
    rm = running_mean.data if isinstance(running_mean, Tensor) else running_mean
    rv = running_var.data if isinstance(running_var, Tensor) else running_var
    return BatchNormReLU(rm, rv, training, momentum, eps)(input, weight, bias)

"""Loss functions."""
from __future__ import annotations

from .. import backend
from ..autograd import Function, Tensor, as_tensor
from .math import exp
from ._utils import expect_ndim


def log_softmax_array(logits):
    """log softmax over the last axis, by log-sum-exp (no overflow for large logits)."""
    xp = backend.get_array_module(logits)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


class CrossEntropy(Function):
    """Mean over the batch of -log softmax(logits)[label].
    Keeps: the logits and the labels (the softmax is recomputed in backward)."""

    def forward(self, logits, labels):
        expect_ndim("cross_entropy", "logits", logits, 2, "N, classes")
        if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
            raise ValueError(f"cross_entropy: labels must have shape ({logits.shape[0]},) for logits "
                             f"of shape {tuple(logits.shape)}, got {tuple(labels.shape)}")
        if labels.dtype.kind not in "iu":
            raise TypeError(f"cross_entropy: labels must be integers, got dtype {labels.dtype}")
        xp = backend.get_array_module(logits)
        k = logits.shape[1]
        # CuPy's fancy indexing wraps an out-of-range label around instead of raising, so
        # without a check a bad label would silently train on the wrong class.  Host
        # labels are checked here and raise; device labels are checked on the device,
        # without the host sync a raise would need: a bad label makes the loss and the
        # gradient NaN (labels are best checked once on the host, as DataLoader does).
        bad = (labels < 0) | (labels >= k)
        self.poison = None
        if backend.device_of(labels) == "cpu":
            if labels.size and bool(bad.any()):
                raise ValueError(f"cross_entropy: labels must be in [0, {k}) for {k} classes, "
                                 f"got {labels[bad][:5].tolist()}")
        else:
            self.poison = xp.where(bad.any(), xp.nan, 0).astype(logits.dtype)  # 0-d, on the device
            labels = labels.clip(0, k - 1)
        log_p = log_softmax_array(logits)
        rows = xp.arange(labels.shape[0])
        loss = -log_p[rows, labels].mean()
        if self.poison is not None:
            loss = loss + self.poison
        self.save_for_backward(logits, labels)   # the probabilities are recomputed in backward
        return xp.asarray(loss, dtype=logits.dtype)

    def backward(self, gy):
        logits, labels = self.saved
        xp = backend.get_array_module(logits)
        n = logits.shape[0]
        g = xp.exp(log_softmax_array(logits))        # the softmax probabilities
        g[xp.arange(n), labels] -= 1
        scale = gy / n if self.poison is None else gy / n + self.poison
        return g * scale, None

    differentiable = True

    def differentiable_backward(self, gy):
        """(softmax(logits) - onehot(labels)) * gy / N, with ops on the logits."""
        logits, labels = self.saved_tensors()
        xp = backend.get_array_module(logits.data)
        n, k = logits.shape
        shift = Tensor(logits.data.max(axis=1, keepdims=True))   # any constant shift: no overflow
        e = exp(logits - shift)
        probs = e / e.sum(axis=1, keepdims=True)
        onehot = Tensor((labels.data[:, None] == xp.arange(k)).astype(logits.dtype))
        scale = gy / n if self.poison is None else gy / n + Tensor(self.poison)
        return (probs - onehot) * scale, None


def cross_entropy(logits, labels):
    """Softmax cross-entropy with integer class labels, averaged over the batch."""
    logits = as_tensor(logits)
    return CrossEntropy()(logits, as_tensor(labels))

"""Loss functions."""
from __future__ import annotations

from .. import backend
from ..autograd import Function, Tensor, as_tensor
from .math import exp
from ._utils import expect_ndim
from .array import getitem
from .softmax import log_softmax, log_softmax_array


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


REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(op, size_average, reduce, reduction):
    if size_average is not None or reduce is not None:
        raise TypeError(f"{op}: size_average and reduce are deprecated in PyTorch and not "
                        f"supported by minidense; use reduction='mean', 'sum' or 'none'")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {', '.join(map(repr, REDUCTIONS))}, "
                         f"got {reduction!r}")


def _class_weights(op, labels, weight, ignore_index, classes, dtype):
    """For integer labels, as arrays: the labels with ignored ones replaced by 0, each
    sample's weight (weight[label], 0 where ignored), and which samples are not ignored."""
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{op}: target must hold integer class indices, got dtype {labels.dtype}")
    xp = backend.get_array_module(labels)
    valid = labels != ignore_index
    safe = xp.where(valid, labels, 0)
    if backend.device_of(labels) == "cpu" and bool(((safe < 0) | (safe >= classes)).any()):
        raise ValueError(f"{op}: target must be in [0, {classes}) for {classes} classes (or "
                         f"ignore_index={ignore_index}), got {labels[(safe < 0) | (safe >= classes)][:5].tolist()}")
    w = xp.ones(classes, dtype=dtype) if weight is None else as_tensor(weight).data.astype(dtype)
    if w.shape != (classes,):
        raise ValueError(f"{op}: weight must have shape ({classes},), one per class, got {tuple(w.shape)}")
    return safe, w[safe] * valid, valid


def _reduce(losses, reduction, total_weight):
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.sum() / total_weight


def _check_batch(op, input, target):
    expect_ndim(op, "input", input, 2, "N, classes")
    if target.shape[:1] != input.shape[:1]:
        raise ValueError(f"{op}: target of shape {tuple(target.shape)} does not match input of "
                         f"shape {tuple(input.shape)} (one class index per sample, or a "
                         f"probability row of the input's shape)")


def nll_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
             reduction="mean"):
    """The negative log-likelihood of log-probabilities ``input`` (N, C) at the classes
    ``target`` (N,), each weighted by ``weight[class]``; "mean" divides by the weights' sum."""
    _check_reduction("nll_loss", size_average, reduce, reduction)
    log_p, labels = as_tensor(input), as_tensor(target).data
    _check_batch("nll_loss", log_p, labels)
    safe, sample_weight, _ = _class_weights("nll_loss", labels, weight, ignore_index,
                                            log_p.shape[1], log_p.dtype)
    xp = backend.get_array_module(safe)
    picked = getitem(log_p, (xp.arange(log_p.shape[0]), safe))
    return _reduce(-(picked * Tensor(sample_weight)), reduction, sample_weight.sum())


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0):
    """Softmax cross-entropy of logits ``input`` (N, C), as PyTorch's: ``target`` holds
    class indices (N,) or class probabilities (N, C); ``weight`` weighs each class;
    ``label_smoothing`` mixes the target with the uniform distribution.

    The common case (class indices, no weight, no smoothing, the mean) is one fused op,
    ``CrossEntropy``; the rest is composed of log_softmax, indexing and sums."""
    _check_reduction("cross_entropy", size_average, reduce, reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    logits, labels = as_tensor(input), as_tensor(target)
    _check_batch("cross_entropy", logits, labels)
    plain = (weight is None and reduction == "mean" and label_smoothing == 0
             and labels.dtype.kind in "iu" and labels.ndim == 1)
    if plain and (backend.device_of(labels.data) != "cpu" or not bool((labels.data == ignore_index).any())):
        return CrossEntropy()(logits, labels)
    log_p = log_softmax(logits, 1)
    classes = logits.shape[1]
    if labels.dtype.kind == "f":  # class probabilities
        if labels.shape != logits.shape:
            raise TypeError(f"cross_entropy: target must hold integer class indices, or class "
                            f"probabilities of the input's shape {tuple(logits.shape)}; got "
                            f"{labels.dtype} of shape {tuple(labels.shape)}")
        p = labels.data * (1 - label_smoothing) + label_smoothing / classes
        if weight is not None:
            p = p * as_tensor(weight).data
        return _reduce(-(log_p * Tensor(p.astype(log_p.dtype))).sum(1), reduction, logits.shape[0])
    nll = nll_loss(log_p, labels, weight, ignore_index=ignore_index, reduction=reduction)
    if label_smoothing == 0:
        return nll
    _, sample_weight, valid = _class_weights("cross_entropy", labels.data, weight, ignore_index,
                                             classes, log_p.dtype)
    w = log_p if weight is None else log_p * as_tensor(weight).to(dtype=log_p.dtype)
    smooth = -w.sum(1) * Tensor(valid.astype(log_p.dtype))
    smooth = _reduce(smooth, reduction, sample_weight.sum())
    return nll * (1 - label_smoothing) + smooth * (label_smoothing / classes)


def mse_loss(input, target, size_average=None, reduce=None, reduction="mean"):
    """The squared difference, averaged ("mean"), summed, or per element ("none")."""
    _check_reduction("mse_loss", size_average, reduce, reduction)
    input, target = as_tensor(input), as_tensor(target)
    if tuple(input.shape) != tuple(target.shape):
        raise ValueError(f"mse_loss: input {tuple(input.shape)} and target {tuple(target.shape)} "
                         f"must have the same shape")
    d = input - target
    squared = d * d
    return squared.mean() if reduction == "mean" else _reduce(squared, reduction, None)

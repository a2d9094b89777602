"""Dropout (Srivastava et al., 2014), inverted: scaled at training time."""
from __future__ import annotations

from .. import backend
from ..autograd import Function


class Dropout(Function):
    """Zero each element with probability p and scale the rest by 1/(1-p).
    Keeps: the mask, already scaled."""

    def __init__(self, p=0.5, generator=None):
        if not 0 <= p < 1:
            raise ValueError(f"dropout: p must be in [0, 1), got {p}")
        self.p, self.generator = p, generator

    def forward(self, x):
        device = backend.device_of(x)
        gen = self.generator or backend.generator(device)
        # A generator of the other device (a NumPy one for a CUDA tensor) still works:
        # its draws are moved, once, to the tensor's device.
        keep = backend.to_device(gen.random(x.shape, dtype=x.dtype), device) >= self.p
        mask = keep * x.dtype.type(1.0 / (1.0 - self.p))
        self.save_for_backward(mask)
        return x * mask

    def backward(self, gy):
        (mask,) = self.saved
        return gy * mask

    differentiable = True

    def differentiable_backward(self, gy):
        (mask,) = self.saved_tensors()   # the same mask again: a constant
        return gy * mask


def dropout(input, p=0.5, train=True, *, generator=None):
    """Inverted dropout; the identity when not ``train``ing or when p == 0 (PyTorch's
    ``torch.dropout``; ``nn.functional.dropout`` calls the flag ``training``).
    ``generator``: a NumPy/CuPy Generator (on either device); by default minidense's
    seeded one for the tensor's device (``md.manual_seed``)."""
    if not train or p == 0:
        return input
    return Dropout(p, generator)(input)

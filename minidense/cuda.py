"""``md.cuda.is_available()``, as ``torch.cuda.is_available()``: whether CuPy sees a GPU.
minidense uses one GPU, "cuda" (see ``backend.check_device``)."""
from __future__ import annotations

from . import backend


def is_available() -> bool:
    return backend.cuda_available()


def device_count() -> int:
    """1 when a GPU can be used (minidense uses the first one only), else 0."""
    return int(backend.cuda_available())


def synchronize(device=None) -> None:
    """Wait for the GPU's queued work."""
    backend.synchronize("cuda" if device is None else device)

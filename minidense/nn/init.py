"""Weight initialisation, from minidense's seeded generator (``md.manual_seed``).

Arrays are made in float32 on the CPU; ``Module.to(device)`` moves them."""
from __future__ import annotations

import math

import numpy as np

from .. import backend


def kaiming_normal(shape, mode="fan_out"):
    """He et al. (2015): N(0, 2/fan), fan = out*kh*kw ("fan_out") or in*kh*kw ("fan_in")."""
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    fan = (shape[0] if mode == "fan_out" else shape[1]) * receptive
    std = math.sqrt(2.0 / fan)
    return (backend.generator("cpu").standard_normal(shape) * std).astype(np.float32)


def uniform(shape, low, high):
    return backend.generator("cpu").uniform(low, high, shape).astype(np.float32)


def zeros(shape):
    return np.zeros(shape, dtype=np.float32)


def ones(shape):
    return np.ones(shape, dtype=np.float32)

"""The one module that knows NumPy from CuPy.

Everything else in minidense asks this module for the array library that goes
with an array (``xp = backend.get_array_module(x)``) or with a device name
(``backend.array_module("cuda")``), and never imports CuPy itself.  CuPy is
optional: ``import minidense`` works without it, and only asking for
``device="cuda"`` needs it.
"""
from __future__ import annotations

import contextlib
import copy

import numpy as np

try:  # CuPy is an optional dependency (the ``gpu`` extra).
    import cupy as _cupy
except Exception:  # ImportError, or a CUDA library that fails to load
    _cupy = None

DEVICES = ("cpu", "cuda")


def cuda_available() -> bool:
    """True when CuPy is importable and sees at least one GPU."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def check_device(device: str) -> str:
    """Normalise a device name ("cpu", "cuda", "cuda:0") and check it can be used."""
    if device is None:
        return "cpu"
    name = str(device).split(":")[0]
    if name not in DEVICES:
        raise ValueError(f"unknown device {device!r}: expected one of {DEVICES}")
    if name == "cuda" and not cuda_available():
        reason = ("CuPy is not installed (pip install 'minidense[gpu]', or the "
                  "cupy-cudaXXx wheel for your CUDA version)" if _cupy is None
                  else "CuPy sees no GPU")
        raise RuntimeError(f"device 'cuda' was requested but {reason}")
    return name


def array_module(device: str):
    """NumPy for "cpu", CuPy for "cuda"."""
    return _cupy if check_device(device) == "cuda" else np


def get_array_module(array):
    """The array library (numpy or cupy) that owns ``array``."""
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return _cupy
    return np


def device_of(array) -> str:
    return "cuda" if get_array_module(array) is not np else "cpu"


def is_array(obj) -> bool:
    return isinstance(obj, np.ndarray) or (_cupy is not None and isinstance(obj, _cupy.ndarray))


def to_device(array, device: str):
    """Move an array to ``device`` (a no-op when it is already there)."""
    device = check_device(device)
    if device == device_of(array):
        return array
    if device == "cuda":
        return _cupy.asarray(array)
    return _cupy.asnumpy(array)


def to_numpy(array) -> np.ndarray:
    """A host (NumPy) copy or view of ``array``."""
    if get_array_module(array) is np:
        return np.asarray(array)
    return _cupy.asnumpy(array)


def scatter_add(target, index, values) -> None:
    """``target[index] += values`` where repeated indices add up (np.add.at)."""
    if get_array_module(target) is np:
        np.add.at(target, index, values)
    else:
        import cupyx
        cupyx.scatter_add(target, index, values)


# ---------------------------------------------------------------------------
# Random numbers: one seeded generator per device (dropout, initialisation, data).
# ---------------------------------------------------------------------------
_generators = {}
_seed = None


def manual_seed(seed: int) -> None:
    """Seed minidense's generators on every device, for repeatable runs."""
    global _seed
    _seed = int(seed)
    _generators.clear()


def generator(device: str = "cpu"):
    """The generator for ``device``: a numpy (or cupy) ``Generator``."""
    device = check_device(device)
    gen = _generators.get(device)
    if gen is None:
        xp = array_module(device)
        gen = _generators[device] = xp.random.default_rng(_seed)
    return gen


def rng_snapshot(device: str = "cpu"):
    """A copy of ``device``'s generator as it is now, to replay its next draws later
    (recomputation in backward draws the same dropout masks as the forward did)."""
    return copy.deepcopy(generator(device))


@contextlib.contextmanager
def replay_rng(device: str, snapshot):
    """Inside the block, ``device``'s generator is a fresh copy of ``snapshot``; after
    it, the generator in use before, untouched."""
    device = check_device(device)
    previous = _generators.get(device)
    _generators[device] = copy.deepcopy(snapshot)   # a copy: a snapshot can be replayed twice
    try:
        yield
    finally:
        if previous is None:
            _generators.pop(device, None)
        else:
            _generators[device] = previous


# ---------------------------------------------------------------------------
# CuPy kernels, compiled once per process on first use.
# ---------------------------------------------------------------------------
_kernels = {}


def cuda_kernel(name: str):
    """A CuPy ElementwiseKernel from ``_CUDA_KERNELS``, built once and cached."""
    kernel = _kernels.get(name)
    if kernel is None:
        in_params, out_params, body = _CUDA_KERNELS[name]
        kernel = _cupy.ElementwiseKernel(in_params, out_params, body, "minidense_" + name)
        _kernels[name] = kernel
    return kernel


# im2col: one thread per element of col (N, C, kh, kw, OH, OW); a gather from x.
# col2im: one thread per element of x (N, C, H, W); a gather from col, so the
# result is deterministic (no atomics), as in Chainer.
_CUDA_KERNELS = {
    "im2col": (
        "raw T x, int32 H, int32 W, int32 OH, int32 OW, int32 KH, int32 KW, "
        "int32 SY, int32 SX, int32 PH, int32 PW",
        "T col",
        """
        int ow = i % OW;
        int oh = i / OW % OH;
        int kx = i / (OW * OH) % KW;
        int ky = i / (OW * OH * KW) % KH;
        int nc = i / (OW * OH * KW * KH);
        int y = oh * SY - PH + ky;
        int x_ = ow * SX - PW + kx;
        col = (0 <= y && y < H && 0 <= x_ && x_ < W) ? x[(nc * H + y) * W + x_] : (T)0;
        """,
    ),
    "col2im": (
        "raw T col, int32 H, int32 W, int32 OH, int32 OW, int32 KH, int32 KW, "
        "int32 SY, int32 SX, int32 PH, int32 PW",
        "T x",
        """
        int xx = i % W + PW;
        int yy = i / W % H + PH;
        int nc = i / (W * H);
        T acc = 0;
        for (int ky = 0; ky < KH; ++ky) {
            int oy = yy - ky;
            if (oy < 0 || oy % SY != 0) continue;
            oy /= SY;
            if (oy >= OH) continue;
            for (int kx = 0; kx < KW; ++kx) {
                int ox = xx - kx;
                if (ox < 0 || ox % SX != 0) continue;
                ox /= SX;
                if (ox >= OW) continue;
                acc += col[(((nc * KH + ky) * KW + kx) * OH + oy) * OW + ox];
            }
        }
        x = acc;
        """,
    ),
}

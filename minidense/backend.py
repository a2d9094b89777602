"""The one module that knows NumPy from CuPy.

Everything else in minidense asks this module for the array library that goes
with an array (``xp = backend.get_array_module(x)``) or with a device name
(``backend.array_module("cuda")``), and never imports CuPy itself.  CuPy is
optional: ``import minidense`` works without it, and only asking for
``device="cuda"`` needs it.
"""
from __future__ import annotations

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


def use_gpu(index: int) -> None:
    """Make GPU ``index`` (modulo the GPUs this machine has) CuPy's current device: one
    GPU per rank of a data-parallel job, picked by its rank on the machine."""
    if _cupy is None:
        raise RuntimeError("use_gpu: CuPy is not installed")
    _cupy.cuda.Device(index % _cupy.cuda.runtime.getDeviceCount()).use()


class NcclGroup:
    """An NCCL communicator (``cupy.cuda.nccl.NcclCommunicator``) for CuPy arrays, on the
    current stream: what ``minidense.distributed`` uses for device arrays.
    ``NcclGroup.single()`` makes a 1-rank one, which needs no MPI (the GPU smoke test)."""

    ID_BYTES = 128   # NCCL_UNIQUE_ID_BYTES

    def __init__(self, size: int, rank: int, unique_id):
        if _cupy is None:
            raise RuntimeError("NcclGroup: CuPy is not installed")
        from cupy.cuda import nccl
        self.nccl = nccl
        self.comm = nccl.NcclCommunicator(size, unique_id, rank)

    @staticmethod
    def unique_id():
        from cupy.cuda import nccl
        return nccl.get_unique_id()

    @classmethod
    def single(cls) -> "NcclGroup":
        return cls(1, 0, cls.unique_id())

    def _type(self, array):
        types = {np.dtype(np.float32): self.nccl.NCCL_FLOAT32,
                 np.dtype(np.float64): self.nccl.NCCL_FLOAT64,
                 np.dtype(np.float16): self.nccl.NCCL_FLOAT16,
                 np.dtype(np.int64): self.nccl.NCCL_INT64,
                 np.dtype(np.int32): self.nccl.NCCL_INT32}
        if np.dtype(array.dtype) not in types:
            raise TypeError(f"NcclGroup: no NCCL type for {array.dtype}")
        if not array.flags.c_contiguous:
            raise ValueError("NcclGroup: arrays must be C-contiguous")
        return types[np.dtype(array.dtype)]

    def allreduce(self, array):
        """Sum ``array`` over the ranks, in place."""
        self.comm.allReduce(array.data.ptr, array.data.ptr, array.size, self._type(array),
                            self.nccl.NCCL_SUM, _cupy.cuda.get_current_stream().ptr)
        return array

    def broadcast(self, array, root: int = 0):
        """Overwrite ``array`` with rank ``root``'s, in place."""
        self.comm.broadcast(array.data.ptr, array.data.ptr, array.size, self._type(array), root,
                            _cupy.cuda.get_current_stream().ptr)
        return array

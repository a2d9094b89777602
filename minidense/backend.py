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
import time

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
    """Normalise a device name ("cpu", "cuda", "cuda:0") and check it can be used.

    Only the first GPU is used: every array and kernel goes to CuPy's current device,
    so "cuda:1" would silently run on GPU 0.  It is refused instead; pick a GPU with
    CUDA_VISIBLE_DEVICES (it is then "cuda:0" to this process)."""
    if device is None:
        return "cpu"
    name, _, index = str(device).partition(":")
    if name not in DEVICES:
        raise ValueError(f"unknown device {device!r}: expected one of {DEVICES}")
    if index and (name != "cuda" or index != "0"):
        raise ValueError(f"device {device!r}: minidense uses one GPU, 'cuda' (or 'cuda:0'); to "
                         f"run on another GPU, set CUDA_VISIBLE_DEVICES to its index")
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


def host_nested(data):
    """``data`` (a number, an array, or nested lists/tuples of them) with every CuPy
    array or scalar inside replaced by a NumPy one, so that ``np.asarray`` can read it
    (CuPy refuses implicit conversion to the host).  One copy per CuPy element: meant
    for small lists such as ``[loss1, loss2]``, not for bulk data.  Iterative, so
    deep nesting cannot hit the recursion limit."""
    if _cupy is None or not isinstance(data, (list, tuple)):
        return data
    root = [data]
    stack = [(root, 0)]
    while stack:
        container, i = stack.pop()
        item = container[i]
        if isinstance(item, _cupy.ndarray):
            container[i] = _cupy.asnumpy(item)
        elif isinstance(item, (list, tuple)):
            item = container[i] = list(item)
            stack.extend((item, j) for j in range(len(item)))
    return root[0]


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
    """The generator for ``device``: a numpy (or cupy) ``Generator``.

    Chosen per backend: NumPy's default (PCG64) on the CPU; on CuPy a Philox4x32-10
    generator, which is counter-based and so costs next to nothing to create, where
    CuPy's default XORWOW sets up a cuRAND state for every thread (and the trainer
    reseeds before every step, to make dropout masks a function of the step)."""
    device = check_device(device)
    gen = _generators.get(device)
    if gen is None:
        if device == "cuda":
            gen = _cupy.random.Generator(_cupy.random.Philox4x3210(_seed))
        else:
            gen = np.random.default_rng(_seed)
        _generators[device] = gen
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
# GPU settings and measurements: TF32, synchronisation, timing, peak memory.
# ---------------------------------------------------------------------------
_tf32 = False


def set_tf32(enabled: bool) -> None:
    """Let float32 matrix products on the GPU use TF32 tensor cores (10-bit mantissa
    inputs, float32 accumulation), as ``torch.backends.cuda.matmul.allow_tf32`` does.

    Off by default, so that float32 results keep their tolerances; the training
    command turns it on.  Without CuPy only the flag is recorded (the CPU never uses
    TF32); on GPUs older than Ampere CuPy warns and keeps full float32.  It applies
    to 2-D products (CuPy's dot), which is what minidense's layers use; CuPy's
    batched matmul ignores it."""
    global _tf32
    _tf32 = bool(enabled)
    if cuda_available():
        linalg = _cupy._core._routines_linalg  # where CuPy keeps its GEMM compute type
        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if _tf32
                                else linalg.COMPUTE_TYPE_DEFAULT)


def tf32_enabled() -> bool:
    return _tf32


def synchronize(device: str = "cuda") -> None:
    """Wait for the GPU's queued work (a no-op on the CPU)."""
    if check_device(device) == "cuda":
        _cupy.cuda.Device().synchronize()


class Timer:
    """Milliseconds between ``start()`` and ``stop()``: CUDA events on the GPU (the time
    the GPU spent, not when Python happened to queue the kernels), the wall clock on
    the CPU."""

    def __init__(self, device: str = "cpu"):
        self.cuda = check_device(device) == "cuda"
        if self.cuda:
            self.begin, self.end = _cupy.cuda.Event(), _cupy.cuda.Event()

    def start(self):
        if self.cuda:
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            return _cupy.cuda.get_elapsed_time(self.begin, self.end)
        return (time.perf_counter() - self.t0) * 1e3


class MemoryCounter:
    """Current and peak bytes of GPU memory handed out to arrays.

    CuPy's pool keeps no high-water mark, so this allocator sits in front of it:
    ``install()`` routes every allocation through ``malloc``/``free`` here, which
    count the bytes (rounded up as the pool rounds them, to 512) and forward to the
    pool.  The peak is comparable to ``torch.cuda.max_memory_allocated``.  The
    counting itself needs no GPU (the tests drive it with a fake pool)."""

    ROUND = 512

    def __init__(self, pool=None):
        self.pool = pool
        self.live = {}          # pointer -> (the pool's MemoryPointer, rounded size)
        self.current = self.peak = 0
        self._previous = None

    def malloc(self, size, device_id=0):
        if size == 0:  # nothing to count, and every empty allocation would share pointer 0
            return 0
        rounded = -(-size // self.ROUND) * self.ROUND
        memory = self.pool.malloc(size)
        self.live[memory.ptr] = (memory, rounded)
        self.current += rounded
        self.peak = max(self.peak, self.current)
        return memory.ptr

    def free(self, ptr, device_id=0):
        if ptr == 0:
            return
        memory, rounded = self.live.pop(ptr)
        self.current -= rounded
        del memory  # back to the pool

    def reset_peak(self):
        self.peak = self.current

    def install(self):
        """Make this the allocator of CuPy (and so of minidense on the GPU)."""
        if self.pool is None:
            self.pool = _cupy.get_default_memory_pool()
        self._previous = _cupy.cuda.get_allocator()
        allocator = _cupy.cuda.memory.PythonFunctionAllocator(self.malloc, self.free)
        _cupy.cuda.set_allocator(allocator.malloc)
        return self

    def uninstall(self):
        if self._previous is not None:
            _cupy.cuda.set_allocator(self._previous)
            self._previous = None


# ---------------------------------------------------------------------------
# CuPy kernels, compiled once per process on first use.
# ---------------------------------------------------------------------------
_kernels = {}


def cuda_kernel(name: str):
    """A CuPy ElementwiseKernel (or ReductionKernel) from ``CUDA_KERNELS``, built once
    and cached; CuPy compiles it on first launch and caches the binary per dtype."""
    kernel = _kernels.get(name)
    if kernel is None:
        spec = CUDA_KERNELS[name]
        if spec[0] == "reduction":
            _, in_params, out_params, map_expr, reduce_expr, post_map, identity = spec
            kernel = _cupy.ReductionKernel(in_params, out_params, map_expr, reduce_expr,
                                           post_map, identity, "minidense_" + name)
        else:
            in_params, out_params, body = spec
            kernel = _cupy.ElementwiseKernel(in_params, out_params, body, "minidense_" + name)
        _kernels[name] = kernel
    return kernel


def index_kernel(name: str, *sizes):
    """The 32-bit-index variant of kernel ``name`` when every array it touches has
    fewer than 2**31 elements, the 64-bit one otherwise: 64-bit division, which the
    index arithmetic is made of, is several times slower on a GPU."""
    return cuda_kernel(name + ("_i32" if max(sizes) < 2 ** 31 else "_i64"))


# im2col: one thread per element of col; a gather from x, PAD outside the image (0, or
# -inf for max pooling).  Two layouts of col:
# "image" (N, C, KH, KW, OH, OW), for pooling, and "rows" (C, KH, KW, N, OH, OW), the
# (C*KH*KW, N*OH*OW) patch matrix of a convolution, which then needs only 2-D GEMMs.
# col2im: one thread per element of x (N, C, H, W); a gather from col, so the
# result is deterministic (no atomics), as in Chainer.  Coordinates within an image
# are int; flat indices are IDX (int or ptrdiff_t, see index_kernel).
_IM2COL_BODY = """
    IDX t = i;
    int ox = t % OW; t /= OW;
    int oy = t % OH; t /= OH;
    IDX nc;
    int ky, kx;
    if (ROWS) {
        IDX n = t % N; t /= N;
        kx = t % KW; t /= KW;
        ky = t % KH;
        nc = n * C + t / KH;
    } else {
        kx = t % KW; t /= KW;
        ky = t % KH;
        nc = t / KH;
    }
    int y = oy * SY - PH + ky;
    int x_ = ox * SX - PW + kx;
    col = (0 <= y && y < H && 0 <= x_ && x_ < W) ? x[(nc * H + y) * W + x_] : PAD;
"""

_COL2IM_BODY = """
    IDX t = i;
    int xx = t % W + PW; t /= W;
    int yy = t % H + PH;
    IDX nc = t / H;
    IDX base, ky_stride;        // col index of (nc, ky=0, kx=0, oy=0, ox=0), and per ky
    IDX kx_stride;
    if (ROWS) {
        IDX n = nc / C, c = nc % C;
        kx_stride = (IDX)N * OH * OW;
        ky_stride = kx_stride * KW;
        base = c * KH * ky_stride + n * OH * OW;
    } else {
        kx_stride = (IDX)OH * OW;
        ky_stride = kx_stride * KW;
        base = nc * KH * ky_stride;
    }
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
            acc += col[base + ky * ky_stride + kx * kx_stride + (IDX)oy * OW + ox];
        }
    }
    x = acc;
"""

_GEOMETRY = ("int32 N, int32 C, int32 H, int32 W, int32 OH, int32 OW, int32 KH, int32 KW, "
             "int32 SY, int32 SX, int32 PH, int32 PW, bool ROWS")


def _index_variants(name, in_params, out_params, body):
    return {name + "_i32": (in_params, out_params, body.replace("IDX", "int")),
            name + "_i64": (in_params, out_params, body.replace("IDX", "ptrdiff_t"))}


# Optimizer updates, one thread per parameter element and one launch per parameter
# (instead of about 8 elementwise launches for SGD and 12 for Adam).  The arithmetic
# is that of the NumPy path in optim/optimizer.py, operation for operation; scalars
# computed on the host (1 - dampening, ...) come in as T.
_SGD_BODY = """
    T g = grad;
    if (weight_decay != (T)0) g = g + weight_decay * p;
    buf = first ? g : buf * momentum + one_minus_dampening * g;
    g = nesterov ? g + momentum * buf : buf;
    p = p - lr * g;
"""

_SGD_PLAIN_BODY = """
    T g = grad;
    if (weight_decay != (T)0) g = g + weight_decay * p;
    p = p - lr * g;
"""

_ADAM_BODY = """
    T g = grad;
    if (decay_factor != (T)1) p = p * decay_factor;
    if (weight_decay != (T)0) g = g + weight_decay * p;
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg);
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * g * g;
    T denom = sqrt(exp_avg_sq) / bias2_sqrt + eps;
    p = p - step_size * (exp_avg / denom);
"""

# Batch norm (with an optional ReLU fused in): per-channel reductions over axes (0, 2)
# of an (N, C, L) view, and one elementwise pass each way with per-channel (1, C, 1)
# arrays broadcast.  The ReLU mask is recomputed from x_hat, gamma and beta with the
# forward's own expression, so no ReLU output is kept.  Same order of operations as
# the NumPy path in functions/normalization.py.
_BN_FORWARD_BODY = """
    x_hat = (x - mean) * inv_std;
    T v = x_hat * gamma + beta;
    y = (RELU && !(v > (T)0)) ? (T)0 : v;
"""

_BN_BACKWARD_BODY = """
    T r = (RELU && !(x_hat * gamma + beta > (T)0)) ? (T)0 : gy;
    gx = ((x_hat * neg_mean_gxh + r) - mean_gy) * scale;
"""

# The batch augmentation: one thread per element of the float NCHW batch, reading the
# uint8 NHWC images: the 4-pixel zero-padded crop at the batch's offsets (in padded
# coordinates), the horizontal flip, the transpose and x * scale + shift per channel,
# in one pass (NumPy's path: data/loader.py random_crop_flip and normalize).
_AUGMENT_BODY = """
    int x = i % W;
    int t = i / W;
    int y = t % H; t /= H;
    int c = t % C;
    int n = t / C;
    int top = AUGMENT ? (int)offsets[2 * n] : PAD;
    int left = AUGMENT ? (int)offsets[2 * n + 1] : PAD;
    int col = (AUGMENT && flips[n]) ? W - 1 - x : x;
    int yy = y + top - PAD, xx = col + left - PAD;
    T v = (0 <= yy && yy < H && 0 <= xx && xx < W) ? (T)images[((n * H + yy) * W + xx) * C + c] : (T)0;
    out = v * scale[c] + shift[c];
"""

_RELU_MASKED = "((x_hat * gamma + beta > (T)0) ? gy : (T)0)"

CUDA_KERNELS = {
    "augment": ("raw uint8 images, raw int64 offsets, raw bool flips, raw T scale, raw T shift, "
                "int32 H, int32 W, int32 C, int32 PAD, bool AUGMENT", "T out", _AUGMENT_BODY),
    "channel_dot": ("reduction", "T x, T z", "T y", "x * z", "a + b", "y = a", "0"),
    "channel_squared_deviation": ("reduction", "T x, T m", "T y", "(x - m) * (x - m)", "a + b",
                                  "y = a", "0"),
    "relu_masked_sum": ("reduction", "T gy, T x_hat, T gamma, T beta", "T y", _RELU_MASKED,
                        "a + b", "y = a", "0"),
    "relu_masked_dot": ("reduction", "T gy, T x_hat, T gamma, T beta", "T y",
                        _RELU_MASKED + " * x_hat", "a + b", "y = a", "0"),
    "bn_forward": ("T x, T mean, T inv_std, T gamma, T beta, bool RELU", "T x_hat, T y",
                   _BN_FORWARD_BODY),
    "bn_backward": ("T gy, T x_hat, T gamma, T beta, T scale, T mean_gy, T neg_mean_gxh, bool RELU",
                    "T gx", _BN_BACKWARD_BODY),
    "sgd_update": ("T grad, T lr, T weight_decay, T momentum, T one_minus_dampening, "
                   "bool nesterov, bool first", "T p, T buf", _SGD_BODY),
    "sgd_plain_update": ("T grad, T lr, T weight_decay", "T p", _SGD_PLAIN_BODY),
    "adam_update": ("T grad, T decay_factor, T weight_decay, T one_minus_beta1, T beta2, "
                    "T one_minus_beta2, T bias2_sqrt, T eps, T step_size",
                    "T p, T exp_avg, T exp_avg_sq", _ADAM_BODY),
    **_index_variants("im2col", "raw T x, " + _GEOMETRY + ", T PAD", "T col", _IM2COL_BODY),
    **_index_variants("col2im", "raw T col, " + _GEOMETRY, "T x", _COL2IM_BODY),
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

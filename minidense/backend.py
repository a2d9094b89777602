"""The one module that knows NumPy from CuPy.

Everything else in minidense asks this module for the array library that goes
with an array (``xp = backend.get_array_module(x)``) or with a device name
(``backend.array_module("cuda")``), and never imports CuPy itself.  CuPy is
optional: ``import minidense`` works without it, and only asking for
``device="cuda"`` needs it.  CuPy itself is imported on first need (``_load_cupy``),
not by ``import minidense``: its import takes 0.15 s warm and about a second cold,
which a CPU-only use should not pay.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
import time

import numpy as np

_cupy = None            # the cupy module once imported (the tests put a fake one here)
_cupy_tried = False     # whether the import was attempted

DEVICES = ("cpu", "cuda")


def _load_cupy():
    """CuPy, imported the first time something asks for it; None when it is not
    installed (or a CUDA library it needs fails to load)."""
    global _cupy, _cupy_tried
    if _cupy is None and not _cupy_tried:
        _cupy_tried = True
        try:  # CuPy is an optional dependency (the ``gpu`` extra).
            import cupy
            _cupy = cupy
        except Exception:  # ImportError, or a CUDA library that fails to load
            pass
    return _cupy


def _cupy_if_imported():
    """CuPy if it has been imported by anyone (so that CuPy arrays can exist), else None:
    the array tests below cost no import of CuPy on a CPU-only run."""
    if _cupy is None and not _cupy_tried and "cupy" in sys.modules:
        _load_cupy()
    return _cupy


def cuda_available() -> bool:
    """True when CuPy is importable and sees at least one GPU."""
    cupy = _load_cupy()
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
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
        raise RuntimeError(f"device 'cuda' was requested but {_no_gpu_reason()}")
    return name


def _no_gpu_reason() -> str:
    if _load_cupy() is None:
        return ("CuPy is not installed (pip install 'minidense[gpu]', or the cupy-cudaXXx "
                "wheel for your CUDA version)")
    try:
        _cupy.cuda.runtime.getDeviceCount()
    except Exception as error:   # no driver, or no device: CuPy's own words, on one line
        return f"CuPy sees no GPU ({' '.join(str(error).split())})"
    return "CuPy sees no GPU"


def array_module(device: str):
    """NumPy for "cpu", CuPy for "cuda"."""
    return _cupy if check_device(device) == "cuda" else np


def get_array_module(array):
    """The array library (numpy or cupy) that owns ``array``."""
    cupy = _cupy if _cupy is not None else _cupy_if_imported()
    if cupy is not None and isinstance(array, cupy.ndarray):
        return cupy
    return np


def device_of(array) -> str:
    return "cuda" if get_array_module(array) is not np else "cpu"


def is_array(obj) -> bool:
    if isinstance(obj, np.ndarray):
        return True
    cupy = _cupy if _cupy is not None else _cupy_if_imported()
    return cupy is not None and isinstance(obj, cupy.ndarray)


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
    if not isinstance(data, (list, tuple)) or _cupy_if_imported() is None:
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


def joined_view(arrays, axis: int):
    """``arrays`` joined along ``axis`` as a view, when they are views that already lie
    side by side in one allocation (as a DenseNet block's features do in its shared
    storage); None otherwise.  Their shapes must agree off ``axis`` (the caller checks)."""
    first = arrays[0]
    if any(a.base is None for a in arrays):
        return None
    root, address = _allocation(first), _address(first)
    for a in arrays:
        if (_allocation(a) is not root or a.strides != first.strides or a.dtype != first.dtype
                or _address(a) != address):
            return None
        address += a.shape[axis] * a.strides[axis]
    shape = list(first.shape)
    shape[axis] = sum(a.shape[axis] for a in arrays)
    return get_array_module(first).lib.stride_tricks.as_strided(first, tuple(shape), first.strides)


def _allocation(array):
    """The array that owns ``array``'s memory: the end of its chain of bases (through
    the holder objects that NumPy's as_strided puts in between)."""
    base = array.base
    while base is not None:
        if is_array(base):
            array = base
        base = getattr(base, "base", None)
    return array


def _address(array) -> int:
    """The address of ``array``'s first element."""
    if get_array_module(array) is np:
        return array.__array_interface__["data"][0]
    return array.data.ptr


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
        _load_cupy()
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
# The registry of CUDA kernels.  Each kernel's source sits next to the op it serves
# (im2col and col2im in functions/_utils.py, batch norm's in functions/normalization.py,
# the optimizers' in optim/optimizer.py, the augmentation in data/loader.py), which
# registers it when imported; so ``import minidense`` registers every kernel.  This
# registry compiles a kernel with CuPy on its first use (CuPy compiles the source with
# NVRTC on first launch and caches the binary per dtype).
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CudaKernel:
    """One kernel: its CuPy source and how its callers call it.

    * ``kind``: "elementwise" (``cupy.ElementwiseKernel``; ``body`` is the operation) or
      "reduction" (``cupy.ReductionKernel``; ``body`` is (map_expr, reduce_expr,
      post_map_expr, identity)).
    * ``in_params``, ``out_params``: CuPy's parameter lists ("T x, raw T col, int32 H").
    * ``dtypes``: the dtypes its callers pass for the type placeholder ``T``.
    * ``scalars``: the parameters (not ``raw``) its callers pass as Python or NumPy
      scalars rather than arrays; CuPy's generated code differs between the two.
    * ``reduce_axes``: for a reduction, the axes its callers reduce over (of arrays of
      ``len(reduce_axes) + 1`` dimensions).
    * ``where``: the module that defines it (for messages and the compile test).

    ``dtypes``, ``scalars`` and ``reduce_axes`` change nothing at run time: they declare
    the calls, so that a test can have CuPy generate, and NVRTC compile, every variant
    the package launches, on a machine without a GPU."""

    name: str
    kind: str
    in_params: str
    out_params: str
    body: object
    dtypes: tuple = ("float16", "float32", "float64")
    scalars: tuple = ()
    reduce_axes: tuple = ()
    where: str = ""


CUDA_KERNELS = {}   # name -> CudaKernel: every kernel of the package, once imported
_compiled = {}      # name -> the CuPy kernel object, made on first use


def register_cuda_kernel(name, kind, in_params, out_params, body, *,
                         dtypes=("float16", "float32", "float64"),
                         scalars=(), reduce_axes=(), where=""):
    """Add a kernel to ``CUDA_KERNELS`` (see ``CudaKernel``); returns its name."""
    if kind not in ("elementwise", "reduction"):
        raise ValueError(f"register_cuda_kernel: kind must be 'elementwise' or 'reduction', "
                         f"got {kind!r}")
    if name in CUDA_KERNELS and CUDA_KERNELS[name].body != body:
        raise ValueError(f"register_cuda_kernel: a different kernel {name!r} is already "
                         f"registered (from {CUDA_KERNELS[name].where})")
    CUDA_KERNELS[name] = CudaKernel(name, kind, in_params, out_params, body, tuple(dtypes),
                                    tuple(scalars), tuple(reduce_axes), where)
    return name


def register_index_variants(name, in_params, out_params, body, **declared):
    """Two kernels from a ``body`` written with ``IDX`` for flat indices: ``name_i32``
    with int, ``name_i64`` with ptrdiff_t (see ``index_kernel``)."""
    for suffix, index_type in (("_i32", "int"), ("_i64", "ptrdiff_t")):
        register_cuda_kernel(name + suffix, "elementwise", in_params, out_params,
                             body.replace("IDX", index_type), **declared)
    return name


def cuda_kernel(name: str):
    """The CuPy kernel ``name`` of ``CUDA_KERNELS``, built once and cached."""
    kernel = _compiled.get(name)
    if kernel is None:
        spec = CUDA_KERNELS[name]
        if spec.kind == "reduction":
            map_expr, reduce_expr, post_map, identity = spec.body
            kernel = _cupy.ReductionKernel(spec.in_params, spec.out_params, map_expr, reduce_expr,
                                           post_map, identity, "minidense_" + name)
        else:
            kernel = _cupy.ElementwiseKernel(spec.in_params, spec.out_params, spec.body,
                                             "minidense_" + name)
        _compiled[name] = kernel
    return kernel


def index_kernel(name: str, *sizes):
    """The 32-bit-index variant of kernel ``name`` when every array it touches has
    fewer than 2**31 elements, the 64-bit one otherwise: 64-bit division, which the
    index arithmetic is made of, is several times slower on a GPU."""
    return cuda_kernel(name + ("_i32" if max(sizes) < 2 ** 31 else "_i64"))


def use_gpu(index: int) -> None:
    """Make GPU ``index`` (modulo the GPUs this machine has) CuPy's current device: one
    GPU per rank of a data-parallel job, picked by its rank on the machine."""
    if _load_cupy() is None:
        raise RuntimeError("use_gpu: CuPy is not installed")
    _cupy.cuda.Device(index % _cupy.cuda.runtime.getDeviceCount()).use()


def nccl_module():
    """``cupy.cuda.nccl``, imported on first use (CuPy warns at that import when NCCL is
    missing, so only a data-parallel run on GPUs pays it); the tests put a fake here."""
    if _load_cupy() is None:
        raise RuntimeError("NCCL: CuPy is not installed")
    from cupy.cuda import nccl
    if not getattr(nccl, "available", True):
        raise RuntimeError("NCCL: CuPy finds no NCCL library (pip install nvidia-nccl-cu12 "
                           "or nvidia-nccl-cu13, to match your CuPy)")
    return nccl


class NcclGroup:
    """An NCCL communicator (``cupy.cuda.nccl.NcclCommunicator``) for CuPy arrays, on the
    current stream: what ``minidense.distributed`` uses for device arrays.
    ``NcclGroup.single()`` makes a 1-rank one, which needs no MPI (the GPU smoke test).

    The unique id that every rank must share is ``bytes`` of ``ID_BYTES``, as CuPy 14
    returns it from ``get_unique_id()`` and takes it in ``NcclCommunicator(ndev, commId,
    rank)`` (CuPy 13 and older used a tuple of ints)."""

    ID_BYTES = 128   # NCCL_UNIQUE_ID_BYTES

    def __init__(self, size: int, rank: int, unique_id: bytes):
        if not isinstance(unique_id, bytes) or len(unique_id) != self.ID_BYTES:
            got = type(unique_id).__name__ + (f" of length {len(unique_id)}"
                                              if hasattr(unique_id, "__len__") else "")
            raise TypeError(f"NcclGroup: the unique id must be bytes of length {self.ID_BYTES} "
                            f"(NcclGroup.unique_id() on one rank, sent to the others), got {got}")
        self.nccl = nccl_module()
        self.comm = self.nccl.NcclCommunicator(size, unique_id, rank)

    @staticmethod
    def unique_id() -> bytes:
        return bytes(nccl_module().get_unique_id())

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

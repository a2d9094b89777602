"""A pretend GPU for the CPU tests: NumPy arrays of a subclass that behaves, where it
matters to minidense, as CuPy's arrays do.

* ``backend`` sees it as CuPy (``fake_cuda(monkeypatch)`` installs it as ``backend._cupy``
  and makes ``cuda_available()`` true), so tensors on "cuda" are ``DeviceArray``s;
* like CuPy, a ufunc refuses to mix a device array with a host (NumPy) array, and
  ``np.asarray`` refuses device arrays: the crashes the real GPU would give;
* kernels come from ``cuda_emulation`` (g++), random numbers from NumPy's Philox.
"""
from __future__ import annotations

import sys
import types

import numpy as np

import cuda_emulation


class DeviceArray(np.ndarray):
    """An array "on the device"."""

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        for value in inputs + (out or ()):
            if isinstance(value, np.ndarray) and not isinstance(value, DeviceArray):
                raise TypeError(f"fake CuPy: {ufunc.__name__} mixes a device array with a host "
                                f"(NumPy) array")
        plain = [v.view(np.ndarray) if isinstance(v, DeviceArray) else v for v in inputs]
        if out is not None:
            kwargs["out"] = tuple(o.view(np.ndarray) for o in out)
        result = getattr(ufunc, method)(*plain, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array__(self, dtype=None, copy=None):
        # CuPy: "Implicit conversion to a NumPy array is not allowed".  NumPy calls this
        # for np.asarray of a list that holds device scalars.
        raise TypeError("fake CuPy: implicit conversion to a NumPy array is not allowed")

    @property
    def data(self):
        # CuPy's MemoryPointer, of which minidense reads the address.
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    syncs = 0  # host reads of device values (each one a GPU sync on CuPy), for the tests

    def __bool__(self):
        DeviceArray.syncs += 1
        return bool(self.view(np.ndarray))

    def item(self, *args):
        DeviceArray.syncs += 1
        return self.view(np.ndarray).item(*args)

    def tolist(self):
        DeviceArray.syncs += 1
        return self.view(np.ndarray).tolist()

    def get(self):
        DeviceArray.syncs += 1
        return np.array(self.view(np.ndarray), copy=True)


def _wrap(result):
    if isinstance(result, (tuple, list)):
        return type(result)(_wrap(r) for r in result)
    if isinstance(result, np.ndarray):
        return result.view(DeviceArray)
    if isinstance(result, np.generic):  # CuPy reductions give 0-d arrays, never scalars
        return np.asarray(result).view(DeviceArray)
    return result


def _host(value):
    return value.view(np.ndarray) if isinstance(value, DeviceArray) else value


class _FakeCupy(types.ModuleType):
    """NumPy's functions with device arrays in and out."""

    ndarray = DeviceArray

    def __init__(self):
        super().__init__("fake_cupy")
        pool = _FakePool()
        self.get_default_memory_pool = lambda: pool
        allocator = {"current": pool.malloc}
        self.cuda = types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
            Device=lambda *a: types.SimpleNamespace(synchronize=lambda: None),
            Event=_FakeEvent, get_elapsed_time=lambda start, end: (end.time - start.time) * 1e3,
            get_allocator=lambda: allocator["current"], get_current_stream=lambda: _FakeStream,
            set_allocator=lambda function: allocator.__setitem__("current", function),
            memory=types.SimpleNamespace(PythonFunctionAllocator=_FakeFunctionAllocator))
        linalg = types.SimpleNamespace(COMPUTE_TYPE_DEFAULT=1, COMPUTE_TYPE_TF32=7, compute_types={})
        linalg.set_compute_type = lambda dtype, kind: linalg.compute_types.__setitem__(np.dtype(dtype), kind)
        self._core = types.SimpleNamespace(_routines_linalg=linalg)
        self.random = types.SimpleNamespace(
            Generator=_FakeGenerator, Philox4x3210=lambda seed=None: np.random.Philox(seed))
        self.lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(
            as_strided=lambda x, shape=None, strides=None: _wrap(
                np.lib.stride_tricks.as_strided(x, shape, strides, subok=True))))

    def asarray(self, a, dtype=None):
        if isinstance(a, DeviceArray):
            return a if dtype is None else a.astype(dtype)
        # (Lists of device arrays are read as CuPy reads them.  NumPy reads them too, as
        # ndarray subclasses, where it refuses CuPy's: the real-GPU tests cover that.)
        return np.array(a, dtype=dtype).view(DeviceArray)

    def asnumpy(self, a):
        DeviceArray.syncs += 1
        return np.array(_host(a), copy=True)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        function = getattr(np, name)
        if not callable(function):
            return function

        def call(*args, **kwargs):
            args = [_host(a) if not isinstance(a, (list, tuple)) else [_host(v) for v in a] for a in args]
            return _wrap(function(*args, **{k: _host(v) for k, v in kwargs.items()}))
        return call


class _FakePool:
    """CuPy's memory pool as MemoryCounter and the benchmarks use it (numbers only:
    the fake arrays live in host memory and never ask it for any)."""

    def __init__(self):
        self.next = 1 << 20

    def malloc(self, size):
        self.next += max(size, 1)
        return types.SimpleNamespace(ptr=self.next)

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass


_FakeStream = types.SimpleNamespace(ptr=0)   # CuPy's null stream


class FakeNccl(types.ModuleType):
    """``cupy.cuda.nccl`` as CuPy 14 has it (cupy_backends/cuda/libs/nccl.pyx), for the
    set-up code of ``backend.NcclGroup`` and ``distributed.MPICommunicator``: no GPU, no
    communication; it checks its arguments as the Cython signatures do and records
    every communicator and call.

    * ``get_unique_id()`` returns ``bytes`` of NCCL_UNIQUE_ID_BYTES (a tuple of ints
      before CuPy 14);
    * ``NcclCommunicator(int ndev, bytes commId, int rank, NcclConfig config=None)``:
      another type is Cython's TypeError, another length CuPy's ValueError;
    * ``allReduce(intptr_t sendbuf, intptr_t recvbuf, size_t count, int datatype, int op,
      intptr_t stream)``, ``broadcast(intptr_t sendbuff, intptr_t recvbuff, size_t count,
      int datatype, int root, intptr_t stream)``."""

    UNIQUE_ID_BYTES = 128
    # nccl.h's ncclDataType_t and ncclRedOp_t
    NCCL_INT32, NCCL_INT64, NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 2, 4, 6, 7, 8, 0
    available = True

    def __init__(self):
        super().__init__("fake_cupy.cuda.nccl")
        self.issued = []          # every unique id handed out
        self.communicators = []   # every NcclCommunicator made
        fake = self

        class NcclCommunicator:
            def __init__(self, ndev, commId, rank, config=None):
                _typed("ndev", ndev, int)
                _typed("commId", commId, bytes)
                _typed("rank", rank, int)
                if len(commId) != fake.UNIQUE_ID_BYTES:
                    raise ValueError(f"commId length {len(commId)} != {fake.UNIQUE_ID_BYTES}.")
                if not 0 <= rank < ndev:
                    raise ValueError(f"NCCL: rank {rank} of {ndev}")   # ncclInvalidArgument
                self.ndev, self.commId, self.rank, self.calls = ndev, commId, rank, []
                fake.communicators.append(self)

            def size(self):
                return self.ndev

            def rank_id(self):
                return self.rank

            def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
                for name, value in (("sendbuf", sendbuf), ("recvbuf", recvbuf), ("count", count),
                                    ("datatype", datatype), ("op", op), ("stream", stream)):
                    _typed(name, value, int)
                self.calls.append(("allReduce", sendbuf, recvbuf, count, datatype, op, stream))

            def broadcast(self, sendbuff, recvbuff, count, datatype, root, stream):
                for name, value in (("sendbuff", sendbuff), ("recvbuff", recvbuff), ("count", count),
                                    ("datatype", datatype), ("root", root), ("stream", stream)):
                    _typed(name, value, int)
                self.calls.append(("broadcast", sendbuff, recvbuff, count, datatype, root, stream))

        self.NcclCommunicator = NcclCommunicator

    def get_unique_id(self):
        unique_id = bytes(np.random.default_rng(len(self.issued)).integers(0, 256, self.UNIQUE_ID_BYTES,
                                                                            dtype=np.uint8))
        self.issued.append(unique_id)
        return unique_id

    def get_version(self):
        return 22805


def _typed(name, value, kind):
    """Cython's check of a typed argument: an int parameter takes any integer, a bytes
    parameter bytes only."""
    if not (isinstance(value, (int, np.integer)) if kind is int else type(value) is kind):
        raise TypeError(f"Argument '{name}' has incorrect type (expected {kind.__name__}, "
                        f"got {type(value).__name__})")


class _FakeEvent:
    def record(self):
        import time
        self.time = time.perf_counter()

    def synchronize(self):
        pass


class _FakeFunctionAllocator:
    def __init__(self, malloc, free):
        self.malloc_function, self.free = malloc, free

    def malloc(self, size):
        return self.malloc_function(size, 0)


class _FakeGenerator:
    def __init__(self, bit_generator):
        self.numpy = np.random.Generator(bit_generator)

    def random(self, size=None, dtype=np.float64):
        return _wrap(self.numpy.random(size, dtype=dtype))

    def standard_normal(self, size=None, dtype=np.float64):
        return _wrap(self.numpy.standard_normal(size, dtype=dtype))


class _DeviceKernel(cuda_emulation.EmulatedKernel):
    """An emulated kernel whose returned arrays (reductions) are device arrays."""

    def __call__(self, *args, **kwargs):
        return _wrap(super().__call__(*args, **kwargs))


def fake_cuda(monkeypatch):
    """Install the fake CuPy in ``backend`` for one test; returns it."""
    from minidense import backend
    fake = _FakeCupy()
    monkeypatch.setattr(backend, "_cupy", fake)
    monkeypatch.setattr(backend, "_generators", {})
    monkeypatch.setattr(backend, "cuda_kernel", lambda name: _DeviceKernel(name))
    monkeypatch.setitem(sys.modules, "fake_cupy", fake)
    return fake

"""Every CUDA kernel of the package compiled by NVIDIA's compiler, on a machine with no
GPU: CuPy 14.2's own code generation from the registry's declarations
(tests/nvrtc_compile.py), NVRTC 13.0 for sm_90 (the H200), as at a kernel's first
launch on the GPU machine.  The default suite compiles each kernel once per declared
dtype; the slow test, over several launch shapes with 32- and 64-bit indices."""
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from minidense import backend

import nvrtc_compile

_reason = nvrtc_compile.unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=str(_reason))

KERNELS = sorted(backend.CUDA_KERNELS)


def compile_all(jobs):
    """{(name, dtype, loop): None, or NVRTC's error lines} for every job, compiled two
    or more at a time (NVRTC runs without the GIL)."""
    def attempt(job):
        try:
            nvrtc_compile.compile_kernel(*job)
            return None
        except Exception as error:   # CuPy's CompileException holds NVRTC's log
            lines = [line for line in str(error).splitlines() if "error" in line]
            return "\n".join(lines[:6]) or f"{type(error).__name__}: {error}"
    with ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 1))) as pool:
        return dict(zip(jobs, pool.map(attempt, jobs)))


@pytest.fixture(scope="module")
def compiled():
    """Each kernel in each of its dtypes, with the launch shape the package uses most."""
    return compile_all([(name, dtype, None) for name in KERNELS
                        for dtype in backend.CUDA_KERNELS[name].dtypes])


@pytest.mark.parametrize("name", KERNELS)
def test_every_kernel_compiles_for_sm90_in_every_dtype(compiled, name):
    spec = backend.CUDA_KERNELS[name]
    assert set(spec.dtypes) == {"float16", "float32", "float64"}, "a dtype is not declared"
    failed = {dtype: compiled[name, dtype, None] for dtype in spec.dtypes
              if compiled[name, dtype, None] is not None}
    assert not failed, f"{name} (from {spec.where}) does not compile: {failed}"


@pytest.mark.slow
@pytest.mark.parametrize("name", KERNELS)
def test_every_kernel_compiles_for_every_launch_shape(name):
    spec = backend.CUDA_KERNELS[name]
    jobs = [(name, dtype, loop) for dtype in spec.dtypes for loop in nvrtc_compile.loops(spec)]
    results = compile_all(jobs)
    failed = {f"{dtype} {loop}": log for (_, dtype, loop), log in results.items() if log is not None}
    assert not failed, f"{name} (from {spec.where}) does not compile: {failed}"


def test_the_source_is_cupys_for_the_declared_arguments():
    """Scalars as values of their parameter's type, arrays as CuPy's CArray of the
    launch's layout, T as the dtype, 64-bit indexing when asked."""
    code = nvrtc_compile.source("sgd_update", "float16")
    assert "typedef float16 T;" in code and "#include <cupy/carray.cuh>" in code
    assert "const float16 lr" in code and "const bool nesterov" in code
    assert "const CArray<float16, 1, 1, 1> _raw_grad" in code and "CIndexer<1, 1> _ind" in code
    wide = nvrtc_compile.source("im2col_i64", "float64", nvrtc_compile.Loop(3, False, False, 4))
    assert ("const CArray<double, 4, 1, 0> x" in wide and "CArray<double, 3, 1, 0> _raw_col" in wide
            and "const int N" in wide and "const double PAD" in wide and "CIndexer<3, 0>" in wide)
    reduction = nvrtc_compile.source("channel_centred_dot", "float32")
    assert "typedef int IndexT;" in reduction and "CIndexer<3, 1> _in_ind" in reduction
    assert "const CArray<float, 3, 0, 1> _raw_gy" in reduction and "CArray<float, 1, 1, 1> _raw_y" in reduction


def _plant(monkeypatch, name, body, **declared):
    """A kernel registered as a module of the package would register it."""
    monkeypatch.setattr(backend, "_compiled", {})
    monkeypatch.setitem(backend.CUDA_KERNELS, name, backend.CudaKernel(
        name, "elementwise", "T x, bool FLAG", "T y", body, scalars=("FLAG",), where="planted",
        **declared))


def test_a_planted_syntax_error_fails(monkeypatch):
    _plant(monkeypatch, "planted_syntax", "y = x +;")
    results = compile_all([("planted_syntax", "float32", None), ("bn_forward", "float32", None)])
    assert "minidense_planted_syntax.cu" in results["planted_syntax", "float32", None]
    assert "expected an expression" in results["planted_syntax", "float32", None]
    assert results["bn_forward", "float32", None] is None


def test_a_planted_float16_type_error_fails_for_float16_only(monkeypatch):
    """sgd_update's former mistake: ?: between a T and float arithmetic, which NVRTC
    rejects as ambiguous when T is CuPy's float16."""
    _plant(monkeypatch, "planted_half", "y = FLAG ? x : x * x;")
    results = compile_all([("planted_half", dtype, None) for dtype in ("float16", "float32", "float64")])
    assert 'ambiguous "?" operation' in results["planted_half", "float16", None]
    assert results["planted_half", "float32", None] is None
    assert results["planted_half", "float64", None] is None

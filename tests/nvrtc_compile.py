"""minidense's CUDA kernels (``backend.CUDA_KERNELS``) made into CUDA source by CuPy's own
code generation and compiled by NVIDIA's NVRTC for the H100/H200 (sm_90), with no GPU.

What CuPy does at a kernel's first launch, minus the launch: ``ElementwiseKernel.__call__``
and ``ReductionKernel.__call__`` turn each argument into an ``_ArgInfo`` (array: dtype,
ndim, contiguity, 32- or 64-bit indexing; scalar: the type of its parameter), decide the
type of ``T`` (``_decide_params_type``), generate the source from those, put CuPy's headers
in front and hand it to NVRTC with CuPy's options.  Here the ``_ArgInfo``s are made from
the registry's declarations (``dtypes``, ``scalars``, ``reduce_axes``) and a ``Loop`` (the
shape of the launch) instead of from real arrays; everything after that is CuPy's code.

Pinned versions (pyproject's ``test`` extra: cupy-cuda13x==14.2.0, nvidia-cuda-nvrtc and
nvidia-cuda-runtime 13.0.x, the versions on the GPU machine): this module reaches into
CuPy's internals, which change between releases without notice:

* ``cupy._core._kernel``: ``_ArgInfo(kind, type, dtype, ndim, c_contiguous,
  index_32_bits)`` with the kinds of ``_kernel.pxd`` (below), ``_decide_params_type``,
  ``_TypeMap``, ``_get_elementwise_kernel_code``;
* ``cupy._core._reduction``: ``ReductionKernel._params``,
  ``_ReductionKernel_get_cached_function_code``, the default block size 512;
* ``cupy._core.core``: ``_cupy_header_list``, ``assemble_cupy_compiler_options``;
* ``cupy.cuda.compiler``: ``_NVRTCProgram`` and the options that
  ``_compile_with_cache_cuda`` and ``_compile_using_nvrtc_no_warning`` add.

A CuPy upgrade that changes them fails the compile tests loudly (an AttributeError or a
TypeError here), never silently: update this module and the pins together.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from minidense import backend

CUPY_VERSION = "14.2.0"
ARCH = "90"                 # sm_90: the H100 and H200
# cupy/_core/_kernel.pxd, enum _ArgKind
ARG_KIND_NDARRAY, ARG_KIND_INDEXER, ARG_KIND_SCALAR = 1, 2, 3
REDUCTION_BLOCK_SIZE = 512  # cupy/_core/_reduction.pyx, _default_block_size (CUDA)


def unavailable_reason():
    """None when CuPy (of the pinned version) and NVRTC load here; else why not."""
    try:
        import cupy
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
    except Exception as error:  # ImportError, or NVRTC's library missing
        return (f"CuPy with NVRTC is not installed ({type(error).__name__}: {error}): "
                f"pip install -e '.[test]'")
    if cupy.__version__ != CUPY_VERSION:
        return (f"this test reads CuPy {CUPY_VERSION}'s internals, found CuPy {cupy.__version__}: "
                f"pip install -e '.[test]'")
    return None


@dataclasses.dataclass(frozen=True)
class Loop:
    """The shape of one launch, as CuPy sees it after ``_reduce_dims``.

    * ``ndim``: of the element-wise loop (arrays of one shape and layout collapse to 1;
      batch norm's per-channel arrays broadcast against (N, C, H*W) keep 3); for a
      reduction, of its inputs after the reduced axes are moved first (the output has
      one axis fewer per reduced axis).
    * ``contiguous``: whether the non-raw input arrays are C-contiguous (broadcast or
      strided views are not); outputs always are (the callers allocate them).
    * ``index_32``: 32-bit indexing (every array under 2**31 elements) or 64-bit.
    * ``raw_ndim``: the ndim of ``raw`` arrays (read with flat indices)."""

    ndim: int = 1
    contiguous: bool = True
    index_32: bool = True
    raw_ndim: int = 1

    def __str__(self):
        return (f"ndim{self.ndim}-{'contiguous' if self.contiguous else 'strided'}-"
                f"{'i32' if self.index_32 else 'i64'}-raw{self.raw_ndim}")


def default_loop(spec) -> Loop:
    """What the package launches most: element-wise kernels over contiguous arrays of
    one shape (one dimension); reductions over (N, C, L) views, reduced over
    ``reduce_axes``, their inputs strided once the reduced axes are moved first."""
    if spec.kind == "reduction":
        return Loop(ndim=len(spec.reduce_axes) + 1, contiguous=False)
    return Loop()


def loops(spec):
    """Several launch shapes of ``spec``, 32- and 64-bit: the slow test's matrix."""
    if spec.kind == "reduction":
        shapes = [(len(spec.reduce_axes) + 1, False), (len(spec.reduce_axes) + 1, True),
                  (len(spec.reduce_axes), True), (len(spec.reduce_axes), False)]
    else:
        shapes = [(1, True), (1, False), (3, False), (4, True)]
    return [Loop(ndim, contiguous, index_32, raw_ndim=1 if ndim == 1 else 4)
            for ndim, contiguous in shapes for index_32 in (True, False)]


def _params(text):
    return [p.split() for p in text.split(",") if p.strip()]


def _cupy_kernel(spec):
    """The CuPy kernel object the package launches (``backend.cuda_kernel``): made
    without a GPU (CuPy compiles only at the first launch)."""
    backend._load_cupy()
    return backend.cuda_kernel(spec.name)


def source(name: str, dtype, loop: Loop | None = None) -> str:
    """The CUDA source CuPy generates for kernel ``name`` launched with ``T`` = ``dtype``
    over ``loop`` (default: ``default_loop``), CuPy's headers included."""
    from cupy._core import _carray, _kernel, _scalar, core
    import cupy
    spec = backend.CUDA_KERNELS[name]
    loop = loop or default_loop(spec)
    dtype = np.dtype(dtype)
    kernel = _cupy_kernel(spec)
    ins, outs = kernel.in_params, kernel.out_params
    scalars = set(spec.scalars)

    def array(ndim, contiguous, param_dtype):
        return _kernel._ArgInfo(ARG_KIND_NDARRAY, cupy.ndarray, param_dtype, ndim, contiguous,
                                loop.index_32)

    def argument(p, param_dtype, is_input):
        if p.name in scalars:
            return _kernel._ArgInfo(ARG_KIND_SCALAR, _scalar.CScalar, param_dtype, 0, True, True)
        if p.raw:
            return array(loop.raw_ndim, True, param_dtype)
        if spec.kind == "reduction" and not is_input:
            return array(loop.ndim - len(spec.reduce_axes), True, param_dtype)
        return array(loop.ndim, loop.contiguous or not is_input, param_dtype)

    if spec.kind == "reduction":
        # ReductionKernel.__call__: the dtypes as scalar types, no output given.
        in_types = tuple(None if p.name in scalars else dtype.type for p in ins)
        in_types, out_types, type_map = _kernel._decide_params_type(ins, outs, in_types, ())
    else:
        in_types = tuple(None if p.name in scalars else (dtype if p.dtype is None else p.dtype)
                         for p in ins)
        out_types = tuple(dtype if p.dtype is None else p.dtype for p in outs)
        in_types, out_types, type_map = _kernel._decide_params_type(ins, outs, in_types, out_types)
    arginfos = ([argument(p, np.dtype(t), True) for p, t in zip(ins, in_types)]
                + [argument(p, np.dtype(t), False) for p, t in zip(outs, out_types)])

    if spec.kind == "reduction":
        from cupy._core import _reduction
        out_ndim = loop.ndim - len(spec.reduce_axes)
        arginfos += [_kernel._ArgInfo(ARG_KIND_INDEXER, _carray.Indexer, None, loop.ndim, True,
                                      loop.index_32),
                     _kernel._ArgInfo(ARG_KIND_INDEXER, _carray.Indexer, None, out_ndim, True,
                                      loop.index_32),
                     _kernel._ArgInfo(ARG_KIND_SCALAR, _scalar.CScalar, np.dtype(np.int32), 0,
                                      True, True)]   # _block_stride
        type_map = _kernel._TypeMap(type_map._pairs + (
            ("IndexT", "int32" if loop.index_32 else "int64"),))
        code = _reduction._ReductionKernel_get_cached_function_code(
            kernel.nin, kernel.nout, kernel._params, tuple(arginfos), type_map, kernel.name,
            REDUCTION_BLOCK_SIZE, kernel.reduce_type, kernel.identity, kernel.map_expr,
            kernel.reduce_expr, kernel.post_map_expr, kernel.preamble, kernel.options)
    else:
        arginfos.append(_kernel._ArgInfo(ARG_KIND_INDEXER, _carray.Indexer, None, loop.ndim, True,
                                         loop.index_32))
        code = _kernel._get_elementwise_kernel_code(
            tuple(arginfos), type_map, kernel.params, kernel.operation, kernel.name,
            kernel.preamble, **kernel.kwargs)
    # core.compile_with_cache: CuPy's headers in front.
    return "".join(f"#include <{h}>\n" for h in core._cupy_header_list) + code


def options(kernel_options=()) -> tuple:
    """NVRTC's options as CuPy passes them for a kernel (compile_with_cache,
    _compile_with_cache_cuda, _compile_using_nvrtc_no_warning), for sm_90."""
    from cupy._core import core
    return (core.assemble_cupy_compiler_options(tuple(kernel_options))
            + ("-ftz=true", f"-arch=sm_{ARCH}", "--device-as-default-execution-space"))


def compile_source(code: str, name: str = "kernel", kernel_options=()) -> bytes:
    """``code`` compiled by NVRTC to an sm_90 cubin; CuPy's CompileException (with
    NVRTC's log) when it fails."""
    from cupy.cuda import compiler
    program = compiler._NVRTCProgram(code, f"{name}.cu", method="cubin")
    cubin, _ = program.compile(options(kernel_options))
    return cubin


def compile_kernel(name: str, dtype, loop: Loop | None = None) -> bytes:
    """Kernel ``name`` of the registry, as CuPy would build it, compiled for sm_90."""
    kernel = _cupy_kernel(backend.CUDA_KERNELS[name])
    kernel_options = (kernel.options if backend.CUDA_KERNELS[name].kind == "reduction"
                      else kernel.kwargs.get("options", ()))
    return compile_source(source(name, dtype, loop), "minidense_" + name, kernel_options)

"""minidense's CuPy kernels (``backend.CUDA_KERNELS``) compiled as C++ and run on the CPU.

An ElementwiseKernel body is C++ that CuPy wraps in a loop over the output elements
``i``; here g++ wraps the same body in a plain ``for`` loop, so the index arithmetic,
the argument order and the types are what the GPU would run, without a GPU:

* ``raw T a``: a pointer indexed flat (``virtual_raw``: a fake array whose element k is
  ``k % VIRTUAL_MODULUS``, so that inputs of more than 2**31 elements cost no memory);
* ``T a`` (an array of the output's size, or a scalar): element i of it;
* ``int32``/``float32``/``float64``/``bool``: scalars;
* outputs (non-raw): element i, written back.

``run(name, args, start=, stop=)`` runs elements [start, stop) only, writing them to
an output buffer of stop - start elements: how the tests look at elements past 2**31.

CuPy's type rules are enforced before anything runs (``decide_types``): every array
given for a ``T`` parameter must have one dtype, and an array for a typed parameter
(``raw uint8 images``) exactly that dtype, or CuPy's ``TypeError: Type is mismatched``;
scalars take the type of their parameter.  So a mixed-dtype call fails here as on a GPU.
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from minidense import backend

VIRTUAL_MODULUS = 1000003
_C_TYPES = {"int32": ("int", ctypes.c_int), "float32": ("float", ctypes.c_float),
            "float64": ("double", ctypes.c_double), "bool": ("bool", ctypes.c_bool)}
_T_TYPES = {np.dtype(np.float32): ("float", ctypes.c_float), np.dtype(np.float64): ("double", ctypes.c_double)}
_BUILD_DIR = Path(tempfile.mkdtemp(prefix="minidense-kernels-"))
atexit.register(functools.partial(shutil.rmtree, _BUILD_DIR, ignore_errors=True))
_libraries = {}


def compiler_available() -> bool:
    return shutil.which("g++") is not None


def _params(spec):
    return [p.split() for p in spec.split(",") if p.strip()]


def decide_types(name, inputs, outputs=()):
    """The dtype of ``T`` for a call of kernel ``name``, as CuPy decides it
    (``cupy._core._kernel._decide_params_type_core``): the outputs first, then the
    inputs; only arrays count (Python and NumPy scalars take their parameter's type);
    a second dtype for ``T``, or an array of another dtype than its typed parameter,
    raises CuPy's TypeError."""
    spec = backend.CUDA_KERNELS[name]
    ins, outs = _params(spec.in_params), _params(spec.out_params)
    decided = None
    for params, values in ((outs, outputs), (ins, inputs)):
        for param, value in zip(params, values):
            if not isinstance(value, np.ndarray):
                continue
            declared, pname = param[-2], param[-1]
            if declared != "T":
                if value.dtype != np.dtype(declared):
                    raise TypeError(f"Type is mismatched. {pname} {value.dtype} {declared}")
            elif decided is None:
                decided = value.dtype
            elif value.dtype != decided:
                raise TypeError(f"Type is mismatched. {pname} {value.dtype} {decided} T")
    return decided


def _source(name, t_name, virtual_raw, scalar_inputs):
    spec = backend.CUDA_KERNELS[name]
    in_params, out_params, body = spec.in_params, spec.out_params, spec.body
    args, prologue = [], []
    for param in _params(in_params):
        kind, pname = param[:-1], param[-1]
        if kind[0] == "raw":
            if virtual_raw:  # a local, not a parameter: an empty struct has no C calling convention
                prologue.insert(0, f"const Virtual {pname};")
            else:
                ctype = {"T": "T", "uint8": "unsigned char", "int64": "long long", "bool": "bool",
                         "float32": "float", "float64": "double", "int32": "int"}[kind[1]]
                args.append(f"const {ctype}* {pname}")
        elif kind[0] == "T" and pname not in scalar_inputs:
            args.append(f"const T* {pname}__p")
            prologue.append(f"const T {pname} = {pname}__p[i];")
        else:
            ctype = "T" if kind[0] == "T" else _C_TYPES[kind[0]][0]
            args.append(f"{ctype} {pname}")
    for param in _params(out_params):
        pname = param[-1]
        args.append(f"T* {pname}__p")
        prologue.append(f"T& {pname} = {pname}__p[i - start];")
    return f"""
#include <cstddef>
#include <cmath>
typedef {t_name} T;
struct Virtual {{ T operator[](ptrdiff_t k) const {{ return (T)(k % {VIRTUAL_MODULUS}); }} }};
extern "C" void kernel({", ".join(args + ["ptrdiff_t start", "ptrdiff_t stop"])}) {{
    for (ptrdiff_t i = start; i < stop; ++i) {{
        {" ".join(prologue)}
        {body}
    }}
}}
"""


def _library(name, t_name, virtual_raw, scalar_inputs):
    return _compile(_source(name, t_name, virtual_raw, scalar_inputs))


def _compile(source):
    key = hashlib.sha1(source.encode()).hexdigest()[:16]
    lib = _libraries.get(key)
    if lib is None:
        src, so = _BUILD_DIR / f"{key}.cpp", _BUILD_DIR / f"{key}.so"
        src.write_text(source)
        # -fwrapv: a 32-bit index that overflows wraps around as it does on the GPU,
        # instead of being undefined behaviour the optimiser may exploit.
        subprocess.run(["g++", "-O1", "-fwrapv", "-shared", "-fPIC", "-o", str(so), str(src)],
                       check=True, capture_output=True, text=True)
        lib = _libraries[key] = ctypes.CDLL(str(so))
    return lib


def run(name, args, start=0, stop=None, virtual_raw=False):
    """Launch kernel ``name`` on NumPy arrays as CuPy would: ``args`` are the inputs
    then the outputs, by position; returns the outputs."""
    spec = backend.CUDA_KERNELS[name]
    ins, outs = _params(spec.in_params), _params(spec.out_params)
    assert len(args) == len(ins) + len(outs), (name, len(args))
    outputs = args[len(ins):]
    t_dtype = decide_types(name, args[:len(ins)], outputs)
    t_name, t_ctype = _T_TYPES[t_dtype]
    size = outputs[0].size
    stop = size if stop is None else stop
    scalar_inputs = {p[-1] for p, a in zip(ins, args) if p[0] == "T" and np.ndim(a) == 0}
    lib = _library(name, t_name, virtual_raw, scalar_inputs)
    c_args, keep = [], []
    for param, value in zip(ins, args):
        kind, pname = param[0], param[-1]
        if kind == "T" and pname not in scalar_inputs and (value.shape != outputs[0].shape
                                                            or not value.flags.c_contiguous):
            # CuPy broadcasts array arguments to the output's shape (per-channel BN arrays),
            # and reads strided ones (a view of a DenseNet block's storage) in place.
            value = np.ascontiguousarray(np.broadcast_to(value, outputs[0].shape))
            keep.append(value)
        if kind == "raw":
            if virtual_raw:
                continue
            declared = param[1]
            assert value.flags.c_contiguous
            assert value.dtype == (t_dtype if declared == "T" else np.dtype(declared)), (pname, value.dtype)
            c_args.append(value.ctypes.data_as(ctypes.c_void_p))
        elif kind == "T" and pname not in scalar_inputs:
            assert value.flags.c_contiguous and value.dtype == t_dtype and value.size == size
            c_args.append(value.ctypes.data_as(ctypes.c_void_p))
        elif kind == "T":
            c_args.append(t_ctype(float(value)))
        else:
            assert not isinstance(value, np.ndarray) or value.ndim == 0, (pname, value)
            c_args.append(_C_TYPES[kind][1](value))
    for out in outputs:
        assert out.flags.c_contiguous and out.dtype == t_dtype and out.size >= stop - start
        c_args.append(out.ctypes.data_as(ctypes.c_void_p))
    c_args += [ctypes.c_ssize_t(start), ctypes.c_ssize_t(stop)]
    lib.kernel(*c_args)
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _reduction_source(name, t_name):
    spec = backend.CUDA_KERNELS[name]
    map_expr, reduce_expr, post_map, identity = spec.body
    ins, (out,) = _params(spec.in_params), _params(spec.out_params)
    args = [f"const T* {p[-1]}__p" for p in ins] + [f"T* {out[-1]}__p", "ptrdiff_t outer",
                                                   "ptrdiff_t inner"]
    reads = " ".join(f"const T {p[-1]} = {p[-1]}__p[o * inner + j];" for p in ins)
    return f"""
#include <cstddef>
#include <cmath>
typedef {t_name} T;
extern "C" void kernel({", ".join(args)}) {{
    for (ptrdiff_t o = 0; o < outer; ++o) {{
        T acc = {identity};
        for (ptrdiff_t j = 0; j < inner; ++j) {{
            {reads}
            const T mapped = ({map_expr});
            {{ const T a = acc, b = mapped; acc = ({reduce_expr}); }}
        }}
        {{ const T a = acc; T& {out[-1]} = {out[-1]}__p[o]; {post_map}; }}
    }}
}}
"""


def run_reduction(name, inputs, axis):
    """A ReductionKernel of ``backend.CUDA_KERNELS`` over ``axis`` of the broadcast
    inputs: the reduced axes are moved last and made contiguous, then the map, reduce
    and post-map expressions run in C++ loops."""
    t_dtype = decide_types(name, inputs)
    arrays = np.broadcast_arrays(*[np.asarray(a) for a in inputs])
    ndim = arrays[0].ndim
    axes = tuple(a % ndim for a in ((axis,) if np.isscalar(axis) else axis))
    kept = [a for a in range(ndim) if a not in axes]
    moved = [np.ascontiguousarray(a.transpose(kept + list(axes)), dtype=t_dtype) for a in arrays]
    out_shape = tuple(arrays[0].shape[a] for a in kept)
    outer = int(np.prod(out_shape, dtype=np.int64))
    inner = int(np.prod([arrays[0].shape[a] for a in axes], dtype=np.int64))
    out = np.empty(out_shape, dtype=t_dtype)
    t_name, _ = _T_TYPES[t_dtype]
    lib = _compile(_reduction_source(name, t_name))
    lib.kernel(*[a.ctypes.data_as(ctypes.c_void_p) for a in moved], out.ctypes.data_as(ctypes.c_void_p),
               ctypes.c_ssize_t(outer), ctypes.c_ssize_t(inner))
    return out


class EmulatedKernel:
    """A stand-in for ``backend.cuda_kernel(name)``: callable like the CuPy kernel."""

    def __init__(self, name):
        self.name = name

    def __call__(self, *args, axis=None):
        if backend.CUDA_KERNELS[self.name].kind == "reduction":
            return run_reduction(self.name, args, axis)
        return run(self.name, args)

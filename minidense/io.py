"""``md.save`` / ``md.load``: state dicts (and any nest of dicts, lists, arrays, numbers
and strings, such as an optimizer's state) as ``.npz`` files, with no pickle; flat dicts
of arrays also as ``.safetensors``, the format PyTorch, JAX and NumPy all read.  The
file's extension picks the format.

The file is an ordinary NumPy ``.npz``: one ``.npy`` member per array, named by its
keys joined with "/" (so ``np.load`` alone shows a model's weights by name), plus a
JSON manifest, stored as a uint8 array, that records the nesting, the key types and
which Python type each number had.  Numbers are stored as 0-d arrays, so a round trip
is bit-exact.  Files are written to a temporary file beside the target and renamed
over it, so a crash never leaves a half-written file under the real name.

A ``.safetensors`` file is a JSON header (name, dtype, shape and byte range of every
array) followed by the raw bytes, read and written by the ``safetensors`` package (an
optional dependency: ``pip install safetensors``).  It holds one flat dict of arrays, so
nested state (an optimizer's) stays in .npz.  Unlike .npz (a zip with a CRC per member)
it has no checksum: a truncated file or a damaged header is caught, a flipped bit inside
an array is not.

PyTorch's ``.pth`` / ``.pt`` files are pickles, which can run any code when loaded, so
minidense never reads them; ``PTH_TO_SAFETENSORS`` is the conversion to run where torch is.
"""
from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np

from . import backend
from .autograd import Tensor
from .files import atomic_write   # md.io.atomic_write: its home is minidense/files.py

MANIFEST = "__minidense_manifest__"
FORMAT = "minidense.save"
VERSION = 1
SAFETENSORS = ".safetensors"
PICKLE_SUFFIXES = (".pth", ".pt")

PTH_TO_SAFETENSORS = """\
import torch, safetensors.torch
state = torch.load("densenet121.pth", map_location="cpu", weights_only=True)
safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, "densenet121.safetensors")"""

# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------
def _member_name(keys, taken):
    """A safe, unique .npz member name from a key path: ("state", 0, "step") -> "state/0/step"."""
    parts = [re.sub(r"[^A-Za-z0-9._-]", "_", str(k)) or "_" for k in keys] or ["value"]
    base = "/".join(parts)
    name, n = base, 1
    while name in taken or name == MANIFEST:
        n += 1
        name = f"{base}~{n}"
    return name


def _encode(value, keys, arrays):
    """The manifest entry for ``value``; its arrays go into ``arrays`` (name -> ndarray)."""
    where = "/".join(map(str, keys)) or "the top level"
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise TypeError(f"save: dict keys must be str or int, got {key!r} "
                                f"({type(key).__name__}) at {where}")
            items.append([key, _encode(item, keys + (key,), arrays)])
        return {"dict": items}
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [_encode(item, keys + (i,), arrays) for i, item in enumerate(value)]}
    if isinstance(value, str):
        return {"str": value}
    if value is None:
        return {"none": None}
    if isinstance(value, Tensor):
        value = value.data
    if isinstance(value, (bool, int, float)):
        kind = type(value).__name__
        array = np.asarray(value, dtype={"bool": np.bool_, "int": np.int64, "float": np.float64}[kind])
    elif backend.is_array(value) or isinstance(value, np.generic):
        kind = "array" if backend.is_array(value) else "numpy_scalar"
        array = np.array(backend.to_numpy(value), copy=True)
        if array.dtype.hasobject:
            raise TypeError(f"save: the array at {where} has dtype object, which cannot be "
                            f"stored without pickle")
    else:
        raise TypeError(f"save: cannot store a {type(value).__name__} at {where}; supported: "
                        f"dicts, lists, tuples, Tensors, NumPy/CuPy arrays, numbers, strings, None")
    name = _member_name(keys, arrays)
    arrays[name] = array
    return {kind: name}


def _safetensors():
    """The ``safetensors.numpy`` module, or an ImportError that says how to get it."""
    try:
        import safetensors.numpy
    except ImportError:
        raise ImportError("md.save/md.load: .safetensors files need the safetensors package: "
                          "pip install safetensors (or minidense[weights])") from None
    return safetensors.numpy


def _pickle_error(verb, path):
    """The error for a PyTorch pickle: why it is refused and how to convert it."""
    return ValueError(
        f"{verb}: {path} is a PyTorch pickle file, and minidense never unpickles (loading a "
        f"pickle can run any code). Convert it to .safetensors on a machine with torch:\n"
        f"    pip install torch safetensors\n" + "\n".join(
            "    " + line for line in PTH_TO_SAFETENSORS.splitlines()))


def save(obj, path) -> None:
    """Write ``obj`` to ``path``: as .safetensors when the name ends so (a flat dict of
    arrays or Tensors by name, such as a state dict), otherwise as .npz (a state dict,
    an optimizer's state, or any nest of dicts, lists and tuples of arrays, Tensors,
    numbers, strings and None)."""
    if hasattr(obj, "state_dict") and not isinstance(obj, dict):
        raise TypeError(f"save: got a {type(obj).__name__}; save its state instead: "
                        f"md.save(obj.state_dict(), path)")
    suffix = Path(path).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(f"save: {path}: minidense writes .npz or .safetensors, never PyTorch's "
                         f"pickle format; torch reads .safetensors with safetensors.torch.load_file")
    if suffix == SAFETENSORS:
        _save_safetensors(obj, path)
        return
    arrays = {}
    tree = _encode(obj, (), arrays)
    manifest = json.dumps({"format": FORMAT, "version": VERSION, "tree": tree})
    arrays[MANIFEST] = np.frombuffer(manifest.encode("utf-8"), dtype=np.uint8)
    with atomic_write(path) as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in arrays.items():
                with archive.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)


def _save_safetensors(obj, path):
    if not isinstance(obj, dict):
        raise TypeError(f"save: a .safetensors file holds a dict of arrays by name, got a "
                        f"{type(obj).__name__}; use .npz for other state")
    arrays = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise TypeError(f"save: .safetensors names must be str, got {key!r}")
        value = value.data if isinstance(value, Tensor) else value
        if not (backend.is_array(value) or isinstance(value, np.generic)):
            raise TypeError(f"save: a .safetensors file holds arrays only, but {key!r} is a "
                            f"{type(value).__name__}; nested state (an optimizer's) goes in .npz")
        # order="C", not ascontiguousarray, which turns a 0-d counter into shape (1,)
        arrays[key] = np.asarray(backend.to_numpy(value), order="C")
    st = _safetensors()
    try:
        data = st.save(arrays)
    except Exception as error:  # safetensors' own error type: an unsupported dtype
        raise TypeError(f"save: cannot store this state as .safetensors: {error}") from None
    with atomic_write(path) as f:
        f.write(data)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
class _Corrupt(Exception):
    """The manifest does not match the arrays."""


class _Pickled(Exception):
    """The zip file is torch.save's, with a pickle inside."""


def _decode(entry, arrays):
    if not isinstance(entry, dict) or len(entry) != 1:
        raise _Corrupt(f"bad manifest entry {entry!r}")
    (kind, content), = entry.items()
    if kind == "dict":
        return {key: _decode(item, arrays) for key, item in content}
    if kind in ("list", "tuple"):
        items = [_decode(item, arrays) for item in content]
        return items if kind == "list" else tuple(items)
    if kind == "str":
        return content
    if kind == "none":
        return None
    if content not in arrays:
        raise _Corrupt(f"the manifest names an array {content!r} that the file lacks")
    array = arrays[content]
    if kind == "array":
        return array
    if kind == "numpy_scalar":
        return array[()]
    if kind in ("bool", "int", "float"):
        return {"bool": bool, "int": int, "float": float}[kind](array.item())
    raise _Corrupt(f"unknown manifest entry type {kind!r}")


def load(path):
    """Read a file written by ``save``: the same nest of dicts, lists and tuples, with
    NumPy arrays for arrays and Tensors, and Python numbers, strings and None as saved.
    A plain .npz without a manifest (``np.savez``) loads as a dict of its arrays, and a
    .safetensors file (anyone's, torchvision's converted weights included) as a dict of
    NumPy arrays by name.  PyTorch's pickled .pth files are refused.

    Load weights into a model with ``model.load_state_dict(md.load(path))``, which
    reports missing, unexpected and mismatched names in one error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load: no such file: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_error("load", path)
    if path.suffix.lower() == SAFETENSORS:
        return _load_safetensors(path)
    if head[:1] == b"\x80":  # pickle's PROTO opcode: torch.save's legacy format
        raise _pickle_error("load", path)
    try:
        if head != b"PK\x03\x04":
            raise ValueError("it does not start like a .npz (zip) file")
        with zipfile.ZipFile(path) as archive:
            # torch.save's zip layout, whatever the file is called
            pickled = any(name.endswith("data.pkl") for name in archive.namelist())
        if pickled:
            raise _Pickled
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        for name, array in arrays.items():
            if not isinstance(array, np.ndarray):  # np.load gives other members as bytes
                raise ValueError(f"its member {name!r} is not a .npy array")
    except _Pickled:
        raise _pickle_error("load", path) from None
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as error:
        raise ValueError(f"load: {path} is not a readable .npz file written by md.save "
                         f"(truncated, damaged or another format): {error}") from None
    manifest = arrays.pop(MANIFEST, None)
    if manifest is None:
        return arrays
    try:
        info = json.loads(manifest.tobytes().decode("utf-8"))
        if info.get("format") != FORMAT:
            raise _Corrupt(f"unknown format {info.get('format')!r}")
        if info.get("version", 0) > VERSION:
            raise _Corrupt(f"format version {info['version']} is newer than this minidense reads "
                           f"({VERSION})")
        return _decode(info["tree"], arrays)
    except (_Corrupt, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"load: {path} has a damaged manifest: {error}") from None


def _load_safetensors(path):
    st = _safetensors()
    from safetensors import SafetensorError
    try:
        return dict(st.load_file(path))
    except (SafetensorError, ValueError, OSError) as error:
        raise ValueError(f"load: {path} is not a readable .safetensors file "
                         f"(truncated, damaged or another format): {error}") from None

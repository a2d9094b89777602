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
nested state (an optimizer's) stays in .npz.

Damage is detected in both formats.  The format itself has no checksum, so ``md.save``
writes one into the header's ``__metadata__``: the sha256 of the whole file with the
checksum's own 64 digits read as "0"s, which covers the tensor data and every byte of
the header (a flipped bit in a name would otherwise load it under another name).  A
.safetensors file without it (written by another tool) loads unchecked.  A .npz needs
no more: the zip's CRC-32 covers each member, the zip directory's names are checked
against the members', and the manifest (written first) names every array, so a damaged
directory that loses entries is caught too.  Every .npy header is checked against the
bytes its member holds before anything is allocated, so a damaged header claiming a huge
shape cannot make ``md.load`` allocate more than the file holds.  A damaged, truncated
or foreign file is a ``CorruptFileError`` (a ValueError) naming the file, in either format.

PyTorch's ``.pth`` / ``.pt`` files are pickles, which can run any code when loaded, so
minidense never reads them; ``PTH_TO_SAFETENSORS`` is the conversion to run where torch is.
"""
from __future__ import annotations

import hashlib
import json
import math
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

# The key of the checksum md.save writes into a .safetensors header's metadata, next to
# "format".  sha256: every language's standard library has it, so another program can
# check a file in a few lines, and on CPUs with the SHA instructions it is hashlib's
# fastest choice (1.1 GB/s on the development machine, blake2b 0.4 GB/s), far faster
# than the disk the weights come from.  Corruption, not an attacker, is what it is for.
CHECKSUM = "minidense.sha256"
_UNSET = "0" * 64          # the digits as they are hashed
_CHUNK = 1 << 16           # bytes read at a time: what md.load holds beyond the arrays
# Deflate packs at most 1032 bytes into one, so a compressed .npz member (np.savez_compressed)
# claiming more is damaged; stored members (md.save's) hold exactly what they claim.
_DEFLATE_MOST = 1032

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
    # The manifest first: zipfile reads the zip directory in order and stops where a damaged
    # entry says it ends, losing the entries after it without an error.  The manifest then
    # names the arrays that are missing, rather than vanishing itself (the file would load
    # as a plain .npz of the arrays that are left).
    members = {MANIFEST: np.frombuffer(manifest.encode("utf-8"), dtype=np.uint8), **arrays}
    with atomic_write(path) as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in members.items():
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
        data = st.save(arrays, metadata={"format": FORMAT, CHECKSUM: _UNSET})
    except Exception as error:  # safetensors' own error type: an unsupported dtype
        raise TypeError(f"save: cannot store this state as .safetensors: {error}") from None
    header_end = 8 + int.from_bytes(data[:8], "little")
    digits = _checksum_digits(data[:header_end], _UNSET)
    data = memoryview(data)
    with atomic_write(path) as f:
        f.write(data[:digits.start])
        f.write(hashlib.sha256(data).hexdigest().encode("ascii"))
        f.write(data[digits.stop:])


def _checksum_digits(head, digits):
    """Where the checksum's ``digits`` lie in ``head`` (the file through its header): the
    one place where they follow the checksum's key, as the safetensors package writes it."""
    field = f'"{CHECKSUM}":"{digits}"'.encode("utf-8")
    if head.count(field) != 1:
        raise ValueError("the checksum field of its header is damaged")
    stop = head.index(field) + len(field) - 1
    return slice(stop - len(digits.encode("utf-8")), stop)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
class CorruptFileError(ValueError):
    """``md.load``: the file is truncated, damaged or not in the format its name says.
    The message names the file and what is wrong."""


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
    NumPy arrays by name.  PyTorch's pickled .pth files are refused.  A truncated, damaged
    or foreign file raises ``CorruptFileError`` (a ValueError) naming it, and so does a
    .safetensors file whose contents no longer match the checksum ``save`` wrote.

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
    # pickle's PROTO opcode and a protocol number: torch.save's legacy format (a damaged
    # .npz that merely starts with 0x80 is damaged, not a pickle)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise _pickle_error("load", path)
    try:
        if head != b"PK\x03\x04":
            raise ValueError("it does not start like a .npz (zip) file")
        arrays = _read_npz(path)
    except _Pickled:
        raise _pickle_error("load", path) from None
    except MemoryError:  # a real shortage: _read_npz refuses damage that asks for more
        raise
    except Exception as error:
        # Whatever a damaged zip or .npy header makes zipfile or NumPy raise (BadZipFile,
        # NotImplementedError for an unknown compression method, zlib.error, struct.error,
        # EOFError, KeyError, UnicodeDecodeError, tokenize.TokenError, ... and the list
        # changes between versions), the file is unreadable: one error that names it.
        raise CorruptFileError(f"load: {path} is not a readable .npz file written by md.save "
                               f"(truncated, damaged or another format): {_reason(error)}"
                               ) from None
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
        raise CorruptFileError(f"load: {path} has a damaged manifest: {_reason(error)}") from None


def _reason(error):
    """An exception as one line: its message, or its type when it has none (EOFError())."""
    return str(error) or type(error).__name__


def _read_npz(path):
    """The arrays of the .npz file at ``path`` by member name (less ".npy"), as ``np.load``
    gives them, except that nothing is allocated before the zip directory and the member's
    .npy header agree with the bytes the file holds: a damaged header claiming a huge shape
    is refused instead of allocated.  The zip's CRC-32 is checked as each member is read."""
    room = path.stat().st_size
    arrays = {}
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        # torch.save's zip layout, whatever the file is called
        if any(info.filename.endswith("data.pkl") for info in members):
            raise _Pickled
        for info in members:
            name = info.filename
            if not name.endswith(".npy"):
                raise ValueError(f"its member {name!r} is not a .npy array")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ValueError(f"its member {name!r} uses zip compression method "
                                 f"{info.compress_type}, which .npz files do not")
            room -= info.compress_size
            ratio = 1 if info.compress_type == zipfile.ZIP_STORED else _DEFLATE_MOST
            if room < 0 or info.file_size > ratio * info.compress_size:
                raise ValueError(f"its zip directory claims more bytes for {name!r} than the "
                                 f"file holds")
            with archive.open(info) as member:
                arrays[name[:-len(".npy")]] = _read_npy(member, name, info.file_size)
    return arrays


def _read_npy(member, name, size):
    """The array in the .npy file ``member`` of ``size`` bytes, read as ``np.load`` reads
    one, but allocated only once its header's shape and dtype fit ``size``."""
    version = np.lib.format.read_magic(member)
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise ValueError(f"its member {name!r} is a .npy file of unknown version {version}")
    # 3.0 differs from 2.0 only in the header's encoding (utf-8, for a structured dtype's
    # field names), which changes no size
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran_order, dtype = read_header(member)
    if dtype.hasobject:
        raise ValueError(f"its member {name!r} holds Python objects, which only pickle reads")
    claimed, held = math.prod(shape) * dtype.itemsize, size - member.tell()
    if min(shape, default=0) < 0 or claimed != held:
        raise ValueError(f"the header of its member {name!r} claims shape {shape} of {dtype} "
                         f"({claimed} bytes), but the member holds {held}")
    if version == (3, 0):  # rare: NumPy's own reader decodes those names right
        member.seek(0)
        array = np.lib.format.read_array(member, allow_pickle=False)
    else:  # the bytes straight into the array, _CHUNK at a time (twice read_array's speed)
        array = np.empty(shape, dtype, order="F" if fortran_order else "C")
        flat = array.reshape(-1, order="A").view(np.uint8) if claimed else None
        for start in range(0, claimed, _CHUNK):
            stop = min(start + _CHUNK, claimed)
            chunk = member.read(stop - start)
            if len(chunk) != stop - start:
                raise EOFError(f"its member {name!r} ends early")
            flat[start:stop] = np.frombuffer(chunk, np.uint8)
    if member.read(1):  # reading to the end is also what makes zipfile check the CRC
        raise ValueError(f"its member {name!r} holds more than its array")
    return array


def _load_safetensors(path):
    st = _safetensors()
    from safetensors import SafetensorError
    try:
        arrays = dict(st.load_file(path))  # the package checks the header's shapes and offsets
        _check_checksum(path)
    except (SafetensorError, ValueError, OSError) as error:
        raise CorruptFileError(f"load: {path} is not a readable .safetensors file "
                               f"(truncated, damaged or another format): {_reason(error)}"
                               ) from None
    return arrays


def _check_checksum(path):
    """Compare the checksum md.save wrote into the header of the .safetensors file at
    ``path`` (already read by the safetensors package, so its header is well formed) with
    the file's contents; a ValueError says what is wrong.  A file without one passes."""
    with open(path, "rb") as f:
        head = f.read(8)
        head = bytearray(head + f.read(int.from_bytes(head, "little")))
        metadata = json.loads(head[8:]).get("__metadata__") or {}
        if CHECKSUM not in metadata:
            if metadata.get("format") == FORMAT:
                raise ValueError("md.save wrote it, but the checksum is missing from its header")
            return  # another tool's file: nothing to check
        expected = metadata[CHECKSUM]
        digits = _checksum_digits(head, expected)
        head[digits] = b"0" * (digits.stop - digits.start)
        digest = hashlib.sha256(head)
        chunk = bytearray(_CHUNK)  # one buffer, refilled: the file is never in memory twice
        while n := f.readinto(chunk):
            digest.update(memoryview(chunk)[:n])
    if digest.hexdigest() != expected:
        raise ValueError(f"its contents do not match the {CHECKSUM} checksum md.save wrote "
                         f"into its header: it was changed or damaged after it was written")

"""md.load on damaged files.  A few hundred seeded random corruptions (bit flips anywhere
and inside the headers, truncations, overwritten header bytes, appended junk) of a small
model's weights as .safetensors and .npz and of an optimizer's nested state as .npz: each
one either raises CorruptFileError naming the file or loads arrays bit-identical to those
saved, and none makes md.load allocate more than the file's size plus a small bound."""
import hashlib
import io
import json
import struct
import tracemalloc
import zipfile
from collections import Counter

import numpy as np
import pytest

import minidense as md
from minidense import models
from minidense.io import CHECKSUM, CorruptFileError

pytest.importorskip("safetensors")

SEED = 21
# corruptions of each kind applied to each of the three files
KINDS = {"bit flip": 30, "bit flip in a header": 30, "truncation": 15,
         "overwritten header bytes": 15, "appended junk": 10}
# What md.load may allocate beyond the file's size: 64 KiB read chunks (zipfile copies
# one), the zip directory and the parsed headers; 120-160 KiB were measured
EXTRA_BYTES = 256 << 10


def small_model():
    """ResNet-8 whose BN running statistics have moved away from 0 and 1."""
    md.manual_seed(0)
    model = models.resnet_cifar(8, shortcut="B")
    with md.no_grad():
        model(md.randn(4, 3, 8, 8) * 3 + 1)
    return model


def optimizer_state(model):
    """Adam's state after one step on the classifier (a small optimizer keeps the test
    fast): arrays, counters, a betas pair and flags in dicts within dicts."""
    optimizer = md.optim.Adam(model.classifier.parameters(), lr=1e-3, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    x = md.tensor(rng.standard_normal((4, 3, 8, 8)), dtype=np.float32)
    md.cross_entropy(model(x), md.tensor(rng.integers(0, 10, 4))).backward()
    optimizer.step()
    return {"optimizer": optimizer.state_dict(), "epoch": 3, "best_accuracy": 0.5}


def assert_identical(loaded, saved, where="the top level"):
    """The same nest, with arrays of the same dtype, shape and bytes (and dict keys in the
    same order, except from .safetensors, whose header the package writes sorted)."""
    if isinstance(saved, dict):
        assert isinstance(loaded, dict) and sorted(loaded) == sorted(saved), where
        assert list(loaded) == list(saved) or ".safetensors" in where, where
        for key, value in saved.items():
            assert_identical(loaded[key], value, f"{where}/{key}")
    elif isinstance(saved, (list, tuple)):
        assert type(loaded) is type(saved) and len(loaded) == len(saved), where
        for i, (a, b) in enumerate(zip(loaded, saved)):
            assert_identical(a, b, f"{where}/{i}")
    elif isinstance(saved, (np.ndarray, md.Tensor)):
        saved = saved.numpy() if isinstance(saved, md.Tensor) else saved
        assert isinstance(loaded, np.ndarray), where
        assert (loaded.dtype, loaded.shape) == (saved.dtype, saved.shape), where
        assert loaded.tobytes() == saved.tobytes(), where
    else:
        assert type(loaded) is type(saved) and loaded == saved, where


def header_spans(path):
    """The (start, stop) byte ranges of the file's headers: a .safetensors file's length and
    JSON header; each .npz member's zip header and .npy header, and the zip directory."""
    good = path.read_bytes()
    if path.suffix == ".safetensors":
        return [(0, 8 + int.from_bytes(good[:8], "little"))]
    spans = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name_length, extra_length = struct.unpack("<HH", good[info.header_offset + 26:][:4])
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                (np.lib.format.read_array_header_1_0 if version == (1, 0)
                 else np.lib.format.read_array_header_2_0)(member)
                npy_header = member.tell()
            spans.append((info.header_offset, info.header_offset + 30 + name_length + extra_length
                          + npy_header))
        spans.append((archive.start_dir, len(good)))
    return spans


def corrupt(good, spans, kind, rng):
    data = bytearray(good)
    if kind in ("bit flip", "bit flip in a header"):
        start, stop = (0, len(data)) if kind == "bit flip" else spans[rng.integers(len(spans))]
        data[rng.integers(start, stop)] ^= 1 << int(rng.integers(8))
    elif kind == "truncation":
        del data[rng.integers(len(data)):]
    elif kind == "overwritten header bytes":
        start, stop = spans[rng.integers(len(spans))]
        at = int(rng.integers(start, stop))
        n = min(int(rng.integers(1, 65)), stop - at)
        data[at:at + n] = rng.bytes(n)
    elif kind == "appended junk":
        data += rng.bytes(int(rng.integers(1, 4097)))
    return bytes(data)


def load_and_measure(path):
    """md.load(path), or the CorruptFileError it raised, and the most it allocated at once."""
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        result = md.load(path)
    except CorruptFileError as error:
        result = error
    return result, tracemalloc.get_traced_memory()[1] - before


def check_corruptions(tmp_path, name, saved, rng, tally):
    good_path = tmp_path / f"good-{name}"
    md.save(saved, good_path)
    good, spans = good_path.read_bytes(), header_spans(good_path)
    path = tmp_path / f"damaged-{name}"
    for kind, count in KINDS.items():
        for _ in range(count):
            content = corrupt(good, spans, kind, rng)
            path.write_bytes(content)
            loaded, allocated = load_and_measure(path)
            if isinstance(loaded, CorruptFileError):
                assert str(loaded).startswith(f"load: {path} "), (kind, str(loaded))
                tally[name, kind, "raised"] += 1
            else:
                assert_identical(loaded, saved, f"{name} after a {kind}")
                tally[name, kind, "loaded identical"] += 1
            del loaded
            assert allocated <= len(content) + EXTRA_BYTES, (name, kind, allocated, len(content))


def test_every_corruption_raises_a_clear_error_or_loads_what_was_saved(tmp_path):
    model = small_model()
    files = {"weights.safetensors": model.state_dict(), "weights.npz": model.state_dict(),
             "optimizer.npz": optimizer_state(model)}
    rng = np.random.default_rng(SEED)
    tally = Counter()
    tracemalloc.start()
    try:
        for name, saved in files.items():
            check_corruptions(tmp_path, name, saved, rng, tally)
    finally:
        tracemalloc.stop()
    for name in files:  # the figures, shown with pytest -s
        print(name, {f"{kind}: {outcome}": n for (file, kind, outcome), n in sorted(tally.items())
                     if file == name})
    assert sum(tally.values()) == len(files) * sum(KINDS.values())
    # Bit flips land mostly in array data, which no format may let through
    for name in files:
        assert tally[name, "bit flip", "raised"] >= KINDS["bit flip"] * 3 // 4, name


# ---------------------------------------------------------------------------
# The cases random damage rarely produces
# ---------------------------------------------------------------------------
def safetensors_parts(path):
    data = path.read_bytes()
    end = 8 + int.from_bytes(data[:8], "little")
    return json.loads(data[8:end]), data[end:]


def safetensors_bytes(header, body):
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def test_the_checksum_is_the_sha256_of_the_file_with_its_own_digits_as_zeros(tmp_path):
    path = tmp_path / "w.safetensors"
    md.save(small_model().state_dict(), path)
    data = path.read_bytes()
    header, _ = safetensors_parts(path)
    digits = header["__metadata__"][CHECKSUM]
    assert header["__metadata__"]["format"] == "minidense.save" and len(digits) == 64
    assert hashlib.sha256(data.replace(digits.encode(), b"0" * 64)).hexdigest() == digits


def test_a_flipped_bit_in_a_name_or_in_the_data_fails_the_checksum(tmp_path):
    path = tmp_path / "w.safetensors"
    md.save(small_model().state_dict(), path)
    good = path.read_bytes()
    at = good.index(b'"stem.conv.weight"') + 1
    renamed = bytearray(good)
    renamed[at] ^= 0x01  # "stem..." -> "rtem...", still valid JSON and a valid file
    in_data = bytearray(good)
    in_data[-5] ^= 0x10
    for content in (renamed, in_data):
        path.write_bytes(content)
        with pytest.raises(CorruptFileError, match=f"load: {path} .* do not match the {CHECKSUM}"):
            md.load(path)


def test_files_of_other_tools_load_without_a_checksum_and_ours_need_theirs(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(7, dtype=np.int64)}
    safetensors_numpy.save_file(arrays, tmp_path / "plain.safetensors")
    safetensors_numpy.save_file(arrays, tmp_path / "hub.safetensors", metadata={"format": "pt"})
    for name in ("plain.safetensors", "hub.safetensors"):
        assert_identical(md.load(tmp_path / name), arrays, name)
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file({"w": torch.arange(6.0).reshape(2, 3)},
                                tmp_path / "torch.safetensors")
    np.testing.assert_array_equal(md.load(tmp_path / "torch.safetensors")["w"], arrays["w"])
    # md.save's file with the checksum's key damaged: its "format" still says it needs one
    md.save(arrays, tmp_path / "ours.safetensors")
    header, body = safetensors_parts(tmp_path / "ours.safetensors")
    header["__metadata__"]["minidense.sha257"] = header["__metadata__"].pop(CHECKSUM)
    (tmp_path / "ours.safetensors").write_bytes(safetensors_bytes(header, body))
    with pytest.raises(CorruptFileError, match="the checksum is missing"):
        md.load(tmp_path / "ours.safetensors")


def test_a_damaged_zip_directory_that_loses_entries_is_caught_by_the_manifest(tmp_path):
    path = tmp_path / "w.npz"
    md.save(small_model().state_dict(), path)
    # A zip directory that has lost its last entries, as when a damaged entry's comment
    # length swallows the rest: zipfile reads what is left without an error of its own.
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in members[:-2]:
            archive.writestr(info, data)
    with pytest.raises(CorruptFileError, match=f"load: {path} has a damaged manifest: the "
                                               f"manifest names an array"):
        md.load(path)
    # And the bit flip that does it in place: caught either way, naming the file.
    md.save(small_model().state_dict(), path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        first = archive.start_dir
    data[first + 33] ^= 0x10   # the first directory entry's comment length grows by 4096
    path.write_bytes(data)
    with pytest.raises(CorruptFileError, match=f"load: {path} "):
        md.load(path)


def npy_member(shape, dtype, data):
    """A .npy file's bytes: a header claiming ``shape`` and ``dtype``, then ``data``."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": shape}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + data


def test_a_header_claiming_a_huge_shape_is_refused_before_anything_is_allocated(tmp_path):
    claimed = (1 << 24,)  # 64 MiB of float32 from a file of a few hundred bytes
    member = npy_member(claimed, np.float32, b"\0" * 64)
    # .npz: a consistent zip (right sizes and CRC) whose .npy header lies
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.writestr("w.npy", member)
    # .npz: the zip directory's sizes agree with that header's lie
    data = bytearray((tmp_path / "huge.npz").read_bytes())
    with zipfile.ZipFile(tmp_path / "huge.npz") as archive:
        entry = archive.start_dir
    for field in (20, 24):  # the compressed and uncompressed size of the directory entry
        data[entry + field:entry + field + 4] = struct.pack("<I", len(member) - 64 + (1 << 26))
    (tmp_path / "sizes.npz").write_bytes(data)
    # .safetensors: a well-formed header whose shape disagrees with its byte range
    md.save({"w": np.zeros(16, np.float32)}, tmp_path / "huge.safetensors")
    header, body = safetensors_parts(tmp_path / "huge.safetensors")
    header["w"]["shape"] = list(claimed)
    (tmp_path / "huge.safetensors").write_bytes(safetensors_bytes(header, body))
    # .safetensors: a header length larger than the file
    (tmp_path / "long.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    tracemalloc.start()
    try:
        for name in ("huge.npz", "sizes.npz", "huge.safetensors", "long.safetensors"):
            path = tmp_path / name
            loaded, allocated = load_and_measure(path)
            assert isinstance(loaded, CorruptFileError), name
            assert str(loaded).startswith(f"load: {path} "), str(loaded)
            assert allocated <= path.stat().st_size + EXTRA_BYTES, (name, allocated)
    finally:
        tracemalloc.stop()

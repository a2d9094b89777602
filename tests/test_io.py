"""md.save / md.load: bit-exact round trips, plain .npz files, atomic writes and clear
errors for damaged or foreign files."""
import os
import sys
import zipfile

import numpy as np
import pytest

import minidense as md
from minidense import models


def trained_model(seed):
    """A small ResNet whose BN running statistics have moved away from 0 and 1."""
    md.manual_seed(seed)
    model = models.resnet_cifar(8, shortcut="B")
    with md.no_grad():
        model(md.randn(4, 3, 8, 8) * 3 + 1)
    return model


def test_state_dict_round_trip_is_bit_exact_running_statistics_included(tmp_path):
    source, target = trained_model(0), trained_model(1)
    path = tmp_path / "weights.npz"
    md.save(source.state_dict(), path)
    target.load_state_dict(md.load(path))
    expected, restored = source.state_dict(), target.state_dict()
    assert list(restored) == list(expected)
    assert any(name.endswith("running_var") for name in expected)
    for name, array in expected.items():
        assert restored[name].dtype == array.dtype and restored[name].shape == array.shape, name
        assert restored[name].tobytes() == array.tobytes(), name
    source.eval()
    target.eval()
    x = md.randn(2, 3, 8, 8)
    with md.no_grad():
        np.testing.assert_array_equal(source(x).numpy(), target(x).numpy())


def test_float64_arrays_and_tensors_keep_dtype_and_bits(tmp_path):
    rng = np.random.default_rng(0)
    state = {"a": rng.standard_normal((3, 4)), "b": md.tensor(rng.standard_normal(5)),
             "c": np.arange(6, dtype=np.int32).reshape(2, 3), "d": np.array(True)}
    md.save(state, tmp_path / "s.npz")
    back = md.load(tmp_path / "s.npz")
    for key, value in state.items():
        value = value.numpy() if isinstance(value, md.Tensor) else value
        assert isinstance(back[key], np.ndarray)
        assert back[key].dtype == value.dtype and back[key].tobytes() == value.tobytes()


def test_nested_state_with_numbers_strings_and_int_keys_round_trips(tmp_path):
    state = {
        "state": {0: {"momentum_buffer": np.linspace(0, 1, 7), "step": 12}},
        "param_groups": [{"lr": 0.1 + 1e-17, "momentum": 0.9, "nesterov": True, "name": "all",
                          "betas": (0.9, 0.999), "foreach": None, "params": [0, 1, 2]}],
        "epoch": 3, "best": np.float32(0.8125), "a/b": 1, "a": {"b": 2},
        "__minidense_manifest__": "a key that looks like the manifest's",
    }
    md.save(state, tmp_path / "opt.npz")
    back = md.load(tmp_path / "opt.npz")
    assert list(back) == list(state)
    group, expected_group = back["param_groups"][0], state["param_groups"][0]
    for key, value in expected_group.items():
        assert group[key] == value and type(group[key]) is type(value), key
    assert back["state"][0]["step"] == 12 and type(back["state"][0]["step"]) is int
    np.testing.assert_array_equal(back["state"][0]["momentum_buffer"], state["state"][0]["momentum_buffer"])
    assert back["best"] == state["best"] and back["best"].dtype == np.float32
    assert back["a/b"] == 1 and back["a"] == {"b": 2} and back["epoch"] == 3
    assert back["__minidense_manifest__"] == state["__minidense_manifest__"]


def test_optimizer_state_round_trip_continues_identically(tmp_path):
    def setup():
        md.manual_seed(0)
        model = models.resnet_cifar(8)
        return model, md.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                   weight_decay=1e-4)

    def step(model, optimizer, seed):
        rng = np.random.default_rng(seed)
        x = md.tensor(rng.standard_normal((4, 3, 8, 8), dtype=np.float32))   # the model's dtype
        labels = md.tensor(rng.integers(0, 10, 4))
        optimizer.zero_grad()
        md.cross_entropy(model(x), labels).backward()
        optimizer.step()

    straight, straight_opt = setup()
    for seed in range(3):
        step(straight, straight_opt, seed)

    first, first_opt = setup()
    for seed in range(2):
        step(first, first_opt, seed)
    md.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, tmp_path / "ckpt.npz")
    resumed, resumed_opt = setup()
    checkpoint = md.load(tmp_path / "ckpt.npz")
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    step(resumed, resumed_opt, 2)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_the_file_is_a_plain_npz_named_by_state_dict_keys(tmp_path):
    state = trained_model(0).state_dict()
    md.save(state, tmp_path / "w.npz")
    with np.load(tmp_path / "w.npz", allow_pickle=False) as npz:
        for name, array in state.items():
            np.testing.assert_array_equal(npz[name], array)


def test_a_plain_npz_without_manifest_loads_as_a_dict_of_arrays(tmp_path):
    np.savez(tmp_path / "plain.npz", w=np.ones((2, 2)), b=np.zeros(3))
    back = md.load(tmp_path / "plain.npz")
    assert sorted(back) == ["b", "w"] and back["w"].shape == (2, 2)


def leftovers(folder, keep):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_a_failed_save_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "w.npz"
    md.save({"x": np.arange(3.0)}, path)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="cannot store a set at bad"):
        md.save({"x": np.ones(3), "bad": {1, 2}}, path)
    calls = []

    def write_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_write(*args, **kwargs)

    real_write = np.lib.format.write_array
    monkeypatch.setattr(np.lib.format, "write_array", write_then_crash)
    with pytest.raises(OSError, match="disk full"):
        md.save({"x": np.ones(3), "y": np.ones(4)}, path)
    assert path.read_bytes() == before
    assert leftovers(tmp_path, {"w.npz"}) == []


def test_saving_a_model_or_unsupported_values_explains_what_to_do(tmp_path):
    with pytest.raises(TypeError, match=r"state_dict\(\)"):
        md.save(models.resnet20(), tmp_path / "m.npz")
    with pytest.raises(TypeError, match="dict keys must be str or int"):
        md.save({(1, 2): np.ones(1)}, tmp_path / "m.npz")
    with pytest.raises(TypeError, match="dtype object"):
        md.save({"o": np.array([None, 1], dtype=object)}, tmp_path / "m.npz")
    assert leftovers(tmp_path, set()) == []


def damaged_files(tmp_path):
    md.save(trained_model(0).state_dict(), tmp_path / "good.npz")
    good = (tmp_path / "good.npz").read_bytes()
    files = {}
    for cut in (10, len(good) // 2, len(good) - 10):
        files[f"truncated-{cut}"] = good[:cut]
    flipped = bytearray(good)
    weight = md.load(tmp_path / "good.npz")["stem.conv.weight"].tobytes()
    at = bytes(flipped).find(weight)
    assert at > 0  # stored uncompressed, so the array's bytes are in the file as they are
    at += 17
    flipped[at] ^= 0xFF
    files["bit flip in the data"] = bytes(flipped)
    files["random bytes"] = np.random.default_rng(0).bytes(3000)
    files["text"] = b"these are not weights\n"
    files["empty"] = b""
    return files


def test_damaged_or_foreign_files_give_a_corrupt_file_error_naming_the_path(tmp_path):
    for label, content in damaged_files(tmp_path).items():
        path = tmp_path / f"{label}.npz"
        path.write_bytes(content)
        with pytest.raises(md.io.CorruptFileError, match=f"load: {path}") as error:
            md.load(path)
        assert error.value.__cause__ is None and error.value.__suppress_context__, label


def test_npy_zip_and_pickled_object_arrays_are_refused(tmp_path):
    np.save(tmp_path / "single.npy", np.ones(3))
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "hello")
    np.savez(tmp_path / "objects.npz", o=np.array([{"a": 1}], dtype=object))
    for name in ("single.npy", "other.zip", "objects.npz"):
        with pytest.raises(md.io.CorruptFileError, match=f"load: {tmp_path / name} is not a readable"):
            md.load(tmp_path / name)


def test_a_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.npz"):
        md.load(tmp_path / "no-such.npz")


def test_loading_into_another_architecture_reports_every_problem_at_once(tmp_path):
    state = trained_model(0).state_dict()
    state.pop("stem.norm.running_mean")
    state["extra.weight"] = np.ones(2, dtype=np.float32)
    md.save(state, tmp_path / "w.npz")
    other = models.resnet_cifar(8, shortcut="B", num_classes=5)
    before = other.state_dict()
    with pytest.raises(RuntimeError) as error:
        other.load_state_dict(md.load(tmp_path / "w.npz"))
    message = str(error.value)
    for expected in ("classifier.fc.weight: model (5, 64), file (10, 64)", "classifier.fc.bias",
                     "missing keys: stem.norm.running_mean", "unexpected keys: extra.weight"):
        assert expected in message
    for name, array in other.state_dict().items():  # nothing was half loaded
        np.testing.assert_array_equal(array, before[name])


def test_saved_files_get_ordinary_permissions(tmp_path):
    md.save({"x": np.ones(1)}, tmp_path / "p.npz")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "p.npz").stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------
# .safetensors: chosen by the extension; flat dicts of arrays only
# ---------------------------------------------------------------------------
def test_safetensors_round_trip_is_bit_exact_and_readable_by_the_safetensors_package(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    state = trained_model(0).state_dict()
    state["stem.norm.num_batches_tracked"] = np.array(7, dtype=np.int64)  # a 0-d array stays 0-d
    state["double"] = np.random.default_rng(0).standard_normal((3, 2))
    state["tensor"] = md.tensor([1.0, 2.0])
    path = tmp_path / "w.safetensors"
    md.save(state, path)
    with open(path, "rb") as f:
        assert f.read(8) != b"PK\x03\x04\x14\x00\x00\x00"  # not an .npz in disguise
    for back in (md.load(path), safetensors_numpy.load_file(str(path))):
        assert sorted(back) == sorted(state)
        for name, value in state.items():
            value = value.numpy() if isinstance(value, md.Tensor) else value
            assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
            assert back[name].tobytes() == value.tobytes(), name
    model = trained_model(1)
    loaded = md.load(path)
    for extra in ("double", "tensor"):
        loaded.pop(extra)
    model.load_state_dict(loaded)
    assert int(model.stem.norm.num_batches_tracked.item()) == 7
    for name, array in trained_model(0).state_dict().items():
        if name != "stem.norm.num_batches_tracked":
            np.testing.assert_array_equal(model.state_dict()[name], array)


def test_a_safetensors_header_whose_length_starts_with_pickles_byte_still_loads(tmp_path):
    pytest.importorskip("safetensors")
    path = tmp_path / "w.safetensors"
    for n in range(1, 300):  # the header's length is little-endian: find one whose low byte is 0x80
        md.save({"w" * n: np.ones(2)}, path)
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    np.testing.assert_array_equal(md.load(path)["w" * n], np.ones(2))


def test_safetensors_refuses_nested_state_and_non_arrays_and_leaves_no_file(tmp_path):
    pytest.importorskip("safetensors")
    path = tmp_path / "o.safetensors"
    with pytest.raises(TypeError, match=r"'state' is a dict; nested state .* goes in .npz"):
        md.save({"state": {0: {"step": 1}}, "w": np.ones(2)}, path)
    with pytest.raises(TypeError, match=r"'epoch' is a int"):
        md.save({"epoch": 3}, path)
    with pytest.raises(TypeError, match="names must be str"):
        md.save({0: np.ones(2)}, path)
    with pytest.raises(TypeError, match="holds a dict of arrays by name, got a list"):
        md.save([np.ones(2)], path)
    md.save({"w": np.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="cannot store this state as .safetensors"):
        md.save({"w": np.array(["text"])}, path)
    assert path.read_bytes() == before
    assert leftovers(tmp_path, {"o.safetensors"}) == []


def test_damaged_or_foreign_safetensors_files_give_a_corrupt_file_error_naming_the_path(tmp_path):
    pytest.importorskip("safetensors")
    md.save(trained_model(0).state_dict(), tmp_path / "good.safetensors")
    good = (tmp_path / "good.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(good[:8], "little")
    files = {f"truncated-{cut}": good[:cut] for cut in (4, 12, header_end, len(good) - 10)}
    files["header length too large"] = (len(good)).to_bytes(8, "little") + good[8:]
    damaged = bytearray(good)
    damaged[8] = ord("#")  # the JSON header's opening brace
    files["damaged header"] = bytes(damaged)
    files["random bytes"] = np.random.default_rng(0).bytes(3000)
    files["text"] = b"these are not weights\n"
    files["empty"] = b""
    md.save(trained_model(0).state_dict(), tmp_path / "an.npz")
    files["an npz"] = (tmp_path / "an.npz").read_bytes()
    for label, content in files.items():
        path = tmp_path / f"{label}.safetensors"
        path.write_bytes(content)
        with pytest.raises(md.io.CorruptFileError, match=f"load: {path} is not a readable .safetensors") as error:
            md.load(path)
        assert error.value.__cause__ is None and error.value.__suppress_context__, label


def test_pytorch_pickles_are_never_read_and_the_error_shows_the_conversion(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pth")
    (tmp_path / "renamed.npz").write_bytes((tmp_path / "w.pth").read_bytes())
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("w.pth", "renamed.npz", "legacy.bin", "empty.pt"):
        with pytest.raises(ValueError, match="is a PyTorch pickle file") as error:
            md.load(tmp_path / name)
        message = str(error.value)
        assert "torch.load(" in message and "safetensors.torch.save_file(" in message, name
    with pytest.raises(ValueError, match="never PyTorch's pickle format"):
        md.save({"w": np.ones(2)}, tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()


def test_without_the_safetensors_package_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes "import safetensors" fail
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        md.save({"w": np.ones(2)}, tmp_path / "w.safetensors")
    (tmp_path / "x.safetensors").write_bytes(b"x")
    with pytest.raises(ImportError, match="pip install safetensors"):
        md.load(tmp_path / "x.safetensors")
    md.save({"w": np.ones(2)}, tmp_path / "w.npz")  # .npz needs nothing more

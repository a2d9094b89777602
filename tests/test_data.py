"""md.data: the CIFAR-10 binary format, image folders and their cache, the digits demo,
the loader (order, drop_last, prefetching) and the augmentation."""
import hashlib
import io
import tarfile
import urllib.error
import zipfile

import numpy as np
import pytest

from minidense import data
from minidense.data import datasets


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test caches into its own folder, never ~/.cache."""
    monkeypatch.setenv("MINIDENSE_DATA", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------
# CIFAR-10 binary release
# ---------------------------------------------------------------------------
def fake_cifar10_archive(path, per_batch=3, seed=0):
    """A tar.gz laid out as cifar-10-binary.tar.gz, with a few random records per file.
    Returns the records of the training files and of the test file."""
    rng = np.random.default_rng(seed)
    records = {}
    with tarfile.open(path, "w:gz") as tar:
        names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
        for name in names:
            rec = rng.integers(0, 256, size=(per_batch, 3073), dtype=np.uint8)
            rec[:, 0] = rng.integers(0, 10, per_batch)
            records[name] = rec
            add_member(tar, f"cifar-10-batches-bin/{name}", rec.tobytes())
        add_member(tar, "cifar-10-batches-bin/batches.meta.txt",
                   "\n".join(data.CIFAR10_CLASSES).encode() + b"\n\n")
    train = np.concatenate([records[f"data_batch_{i}.bin"] for i in range(1, 6)])
    return train, records["test_batch.bin"]


def add_member(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def decode_records_naively(records):
    """Pixel by pixel from the format's description: byte 1 + c*1024 + y*32 + x."""
    images = np.zeros((len(records), 32, 32, 3), dtype=np.uint8)
    for i, rec in enumerate(records):
        for c in range(3):
            for y in range(32):
                for x in range(32):
                    images[i, y, x, c] = rec[1 + c * 1024 + y * 32 + x]
    return images, records[:, 0].astype(np.int64)


def md5_of(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_binary_records_parse_as_the_format_says(tmp_path):
    archive = tmp_path / data.datasets.CIFAR10_ARCHIVE
    train, test = fake_cifar10_archive(archive)
    for train_split, records in ((True, train), (False, test)):
        images, labels, classes = data.parse_cifar10_binary(archive, train_split)
        expected_images, expected_labels = decode_records_naively(records)
        np.testing.assert_array_equal(images, expected_images)
        np.testing.assert_array_equal(labels, expected_labels)
        assert classes == list(data.CIFAR10_CLASSES)


def test_cifar10_checks_md5_and_caches(tmp_path, monkeypatch):
    archive = tmp_path / data.datasets.CIFAR10_ARCHIVE
    train, _ = fake_cifar10_archive(archive)
    with pytest.raises(data.DataUnavailableError, match="md5.*--data PATH"):
        data.CIFAR10(root=tmp_path, train=True, download=False)
    monkeypatch.setattr(datasets, "CIFAR10_MD5", md5_of(archive))
    first = data.CIFAR10(root=tmp_path, train=True, download=False)
    np.testing.assert_array_equal(first.images, decode_records_naively(train)[0])
    assert sorted(p.name.split("-")[-1] for p in tmp_path.glob("cifar10-*.npy")) == \
        ["classes.npy", "images.npy", "labels.npy"]
    monkeypatch.setattr(datasets, "parse_cifar10_binary", lambda *a: pytest.fail("decoded twice"))
    again = data.CIFAR10(root=tmp_path, train=True, download=False)
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)


def test_cifar10_offline_gives_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(datasets.urllib.request, "urlopen", offline)
    with pytest.raises(data.DataUnavailableError) as error:
        data.CIFAR10(root=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "cifar-10-binary.tar.gz") in message and "--data PATH" in message
    assert data.CIFAR10_URL in message
    assert list(tmp_path.iterdir()) == []          # no partial download left behind


def test_cifar10_download_is_verified(tmp_path, monkeypatch):
    source = tmp_path / "source.tar.gz"
    train, _ = fake_cifar10_archive(source)
    payload = source.read_bytes()
    monkeypatch.setattr(datasets, "CIFAR10_MD5", md5_of(source))
    root = tmp_path / "root"

    def serve(content):
        return lambda url, timeout=None: io.BytesIO(content)

    monkeypatch.setattr(datasets.urllib.request, "urlopen", serve(payload[:-100] + b"x" * 100))
    with pytest.raises(data.DataUnavailableError, match="has md5"):
        data.CIFAR10(root=root)
    assert list(root.iterdir()) == []
    monkeypatch.setattr(datasets.urllib.request, "urlopen", serve(payload))
    downloaded = data.CIFAR10(root=root)
    np.testing.assert_array_equal(downloaded.labels, train[:, 0])


# ---------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------
CLASSES = ["cat", "airplane", "dog"]   # written unsorted: labels must follow sorted order


def write_image_tree(root, fmt="png", per_class=(3, 2), size=8, seed=0):
    """train/<class>/* and test/<class>/* image files; returns {relative path: array}."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in zip(("train", "test"), per_class):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                rel = f"{split}/{cls}/{i:03d}.{fmt}"
                Image.fromarray(pixels).save(root / rel)
                written[rel] = pixels
    return written


def zip_tree(root, target, folder=""):
    """Zip the tree; with ``folder``, inside that one top-level folder (as `zip -r` does)."""
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                archive.write(path, folder + path.relative_to(root).as_posix())
    return target


def expected_split(written, split):
    keys = sorted(k for k in written if k.startswith(split + "/"))
    classes = sorted(CLASSES)
    return (np.stack([written[k] for k in keys]),
            np.array([classes.index(k.split("/")[1]) for k in keys]))


@pytest.mark.parametrize("as_zip", [False, True, "cifar/"], ids=["folder", "zip", "zip-of-a-folder"])
def test_image_folder_reads_png_trees(tmp_path, as_zip):
    tree = tmp_path / "tree"
    written = write_image_tree(tree)
    folder = as_zip if isinstance(as_zip, str) else ""
    source = zip_tree(tree, tmp_path / "tree.zip", folder) if as_zip else tree
    for split, train in (("train", True), ("test", False)):
        ds = data.ImageFolder(source, train=train, workers=1)
        images, labels = expected_split(written, split)
        assert ds.classes == sorted(CLASSES)
        np.testing.assert_array_equal(ds.images, images)     # PNG is lossless
        np.testing.assert_array_equal(ds.labels, labels)


def test_image_folder_decodes_jpeg_as_pillow_does(tmp_path):
    from PIL import Image
    tree = tmp_path / "tree"
    write_image_tree(tree, fmt="jpg")
    ds = data.ImageFolder(zip_tree(tree, tmp_path / "jpegs.zip"), train=False, workers=1)
    files = sorted(tree.glob("test/*/*.jpg"))
    expected = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    np.testing.assert_array_equal(ds.images, expected)


def test_image_folder_worker_processes_give_the_same_arrays(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    write_image_tree(tree, per_class=(20, 1))
    serial = data.ImageFolder(tree, train=True, workers=1, cache=tmp_path / "a")
    pools = []
    monkeypatch.setattr(datasets, "IMAGES_PER_WORKER", 10)
    monkeypatch.setattr(datasets, "ProcessPoolExecutor", CountingPool(pools))
    parallel = data.ImageFolder(tree, train=True, workers=2, cache=tmp_path / "b")
    assert pools == [2]
    np.testing.assert_array_equal(serial.images, parallel.images)
    np.testing.assert_array_equal(serial.labels, parallel.labels)


class CountingPool:
    def __init__(self, calls):
        self.calls = calls

    def __call__(self, workers):
        from concurrent.futures import ProcessPoolExecutor
        self.calls.append(workers)
        return ProcessPoolExecutor(workers)


def test_image_folder_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    write_image_tree(tree)
    source = zip_tree(tree, tmp_path / "tree.zip")
    first = data.ImageFolder(source, train=True, workers=1)
    cache = tmp_path / "cache"
    assert len(list(cache.glob("*-train-images.npy"))) == 1
    assert not list(cache.glob("*.tmp"))

    def no_decoding(*args):
        raise AssertionError("decoded again although the cache is valid")
    monkeypatch.setattr(datasets, "_decode_images", no_decoding)
    second = data.ImageFolder(source, train=True, workers=1)
    np.testing.assert_array_equal(second.images, first.images)
    assert second.classes == first.classes

    # A changed source (new contents, new size and mtime) is decoded again.
    (tree / "train" / "dog" / "000.png").unlink()
    zip_tree(tree, source)
    with pytest.raises(AssertionError, match="decoded again"):
        data.ImageFolder(source, train=True, workers=1)


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.ImageFolder(tmp_path / "missing")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(data.DataError, match="no train/<class>"):
        data.ImageFolder(tmp_path / "empty", workers=1)


# ---------------------------------------------------------------------------
# The digits demo
# ---------------------------------------------------------------------------
def test_digits_are_upsampled_and_split_per_class():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    train, test = data.Digits(train=True), data.Digits(train=False)
    assert train.images.shape[1:] == (32, 32, 3) and train.images.dtype == np.uint8
    assert len(train) + len(test) == len(load_digits().images)
    counts = np.bincount(test.labels, minlength=10)
    totals = counts + np.bincount(train.labels, minlength=10)
    np.testing.assert_array_equal(counts, totals // 5)     # the 5th, 10th, ... of each digit
    raw = load_digits()
    first_test = np.flatnonzero(raw.target == test.labels[0])[4]
    expected = np.round(raw.images[first_test] * 255 / 16)
    np.testing.assert_array_equal(test.images[0, ::4, ::4, 1], expected)
    np.testing.assert_array_equal(test.images[0, 3::4, 3::4, 2], expected)


# ---------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------
def toy_dataset(n=50, size=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return data.ImageDataset(images, np.arange(n) % 10, [str(i) for i in range(10)])


def collect(loader, epoch, start=0):
    return [(x.numpy(), y.numpy()) for x, y in loader.iterate(epoch, start)]


def test_loader_order_depends_only_on_seed_and_epoch():
    ds = toy_dataset()
    make = lambda seed: data.DataLoader(ds, 8, shuffle=True, augment=True, seed=seed)  # noqa: E731
    a, b = collect(make(1), 3), collect(make(1), 3)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    other_epoch = collect(make(1), 4)
    other_seed = collect(make(2), 3)
    assert not np.array_equal(a[0][1], other_epoch[0][1])
    assert not np.array_equal(a[0][1], other_seed[0][1])
    # Starting mid-epoch gives the rest of the same epoch.
    tail = collect(make(1), 3, start=4)
    for (xa, ya), (xt, yt) in zip(a[4:], tail):
        np.testing.assert_array_equal(xa, xt)
        np.testing.assert_array_equal(ya, yt)
    # iter() walks the epochs in turn.
    loader = make(1)
    list(loader)
    second = [(x.numpy(), y.numpy()) for x, y in loader]
    np.testing.assert_array_equal(second[0][0], collect(make(1), 1)[0][0])


def test_loader_background_thread_changes_nothing():
    ds = toy_dataset()
    threaded = collect(data.DataLoader(ds, 8, shuffle=True, augment=True, seed=5, prefetch=2), 0)
    inline = collect(data.DataLoader(ds, 8, shuffle=True, augment=True, seed=5, prefetch=0), 0)
    assert len(threaded) == len(inline)
    for (xa, ya), (xb, yb) in zip(threaded, inline):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


def test_loader_stops_cleanly_when_left_early():
    import threading
    ds = toy_dataset()
    loader = data.DataLoader(ds, 4, shuffle=True, prefetch=1)
    batches = loader.iterate(0)
    next(batches)
    batches.close()
    assert not any(t.name == "minidense-loader" for t in threading.enumerate())


@pytest.mark.parametrize("drop_last", [False, True])
def test_loader_covers_every_image_once(drop_last):
    ds = toy_dataset(n=50)
    loader = data.DataLoader(ds, 8, shuffle=True, drop_last=drop_last, seed=0)
    batches = collect(loader, 0)
    sizes = [len(y) for _, y in batches]
    assert len(batches) == len(loader) == (6 if drop_last else 7)
    assert sizes == ([8] * 6 if drop_last else [8] * 6 + [2])
    # Without augmentation and normalisation the pixels identify the images.
    seen = np.concatenate([np.rint(x * 255).astype(np.uint8).transpose(0, 2, 3, 1) for x, _ in batches])
    index = {img.tobytes(): i for i, img in enumerate(ds.images)}
    picked = [index[img.tobytes()] for img in seen]
    assert len(set(picked)) == len(picked) == sum(sizes)
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), ds.labels[picked])


def test_loader_errors():
    with pytest.raises(ValueError, match="batch_size"):
        data.DataLoader(toy_dataset(), 0)
    with pytest.raises(ValueError, match="drop_last"):
        data.DataLoader(toy_dataset(n=5), 8, drop_last=True)


def test_loader_hands_on_errors_from_its_thread():
    ds = toy_dataset()
    loader = data.DataLoader(ds, 8, prefetch=2)
    loader.make_batch = lambda plan, index: (_ for _ in ()).throw(RuntimeError("broken batch"))
    with pytest.raises(RuntimeError, match="broken batch"):
        collect(loader, 0)


# ---------------------------------------------------------------------------
# Augmentation and normalisation
# ---------------------------------------------------------------------------
def naive_crop_flip(image, top, left, flip, pad):
    """One image: pad with zeros, slice, mirror."""
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    h, w = image.shape[:2]
    crop = padded[top:top + h, left:left + w]
    return crop[:, ::-1] if flip else crop


def test_random_crop_flip_equals_pad_slice_mirror():
    images = toy_dataset(n=64, size=10).images
    offsets, flips = data.augmentation_parameters(np.random.default_rng(0), len(images), 4)
    out = data.random_crop_flip(images, offsets, flips, pad=4)
    assert out.shape == images.shape and out.dtype == np.uint8
    for i in range(len(images)):
        np.testing.assert_array_equal(out[i], naive_crop_flip(images[i], *offsets[i], flips[i], 4))
    # Offsets cover the whole 9 x 9 range, flips both ways.
    big_offsets, big_flips = data.augmentation_parameters(np.random.default_rng(1), 5000, 4)
    assert set(map(tuple, big_offsets)) == {(a, b) for a in range(9) for b in range(9)}
    assert 0.45 < big_flips.mean() < 0.55


def test_each_augmented_image_is_a_crop_of_the_padded_original():
    """Independent of the parameters: search every crop and both mirrors."""
    ds = toy_dataset(n=12, size=8)
    loader = data.DataLoader(ds, 12, shuffle=False, augment=True, pad=4, seed=3)
    (x, _), = collect(loader, 0)
    out = np.rint(x * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    for image, original in zip(out, ds.images):
        candidates = [naive_crop_flip(original, t, l, f, 4)
                      for t in range(9) for l in range(9) for f in (False, True)]
        assert any(np.array_equal(image, c) for c in candidates)


def test_flip_is_an_exact_mirror():
    images = toy_dataset(n=16).images
    offsets = np.random.default_rng(0).integers(0, 9, (16, 2))
    plain = data.random_crop_flip(images, offsets, np.zeros(16, bool))
    mirrored = data.random_crop_flip(images, offsets, np.ones(16, bool))
    np.testing.assert_array_equal(mirrored, plain[:, :, ::-1])
    centred = data.random_crop_flip(images, np.full((16, 2), 4), np.zeros(16, bool))
    np.testing.assert_array_equal(centred, images)


def test_normalisation_with_training_statistics_gives_zero_mean_unit_std():
    ds = toy_dataset(n=200, size=8)
    ds.images[..., 1] //= 3                         # channels with different statistics
    mean, std = data.channel_mean_std(ds.images)
    pixels = ds.images.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(std, pixels.std(axis=0), rtol=1e-6)
    loader = data.DataLoader(ds, 64, mean=mean, std=std)
    x = np.concatenate([x for x, _ in collect(loader, 0)])
    assert x.dtype == np.float32 and x.shape == (200, 3, 8, 8)
    np.testing.assert_allclose(x.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(0, 2, 3)), 1, rtol=1e-5)
    expected = (ds.images.transpose(0, 3, 1, 2) / 255 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


def test_subset_is_fixed_and_spread_over_the_data():
    ds = data.ImageDataset(np.zeros((1000, 2, 2, 3), np.uint8), np.repeat(np.arange(10), 100),
                           [str(i) for i in range(10)])
    a, b = ds.subset(200), ds.subset(200)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert len(a) == 200 and np.bincount(a.labels, minlength=10).min() > 5


# ---------------------------------------------------------------------------
# Choosing a source
# ---------------------------------------------------------------------------
def test_no_source_and_no_network_falls_back_to_digits(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.delenv("MINIDENSE_CIFAR10", raising=False)
    monkeypatch.setattr(datasets.urllib.request, "urlopen",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    said = []
    train, test = data.open_datasets(None, log=said.append)
    assert train.source == "digits" and test.name == "digits/test"
    assert "offline demo" in said[-1] and "unavailable" in said[0]
    with pytest.raises(data.DataUnavailableError, match="--data PATH"):
        data.open_datasets("cifar10")


def test_environment_names_the_cifar10_zip(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDENSE_CIFAR10", str(tmp_path / "absent.zip"))
    with pytest.raises(data.DataUnavailableError, match="MINIDENSE_CIFAR10=.*absent.zip"):
        data.open_datasets(None, log=lambda *a: None)
    tree = tmp_path / "tree"
    write_image_tree(tree)
    archive = zip_tree(tree, tmp_path / "mine.zip")
    monkeypatch.setenv("MINIDENSE_CIFAR10", str(archive))
    assert data.cifar10_from_environment() == archive
    train, _ = data.open_datasets(None, log=lambda *a: None)
    assert train.classes == sorted(CLASSES) and train.source == str(archive.resolve())

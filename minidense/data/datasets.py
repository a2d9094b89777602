"""Image classification data sets as in-memory arrays: CIFAR-10, image folders, digits.

Every data set here is an ``ImageDataset``: ``images`` (uint8, N x H x W x 3, NHWC as
decoded), ``labels`` (int64, N) and ``classes`` (names, in label order).  Decoding
happens once; the arrays are cached as .npy files in the cache folder
(``$MINIDENSE_DATA``, or ``~/.cache/minidense``), keyed by the source file's path,
size and modification time, so a second run starts in seconds.  Nothing is ever
unpickled: the CIFAR-10 source is the *binary* release, and caches are read with
``allow_pickle=False``.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import io
import os
import tarfile
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..files import atomic_write

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGES_PER_WORKER = 2000   # fewer images than this per process are not worth a process


def imagenet_classes():
    """The 1,000 ImageNet (ILSVRC-2012) class names in label order, as torchvision lists
    them, for reading the output of pretrained weights (minidense/data/imagenet_classes.txt)."""
    text = importlib.resources.files(__package__).joinpath("imagenet_classes.txt").read_text("utf-8")
    return tuple(text.splitlines())


class DataError(Exception):
    """The data cannot be used (missing, unreadable or malformed); the message names the
    path and says what is wrong.  The training command reports it in one line."""


class DataUnavailableError(DataError, RuntimeError):
    """The data set is neither on disk nor downloadable; the message says what to do."""


# ---------------------------------------------------------------------------
# The data set container
# ---------------------------------------------------------------------------
class ImageDataset:
    """Images (uint8 NHWC), labels (int64) and class names, all in memory."""

    def __init__(self, images, labels, classes, name="images", source=None):
        images, labels = np.asarray(images), np.asarray(labels)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"ImageDataset: images must be uint8 of shape (N, H, W, C), "
                             f"got {images.dtype} {images.shape}")
        if labels.shape != (len(images),):
            raise ValueError(f"ImageDataset: labels must have shape ({len(images)},), "
                             f"got {labels.shape}")
        self.images, self.labels = images, labels.astype(np.int64, copy=False)
        self.classes, self.name = list(classes), name
        self.source = source   # what ``open_datasets`` needs to open it again

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, size: int, seed: int = 0) -> "ImageDataset":
        """``size`` images drawn without replacement by a fixed generator (the same for
        every training seed), kept in their original order.  The sources list images
        class by class, so the first ``size`` would not do."""
        if size >= len(self):
            return self
        keep = np.sort(np.random.default_rng(seed).permutation(len(self))[:size])
        return ImageDataset(self.images[keep], self.labels[keep], self.classes,
                            f"{self.name}[{size}]", self.source)

    def __repr__(self):
        return (f"ImageDataset({self.name}: {len(self)} images of {self.images.shape[1:]}, "
                f"{self.num_classes} classes)")


def channel_mean_std(images):
    """Per-channel mean and standard deviation of uint8 NHWC images, scaled to [0, 1]
    (the normalisation statistics of a training set).  Computed exactly from each
    channel's histogram of the 256 levels."""
    levels = np.arange(256, dtype=np.float64)
    counts = np.stack([np.bincount(images[..., c].ravel(), minlength=256)
                       for c in range(images.shape[-1])]).astype(np.float64)
    total = counts.sum(axis=1)
    mean = counts @ levels / total
    var = counts @ (levels * levels) / total - mean * mean
    return (mean / 255.0).astype(np.float32), (np.sqrt(np.maximum(var, 0.0)) / 255.0).astype(np.float32)


# ---------------------------------------------------------------------------
# The cache folder
# ---------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$MINIDENSE_DATA``, or ``~/.cache/minidense``; created on first use."""
    root = Path(os.environ.get("MINIDENSE_DATA") or Path.home() / ".cache" / "minidense")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _source_key(path: Path, *extra) -> str:
    """A short key that changes when the source changes: the path, size and mtime of
    the file, or of every file under a folder."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    text = "|".join([str(path.resolve()), *map(str, extra)])
    for f in files:
        stat = f.stat()
        text += f"|{f.relative_to(path) if path.is_dir() else ''}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _save_npy_atomic(path: Path, array) -> None:
    with atomic_write(path) as f:
        np.save(f, array, allow_pickle=False)


def _cached_decode(source: Path, split: str, decode, name: str, cache=None,
                   opened_as=None) -> ImageDataset:
    """Load (images, labels, classes) decoded from ``source`` from the cache, or run
    ``decode()`` and cache its result.  Each file is written atomically, images last,
    so an interrupted first run leaves no half-written cache behind."""
    folder = Path(cache) if cache is not None else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{name}-{_source_key(source, split)}-{split}"
    files = {part: Path(f"{stem}-{part}.npy") for part in ("labels", "classes", "images")}
    if all(f.is_file() for f in files.values()):
        try:
            arrays = {part: np.load(f, allow_pickle=False) for part, f in files.items()}
            return ImageDataset(arrays["images"], arrays["labels"], arrays["classes"].tolist(),
                                f"{name}/{split}", opened_as)
        except (ValueError, OSError):
            pass  # a damaged cache: decode again
    images, labels, classes = decode()
    _save_npy_atomic(files["labels"], labels)
    _save_npy_atomic(files["classes"], np.array(classes, dtype=str))
    _save_npy_atomic(files["images"], images)
    return ImageDataset(images, labels, classes, f"{name}/{split}", opened_as)


# ---------------------------------------------------------------------------
# CIFAR-10, official binary release
# ---------------------------------------------------------------------------
def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _where_to_put_it(path: Path) -> str:
    return (f"download {CIFAR10_URL} (md5 {CIFAR10_MD5}) by hand and put it at {path} "
            f"(set MINIDENSE_DATA to use another folder), or pass --data PATH with a folder or "
            f".zip of train/<class>/*.png|jpg and test/<class>/* images")


def download_cifar10(path: Path, url: str = CIFAR10_URL, timeout: float = 30.0) -> Path:
    """Download the binary release to ``path``, checking its md5 on the way; the file
    appears under its name only when complete and correct."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.md5()
    with atomic_write(path) as out:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                for block in iter(lambda: response.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
        except (urllib.error.URLError, OSError) as error:
            raise DataUnavailableError(
                f"CIFAR-10 is not in the cache and could not be downloaded from {url} "
                f"({error}); {_where_to_put_it(path)}") from error
        if digest.hexdigest() != CIFAR10_MD5:
            raise DataUnavailableError(
                f"the CIFAR-10 download from {url} has md5 {digest.hexdigest()}, expected "
                f"{CIFAR10_MD5} (a truncated or altered file); {_where_to_put_it(path)}")
    return path


def parse_cifar10_binary(archive: Path, train: bool):
    """Records of the binary release: 1 label byte, then 3072 pixel bytes (1024 red,
    1024 green, 1024 blue, each row by row), read as raw bytes.  Returns uint8 NHWC
    images, int64 labels and the class names."""
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if train else ["test_batch.bin"]
    chunks = {}
    classes = list(CIFAR10_CLASSES)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            base = os.path.basename(member.name)
            if base in names:
                chunks[base] = tar.extractfile(member).read()
            elif base == "batches.meta.txt":
                listed = tar.extractfile(member).read().decode().split()
                classes = listed or classes
    missing = [n for n in names if n not in chunks]
    if missing:
        raise DataUnavailableError(f"{archive} is not the CIFAR-10 binary release: "
                                   f"{', '.join(missing)} missing")
    records = np.frombuffer(b"".join(chunks[n] for n in names), dtype=np.uint8)
    if records.size % 3073:
        raise DataUnavailableError(f"{archive}: {records.size} bytes is not a whole number of "
                                   f"3073-byte records (a truncated archive?)")
    records = records.reshape(-1, 3073)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), records[:, 0].astype(np.int64), classes


def CIFAR10(root=None, train: bool = True, download: bool = True) -> ImageDataset:
    """CIFAR-10 (Krizhevsky, 2009) from the official binary release.

    ``root``: the folder holding ``cifar-10-binary.tar.gz`` (default: the cache folder,
    ``$MINIDENSE_DATA`` or ``~/.cache/minidense``).  When the archive is absent it is
    downloaded (``download=True``) and its md5 checked; offline, or on a bad checksum,
    ``DataUnavailableError`` says where to put the file.
    """
    folder = Path(root) if root is not None else cache_dir()
    archive = folder / CIFAR10_ARCHIVE
    if not archive.is_file():
        if not download:
            raise DataUnavailableError(f"CIFAR-10 is not at {archive}; {_where_to_put_it(archive)}")
        download_cifar10(archive)

    def decode():
        digest = _md5(archive)
        if digest != CIFAR10_MD5:
            raise DataUnavailableError(f"{archive} has md5 {digest}, expected {CIFAR10_MD5} "
                                       f"(a truncated or altered file): delete it and "
                                       f"{_where_to_put_it(archive)}")
        return parse_cifar10_binary(archive, train)

    return _cached_decode(archive, "train" if train else "test", decode, "cifar10", folder, "cifar10")


# ---------------------------------------------------------------------------
# Image folders: train/<class>/*, test/<class>/*, from a directory or a .zip
# ---------------------------------------------------------------------------
def _list_images(path: Path, split: str):
    """Sorted (member path, class name) pairs under ``split/<class>/``."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    elif path.is_dir():
        names = [p.relative_to(path).as_posix() for p in (path / split).rglob("*") if p.is_file()]
    else:
        raise DataError(f"ImageFolder: {path} is neither a folder nor a .zip file")
    # A zip made from a folder holds <folder>/train/...: look inside that one folder.
    tops = {name.split("/")[0] for name in names}
    skip = 1 if len(tops) == 1 and not tops & {"train", "test"} else 0
    found = []
    for name in names:
        parts = name.split("/")[skip:]
        if len(parts) == 3 and parts[0] == split and parts[2].lower().endswith(IMAGE_SUFFIXES):
            found.append((name, parts[1]))
    return sorted(found)


def _class_names(path: Path):
    """The class folders of both splits, sorted, so train and test share one labelling."""
    return sorted({cls for split in ("train", "test") for _, cls in _list_images(path, split)})


def _decode_images(path: str, members):
    """Decode image files (members of a zip, or files under a folder) to uint8 RGB."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as error:
        raise DataUnavailableError("ImageFolder: decoding images needs Pillow: pip install "
                                   "Pillow (or 'minidense[train]')") from error

    archive = zipfile.ZipFile(path) if zipfile.is_zipfile(path) else None
    try:
        images = []
        for member in members:
            raw = archive.read(member) if archive else (Path(path) / member).read_bytes()
            try:
                with Image.open(io.BytesIO(raw)) as image:
                    images.append(np.asarray(image.convert("RGB")))
            except (UnidentifiedImageError, OSError, ValueError) as error:
                raise DataError(f"ImageFolder: {path}: {member} is not a readable image "
                                f"({type(error).__name__}: {error})") from None
    finally:
        if archive:
            archive.close()
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(f"ImageFolder: images of different sizes in {path}: {sorted(shapes)[:4]}; "
                        f"resize them to one size first")
    return np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8)


def ImageFolder(path, train: bool = True, workers: int | None = None, cache=None) -> ImageDataset:
    """Images in ``train/<class>/*`` and ``test/<class>/*`` (PNG or JPEG), from a folder
    or straight from a .zip; labels follow the sorted class names.

    The first call decodes every image of the split with Pillow, in ``workers``
    processes (default: every CPU core) and caches the arrays; later calls load the
    cache.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"ImageFolder: {path} does not exist")
    split = "train" if train else "test"

    def decode():
        entries = _list_images(path, split)
        if not entries:
            raise DataError(f"ImageFolder: no {split}/<class>/*.png|jpg images in {path}")
        classes = _class_names(path)
        absent = sorted(set(classes) - {cls for _, cls in entries})
        if absent:
            raise DataError(f"ImageFolder: {path}: {split}/ has no images of the class(es) "
                            f"{', '.join(absent)}, which the other split has; every class "
                            f"needs images in both train/ and test/")
        labels = np.array([classes.index(cls) for _, cls in entries], dtype=np.int64)
        members = [name for name, _ in entries]
        n_workers = min(workers or os.cpu_count() or 1, max(1, len(members) // IMAGES_PER_WORKER))
        if n_workers <= 1:
            images = _decode_images(str(path), members)
        else:
            chunks = np.array_split(np.arange(len(members)), n_workers * 4)
            with ProcessPoolExecutor(n_workers) as pool:
                parts = pool.map(_decode_images, [str(path)] * len(chunks),
                                 [[members[i] for i in c] for c in chunks])
                images = np.concatenate(list(parts))
        return images, labels, classes

    return _cached_decode(path, split, decode, "imagefolder-" + path.stem, cache,
                          str(path.resolve()))


# ---------------------------------------------------------------------------
# The offline demo: scikit-learn's handwritten digits, upsampled to 32x32 RGB
# ---------------------------------------------------------------------------
def Digits(train: bool = True, size: int = 32) -> ImageDataset:
    """The 1,797 8x8 handwritten digits that ship with scikit-learn (16 grey levels),
    upsampled by pixel repetition to ``size`` x ``size`` with 3 equal channels, so the
    CIFAR models run on them unchanged.  The test set is every fifth image of each
    digit (a fixed split, 20% of every class)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise DataUnavailableError("the offline digits demo needs scikit-learn: "
                                   "pip install scikit-learn (or 'minidense[train]')") from error
    digits = load_digits()
    grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)   # (N, 8, 8), 0..255
    scale = size // 8
    big = grey.repeat(scale, axis=1).repeat(scale, axis=2)
    images = np.ascontiguousarray(np.repeat(big[..., None], 3, axis=3))
    in_test = np.zeros(len(images), dtype=bool)
    for digit in range(10):
        in_test[np.flatnonzero(digits.target == digit)[4::5]] = True
    keep = in_test if not train else ~in_test
    return ImageDataset(images[keep], digits.target[keep], [str(d) for d in range(10)],
                        "digits/" + ("train" if train else "test"), "digits")


# ---------------------------------------------------------------------------
# Choosing a source by name: what the training command's --data means
# ---------------------------------------------------------------------------
def cifar10_from_environment():
    """The CIFAR-10 image zip or folder that ``$MINIDENSE_CIFAR10`` names, or None when
    the variable is unset.  A name that does not exist is an error, not a silent fall-back."""
    value = os.environ.get("MINIDENSE_CIFAR10")
    if not value:
        return None
    path = Path(value)
    if not path.exists():
        raise DataUnavailableError(f"MINIDENSE_CIFAR10={value}: no such file or folder "
                                   f"(unset it, or point it at a CIFAR-10 image zip or folder)")
    return path


def open_datasets(source=None, log=print, workers=None):
    """(train set, test set) for ``source``: "cifar10" (the binary release: cached, or
    downloaded, or a clear error), "digits" (the offline demo), or the path of an image
    folder or .zip.  With no source: the zip or folder named by ``$MINIDENSE_CIFAR10``,
    else CIFAR-10 from the cache or the network, else, saying so, the digits demo."""
    if source == "cifar10":
        return CIFAR10(train=True), CIFAR10(train=False)
    if source == "digits":
        return Digits(train=True), Digits(train=False)
    if source is not None:
        return ImageFolder(source, True, workers), ImageFolder(source, False, workers)
    named = cifar10_from_environment()
    if named is not None:
        log(f"data: CIFAR-10 from {named} ($MINIDENSE_CIFAR10)")
        return ImageFolder(named, True, workers), ImageFolder(named, False, workers)
    try:
        return CIFAR10(train=True), CIFAR10(train=False)
    except DataUnavailableError as error:
        log(f"data: CIFAR-10 is unavailable ({error}).\n"
            f"data: running the offline demo instead: scikit-learn's 8x8 handwritten digits, "
            f"upsampled to 32x32, on the same model code.")
        return Digits(train=True), Digits(train=False)

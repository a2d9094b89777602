"""Batches for training and testing: shuffling, augmentation, normalisation, prefetching.

Everything random about an epoch (the order of the images, every crop offset and
every flip) is drawn at the start of the epoch from a generator seeded with
``(seed, epoch)`` alone, so epoch 7 is the same whether or not the run was stopped
and resumed in between, and a run can restart from any batch of an epoch.

Augmentation works on a whole batch at once with the array module of the target
device: the uint8 batch is copied to the device once, zero-padded, and cropped and
mirrored with one fancy-indexing gather; normalisation then makes float32 NCHW.
A background thread prepares the next batch while the current one trains (on the
GPU, only the host part of it: see ``DataLoader.iterate``).
"""
from __future__ import annotations

import queue
import threading

import numpy as np

from .. import backend
from ..autograd import Tensor


def augmentation_parameters(rng, count: int, pad: int):
    """Crop offsets (count, 2) in [0, 2*pad] and horizontal flips (count,), drawn from
    ``rng``: the standard CIFAR augmentation of He et al. (2016)."""
    offsets = rng.integers(0, 2 * pad + 1, size=(count, 2))
    flips = rng.random(count) < 0.5
    return offsets, flips


def random_crop_flip(images, offsets, flips, pad: int = 4):
    """Zero-pad uint8 NHWC ``images`` by ``pad`` pixels on every side, crop each back to
    its original size at ``offsets[i] = (top, left)`` of the padded image, and mirror
    left-right where ``flips[i]``.  One gather for the whole batch; runs on the device
    of ``images`` (offsets and flips may be host arrays)."""
    xp = backend.get_array_module(images)
    n, h, w, c = images.shape
    padded = xp.zeros((n, h + 2 * pad, w + 2 * pad, c), dtype=images.dtype)
    padded[:, pad:pad + h, pad:pad + w] = images
    offsets, flips = xp.asarray(offsets), xp.asarray(flips)
    rows = offsets[:, :1] + xp.arange(h)                      # (n, h)
    cols = offsets[:, 1:] + xp.arange(w)                      # (n, w)
    cols = xp.where(flips[:, None], cols[:, ::-1], cols)      # a flip reads columns backwards
    return padded[xp.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def normalization_constants(mean, std, xp=np, dtype=np.float32):
    """Per-channel ``(scale, shift)``, shaped (C, 1, 1), made with ``xp`` in ``dtype``,
    such that ``x * scale + shift == (x / 255 - mean) / std`` for pixel values x."""
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    scale = xp.asarray(1.0 / (255.0 * std), dtype=dtype).reshape(-1, 1, 1)
    shift = xp.asarray(-mean / std, dtype=dtype).reshape(-1, 1, 1)
    return scale, shift


def normalize(images, scale, shift, dtype=np.float32):
    """uint8 NHWC -> ``dtype`` NCHW, ``x * scale + shift`` per channel, with ``(scale,
    shift) = normalization_constants(mean, std)`` on the device of ``images`` (the loader
    makes them once rather than copying them to the device every batch)."""
    xp = backend.get_array_module(images)
    out = xp.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(dtype)
    out *= scale
    out += shift
    return out



# The batch augmentation: one thread per element of the float NCHW batch, reading the
# uint8 NHWC images: the 4-pixel zero-padded crop at the batch's offsets (in padded
# coordinates), the horizontal flip, the transpose and x * scale + shift per channel,
# in one pass (NumPy's path: data/loader.py random_crop_flip and normalize).
_AUGMENT_BODY = """
    int x = i % W;
    int t = i / W;
    int y = t % H; t /= H;
    int c = t % C;
    int n = t / C;
    int top = AUGMENT ? (int)offsets[2 * n] : PAD;
    int left = AUGMENT ? (int)offsets[2 * n + 1] : PAD;
    int col = (AUGMENT && flips[n]) ? W - 1 - x : x;
    int yy = y + top - PAD, xx = col + left - PAD;
    T v = (0 <= yy && yy < H && 0 <= xx && xx < W) ? (T)images[((n * H + yy) * W + xx) * C + c] : (T)0;
    out = v * scale[c] + shift[c];
"""

backend.register_cuda_kernel(
    "augment", "elementwise", "raw uint8 images, raw int64 offsets, raw bool flips, raw T scale, "
    "raw T shift, int32 H, int32 W, int32 C, int32 PAD, bool AUGMENT", "T out", _AUGMENT_BODY,
    scalars=("H", "W", "C", "PAD", "AUGMENT"), where=__name__)


class _Failure:
    def __init__(self, error):
        self.error = error


_END = object()


class DataLoader:
    """Batches of (images, labels) Tensors on ``device`` from an ``ImageDataset``.

    ``shuffle``: a new order every epoch; ``augment``: random ``pad``-pixel crops and
    horizontal flips; ``mean``/``std``: per-channel normalisation (use the training
    set's, from ``channel_mean_std``; default none, i.e. x / 255); ``drop_last``: skip
    the final short batch; ``prefetch``: how many batches the background thread may
    prepare ahead (0: no thread).

    ``iter(loader)`` gives epoch ``loader.epoch`` and then moves to the next epoch;
    ``loader.iterate(epoch, start)`` gives any epoch from any batch.

    ``shard=(rank, size)``: data-parallel training.  ``batch_size`` is then the global
    batch, and this loader gives rank ``rank``'s part of each one (of the same order,
    crops and flips as a single process), so N ranks together see exactly what one
    process sees; a part may be empty at the end of an epoch without ``drop_last``.
    """

    def __init__(self, dataset, batch_size: int, shuffle: bool = False, drop_last: bool = False,
                 augment: bool = False, pad: int = 4, mean=None, std=None, device: str = "cpu",
                 seed: int = 0, prefetch: int = 2, dtype=np.float32, shard=None):
        if batch_size < 1:
            raise ValueError(f"DataLoader: batch_size must be at least 1, got {batch_size}")
        if drop_last and len(dataset) < batch_size:
            raise ValueError(f"DataLoader: drop_last with batch_size {batch_size} leaves no batch "
                             f"of a data set of {len(dataset)} images")
        classes = getattr(dataset, "classes", None)
        if classes is not None and len(dataset) and not (
                0 <= dataset.labels.min() and dataset.labels.max() < len(classes)):
            # Checked once here, on the host, so that cross_entropy on the GPU need not
            # sync to check every batch's labels.
            raise ValueError(f"DataLoader: labels must be in [0, {len(classes)}) for the "
                             f"{len(classes)} classes of {getattr(dataset, 'name', 'the data set')}, "
                             f"got {dataset.labels.min()}..{dataset.labels.max()}")
        channels = dataset.images.shape[-1]
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.drop_last, self.augment, self.pad = shuffle, drop_last, augment, pad
        self.mean = np.zeros(channels) if mean is None else np.asarray(mean, dtype=np.float64)
        self.std = np.ones(channels) if std is None else np.asarray(std, dtype=np.float64)
        self.device = backend.check_device(device)
        self.seed, self.prefetch, self.dtype = seed, prefetch, dtype
        if shard is not None and not (0 <= shard[0] < shard[1]):
            raise ValueError(f"DataLoader: shard must be (rank, size) with 0 <= rank < size, "
                             f"got {shard}")
        self.shard = shard
        self.xp = backend.array_module(self.device)
        self.normalization = normalization_constants(self.mean, self.std, self.xp, dtype)
        self.epoch = 0

    def __len__(self):
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def plan(self, epoch: int):
        """The epoch's image order (host), and its labels, crop offsets and flips in
        that order, from (seed, epoch) alone.  Labels, offsets and flips go to the
        device here, once per epoch, so that a batch copies only its images."""
        n = len(self.dataset)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        labels = self.xp.asarray(self.dataset.labels[order])
        offsets = flips = None
        if self.augment:
            offsets, flips = map(self.xp.asarray, augmentation_parameters(rng, n, self.pad))
        return order, labels, offsets, flips

    def batch_slice(self, index: int) -> slice:
        """Where batch ``index`` (this shard's part of it) lies in an epoch's order."""
        start = index * self.batch_size
        stop = min(start + self.batch_size, len(self.dataset))
        if self.shard is not None:
            rank, size = self.shard
            start, stop = (start + (stop - start) * rank // size,
                           start + (stop - start) * (rank + 1) // size)
        return slice(start, stop)

    def make_batch(self, plan, index: int):
        """Batch ``index`` of an epoch's ``plan``, as (images, labels) Tensors on the device."""
        return self._on_device(plan, index, self._gather(plan, index))

    def _gather(self, plan, index: int):
        """The host part of a batch: its uint8 images, gathered from the data set."""
        order = plan[0]
        return self.dataset.images[order[self.batch_slice(index)]]

    def _on_device(self, plan, index: int, images):
        """The device part: copy, augment, normalise."""
        _, labels, offsets, flips = plan
        picked = self.batch_slice(index)
        images = self.xp.asarray(images)   # the one copy per batch
        if backend.device_of(images) == "cuda":  # one fused kernel (_AUGMENT_BODY)
            xp = self.xp
            n, h, w, c = images.shape
            out = xp.empty((n, c, h, w), dtype=self.dtype)
            scale, shift = self.normalization
            if self.augment:
                offsets, flips = xp.ascontiguousarray(offsets[picked]), xp.ascontiguousarray(flips[picked])
            else:  # unread, but of the declared types
                offsets, flips = xp.zeros((1, 2), dtype=np.int64), xp.zeros(1, dtype=np.bool_)
            backend.cuda_kernel("augment")(xp.ascontiguousarray(images), offsets, flips, scale, shift,
                                           h, w, c, self.pad, self.augment, out)
            return Tensor(out), Tensor(labels[picked])
        if self.augment:
            images = random_crop_flip(images, offsets[picked], flips[picked], self.pad)
        images = normalize(images, *self.normalization, self.dtype)
        return Tensor(images), Tensor(labels[picked])

    def iterate(self, epoch: int, start: int = 0):
        """The batches of ``epoch``, from batch ``start`` on.

        With ``prefetch``, a background thread prepares batches ahead.  On the CPU it
        makes whole batches.  On the GPU it only gathers the images on the host, and
        the copy, augmentation and normalisation are queued from this (the training)
        thread: on the training thread's stream they are ordered before the step that
        reads them, and a batch's memory cannot be reused by another stream while the
        step still reads it (CuPy's pool hands a freed block back to the stream that
        allocated it), which a loader thread with its own stream (CuPy's per-thread
        default streams) would allow.  The device work is asynchronous anyway; the
        host work is what the thread overlaps."""
        plan = self.plan(epoch)
        indices = [i for i in range(start, len(self)) if self.shard is None or
                   self.batch_slice(i).stop > self.batch_slice(i).start]
        if self.prefetch <= 0:
            for index in indices:
                yield self.make_batch(plan, index)
            return
        on_host_only = self.device != "cpu"
        prepare = self._gather if on_host_only else self.make_batch
        ready = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item):
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for index in indices:
                    if not put((index, prepare(plan, index))):
                        return
                put(_END)
            except BaseException as error:  # hand it to the training thread
                put(_Failure(error))

        worker = threading.Thread(target=produce, name="minidense-loader", daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                index, batch = item
                yield self._on_device(plan, index, batch) if on_host_only else batch
        finally:
            stop.set()
            worker.join()

    def __iter__(self):
        epoch = self.epoch
        yield from self.iterate(epoch)
        self.epoch = epoch + 1

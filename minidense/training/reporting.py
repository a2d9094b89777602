"""Measuring and reporting a run: running sums, evaluation, the progress bar, the
metrics files and the plot."""
from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import minidense as md
from minidense import backend

# Metrics that depend only on the computation, not on the clock (compared by the resume test).
EXACT_METRICS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc")


class RunningSums:
    """Loss and correct-prediction sums kept on the device (no sync per step), in
    float64, read only when shown or saved."""

    def __init__(self, xp, loss_sum=0.0, correct=0, seen=0):
        self.xp = xp
        self.loss_sum = xp.asarray(loss_sum, dtype=xp.float64)
        self.correct = xp.asarray(correct, dtype=xp.int64)
        self.seen = int(seen)

    def add(self, loss, logits, labels):
        n = labels.shape[0]
        self.loss_sum = self.loss_sum + loss.data.astype(self.xp.float64) * n
        self.correct = self.correct + (logits.data.argmax(axis=1) == labels.data).sum()
        self.seen += n

    def values(self, comm=None):
        """(mean loss, accuracy in %, images); syncs with the device.  With ``comm``, of
        every rank's images together (every rank must call it)."""
        loss_sum, correct, seen = float(self.loss_sum), int(self.correct), self.seen
        if comm is not None:
            loss_sum, correct, seen = comm.sum_numbers(loss_sum, correct, seen)
            correct, seen = int(correct), int(seen)
        if seen == 0:
            return math.nan, math.nan, 0
        return loss_sum / seen, 100.0 * correct / seen, seen


def evaluate_model(model, loader, num_classes=None, comm=None):
    """Loss, accuracy (%) and, with ``num_classes``, the confusion matrix (rows: true
    class, columns: prediction) of ``model`` on ``loader``, in eval mode, no graph.
    With ``comm``, the sums of every rank's part of the test set (every rank calls it)."""
    model.eval()
    xp = backend.array_module(loader.device)
    sums = RunningSums(xp)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64) if num_classes else None
    with md.no_grad():
        for images, labels in loader.iterate(0):
            logits = model(images)
            sums.add(md.cross_entropy(logits, labels), logits, labels)
            if confusion is not None:
                predicted = backend.to_numpy(logits.data.argmax(axis=1))
                np.add.at(confusion, (labels.numpy(), predicted), 1)
    loss, accuracy, _ = sums.values(comm)
    if confusion is not None and comm is not None:
        confusion = comm.allreduce(confusion)
    return loss, accuracy, confusion


def peak_memory_mb() -> float:
    """Peak resident memory of this process (Linux reports kilobytes, macOS bytes);
    NaN where the ``resource`` module is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class EpochProgress:
    """A tqdm bar on a terminal (loss, accuracy, images/s, time left); plain lines
    every ~10% of the epoch otherwise (a log file, a pipe, no tqdm)."""

    def __init__(self, epoch, epochs, total, done):
        self.total, self.start_done, self.start_time = total, done, time.perf_counter()
        self.label = f"epoch {epoch + 1}/{epochs}"
        self.bar = None
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=done, desc=self.label, unit="batch",
                            dynamic_ncols=True, leave=False)
        self.next_line = done + max(1, total // 10)

    def update(self, done, stats, images_per_s):
        loss, acc, _ = stats
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f}, acc {acc:.1f}%, {images_per_s:.0f} img/s",
                                     refresh=False)
            self.bar.update(done - self.bar.n)
        elif done >= self.next_line or done == self.total:
            self.next_line = done + max(1, self.total // 10)
            elapsed = time.perf_counter() - self.start_time
            left = elapsed / max(done - self.start_done, 1) * (self.total - done)
            print(f"{self.label} [{done}/{self.total}] loss {loss:.3f}  acc {acc:.1f}%  "
                  f"{images_per_s:.0f} img/s  {format_duration(left)} left", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()

def write_atomic(path: Path, content: bytes) -> None:
    with md.files.atomic_write(path) as f:
        f.write(content)


def write_metrics(out: Path, history: list) -> None:
    """metrics.jsonl (one JSON object per epoch) and metrics.csv, rewritten whole and
    atomically after every epoch (so a resumed run's files match its checkpoint)."""
    def clean(value):
        return None if isinstance(value, float) and math.isnan(value) else value
    lines = "".join(json.dumps({k: clean(v) for k, v in row.items()}) + "\n" for row in history)
    write_atomic(out / "metrics.jsonl", lines.encode())
    table = io.StringIO()
    if history:
        writer = csv.DictWriter(table, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    write_atomic(out / "metrics.csv", table.getvalue().encode())


def read_metrics(path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(history: list, path: Path, title: str) -> None:
    """Loss and accuracy per epoch, training and test, in one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, acc_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for axes, metric, label in ((loss_axes, "loss", "cross-entropy loss"),
                                (acc_axes, "acc", "accuracy (%)")):
        for split, style in (("train", "-"), ("test", "-o")):
            values = [np.nan if row[f"{split}_{metric}"] is None else row[f"{split}_{metric}"]
                      for row in history]
            axes.plot(epochs, values, style, label=split, markersize=3)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    write_atomic(path, buffer.getvalue())

def summarize(history, out, settings, data_name, best_epoch, log) -> None:
    final = history[-1]
    tested = [row for row in history if row["test_acc"] is not None]
    best = max((row["test_acc"] for row in tested), default=math.nan)
    train_time = sum(row["train_time_s"] for row in history)
    images = sum(row["images_per_s"] * row["train_time_s"] for row in history)
    rate = images / train_time if train_time else math.nan
    total = final["elapsed_s"]
    summary = (f"{settings['model']} on {data_name}: best test accuracy {best:.2f}% "
               f"(epoch {best_epoch}), final {final['test_acc']:.2f}%; {len(history)} epochs in "
               f"{format_duration(total)}, {rate:.0f} images/s; peak memory "
               f"{final['peak_memory_mb']:.0f} MB")
    log(summary)
    if settings["plot"]:
        try:
            plot_curves(history, out / "curves.png", summary)
            log(f"curves: {out / 'curves.png'}")
        except ImportError:
            log("curves: matplotlib is not installed (pip install matplotlib), no plot written")
    log(f"metrics: {out / 'metrics.jsonl'}, {out / 'metrics.csv'}; checkpoints: "
        f"{out / 'last.npz'}, {out / 'best.npz'}")

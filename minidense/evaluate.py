"""Test a trained checkpoint: ``python -m minidense.evaluate --checkpoint runs/x/best.npz``.

Prints the test accuracy, the accuracy of every class and the confusion matrix
(rows: true class, columns: predicted class); ``--csv``/``--png`` also write the
matrix to files.  The model, its settings, the class names and the training set's
normalisation all come from the checkpoint; ``--data`` picks the test images
(default: the data the run was trained on).
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

from minidense import data, process
from minidense.training.recipes import SettingsError, build_model, choose_device
from minidense.training.reporting import evaluate_model, write_atomic
from minidense.training.trainer import read_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minidense-evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a last.npz or best.npz from minidense.train")
    p.add_argument("--data", help="cifar10, digits, or a folder or .zip of test/<class>/* images "
                                  "(default: the run's data)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--subset", type=int, help="test on this many images only (default: all)")
    p.add_argument("--csv", help="write the confusion matrix and per-class accuracy as CSV here")
    p.add_argument("--png", help="draw the confusion matrix into this PNG")
    return p


def format_report(accuracy, loss, confusion, classes) -> str:
    """Overall and per-class accuracy, and the confusion matrix, as text."""
    per_class = 100.0 * np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
    width = max(6, max(len(c) for c in classes))
    lines = [f"test accuracy {accuracy:.2f}% ({int(np.trace(confusion))}/{int(confusion.sum())}), "
             f"loss {loss:.4f}", "", "per-class accuracy:"]
    lines += [f"  {name:<{width}} {acc:6.2f}%  ({int(confusion[i].sum())} images)"
              for i, (name, acc) in enumerate(zip(classes, per_class))]
    short = [c[:5] for c in classes]
    lines += ["", "confusion matrix (rows: true class, columns: predicted):",
              " " * (width + 2) + "".join(f"{s:>6}" for s in short)]
    lines += [f"  {name:<{width}}" + "".join(f"{int(v):6d}" for v in row)
              for name, row in zip(classes, confusion)]
    return "\n".join(lines)


def confusion_csv(confusion, classes) -> str:
    per_class = 100.0 * np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
    rows = ["true\\predicted," + ",".join(classes) + ",accuracy_%"]
    rows += [f"{name}," + ",".join(str(int(v)) for v in row) + f",{acc:.4f}"
             for name, row, acc in zip(classes, confusion, per_class)]
    return "\n".join(rows) + "\n"


def plot_confusion(confusion, classes, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    figure, axes = plt.subplots(figsize=(7, 6))
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            axes.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                      color="white" if rates[i, j] > 0.5 else "black")
    figure.colorbar(image, ax=axes, label="fraction of the true class")
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    write_atomic(Path(path), buffer.getvalue())


def load_model(path):
    """(model, checkpoint) from a checkpoint of minidense.train, or ``SettingsError``
    saying why it cannot be used: missing, damaged, not a training checkpoint, or weights
    that do not fit the model and class count its settings name."""
    checkpoint = read_checkpoint(path, "--checkpoint", ("model", "settings", "classes",
                                                         "normalization"))
    settings, classes = checkpoint["settings"], list(checkpoint["classes"])
    try:
        model = build_model(settings, len(classes))
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise SettingsError(f"--checkpoint {path}: its weights do not fit "
                            f"{settings.get('model')!r} with {len(classes)} classes: "
                            f"{error}") from None
    return model, checkpoint


def evaluate_checkpoint(path, source=None, device="auto", batch_size=256, subset=0, log=print):
    """(accuracy %, loss, confusion matrix, class names) of a checkpoint on a test set."""
    model, checkpoint = load_model(path)
    settings = checkpoint["settings"]
    classes = list(checkpoint["classes"])
    device = choose_device(device)
    if source is None:
        source = settings.get("data_used") or settings.get("data")
    _, test_set = data.open_datasets(source, log=log)
    if test_set.classes != classes:
        raise SettingsError(f"--data: its classes {test_set.classes} differ from the "
                            f"checkpoint's {classes}")
    if subset:
        test_set = test_set.subset(subset)
    model.to(device)
    normalization = checkpoint["normalization"]
    loader = data.DataLoader(test_set, batch_size, mean=normalization["mean"],
                             std=normalization["std"], device=device)
    loss, accuracy, confusion = evaluate_model(model, loader, len(classes))
    return accuracy, loss, confusion, classes


def main(argv=None, program=False) -> int:
    """Exit statuses: 0 done, 2 a bad option, an unusable checkpoint or unusable data.
    ``program``: this process is the command itself, as in ``minidense.train.main``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        for option in ("batch_size", "subset"):
            value = getattr(args, option)
            if value is not None and value < 1:
                raise SettingsError(f"--{option.replace('_', '-')} must be at least 1, got {value}")
        if program:
            process.start_command()
        accuracy, loss, confusion, classes = evaluate_checkpoint(
            args.checkpoint, args.data, args.device, args.batch_size, args.subset or 0)
    except (SettingsError, data.DataError) as error:
        parser.error(str(error))   # the usage line, one error line, exit status 2
    print(format_report(accuracy, loss, confusion, classes))
    if args.csv:
        write_atomic(Path(args.csv), confusion_csv(confusion, classes).encode())
        print(f"confusion matrix: {args.csv}")
    if args.png:
        plot_confusion(confusion, classes, args.png,
                       f"{Path(args.checkpoint)}: test accuracy {accuracy:.2f}%")
        print(f"confusion matrix: {args.png}")
    return 0


def command():
    """``minidense-evaluate`` and ``python -m minidense.evaluate``."""
    sys.exit(main(program=True))


if __name__ == "__main__":
    command()

"""The training command: ``python -m minidense.train`` (also ``minidense-train``).

    python -m minidense.train                          # ResNet-20, CIFAR-10 (or the offline demo)
    python -m minidense.train --recipe densenet        # DenseNet-BC (L=100, k=12), the paper's recipe
    python -m minidense.train --model resnet56 --epochs 30 --schedule cosine --out runs/r56
    python -m minidense.train --resume --out runs/r56  # continue where it stopped

Each epoch shows a progress bar, then tests the model; the output folder gets
``metrics.jsonl``, ``metrics.csv``, ``last.npz`` and ``best.npz`` after every epoch
and ``curves.png`` at the end.

Exact resuming: the data order, every crop and flip (``md.data.DataLoader``) and the
dropout masks (``md.manual_seed`` before every step) are functions of (seed, epoch,
step) alone, and a checkpoint holds the model, the optimizer, the scheduler, the
position in the run and the running sums of the current epoch.  So a run that is
stopped (after an epoch, or by Ctrl-C in the middle of one) and resumed produces the
same numbers as one that never stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

import minidense as md
from minidense import backend, data, models, optim

# The papers' recipes.  Both drop the learning rate by 10 at 50% and 75% of training:
# DenseNet at epochs 150 and 225 of 300 (Huang et al., 2017, Sec. 4.2); ResNet at 32k and
# 48k of 64k iterations (He et al., 2016, Sec. 4.2), which is 164 epochs of 390 batches
# of 128 on the 50k training images.
RECIPES = {
    "densenet": dict(model="densenet_bc100_k12", epochs=300, batch_size=64, lr=0.1, momentum=0.9,
                     nesterov=True, wd=1e-4, schedule="multistep", milestones="0.5,0.75"),
    "resnet": dict(model="resnet20", epochs=164, batch_size=128, lr=0.1, momentum=0.9,
                   nesterov=False, wd=1e-4, schedule="multistep", milestones="0.5,0.75"),
}
# Without a recipe: a short cosine run of ResNet-20.
DEFAULTS = dict(model="resnet20", model_args="", epochs=30, batch_size=128, lr=0.1, momentum=0.9,
                nesterov=False, wd=1e-4, optimizer="sgd", schedule="cosine", milestones="0.5,0.75",
                gamma=0.1, warmup=0.0, device="auto", seed=0, subset=0, test_subset=0,
                augment=True, eval_every=1, workers=0, stop_after=0, plot=True)
DEMO_EPOCHS = 10  # the offline digits demo, when --epochs is not given (about 94% test accuracy)
CPU_EPOCHS = 5    # CIFAR-10 on a CPU, when --epochs is not given: ~75% in about half an hour on 2 cores

# Options that may change when resuming; any other must match the checkpoint.
RESUMABLE_CHANGES = {"out", "resume", "device", "stop_after", "plot", "workers", "eval_every", "data"}
# Metrics that depend only on the computation, not on the clock (compared by the resume test).
EXACT_METRICS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minidense-train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a DenseNet or ResNet from md.models on CIFAR-10 (or an image folder).",
        epilog="Recipes: " + "; ".join(f"{k}: " + ", ".join(f"{a}={v}" for a, v in r.items())
                                       for k, r in RECIPES.items()) +
               "\nWithout a recipe: " + ", ".join(f"{a}={DEFAULTS[a]}" for a in
                                                   ("model", "epochs", "batch_size", "lr", "schedule")))
    # Every default is None here, so that an explicit option can be told from a default:
    # explicit options beat the recipe, the recipe beats DEFAULTS.
    p.add_argument("--model", help=f"a name from md.models ({', '.join(models.list_models()[:4])}, "
                                   f"..., densenet_cifar, resnet_cifar); default resnet20")
    p.add_argument("--model-args", help="keyword arguments for the model, e.g. "
                                        "'depth=10,growth_rate=4,bottleneck=true,compression=0.5'")
    p.add_argument("--recipe", choices=sorted(RECIPES), help="the paper's training recipe")
    p.add_argument("--epochs", type=int, help="default 30 on a GPU, 5 on a CPU, 10 for the digits demo")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], help="default sgd")
    p.add_argument("--lr", type=float, help="peak learning rate (default 0.1)")
    p.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help="Nesterov momentum (the DenseNet recipe uses it)")
    p.add_argument("--wd", type=float, help="weight decay, added to the gradient (default 1e-4)")
    p.add_argument("--schedule", choices=["multistep", "cosine", "constant"],
                   help="learning-rate schedule, applied per iteration (default cosine)")
    p.add_argument("--milestones", help="multistep: fractions of the run where lr is multiplied "
                                        "by --gamma (default 0.5,0.75)")
    p.add_argument("--gamma", type=float, help="multistep factor (default 0.1)")
    p.add_argument("--warmup", type=float, help="epochs of linear warm-up before the schedule")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random 4-pixel-padded crops and flips (default on)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="auto: the GPU when CuPy sees one (default)")
    p.add_argument("--data", help="cifar10 (the official binary release), digits (the offline "
                                  "demo), or a folder or .zip of train/<class>/* and test/<class>/*; "
                                  "default: $MINIDENSE_CIFAR10 or ../shared/data/cifar10-jpeg.zip, "
                                  "else cifar10, else the digits demo")
    p.add_argument("--subset", type=int, help="train on this many images (a fixed random subset)")
    p.add_argument("--test-subset", type=int, help="test on this many images")
    p.add_argument("--seed", type=int, help="seeds the weights, data order, augmentation, dropout")
    p.add_argument("--out", help="output folder (default runs/<model>-<data>)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from OUT/last.npz (or from the checkpoint given)")
    p.add_argument("--eval-every", type=int, help="test every N epochs (and after the last)")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after N epochs of the run (resume it later with --resume)")
    p.add_argument("--workers", type=int, help="processes decoding images the first time "
                                               "(default: every core)")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=None,
                   help="write curves.png at the end (default on; --no-plot to skip)")
    return p


def resolve_args(args: argparse.Namespace) -> dict:
    """The run's settings: explicit options, then the recipe, then the defaults."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    settings = dict(DEFAULTS)
    settings.update(RECIPES.get(given.get("recipe"), {}))
    settings.update(given)
    settings.setdefault("recipe", None)
    settings.setdefault("data", None)
    settings.setdefault("out", None)
    settings["epochs_given"] = "epochs" in given or "recipe" in given
    return settings


def parse_model_args(text: str) -> dict:
    """'depth=10,growth_rate=4,bottleneck=true' -> {'depth': 10, 'growth_rate': 4, ...}."""
    kwargs = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        if "=" not in item:
            raise SystemExit(f"--model-args: expected key=value, got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        if value.lower() in ("true", "false"):
            kwargs[key] = value.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    kwargs[key] = kind(value)
                    break
                except ValueError:
                    continue
            else:
                kwargs[key] = value
    return kwargs


def build_model(settings: dict, num_classes: int):
    return models.get(settings["model"], num_classes=num_classes,
                      **parse_model_args(settings.get("model_args", "")))


def build_optimizer(settings: dict, parameters):
    kind, lr, wd = settings["optimizer"], settings["lr"], settings["wd"]
    if kind == "sgd":
        return optim.SGD(parameters, lr=lr, momentum=settings["momentum"], weight_decay=wd,
                         nesterov=bool(settings["nesterov"]))
    return (optim.Adam if kind == "adam" else optim.AdamW)(parameters, lr=lr, weight_decay=wd)


def build_scheduler(settings: dict, optimizer, steps_per_epoch: int):
    """The schedule in iterations: an optional linear warm-up, then the main schedule
    over the remaining iterations (multistep milestones stay at their fraction of the
    whole run)."""
    total = settings["epochs"] * steps_per_epoch
    warmup = min(int(round(settings["warmup"] * steps_per_epoch)), total - 1)
    if settings["schedule"] == "cosine":
        main = optim.CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1))
    elif settings["schedule"] == "multistep":
        fractions = [float(f) for f in str(settings["milestones"]).split(",") if f.strip()]
        main = optim.MultiStepLR(optimizer, [round(f * total) - warmup for f in fractions],
                                 gamma=settings["gamma"])
    else:
        main = optim.ConstantLR(optimizer)
    return optim.warmup_then(optimizer, main, warmup)


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------
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

    def values(self):
        """(mean loss, accuracy in %, images); syncs with the device."""
        if self.seen == 0:
            return math.nan, math.nan, 0
        return float(self.loss_sum) / self.seen, 100.0 * int(self.correct) / self.seen, self.seen


def evaluate_model(model, loader, num_classes=None):
    """Loss, accuracy (%) and, with ``num_classes``, the confusion matrix (rows: true
    class, columns: prediction) of ``model`` on ``loader``, in eval mode, no graph."""
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
    loss, accuracy, _ = sums.values()
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


# ---------------------------------------------------------------------------
# Files: checkpoints, metrics, the plot
# ---------------------------------------------------------------------------
def write_atomic(path: Path, content: bytes) -> None:
    with md.io.atomic_write(path) as f:
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


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------
class InterruptRequest:
    """Ctrl-C asks the run to stop after the current batch and save a checkpoint (a
    KeyboardInterrupt in the middle of an update would leave the weights half
    updated); a second Ctrl-C stops at once."""

    def __init__(self, log):
        self.requested, self.log, self.previous = False, log, None

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("\nCtrl-C: stopping after this batch and saving a checkpoint "
                 "(press Ctrl-C again to quit without saving)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def step_seed(seed: int, epoch: int, step: int) -> int:
    """The dropout seed of one training step, a function of (seed, epoch, step) only."""
    return int(np.random.SeedSequence([seed, epoch, step]).generate_state(1)[0])


def choose_device(name: str, log=print) -> str:
    if name == "auto":
        if md.cuda_available():
            return "cuda"
        if shutil.which("nvidia-smi"):
            log("note: this machine has an NVIDIA GPU but CuPy cannot use it, so training runs on "
                "the CPU; install the CuPy wheel for your CUDA version (nvidia-smi shows it): "
                "pip install cupy-cuda12x (CUDA 12) or cupy-cuda13x (CUDA 13)")
        return "cpu"
    return backend.check_device(name)


def default_out(settings: dict, data_name: str) -> Path:
    """runs/<model>-<data>, or with -2, -3, ... when that folder already holds a run."""
    base = Path("runs") / f"{settings['model']}-{data_name}"
    candidate, n = base, 1
    while (candidate / "last.npz").exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def data_name_of(dataset) -> str:
    return dataset.name.split("/")[0].replace("imagefolder-", "")


class TrainingRun:
    """One run: its data, model, optimizer, schedule and output folder, its history,
    and (after ``restore``) the point it continues from."""

    def __init__(self, settings: dict, log=print, normalization=None):
        self.settings = settings = dict(settings)
        self.log = log
        self.device = choose_device(settings["device"], log)
        train_set, test_set = data.open_datasets(settings["data"], log=log,
                                                 workers=settings["workers"] or None)
        settings["data_used"] = train_set.source
        if train_set.name.startswith("digits") and not settings["epochs_given"]:
            settings["epochs"] = DEMO_EPOCHS
        elif self.device == "cpu" and not settings["epochs_given"]:
            settings["epochs"] = CPU_EPOCHS
        if settings["subset"]:
            train_set = train_set.subset(settings["subset"])
        if settings["test_subset"]:
            test_set = test_set.subset(settings["test_subset"])
        self.train_set, self.test_set = train_set, test_set
        self.data_name = data_name_of(train_set)
        self.mean, self.std = normalization or data.channel_mean_std(train_set.images)

        self.seed = settings["seed"]
        md.manual_seed(self.seed)
        self.model = build_model(settings, train_set.num_classes).to(self.device)
        self.optimizer = build_optimizer(settings, self.model.parameters())
        self.train_loader = data.DataLoader(
            train_set, settings["batch_size"], shuffle=True, drop_last=True,
            augment=settings["augment"], mean=self.mean, std=self.std, device=self.device,
            seed=self.seed)
        self.test_loader = data.DataLoader(test_set, max(settings["batch_size"], 256),
                                           mean=self.mean, std=self.std, device=self.device)
        self.steps_per_epoch = len(self.train_loader)
        self.scheduler = build_scheduler(settings, self.optimizer, self.steps_per_epoch)
        self.epochs = settings["epochs"]
        self.out = Path(settings["out"]) if settings["out"] else default_out(settings, self.data_name)
        self.out.mkdir(parents=True, exist_ok=True)
        settings["out"] = str(self.out)

        self.history, self.best_acc, self.best_epoch = [], -1.0, 0
        # Where the run continues: epoch, batch, and the epoch's sums so far.
        self.start_epoch, self.start_step = 0, 0
        self.partial = dict(loss_sum=0.0, correct=0, seen=0, train_time=0.0)

    # -- checkpoints -----------------------------------------------------------
    def state(self, epoch, step, sums=None, train_time=0.0) -> dict:
        """Everything needed to continue from batch ``step`` of epoch ``epoch``."""
        loss_sum, correct, seen = ((float(sums.loss_sum), int(sums.correct), sums.seen)
                                   if sums is not None else (0.0, 0, 0))
        keys = list(self.history[0]) if self.history else []
        return {
            "model": dict(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            # The generators of the data order, augmentation and dropout are seeded
            # from (seed, epoch, step): the position is their whole state.
            "progress": {"epoch": epoch, "step": step, "seed": self.seed, "loss_sum": loss_sum,
                         "correct": correct, "seen": seen, "train_time": train_time},
            "best_acc": self.best_acc, "best_epoch": self.best_epoch,
            "history": {k: np.array([np.nan if row[k] is None else row[k] for row in self.history],
                                    dtype=np.float64) for k in keys},
            "normalization": {"mean": np.asarray(self.mean, np.float64),
                              "std": np.asarray(self.std, np.float64)},
            "settings": dict(self.settings),
            "classes": list(self.train_set.classes),
        }

    def restore(self, checkpoint: dict) -> None:
        if checkpoint["classes"] != self.train_set.classes:
            raise SystemExit(f"--resume: the checkpoint was trained on classes "
                             f"{checkpoint['classes']}, the data has {self.train_set.classes}")
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        progress = checkpoint["progress"]
        self.start_epoch, self.start_step = int(progress["epoch"]), int(progress["step"])
        self.partial = {k: progress[k] for k in ("loss_sum", "correct", "seen", "train_time")}
        self.best_acc, self.best_epoch = float(checkpoint["best_acc"]), int(checkpoint["best_epoch"])
        saved = checkpoint["history"]
        count = len(next(iter(saved.values()))) if saved else 0
        self.history = [{k: _history_value(k, saved[k][i]) for k in saved} for i in range(count)]
        write_metrics(self.out, self.history)
        self.log(f"resuming {self.out} at epoch {self.start_epoch + 1}, batch "
                 f"{self.start_step + 1} of {self.steps_per_epoch}")

    def save(self, state: dict, best: bool = False) -> None:
        md.save(state, self.out / "last.npz")
        if best:
            md.save(state, self.out / "best.npz")

    # -- training --------------------------------------------------------------
    def train_epoch(self, epoch, interrupt, on_step=None):
        """Train one epoch (from ``start_step`` when resuming into it).  Returns the
        running sums and the training time, or None when Ctrl-C stopped it (after
        saving a checkpoint)."""
        resumed = epoch == self.start_epoch and (self.start_step or self.partial["seen"])
        first_step = self.start_step if resumed else 0
        xp = backend.array_module(self.device)
        sums = RunningSums(xp, **{k: self.partial[k] for k in ("loss_sum", "correct", "seen")}) \
            if resumed else RunningSums(xp)
        time_before = float(self.partial["train_time"]) if resumed else 0.0
        model, optimizer, scheduler = self.model, self.optimizer, self.scheduler
        bar = EpochProgress(epoch, self.epochs, self.steps_per_epoch, first_step)
        model.train()
        start, last_shown, seen_here, step = time.perf_counter(), 0.0, 0, first_step
        with contextlib.closing(self.train_loader.iterate(epoch, first_step)) as batches:
            for images, labels in batches:
                md.manual_seed(step_seed(self.seed, epoch, step))   # dropout masks
                logits = model(images)
                loss = md.cross_entropy(logits, labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                sums.add(loss, logits, labels)
                del logits, loss
                step += 1
                seen_here += labels.shape[0]
                if on_step is not None:
                    on_step(epoch, step)
                now = time.perf_counter()
                if now - last_shown > 0.5 or step == self.steps_per_epoch:
                    last_shown = now
                    bar.update(step, sums.values(), seen_here / (now - start))
                if interrupt.requested and step < self.steps_per_epoch:
                    bar.close()
                    self.save(self.state(epoch, step, sums, time_before + now - start))
                    self.log(f"checkpoint saved: {self.out / 'last.npz'} (epoch {epoch + 1}, "
                             f"batch {step}); continue with: python -m minidense.train --resume "
                             f"--out {self.out}")
                    return None
        bar.close()
        return sums, time_before + time.perf_counter() - start

    def finish_epoch(self, epoch, sums, train_time) -> dict:
        """Test (when due), record the epoch's metrics, save the checkpoints and files."""
        train_loss, train_acc, seen = sums.values()
        test_loss = test_acc = None
        eval_start = time.perf_counter()
        if epoch + 1 == self.epochs or (epoch + 1) % self.settings["eval_every"] == 0:
            test_loss, test_acc, _ = evaluate_model(self.model, self.test_loader)
            if test_acc > self.best_acc:
                self.best_acc, self.best_epoch = test_acc, epoch + 1
        eval_time = time.perf_counter() - eval_start
        elapsed = (self.history[-1]["elapsed_s"] if self.history else 0.0) + train_time + eval_time
        row = {
            "epoch": epoch + 1, "step": (epoch + 1) * self.steps_per_epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": train_loss, "train_acc": train_acc,
            "test_loss": test_loss, "test_acc": test_acc, "best_acc": self.best_acc,
            "train_time_s": train_time, "eval_time_s": eval_time, "elapsed_s": elapsed,
            "images_per_s": seen / train_time, "peak_memory_mb": peak_memory_mb(),
        }
        self.history.append(row)
        self.save(self.state(epoch + 1, 0), best=self.best_epoch == epoch + 1)
        write_metrics(self.out, self.history)
        return row

    def run(self, on_step=None) -> dict:
        """Train from where the run stands to its last epoch, or until --stop-after or
        Ctrl-C.  Returns {"status": "done" | "stopped" | "interrupted", "history", "out"}."""
        s = self.settings
        self.log(f"model: {s['model']} ({self.model.num_parameters():,} parameters) on "
                 f"{self.device}; data: {self.train_set.name} ({len(self.train_set)} images) / "
                 f"{self.test_set.name} ({len(self.test_set)}); {self.epochs} epochs of "
                 f"{self.steps_per_epoch} batches of {s['batch_size']}; {s['optimizer']} lr "
                 f"{s['lr']} ({s['schedule']}"
                 f"{', warm-up %g epochs' % s['warmup'] if s['warmup'] else ''}), wd {s['wd']}; "
                 f"output: {self.out}")
        session_start = time.perf_counter()
        resume_hint = f"continue with: python -m minidense.train --resume --out {self.out}"
        with InterruptRequest(self.log) as interrupt:
            for epoch in range(self.start_epoch, self.epochs):
                trained = self.train_epoch(epoch, interrupt, on_step)
                if trained is None:
                    return self.result("interrupted")
                row = self.finish_epoch(epoch, *trained)
                left = ((time.perf_counter() - session_start) / (epoch + 1 - self.start_epoch)
                        * (self.epochs - epoch - 1))
                self.log(self.epoch_line(row) + (f", about {format_duration(left)} left"
                                                 if epoch + 1 < self.epochs else ""))
                if epoch + 1 == self.epochs:
                    break
                if interrupt.requested:
                    self.log(f"checkpoint saved: {self.out / 'last.npz'} (after epoch "
                             f"{epoch + 1}); {resume_hint}")
                    return self.result("interrupted")
                if s["stop_after"] and epoch + 1 >= s["stop_after"]:
                    self.log(f"stopped after epoch {epoch + 1} (--stop-after); {resume_hint}")
                    return self.result("stopped")
        summarize(self.history, self.out, s, self.data_name, self.best_epoch, self.log)
        return self.result("done")

    def epoch_line(self, row) -> str:
        tested = (f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.2f}% "
                  f"(best {self.best_acc:.2f}%)" if row["test_acc"] is not None else "not tested")
        return (f"epoch {row['epoch']}/{self.epochs}: train loss {row['train_loss']:.4f} acc "
                f"{row['train_acc']:.2f}% | {tested} | lr {row['lr']:.4g} | "
                f"{row['images_per_s']:.0f} img/s | "
                f"{format_duration(row['train_time_s'] + row['eval_time_s'])}")

    def result(self, status) -> dict:
        return {"status": status, "history": self.history, "out": self.out}


def train(settings: dict, checkpoint: dict | None = None, log=print, on_step=None) -> dict:
    """Train (or, with ``checkpoint``, resume) the run described by ``settings`` (see
    ``resolve_args``).  ``on_step(epoch, step)`` is called after every training step.
    Returns {"status": "done" | "stopped" | "interrupted", "history": [...], "out": Path}."""
    if checkpoint is None:
        return TrainingRun(settings, log).run(on_step)
    settings = dict(settings)
    if settings["data"] is None:
        settings["data"] = settings.get("data_used")   # the source the run started on
    normalization = checkpoint["normalization"]
    run = TrainingRun(dict(settings, epochs_given=True), log,
                      (np.asarray(normalization["mean"]), np.asarray(normalization["std"])))
    run.restore(checkpoint)
    return run.run(on_step)


def _history_value(key, value):
    """A history value read back from a checkpoint: epoch and step as ints, NaN as None
    ("not measured"), so resumed metrics files match uninterrupted ones."""
    value = float(value)
    if math.isnan(value):
        return None
    return int(value) if key in ("epoch", "step") else value


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




# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------
def find_checkpoint(resume, out, model) -> Path:
    """The checkpoint --resume means: the path given, OUT/last.npz, or the newest
    runs/<model>-*/last.npz."""
    if resume is not True:
        path = Path(resume)
    elif out:
        path = Path(out) / "last.npz"
    else:
        runs = sorted(Path("runs").glob(f"{model}-*/last.npz"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise SystemExit(f"--resume: no runs/{model}-*/last.npz here; pass --out DIR (the "
                             f"folder of the run) or the checkpoint's path")
        path = runs[-1]
    if not path.is_file():
        raise SystemExit(f"--resume: there is no checkpoint at {path}")
    return path


def resume_settings(saved: dict, given: dict, checkpoint_path: Path) -> dict:
    """The checkpoint's settings, with the options that may change taken from the
    command line; any other option given must agree with the checkpoint."""
    settings = dict(saved)
    conflicts = []
    for key, value in given.items():
        if key in RESUMABLE_CHANGES:
            settings[key] = value
        elif key in saved and saved[key] != value:
            conflicts.append(f"--{key.replace('_', '-')} {value} (the run has {saved[key]})")
    if conflicts:
        raise SystemExit("--resume: these options differ from the run being resumed: "
                         + ", ".join(conflicts) + "; start a new run (another --out) to change them")
    if "out" not in given:
        settings["out"] = str(checkpoint_path.parent)
    settings["stop_after"] = given.get("stop_after", 0)   # a stop point is for one session
    settings.pop("resume", None)
    return settings


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    checkpoint = None
    try:
        if args.resume:
            path = find_checkpoint(args.resume, args.out, args.model or DEFAULTS["model"])
            checkpoint = md.load(path)
            settings = resume_settings(checkpoint["settings"], given, path)
        else:
            settings = resolve_args(args)
        result = train(settings, checkpoint)
    except data.DataUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted without saving; last.npz holds the last completed epoch "
              "(or the last Ctrl-C save)", file=sys.stderr)
        return 130
    return 130 if result["status"] == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())

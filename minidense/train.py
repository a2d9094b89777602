"""The training command: ``python -m minidense.train`` (also ``minidense-train``).

    python -m minidense.train                          # ResNet-20, CIFAR-10 (or the offline demo)
    python -m minidense.train --recipe densenet        # DenseNet-BC (L=100, k=12), the paper's recipe
    python -m minidense.train --model resnet56 --epochs 30 --schedule cosine --out runs/r56
    python -m minidense.train --resume --out runs/r56  # continue where it stopped

Each epoch shows a progress bar, then tests the model; the output folder gets
``metrics.jsonl``, ``metrics.csv``, ``last.npz`` and ``best.npz`` after every epoch
and ``curves.png`` at the end.

The command line lives here: its options, their checks, and the resume settings.  The
run itself is in ``minidense.training``: ``recipes`` (the papers' settings and the
builders of model, optimizer and schedule), ``trainer`` (the loop, checkpoints, Ctrl-C)
and ``reporting`` (running sums, evaluation, progress, metrics files, plots).
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import traceback
from pathlib import Path

from minidense import data, distributed, models, process
from minidense.training.recipes import (DEFAULTS, RECIPES, SettingsError, check_model,
                                        choose_device, run_epochs)
from minidense.training.trainer import Diverged, read_checkpoint, train

# Exit statuses, the same for every way a run can end.
EXIT_OK, EXIT_DATA, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# Options that may change when resuming; any other must match the checkpoint.
RESUMABLE_CHANGES = {"out", "resume", "device", "stop_after", "plot", "workers", "eval_every", "data",
                     "profile"}


class CommandParser(argparse.ArgumentParser):
    """argparse's parser, but under an MPI launcher only rank 0 prints the error: every
    rank exits with status 2, before any communication."""

    def error(self, message):
        if distributed.is_main_process():
            self.print_usage(sys.stderr)
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
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
                                  "default: $MINIDENSE_CIFAR10, else cifar10, else the digits demo")
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
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="under mpiexec: batch-norm statistics over every rank's batch (default "
                        "off: each rank's own, averaged before every evaluation and save)")
    p.add_argument("--profile", type=int, metavar="N",
                   help="profile the first N training steps: OUT/profile.txt (time, calls and "
                        "memory kept per op) and OUT/profile-trace.json (for ui.perfetto.dev)")
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


# ---------------------------------------------------------------------------
# Checking the options, before any data is read
# ---------------------------------------------------------------------------
AT_LEAST_ONE = ("epochs", "batch_size", "subset", "test_subset", "eval_every", "stop_after",
                "workers", "profile")


def check_settings(settings: dict, given: dict) -> None:
    """Raise ``SettingsError`` for the first option that cannot work.  ``given``: the
    options on the command line (0 means "off" for --subset and friends only by default)."""
    for key in AT_LEAST_ONE:
        value = given.get(key, settings.get(key) if key in ("epochs", "batch_size", "eval_every")
                          else None)
        if value is not None and value < 1:
            raise SettingsError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    lr, momentum, wd = settings["lr"], settings["momentum"], settings["wd"]
    if not (math.isfinite(lr) and lr > 0):
        raise SettingsError(f"--lr must be a finite number above 0, got {lr}")
    if not (0 <= momentum < 1):
        raise SettingsError(f"--momentum must be in [0, 1), got {momentum}")
    if not (math.isfinite(wd) and wd >= 0):
        raise SettingsError(f"--wd must be a finite number of at least 0, got {wd}")
    # The epochs as far as the options tell (the trainer decides again once the data is
    # open: the digits demo has its own default).
    device = choose_device(settings["device"], log=lambda *args: None)
    warmup = settings["warmup"]
    epochs = run_epochs(settings, settings.get("data") == "digits", device)
    if not (math.isfinite(warmup) and 0 <= warmup < epochs):
        raise SettingsError(f"--warmup must be at least 0 and less than the {epochs} epochs of "
                            f"the run, got {warmup}")
    try:
        milestones = [float(f) for f in str(settings["milestones"]).split(",")]
    except ValueError:
        raise SettingsError(f"--milestones: expected fractions such as 0.5,0.75, got "
                            f"{settings['milestones']!r}") from None
    if not all(0 < f < 1 for f in milestones) or \
            any(a >= b for a, b in zip(milestones, milestones[1:])):
        raise SettingsError(f"--milestones must be increasing fractions of the run, each in "
                            f"(0, 1), got {settings['milestones']}")
    if not (0 < settings["gamma"] <= 1):
        raise SettingsError(f"--gamma must be in (0, 1], got {settings['gamma']}")
    launched = distributed.launcher_rank_and_size()
    ranks = launched[1] if launched else 1
    if settings["batch_size"] % ranks:
        raise SettingsError(f"--batch-size {settings['batch_size']} (the global batch) does not "
                            f"divide evenly over the {ranks} processes")
    if settings["subset"] and settings["subset"] < settings["batch_size"]:
        raise SettingsError(f"--subset {settings['subset']} is smaller than one batch "
                            f"(--batch-size {settings['batch_size']}): no training step")
    check_model(settings["model"], settings.get("model_args", ""))
    check_out(settings)


def check_out(settings: dict) -> None:
    """The output folder (or, by default, runs/) can be made and written: checked now,
    not when the first epoch ends."""
    folder = Path(settings["out"]) if settings["out"] else Path("runs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise SettingsError(f"--out {folder}: cannot write there ({error.strerror or error})") \
            from None


# ---------------------------------------------------------------------------
# Resuming
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
            raise SettingsError(f"--resume: no runs/{model}-*/last.npz here; pass --out DIR (the "
                                f"folder of the run) or the checkpoint's path")
        path = runs[-1]
    return path


def load_checkpoint(path: Path) -> dict:
    """The checkpoint --resume continues from, or ``SettingsError`` saying why it cannot."""
    return read_checkpoint(path, "--resume", ("model", "optimizer", "scheduler", "progress",
                                              "settings", "classes"))


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
        raise SettingsError("--resume: these options differ from the run being resumed: "
                            + ", ".join(conflicts) + "; start a new run (another --out) to "
                                                     "change them")
    if "out" not in given:
        settings["out"] = str(checkpoint_path.parent)
    settings["stop_after"] = given.get("stop_after", 0)   # a stop point is for one session
    settings["profile"] = given.get("profile", 0)         # and so is a profile
    settings.pop("resume", None)
    return settings


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------
def main(argv=None, program=False) -> int:
    """Exit statuses: 0 done, 1 a data error, 2 a bad option or an unusable checkpoint,
    3 a diverged run (nothing non-finite is saved), 130 Ctrl-C.  Under mpiexec, every
    option is checked before MPI starts, and rank 0 alone reports; a failure of one rank
    after that aborts the whole job, so that no rank waits forever for another.

    ``program``: this process is the command itself (``command``), so once the options
    are checked it takes the command's process-wide settings (``process.start_command``:
    it may re-execute the command).  Called in-process, as by the tests, it leaves the
    process as it is."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    checkpoint, comm = None, None

    def fail(status, message, every_rank_knows=False):
        """Report and exit.  Before MPI starts, rank 0 alone reports (every rank fails
        alike).  After it, an error one rank may have alone is reported by that rank
        and aborts the job, so that no other rank waits for it forever."""
        several = comm is not None and comm.size > 1
        if comm is None and distributed.is_main_process():
            print(f"{parser.prog}: {message}", file=sys.stderr)
        elif comm is not None and (comm.is_main or not every_rank_knows):
            prefix = f"rank {comm.rank}: " if several else ""
            print(f"{parser.prog}: {prefix}{message}", file=sys.stderr)
        if several and not every_rank_knows:
            comm.abort(status)
        return status

    try:
        if args.resume:
            path = find_checkpoint(args.resume, args.out, args.model or DEFAULTS["model"])
            checkpoint = load_checkpoint(path)
            settings = resume_settings(checkpoint["settings"], given, path)
            check_settings(dict(settings, **{"epochs_given": True}), given)
        else:
            settings = resolve_args(args)
            check_settings(settings, given)
        if program:
            process.start_command()
        comm = distributed.init()
        result = train(settings, checkpoint, comm=comm)
    except distributed.DistributedError as error:
        return fail(EXIT_USAGE, f"error: {error}")
    except SettingsError as error:
        if comm is None or comm.size == 1:
            parser.error(str(error))   # the usage line, one error line, exit status 2
        return fail(EXIT_USAGE, f"error: {error}")
    except data.DataError as error:
        return fail(EXIT_DATA, f"data error: {error}")
    except Diverged as error:
        # Every rank found it at the same step (the allreduce carries the mark).
        return fail(EXIT_DIVERGED, str(error), every_rank_knows=True)
    except KeyboardInterrupt:
        return fail(EXIT_INTERRUPTED, "interrupted without saving; last.npz holds the last "
                                      "completed epoch (or the last Ctrl-C save)")
    except Exception:
        if comm is None or comm.size == 1:
            raise
        traceback.print_exc()
        print(f"{parser.prog}: rank {comm.rank} failed: aborting all {comm.size} ranks",
              file=sys.stderr)
        comm.abort(1)
    return EXIT_INTERRUPTED if result["status"] == "interrupted" else EXIT_OK


def command():
    """``minidense-train`` and ``python -m minidense.train``."""
    sys.exit(main(program=True))


if __name__ == "__main__":
    command()

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
import sys
from pathlib import Path

import minidense as md
from minidense import data, models
from minidense.training.recipes import DEFAULTS, RECIPES
from minidense.training.trainer import train

# Options that may change when resuming; any other must match the checkpoint.
RESUMABLE_CHANGES = {"out", "resume", "device", "stop_after", "plot", "workers", "eval_every", "data"}


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

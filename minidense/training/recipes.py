"""The papers' training recipes, the defaults, and the builders of a run's parts.

A run is described by a flat ``settings`` dict (the command's options after the recipe and
the defaults are applied).  From it, ``build_model``, ``build_optimizer`` and
``build_scheduler`` make the parts; ``choose_device`` picks where they run.
"""
from __future__ import annotations

import difflib
import re
import shutil

import minidense as md
from minidense import backend, models, optim

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
                augment=True, eval_every=1, workers=0, stop_after=0, plot=True, sync_bn=False,
                profile=0)
DEMO_EPOCHS = 10  # the offline digits demo, when --epochs is not given (about 94% test accuracy)
CPU_EPOCHS = 5    # CIFAR-10 on a CPU, when --epochs is not given: ~75% in about half an hour on 2 cores

class SettingsError(ValueError):
    """A setting that cannot work.  The command reports it like a bad option: one line,
    exit status 2."""


def parse_model_args(text: str) -> dict:
    """'depth=10,growth_rate=4,bottleneck=true' -> {'depth': 10, 'growth_rate': 4, ...}."""
    kwargs = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        if "=" not in item:
            raise SettingsError(f"--model-args: expected key=value, got {item!r}")
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


def check_model(name: str, model_args: str) -> None:
    """Raise ``SettingsError`` unless ``models.get(name, **model_args)`` builds: an unknown
    name (with the closest known ones), a parameter the model lacks or that its name
    already fixes (resnet20 with depth=7), or a value it refuses.  It builds the model
    once, which is the only check that knows every constructor's rules."""
    known = models.list_models() + ["densenet_cifar", "resnet_cifar"]
    if name not in known:
        close = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
        raise SettingsError(f"--model: unknown model {name!r}; "
                            + (f"the closest names: {', '.join(close)}" if close else
                               f"the names: {', '.join(known)}"))
    kwargs = parse_model_args(model_args)
    if "num_classes" in kwargs:
        raise SettingsError("--model-args: num_classes comes from the data; leave it out")
    try:
        models.get(name, **kwargs)
    except TypeError as error:
        message = str(error)
        fixed = re.search(r"multiple values for (?:keyword )?argument '(\w+)'", message)
        unknown = re.search(r"unexpected keyword argument '(\w+)'", message)
        if fixed:
            # The named CIFAR models are densenet_cifar / resnet_cifar with fixed arguments.
            cifar = re.fullmatch(r"resnet\d+|densenet(_bc)?\d+_k\d+", name) and \
                name not in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
            hint = (f"; use --model {name.split('_')[0].rstrip('0123456789')}_cifar to choose it"
                    if cifar else "")
            raise SettingsError(f"--model-args: {name} already fixes {fixed.group(1)}{hint}") \
                from None
        if unknown:
            raise SettingsError(f"--model-args: {name} has no parameter "
                                f"{unknown.group(1)!r}") from None
        raise SettingsError(f"--model-args for {name}: {message}") from None
    except ValueError as error:
        raise SettingsError(f"--model-args for {name}: {error}") from None


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
        main = optim.ConstantLR(optimizer, factor=1.0)   # the learning rate throughout
    return optim.warmup_then(optimizer, main, warmup)

def run_epochs(settings: dict, digits: bool, device: str) -> int:
    """The run's epochs: the count given (or the recipe's), else the digits demo's, else a
    short CPU run, else the defaults'."""
    if settings["epochs_given"]:
        return settings["epochs"]
    if digits:
        return DEMO_EPOCHS
    return CPU_EPOCHS if device == "cpu" else settings["epochs"]


def choose_device(name: str, log=print) -> str:
    """"cpu" or "cuda": "auto" takes the GPU when CuPy sees one; a device that cannot be
    used is a ``SettingsError`` (a bad --device)."""
    if name == "auto":
        if md.cuda_available():
            return "cuda"
        if shutil.which("nvidia-smi"):
            log("note: this machine has an NVIDIA GPU but CuPy cannot use it, so training runs on "
                "the CPU; install the CuPy wheel for your CUDA version (nvidia-smi shows it): "
                "pip install cupy-cuda12x (CUDA 12) or cupy-cuda13x (CUDA 13)")
        return "cpu"
    try:
        return backend.check_device(name)
    except (RuntimeError, ValueError) as error:
        raise SettingsError(f"--device {name}: {error}") from None

"""Export a trained model as ONNX: ``python -m minidense.export CHECKPOINT --out model.onnx``
(also ``minidense-export``).

    python -m minidense.export runs/resnet20-cifar10/best.npz --out resnet20.onnx
    python -m minidense.export weights.safetensors --model resnet50 --out resnet50.onnx

CHECKPOINT is a ``last.npz`` or ``best.npz`` of ``minidense-train`` (the model, its
settings, class names and input normalisation all come from it), or, with ``--model
NAME``, a weights file (.safetensors or .npz, minidense's or torchvision's names) for
that model of ``md.models``.  The file has a named batch dimension and the metadata of
``md.onnx.export``.  The command prints the output path, the opset, and the largest
difference between ONNX Runtime and minidense on a random batch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import minidense as md
from minidense import nn
from minidense.evaluate import load_model
from minidense.onnx import DEFAULT_OPSET, MIN_OPSET, ExportError
from minidense.training.recipes import SettingsError, check_model, parse_model_args

INPUT, OUTPUT = "input", "logits"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minidense-export", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a last.npz or best.npz of minidense-train, or a weights file with --model")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--model", help="the md.models name the weights file is for (CHECKPOINT is "
                                   "then weights only)")
    p.add_argument("--model-args", default="", help="with --model: keyword arguments for the "
                                                    "model, e.g. 'depth=10,growth_rate=4'")
    p.add_argument("--num-classes", type=int, help="with --model: the weights' class count "
                                                   "(default: the model's)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"the ONNX opset ({MIN_OPSET} or newer; default {DEFAULT_OPSET})")
    p.add_argument("--image-size", type=int,
                   help="the input's height and width (default 224 for a 1000-class model, "
                        "ImageNet's; else 32, CIFAR-10's and the digits demo's)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="the random batch ONNX Runtime and minidense are compared on (default 4)")
    return p


def check_options(args) -> None:
    """Every check that needs no file: a bad option is reported before anything is read."""
    for option in ("batch_size", "image_size", "num_classes"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise SettingsError(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    if args.model is None and (args.model_args or args.num_classes is not None):
        given = "--model-args" if args.model_args else "--num-classes"
        raise SettingsError(f"{given} goes with --model (a checkpoint of minidense-train names "
                            f"its own model)")
    if args.model is not None:
        check_model(args.model, args.model_args)
    try:
        import onnx
        import onnxruntime  # noqa: F401 (the comparison needs it)
    except ImportError as error:
        raise SettingsError(f"exporting needs onnx and onnxruntime ({error.name} is missing): "
                            f"pip install 'minidense[onnx]'") from None
    if not MIN_OPSET <= args.opset <= onnx.defs.onnx_opset_version():
        raise SettingsError(f"--opset must be {MIN_OPSET} to {onnx.defs.onnx_opset_version()} "
                            f"(this onnx's newest), got {args.opset}")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise SettingsError(f"--out {out}: the folder {out.parent} does not exist")
    if out.is_dir():
        raise SettingsError(f"--out {out} is a folder; name the .onnx file to write")


def load(args):
    """(model in eval mode, metadata for md.onnx.export)."""
    if args.model is None:
        model, checkpoint = load_model(args.checkpoint)
        settings = checkpoint["settings"]
        arguments = settings.get("model_args")
        name = settings["model"] + (f"({arguments})" if arguments else "")
        normalization = checkpoint["normalization"]
        metadata = dict(model_name=name, class_names=list(checkpoint["classes"]),
                        mean=normalization["mean"], std=normalization["std"])
    else:
        path = Path(args.checkpoint)
        if not path.is_file():
            raise SettingsError(f"CHECKPOINT: there is no weights file at {path}: no such file")
        kwargs = parse_model_args(args.model_args)
        if args.num_classes is not None:
            kwargs["num_classes"] = args.num_classes
        try:
            model = md.models.get(args.model, weights=path, **kwargs)
        except (OSError, KeyError, TypeError, ValueError, RuntimeError) as error:
            raise SettingsError(f"CHECKPOINT {path}: {error}") from None
        metadata = dict(model_name=args.model + (f"({args.model_args})" if args.model_args else ""))
    return model.eval(), metadata


def num_classes_of(model) -> int:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 0


def export_and_compare(args, log=print):
    """Export, then run a seeded random batch through ONNX Runtime and minidense: the
    largest absolute difference and the largest |logit|."""
    import onnxruntime

    model, metadata = load(args)
    size = args.image_size or (224 if num_classes_of(model) == 1000 else 32)
    rng = np.random.default_rng(0)
    # Traced at batch 2: a constant the size of the batch is then told from one of size 1.
    example = md.tensor(rng.standard_normal((2, 3, size, size)).astype(np.float32))
    try:
        proto = md.onnx.export(model, example, args.out, opset_version=args.opset,
                               input_names=[INPUT], output_names=[OUTPUT],
                               dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                               **metadata)
    except ExportError as error:
        raise SettingsError(str(error)) from None
    batch = rng.standard_normal((args.batch_size, 3, size, size)).astype(np.float32)
    options = onnxruntime.SessionOptions()
    # Its threads would otherwise spin after the run, on the cores minidense's forward needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(args.out), options,
                                           providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT], {INPUT: batch})
    with md.no_grad():
        expected = model(md.tensor(batch)).numpy()
    difference = float(np.abs(got - expected).max())
    log(f"wrote {args.out}")
    log(f"opset {args.opset} (IR version {proto.ir_version}): input {INPUT} (batch, 3, {size}, "
        f"{size}), output {OUTPUT} (batch, {expected.shape[1]})")
    log(f"largest |ONNX Runtime - minidense| on a random batch of {args.batch_size}: "
        f"{difference:.3g} (largest |logit| {float(np.abs(expected).max()):.3g})")
    return difference


def main(argv=None) -> int:
    """Exit statuses: 0 written, 2 a bad option, an unusable checkpoint, or a model that
    does not export.  No ``process.start_command()``: one forward pass gains nothing from
    the training commands' process settings, and would pay for a second start."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_options(args)
        export_and_compare(args)
    except SettingsError as error:
        parser.error(str(error))   # the usage line, one error line, exit status 2
    return 0


def command():
    """``minidense-export`` and ``python -m minidense.export``."""
    sys.exit(main())


if __name__ == "__main__":
    command()

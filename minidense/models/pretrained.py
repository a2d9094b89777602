"""Weights in and out in torchvision's names: ``md.models.get(name, weights=...)``,
``load_weights`` and ``export_state_dict(model, "torchvision")``.

torchvision builds the ImageNet DenseNets (121, 161, 169, 201) and ResNets (18, 34, 50,
101, 152) layer for layer as minidense does, under other module names:

    minidense                          torchvision DenseNet                       torchvision ResNet
    stem.conv, stem.norm               features.conv0, features.norm0             conv1, bn1
    block2.layer3.conv1                features.denseblock2.denselayer3.conv1
    transition1.conv                   features.transition1.conv
    classifier.norm                    features.norm5
    classifier.fc                      classifier                                 fc
    stage2.block1.conv1                                                           layer2.0.conv1
    stage2.block1.shortcut.conv, .norm                                            layer2.0.downsample.0, .1

MobileNetV2 (``mobilenet_v2``) is built under torchvision's own module names
(``features.N...``, ``classifier.1``), so its names map to themselves.

One more difference: torchvision's ResNet-50/101/152
subsample in the 3x3 convolution of a bottleneck ("ResNet v1.5"), where minidense's
default follows the paper (the first 1x1): the shapes are the same either way, so
weights in torchvision's names build the model with ``stride_in_3x3=True``, and a
paper-style model is refused rather than silently computing other logits.

Nothing is downloaded, and nothing is unpickled: weights come from a .safetensors (or
.npz) file, or from a dict of arrays.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .. import io
from ..autograd import Tensor
from .densenet import DenseNet
from .mobilenet import TABLE_2, MobileNetV2
from .resnet import Bottleneck, ResNet, ZeroPadShortcut

# minidense name -> torchvision name: the first rule whose pattern matches renames the prefix.
_DENSENET_RULES = (
    (r"stem\.conv\.", "features.conv0."),
    (r"stem\.norm\.", "features.norm0."),
    (r"block(\d+)\.layer(\d+)\.", r"features.denseblock\1.denselayer\2."),
    (r"transition(\d+)\.", r"features.transition\1."),
    (r"classifier\.norm\.", "features.norm5."),
    (r"classifier\.fc\.", "classifier."),
)
_RESNET_RULES = (  # torchvision numbers the blocks of a stage from 0
    (r"stem\.conv\.", "conv1."),
    (r"stem\.norm\.", "bn1."),
    (r"stage(\d+)\.block(\d+)\.shortcut\.conv\.", lambda m: f"layer{m[1]}.{int(m[2]) - 1}.downsample.0."),
    (r"stage(\d+)\.block(\d+)\.shortcut\.norm\.", lambda m: f"layer{m[1]}.{int(m[2]) - 1}.downsample.1."),
    (r"stage(\d+)\.block(\d+)\.", lambda m: f"layer{m[1]}.{int(m[2]) - 1}."),
    (r"classifier\.fc\.", "fc."),
)
_SAME_NAMES = ((r"", ""),)   # MobileNetV2: torchvision's names are its own
# How the two namings are told apart: the top-level names each one uses.
_TORCHVISION_PREFIXES = ("features.", "classifier.weight", "classifier.bias", "conv1.", "bn1.",
                         "layer", "fc.")
_MINIDENSE_PREFIXES = ("stem.", "block", "transition", "stage", "classifier.norm.", "classifier.fc.")
# torchvision's densenet.py rewrites these keys of its older checkpoints (the .pth files
# it downloads): "denselayer1.norm.1.weight" -> "denselayer1.norm1.weight" (the same
# pattern, with the batch counters those files predate).
_OLD_DENSELAYER_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                                 r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
# The models of md.models whose torchvision counterparts stride in the 3x3 convolution.
_V1_5 = ("resnet50", "resnet101", "resnet152")

CONVERT_HINT = (
    "minidense downloads nothing. On a machine with network access, torch and torchvision:\n"
    "    import torchvision, safetensors.torch\n"
    "    state = torchvision.models.densenet121(weights=\"DEFAULT\").state_dict()\n"
    "    safetensors.torch.save_file(state, \"densenet121.safetensors\")\n"
    "or convert a downloaded .pth file with torch alone:\n"
    + "\n".join("    " + line for line in io.PTH_TO_SAFETENSORS.splitlines()))


def _why_not_torchvision(model):
    """Why torchvision has no model with ``model``'s layout, or None when it has one."""
    stem = dict(model.stem.named_children()) if isinstance(model, (DenseNet, ResNet)) else {}
    if isinstance(model, DenseNet):
        blocks = [m for name, m in model.named_children() if name.startswith("block")]
        if "pool" not in stem:
            return "it is a CIFAR DenseNet (a 3x3 stem convolution, no pooling)"
        if len(blocks) != 4:
            return f"it has {len(blocks)} dense blocks; torchvision's DenseNets have 4"
        if not model.bottleneck or model.compression != 0.5:
            return "torchvision's DenseNets are DenseNet-BC (bottleneck layers, compression 0.5)"
        return None
    if isinstance(model, ResNet):
        stages = [m for name, m in model.named_children() if name.startswith("stage")]
        blocks = [b for stage in stages for b in stage]
        if "pool" not in stem:
            return "it is a CIFAR ResNet (a 3x3 stem convolution, no pooling)"
        if [stage[0].conv1.out_channels for stage in stages] != [64, 128, 256, 512]:
            return "torchvision's ResNets have 4 stages of 64, 128, 256 and 512 channels"
        if any(isinstance(b.shortcut, ZeroPadShortcut) for b in blocks):
            return "it has zero-padding shortcuts (option A); torchvision's project (option B)"
        if any(isinstance(b, Bottleneck) and b.conv1.stride != 1 for b in blocks):
            return ("its bottleneck blocks subsample in the first 1x1 convolution, as in the "
                    "paper; torchvision's ResNet-50/101/152 do it in the 3x3 one: build the "
                    "model with stride_in_3x3=True")
        return None
    if isinstance(model, MobileNetV2):
        if model.first_stride != 2 or model.table != TABLE_2:
            return ("it is a CIFAR MobileNetV2 (stride 1 in the first convolution and the first "
                    "stride-2 sequence)")
        return None
    return f"it is a {type(model).__name__}, not a DenseNet, a ResNet or a MobileNetV2"


def _rename(name, rules):
    for pattern, replacement in rules:
        renamed, count = re.subn("^" + pattern, replacement, name)
        if count:
            return renamed
    raise AssertionError(f"no torchvision name for {name!r}")  # every module is covered above


def torchvision_names(model, what="torchvision_names"):
    """minidense name -> torchvision name for every parameter and buffer of ``model``
    (each BatchNorm2d's ``num_batches_tracked`` included), in torchvision's order; a
    ValueError when torchvision has no model with ``model``'s layout."""
    why = _why_not_torchvision(model)
    if why is not None:
        raise ValueError(f"{what}: torchvision has no counterpart of this model: {why}. Save it "
                         f"in minidense's names instead: md.save(model.state_dict(), path)")
    rules = (_DENSENET_RULES if isinstance(model, DenseNet) else
             _SAME_NAMES if isinstance(model, MobileNetV2) else _RESNET_RULES)
    names = OrderedDict()
    for name in model.state_dict(keep_vars=True):  # module by module: torchvision's order
        names[name] = _rename(name, rules)
    return names


def export_state_dict(model, names):
    """The model's weights as a flat dict in another library's names, ready for
    ``md.save(..., "w.safetensors")``.  ``names``: "torchvision", the only one: its keys,
    each a contiguous NumPy array (the ``num_batches_tracked`` counts int64).  The
    file then loads with ``torchvision.models.densenet121().load_state_dict(...)``.  A
    model torchvision has no counterpart of (a CIFAR model) is a ValueError."""
    if names != "torchvision":
        raise ValueError(f"export_state_dict: names must be 'torchvision', got {names!r}")
    state = model.state_dict()
    exported = OrderedDict()
    for ours, theirs in torchvision_names(model, "export_state_dict").items():
        exported[theirs] = np.asarray(state[ours], order="C")
    return exported


def _as_numpy(value):
    """A host NumPy array from an array, a minidense Tensor or a torch tensor."""
    if isinstance(value, Tensor):
        return value.numpy()
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch, duck-typed: no import
        return value.detach().cpu().numpy()
    return np.asarray(value)


def read_weights(weights):
    """A flat dict of NumPy arrays from a .safetensors/.npz path or a state dict, with
    torchvision's old DenseNet keys rewritten as torchvision itself does."""
    if isinstance(weights, (str, Path)):
        if not Path(weights).is_file():
            raise FileNotFoundError(f"weights={str(weights)!r}: no such file. {CONVERT_HINT}")
        weights = io.load(weights)
    if not isinstance(weights, dict):
        raise TypeError(f"weights must be a path or a dict of arrays, got a {type(weights).__name__}")
    nested = [k for k, v in weights.items() if isinstance(v, (dict, list, tuple))]
    if nested:
        raise ValueError(f"weights: expected a flat dict of arrays by name, but {nested[0]!r} holds "
                         f"nested state (a training checkpoint?); pass its model part, e.g. "
                         f"md.load(path)[{nested[0]!r}]")
    return OrderedDict((_OLD_DENSELAYER_KEY.sub(r"\1\2", k), _as_numpy(v)) for k, v in weights.items())


def naming(state):
    """"torchvision" or "minidense": the naming most of ``state``'s keys follow."""
    theirs = sum(k.startswith(_TORCHVISION_PREFIXES) for k in state)
    ours = sum(k.startswith(_MINIDENSE_PREFIXES) for k in state)
    if theirs == ours == 0:
        raise ValueError(f"weights: the names are neither torchvision's nor minidense's: "
                         f"{', '.join(list(state)[:5]) or 'no arrays at all'}, ...")
    return "torchvision" if theirs > ours else "minidense"


def load_weights(model, weights):
    """Load ``weights`` (a .safetensors/.npz path or a dict of arrays, in torchvision's
    names or minidense's, told apart by the names) into ``model``; returns ``model``.
    Every missing, unexpected and wrong-shaped name is reported in one error.  Files
    without BatchNorm's ``num_batches_tracked`` (older ones) load with the counts at 0."""
    state = read_weights(weights)
    shown = None
    # (A MobileNetV2's names are torchvision's: nothing to rename, CIFAR variant included.)
    if naming(state) == "torchvision" and not isinstance(model, MobileNetV2):
        shown = torchvision_names(model, "load_weights")
        ours_by_theirs = {theirs: ours for ours, theirs in shown.items()}
        state = OrderedDict((ours_by_theirs.get(k, k), v) for k, v in state.items())
    try:
        model.load_state_dict(state, names=shown)
    except RuntimeError as error:
        fc = dict(model.named_parameters()).get("classifier.fc.weight")
        ours = tuple(fc.shape) if fc is not None else ()
        theirs = tuple(np.shape(state.get("classifier.fc.weight")))
        if len(ours) == len(theirs) == 2 and theirs[1] == ours[1] and theirs[0] != ours[0]:
            raise RuntimeError(f"{error} | the weights have {theirs[0]} classes and the model "
                               f"{ours[0]}: pass num_classes={theirs[0]}") from None
        raise
    return model


def build(name, builder, weights, options):
    """``md.models.get(name, weights=..., **options)``: the model, with the weights loaded."""
    state = read_weights(weights)
    if name in _V1_5 and naming(state) == "torchvision":
        options = {"stride_in_3x3": True, **options}  # an explicit False is refused on loading
    return load_weights(builder(**options), state)

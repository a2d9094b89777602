"""The DenseNet, ResNet and MobileNetV2 families as in their papers, by name.

    model = md.models.get("densenet_bc100_k12")            # CIFAR-10, 10 classes
    model = md.models.get("resnet20", shortcut="B")
    model = md.models.get("densenet_cifar", depth=10, growth_rate=4,
                          bottleneck=True, compression=0.5)   # any depth and growth rate
    md.models.names                                         # every name get() builds as is

CIFAR models default to num_classes=10, ImageNet ones to 1000.
"""
from __future__ import annotations

from .densenet import (DenseBlock, DenseLayer, DenseNet, Transition, densenet40_k12,
                       densenet100_k12, densenet100_k24, densenet121, densenet161, densenet169,
                       densenet201, densenet264, densenet_bc100_k12, densenet_bc190_k40,
                       densenet_bc250_k24, densenet_cifar, densenet_imagenet)
from .mobilenet import InvertedResidual, MobileNetV2, mobilenet_v2, mobilenet_v2_cifar
from .network import StagedNetwork
from . import pretrained
from .pretrained import export_state_dict, load_weights
from .resnet import (BasicBlock, Bottleneck, ResNet, ZeroPadShortcut, resnet18, resnet20, resnet32,
                     resnet34, resnet44, resnet50, resnet56, resnet101, resnet110, resnet152,
                     resnet1202, resnet_cifar, resnet_imagenet)

_NAMED = {fn.__name__: fn for fn in (
    # DenseNet paper, Table 2 (CIFAR) and Table 1 (ImageNet)
    densenet40_k12, densenet100_k12, densenet100_k24,
    densenet_bc100_k12, densenet_bc250_k24, densenet_bc190_k40,
    densenet121, densenet161, densenet169, densenet201, densenet264,
    # ResNet paper, Section 4.2 (CIFAR) and Table 1 (ImageNet)
    resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202,
    resnet18, resnet34, resnet50, resnet101, resnet152,
    # MobileNetV2 paper, Table 2 (ImageNet), and its CIFAR variant
    mobilenet_v2, mobilenet_v2_cifar,
)}
# Families that need their configuration as keyword arguments (depth, growth_rate, ...).
_FAMILIES = {fn.__name__: fn for fn in (densenet_cifar, resnet_cifar)}

names = tuple(_NAMED)


def list_models():
    """The names that ``get`` builds without arguments: every model of the papers' tables."""
    return list(names)


def get(name, weights=None, **kwargs):
    """Build the model called ``name`` (see ``names``; also "densenet_cifar" and
    "resnet_cifar" with their configuration as keyword arguments).  ``kwargs``:
    num_classes, and drop_rate / stem_channels / memory_efficient (DenseNet), shortcut (CIFAR ResNet),
    stride_in_3x3 (ImageNet bottleneck ResNet).

    ``weights``: a .safetensors (or .npz) file, or a dict of arrays, in torchvision's
    names or minidense's (told apart by the names), loaded into the model; torchvision's
    ResNet-50/101/152 weights build the model with stride_in_3x3=True.  Nothing is
    downloaded (see ``pretrained.CONVERT_HINT``)."""
    builder = _NAMED.get(name) or _FAMILIES.get(name)
    if builder is None:
        raise ValueError(f"md.models.get: unknown model {name!r}; known models: "
                         f"{', '.join(names + tuple(_FAMILIES))}")
    if "memory_efficient" in kwargs and not name.startswith("densenet"):
        raise ValueError(f"md.models.get: memory_efficient is a DenseNet option (shared block "
                         f"storage and recomputation of concat-BN-ReLU-Conv); {name!r} is not a "
                         f"DenseNet and has no memory-efficient mode")
    if weights is None:
        return builder(**kwargs)
    return pretrained.build(name, builder, weights, kwargs)


__all__ = ["get", "list_models", "names", "export_state_dict", "load_weights", "DenseNet", "DenseBlock", "DenseLayer", "Transition",
           "ResNet", "BasicBlock", "Bottleneck", "ZeroPadShortcut", "StagedNetwork",
           "MobileNetV2", "InvertedResidual",
           "densenet_cifar", "densenet_imagenet", "resnet_cifar", "resnet_imagenet", *names]

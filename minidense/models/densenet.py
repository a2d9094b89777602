"""DenseNet: Huang, Liu, van der Maaten and Weinberger, "Densely Connected
Convolutional Networks" (CVPR 2017).

Layer l of a dense block receives the feature maps of all preceding layers,
    x_l = H_l([x_0, x_1, ..., x_{l-1}])                                    (Eq. 2)
where [.] is concatenation along channels and H_l is the composite function
BN-ReLU-Conv(3x3) producing k ("growth rate") channels.  Variants (Section 3):

* -B  (bottleneck): H_l = BN-ReLU-Conv(1x1, 4k)-BN-ReLU-Conv(3x3, k);
* -C  (compression): a transition after a block with m channels outputs floor(theta*m);
* -BC: both, theta = 0.5.

Memory (Pleiss et al. 2017, "Memory-Efficient Implementation of DenseNets"): a naive
dense block keeps O(L^2) feature maps for backward, because every layer's BN and ReLU
keep their own copy of the concatenation [x_0, ..., x_{l-1}].  Two things fix it here:

* shared block storage (both modes): each layer writes its k channels into its slice of
  one array per block, and layer l's input is a view of the first channels of that array,
  so the concatenation is a view, never a copy (``DenseBlock.forward``, ``SharedStorage``);
* recomputation (``memory_efficient=True``): the BN-ReLU-Conv(-BN-ReLU) segment of each
  layer keeps nothing for backward but its input, that view, and is run again when the
  backward pass reaches it (``DenseLayer.forward``, ``md.recompute``).  The feature maps
  kept then grow linearly with depth.

Transitions between blocks: BN-ReLU-Conv(1x1)-AvgPool(2x2).  Classifier:
BN-ReLU-global average pooling-linear.  Dropout (rate 0.2 in the paper's runs
without data augmentation) follows every convolution except the first.

CIFAR (Table 2): a 3x3 convolution with 16 output channels (2k for DenseNet-BC),
then 3 dense blocks on 32x32, 16x16 and 8x8 maps with (L-4)/3 layers each, or
(L-4)/6 bottleneck layers.  ImageNet (Table 1): DenseNet-BC with k=32, a 7x7/2
convolution with 2k channels and a 3x3/2 max pooling, then 4 dense blocks.
"""
from __future__ import annotations

import math
from collections import OrderedDict

from .. import backend, nn
from ..autograd import Function
from ..functions import cat
from ..recompute import recompute
from .initialization import classifier_linear, he_normal_conv2d
from .network import StagedNetwork, imagenet_stem


class DenseLayer(nn.Module):
    """H_l: BN-ReLU-Conv(3x3, k); in -B, BN-ReLU-Conv(1x1, 4k)-BN-ReLU-Conv(3x3, k), the
    first convolution the bottleneck.  Dropout follows each convolution when
    ``drop_rate`` > 0.  Convolutions have no bias: the BN that follows supplies the shift.

    ``memory_efficient``: ``first_part``, which reads the wide concatenation, is
    recomputed in backward instead of kept: only the 4k channels that conv2 reads stay
    (without the bottleneck, the whole layer is recomputed)."""

    def __init__(self, in_channels, growth_rate, bottleneck, drop_rate=0.0, memory_efficient=False):
        super().__init__()
        width = 4 * growth_rate if bottleneck else growth_rate
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv(in_channels, width, 1 if bottleneck else 3)
        self.dropout1 = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        if bottleneck:
            self.norm2 = nn.BatchNorm2d(width)
            self.relu2 = nn.ReLU()
            self.conv2 = _conv(width, growth_rate, 3)
            self.dropout2 = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.in_channels, self.growth_rate, self.bottleneck = in_channels, growth_rate, bottleneck
        self.memory_efficient, self.drop_rate = memory_efficient, drop_rate
        # The fast path: each BN and the ReLU after it as one op (nn.fuse_bn_relu).
        nn.fuse_bn_relu(self, ("norm1", "relu1"), *([("norm2", "relu2")] if bottleneck else []))

    def forward(self, x):
        # -B: BN-ReLU-Conv(1x1)-BN-ReLU-Conv(3x3); otherwise BN-ReLU-Conv(3x3).
        if self.memory_efficient:
            # THE MEMORY SAVING: nothing inside first_part is kept for backward (BN-ReLU1
            # reads the whole concatenation); only its input x, a view of the block
            # storage, and its output, which conv2 keeps anyway.
            params = [p for name, p in self.named_parameters() if not name.startswith("conv2.")]
            x = recompute(self.first_part, x, params=params,
                          preserve_rng_state=self.training and self.drop_rate > 0)
        else:
            x = self.first_part(x)
        if self.bottleneck:
            x = self.dropout2(self.conv2(x))
        return x

    def first_part(self, x):
        """BN-ReLU-Conv, and in -B the BN-ReLU after it: the part that memory-efficient
        mode recomputes.  (Cutting right after conv1, as torchvision does, would keep
        BN2's input besides ReLU2's output: 8k channels per layer instead of 4k, for
        little compute.)"""
        x = self.dropout1(self.conv1(self.relu1(self.norm1(x))))
        if self.bottleneck:
            x = self.relu2(self.norm2(x))
        return x


def _conv(in_channels, out_channels, kernel_size):
    """A kxk convolution that keeps the map size, without bias (a BN follows)."""
    return he_normal_conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                            bias=False)


class SharedStorage:
    """One array for a dense block's output (Pleiss et al.'s shared memory): each feature
    map is written into its channels as it is made, so the features lie side by side, and
    every concatenation [x_0, ..., x_{l-1}] is a view of the array's first channels (see
    ``md.cat``), never a copy.  Allocated once per forward."""

    def __init__(self, like, channels):
        n, _, h, w = like.shape
        self.array = backend.get_array_module(like.data).empty((n, channels, h, w), like.dtype)
        self.used = 0

    def append(self, feature):
        """``feature``, written into the next free channels, as that view of the storage."""
        view = IntoStorage(self.array, self.used)(feature)
        self.used += feature.shape[1]
        return view


class IntoStorage(Function):
    """y = x, written into channels [start, start + C) of ``storage`` and returned as that
    view of it.  Backward: the identity.  Keeps: nothing (not even the storage: the
    graph must not keep it alive after backward)."""

    def __init__(self, storage, start):
        self.storage, self.start = storage, start

    def forward(self, x):
        view = self.storage[:, self.start:self.start + x.shape[1]]
        view[...] = x
        self.storage = None
        return view

    def backward(self, gy):
        return gy


class DenseBlock(nn.Module):
    """``num_layers`` dense layers; layer l sees in_channels + (l-1)k channels and the
    block outputs in_channels + num_layers*k."""

    def __init__(self, num_layers, in_channels, growth_rate, bottleneck, drop_rate=0.0,
                 memory_efficient=False):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"layer{i + 1}", DenseLayer(in_channels + i * growth_rate, growth_rate,
                                                        bottleneck, drop_rate, memory_efficient))
        self.in_channels = in_channels
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x):
        storage = SharedStorage(x, self.out_channels)
        features = [storage.append(x)]
        for layer in self.children():
            new_features = layer(cat(features, 1))   # x_l = H_l([x_0, x_1, ..., x_{l-1}])  (Eq. 2)
            features.append(storage.append(new_features))
        return cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-Conv(1x1, out_channels)-AvgPool(2x2): halves the feature-map size (with
    dropout after the convolution when ``drop_rate`` > 0)."""

    def __init__(self, in_channels, out_channels, drop_rate=0.0):
        layers = [("norm", nn.BatchNorm2d(in_channels)), ("relu", nn.ReLU()),
                  ("conv", _conv(in_channels, out_channels, 1))]
        if drop_rate > 0:
            layers.append(("dropout", nn.Dropout(drop_rate)))
        super().__init__(OrderedDict(layers + [("pool", nn.AvgPool2d(2))]))
        self.in_channels, self.out_channels = in_channels, out_channels
        nn.fuse_bn_relu(self, ("norm", "relu"))


class DenseNet(StagedNetwork):
    """A DenseNet from its block sizes.  Modules, in order: ``stem``, ``block1``,
    ``transition1``, ..., ``blockN``, ``classifier``.

    block_config: layers per dense block; growth_rate: k; bottleneck: -B;
    compression: theta (1 = none, 0.5 for -C/-BC); stem: "cifar" (3x3 conv) or
    "imagenet" (7x7/2 conv, BN, ReLU, 3x3/2 max pool); stem_channels: output channels of
    the first convolution; drop_rate: dropout after every convolution but the first;
    memory_efficient: recompute each layer's concat-BN-ReLU-Conv in backward, so that
    the feature maps kept grow linearly with depth (same numbers, same state dict).
    """

    def __init__(self, block_config, growth_rate, bottleneck=False, compression=1.0,
                 stem_channels=16, stem="cifar", num_classes=10, drop_rate=0.0,
                 memory_efficient=False):
        super().__init__()
        if not 0 < compression <= 1:
            raise ValueError(f"DenseNet: compression (theta) must be in (0, 1], got {compression}")
        if stem == "cifar":
            self.stem = he_normal_conv2d(3, stem_channels, 3, padding=1, bias=False)
        elif stem == "imagenet":
            self.stem = imagenet_stem(stem_channels)
        else:
            raise ValueError(f"DenseNet: stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.growth_rate, self.bottleneck, self.compression = growth_rate, bottleneck, compression
        self.memory_efficient = memory_efficient
        channels = stem_channels
        for b, num_layers in enumerate(block_config, start=1):
            block = DenseBlock(num_layers, channels, growth_rate, bottleneck, drop_rate,
                               memory_efficient)
            self.add_module(f"block{b}", block)
            channels = block.out_channels
            if b < len(block_config):
                reduced = math.floor(compression * channels)
                self.add_module(f"transition{b}", Transition(channels, reduced, drop_rate))
                channels = reduced
        self.classifier = nn.Sequential(OrderedDict([
            ("norm", nn.BatchNorm2d(channels)),
            ("relu", nn.ReLU()),
            ("pool", nn.GlobalAvgPool2d()),
            ("fc", classifier_linear(channels, num_classes)),
        ]))
        nn.fuse_bn_relu(self.classifier, ("norm", "relu"))
        self.num_features = channels


def densenet_cifar(depth, growth_rate, bottleneck=False, compression=1.0, num_classes=10,
                   drop_rate=0.0, stem_channels=None, memory_efficient=False):
    """The CIFAR DenseNet of depth L: 3 dense blocks of (L-4)/3 layers, or (L-4)/6
    bottleneck layers (each has two convolutions).  ``stem_channels`` defaults to the
    paper's 16, or 2k for DenseNet-BC; pass 2*growth_rate to use 2k everywhere as the
    authors' later code does."""
    per_layer = 6 if bottleneck else 3
    if (depth - 4) % per_layer or depth <= 4:
        kind = "DenseNet-B/-BC" if bottleneck else "DenseNet"
        raise ValueError(f"densenet_cifar: a CIFAR {kind} has depth L = {per_layer}n + 4 "
                         f"(n >= 1 layers per block), got L={depth}")
    if stem_channels is None:
        stem_channels = 2 * growth_rate if bottleneck and compression < 1 else 16
    n = (depth - 4) // per_layer
    return DenseNet((n, n, n), growth_rate, bottleneck, compression, stem_channels, "cifar",
                    num_classes, drop_rate, memory_efficient)


# --- Table 2 of the paper (CIFAR) ---------------------------------------------------
def densenet40_k12(**options):
    """DenseNet (L=40, k=12): 1.0M parameters."""
    return densenet_cifar(40, 12, **options)


def densenet100_k12(**options):
    """DenseNet (L=100, k=12): 7.0M parameters."""
    return densenet_cifar(100, 12, **options)


def densenet100_k24(**options):
    """DenseNet (L=100, k=24): 27.2M parameters."""
    return densenet_cifar(100, 24, **options)


def densenet_bc100_k12(**options):
    """DenseNet-BC (L=100, k=12): 0.8M parameters."""
    return densenet_cifar(100, 12, bottleneck=True, compression=0.5, **options)


def densenet_bc250_k24(**options):
    """DenseNet-BC (L=250, k=24): 15.3M parameters."""
    return densenet_cifar(250, 24, bottleneck=True, compression=0.5, **options)


def densenet_bc190_k40(**options):
    """DenseNet-BC (L=190, k=40): 25.6M parameters."""
    return densenet_cifar(190, 40, bottleneck=True, compression=0.5, **options)


# --- Table 1 of the paper (ImageNet): DenseNet-BC, k=32 -----------------------------
def densenet_imagenet(block_config, growth_rate=32, num_classes=1000, drop_rate=0.0,
                      memory_efficient=False):
    return DenseNet(block_config, growth_rate, bottleneck=True, compression=0.5,
                    stem_channels=2 * growth_rate, stem="imagenet", num_classes=num_classes,
                    drop_rate=drop_rate, memory_efficient=memory_efficient)


def densenet121(**options):
    """DenseNet-121: dense blocks of 6, 12, 24, 16 layers."""
    return densenet_imagenet((6, 12, 24, 16), **options)


def densenet161(**options):
    """DenseNet-161: k=48 (96 stem channels), dense blocks of 6, 12, 36, 24 layers."""
    return densenet_imagenet((6, 12, 36, 24), growth_rate=48, **options)


def densenet169(**options):
    """DenseNet-169: dense blocks of 6, 12, 32, 32 layers."""
    return densenet_imagenet((6, 12, 32, 32), **options)


def densenet201(**options):
    """DenseNet-201: dense blocks of 6, 12, 48, 32 layers."""
    return densenet_imagenet((6, 12, 48, 32), **options)


def densenet264(**options):
    """DenseNet-264: dense blocks of 6, 12, 64, 48 layers."""
    return densenet_imagenet((6, 12, 64, 48), **options)

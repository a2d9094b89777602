"""ResNet: He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition"
(CVPR 2016).

A block learns a residual F(x) and outputs relu(F(x) + shortcut(x)) (Eq. 1, Fig. 2).
When a block halves the feature-map size and widens the channels, the shortcut is

* option A: the identity on stride-2 subsampled maps, with the extra channels
  zero-padded (no parameters; the paper's CIFAR models);
* option B: a 1x1 projection with stride 2, followed by BN (the ImageNet models).

CIFAR (Section 4.2): a 3x3 convolution with 16 channels, then 3 stages of n basic
blocks (2n layers each) on 32x32, 16x16 and 8x8 maps with 16, 32 and 64 channels,
global average pooling and a 10-way linear layer: 6n+2 layers.  ImageNet (Table 1):
a 7x7/2 convolution and a 3x3/2 max pooling, then 4 stages (conv2_x .. conv5_x) of
basic (18, 34 layers) or bottleneck (50, 101, 152) blocks with 64, 128, 256, 512
channels (x4 at the bottleneck's output).
"""
from __future__ import annotations

from collections import OrderedDict

from .. import nn
from ..functions import pad
from .initialization import classifier_linear, he_normal_conv2d
from .network import StagedNetwork, imagenet_stem


def conv_bn(in_channels, out_channels, kernel_size, stride=1):
    """A convolution (no bias: the BN shifts) and its batch normalisation, as two modules."""
    return (he_normal_conv2d(in_channels, out_channels, kernel_size, stride=stride,
                             padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels))


class ZeroPadShortcut(nn.Module):
    """Option A: x subsampled with ``stride``, then zero channels appended up to
    ``out_channels``.  No parameters."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x):
        s = self.stride
        x = x[:, :, ::s, ::s]
        # Zero channels after x's (PyTorch's F.pad widths run from the last dim back: W,
        # H, then C): built from x, so nothing here depends on the batch size.
        return pad(x, (0, 0, 0, 0, 0, self.out_channels - x.shape[1]))

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def shortcut(in_channels, out_channels, stride, option):
    """The identity when shapes agree; otherwise option "A" (zero padding) or "B"
    (1x1 projection + BN)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if option == "A":
        return ZeroPadShortcut(in_channels, out_channels, stride)
    if option == "B":
        conv, norm = conv_bn(in_channels, out_channels, 1, stride)
        return nn.Sequential(OrderedDict([("conv", conv), ("norm", norm)]))
    raise ValueError(f"ResNet: shortcut option must be 'A' or 'B', got {option!r}")


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers, ReLU between them and after the addition (Fig. 2)."""

    expansion = 1

    def __init__(self, in_channels, channels, stride=1, shortcut_option="B"):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_channels, channels, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(channels, channels, 3)
        self.shortcut = shortcut(in_channels, channels, stride, shortcut_option)
        self.relu2 = nn.ReLU()
        nn.fuse_bn_relu(self, ("bn1", "relu1"))   # the fast path: BN and ReLU as one op

    def forward(self, x):
        residual = self.relu1(self.bn1(self.conv1(x)))
        residual = self.bn2(self.conv2(residual))
        return self.relu2(residual + self.shortcut(x))        # relu(F(x) + x)  (Eq. 1)


class Bottleneck(nn.Module):
    """1x1 (reduce), 3x3, 1x1 (restore, 4x channels) conv-BN layers (Fig. 5 right).

    The paper's released models subsample in the first 1x1 convolution; with
    ``stride_in_3x3=True`` the 3x3 one does it instead ("ResNet v1.5", as torchvision):
    the same parameters, more multiply-accumulates, slightly better accuracy."""

    expansion = 4

    def __init__(self, in_channels, channels, stride=1, shortcut_option="B", stride_in_3x3=False):
        super().__init__()
        stride1, stride2 = (1, stride) if stride_in_3x3 else (stride, 1)
        self.conv1, self.bn1 = conv_bn(in_channels, channels, 1, stride1)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(channels, channels, 3, stride2)
        self.relu2 = nn.ReLU()
        self.conv3, self.bn3 = conv_bn(channels, channels * self.expansion, 1)
        self.shortcut = shortcut(in_channels, channels * self.expansion, stride, shortcut_option)
        self.relu3 = nn.ReLU()
        nn.fuse_bn_relu(self, ("bn1", "relu1"), ("bn2", "relu2"))   # the fast path

    def forward(self, x):
        residual = self.relu1(self.bn1(self.conv1(x)))
        residual = self.relu2(self.bn2(self.conv2(residual)))
        residual = self.bn3(self.conv3(residual))
        return self.relu3(residual + self.shortcut(x))        # relu(F(x) + x)  (Eq. 1)


class ResNet(StagedNetwork):
    """A ResNet from its stages.  Modules, in order: ``stem``, ``stage1`` ..
    ``stageN`` (Sequentials of blocks ``block1``, ...), ``classifier``.

    block: BasicBlock or Bottleneck; blocks_per_stage and stage_channels: one entry per
    stage (every stage after the first halves the map size); stem: "cifar" (3x3 conv,
    BN, ReLU) or "imagenet" (7x7/2 conv, BN, ReLU, 3x3/2 max pool); shortcut: "A" or
    "B"; block_options: passed to every block (``stride_in_3x3`` for Bottleneck).
    """

    def __init__(self, block, blocks_per_stage, stage_channels, stem="cifar", num_classes=10,
                 shortcut="B", **block_options):
        super().__init__()
        if len(blocks_per_stage) != len(stage_channels):
            raise ValueError(f"ResNet: blocks_per_stage {tuple(blocks_per_stage)} and "
                             f"stage_channels {tuple(stage_channels)} must have one entry per stage")
        if stem == "cifar":
            conv, norm = conv_bn(3, stage_channels[0], 3)
            self.stem = nn.Sequential(OrderedDict([("conv", conv), ("norm", norm),
                                                   ("relu", nn.ReLU())]))
            nn.fuse_bn_relu(self.stem, ("norm", "relu"))
            channels = stage_channels[0]
        elif stem == "imagenet":
            channels = 64
            self.stem = imagenet_stem(channels)
        else:
            raise ValueError(f"ResNet: stem must be 'cifar' or 'imagenet', got {stem!r}")
        for s, (num_blocks, width) in enumerate(zip(blocks_per_stage, stage_channels), start=1):
            blocks = OrderedDict()
            for b in range(num_blocks):
                stride = 2 if s > 1 and b == 0 else 1
                blocks[f"block{b + 1}"] = block(channels, width, stride, shortcut, **block_options)
                channels = width * block.expansion
            self.add_module(f"stage{s}", nn.Sequential(blocks))
        self.classifier = nn.Sequential(OrderedDict([
            ("pool", nn.GlobalAvgPool2d()),
            ("fc", classifier_linear(channels, num_classes)),
        ]))
        self.num_features = channels


def resnet_cifar(depth, num_classes=10, shortcut="A"):
    """The CIFAR ResNet with 6n+2 layers: 3 stages of n basic blocks, 16/32/64 channels."""
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"resnet_cifar: a CIFAR ResNet has depth 6n + 2 (n >= 1), got {depth}")
    n = (depth - 2) // 6
    return ResNet(BasicBlock, (n, n, n), (16, 32, 64), "cifar", num_classes, shortcut)


# --- Section 4.2 of the paper (CIFAR-10), option A shortcuts ------------------------
def resnet20(**options):
    """ResNet-20: n=3, 0.27M parameters."""
    return resnet_cifar(20, **options)


def resnet32(**options):
    """ResNet-32: n=5, 0.46M parameters."""
    return resnet_cifar(32, **options)


def resnet44(**options):
    """ResNet-44: n=7, 0.66M parameters."""
    return resnet_cifar(44, **options)


def resnet56(**options):
    """ResNet-56: n=9, 0.85M parameters."""
    return resnet_cifar(56, **options)


def resnet110(**options):
    """ResNet-110: n=18, 1.7M parameters."""
    return resnet_cifar(110, **options)


def resnet1202(**options):
    """ResNet-1202: n=200, 19.4M parameters."""
    return resnet_cifar(1202, **options)


# --- Table 1 of the paper (ImageNet), option B shortcuts ----------------------------
def resnet_imagenet(block, blocks_per_stage, num_classes=1000, **block_options):
    return ResNet(block, blocks_per_stage, (64, 128, 256, 512), "imagenet", num_classes, "B",
                  **block_options)


def resnet18(**options):
    """ResNet-18: basic blocks, 2-2-2-2."""
    return resnet_imagenet(BasicBlock, (2, 2, 2, 2), **options)


def resnet34(**options):
    """ResNet-34: basic blocks, 3-4-6-3."""
    return resnet_imagenet(BasicBlock, (3, 4, 6, 3), **options)


def resnet50(**options):
    """ResNet-50: bottleneck blocks, 3-4-6-3."""
    return resnet_imagenet(Bottleneck, (3, 4, 6, 3), **options)


def resnet101(**options):
    """ResNet-101: bottleneck blocks, 3-4-23-3."""
    return resnet_imagenet(Bottleneck, (3, 4, 23, 3), **options)


def resnet152(**options):
    """ResNet-152: bottleneck blocks, 3-8-36-3."""
    return resnet_imagenet(Bottleneck, (3, 8, 36, 3), **options)

"""MobileNetV2: Sandler, Howard, Zhu, Zhmoginov and Chen, "MobileNetV2: Inverted
Residuals and Linear Bottlenecks" (CVPR 2018).

The building block (Table 1, Fig. 4b) is the *inverted residual with a linear
bottleneck*.  On a narrow input of k channels:

* a 1x1 convolution expands it t-fold to tk channels, then BN and ReLU6;
* a 3x3 *depthwise* convolution (one filter per channel, ``groups`` = tk) with stride
  s filters each channel on its own, then BN and ReLU6;
* a 1x1 convolution projects it to k' channels, then BN and no ReLU: the *linear*
  bottleneck, since a ReLU on a narrow layer destroys information (Section 3.2).

When s = 1 and k = k' the block adds its input to its output: the shortcut joins the
narrow bottlenecks, not the wide expanded layers (the "inverted" residual).  With
t = 1 the expansion is left out.  Every convolution is followed by BN, and ReLU6
(min(max(x, 0), 6)) is the non-linearity throughout.

The network (Table 2): a 3x3 convolution with 32 channels and stride 2, then seven
sequences of n identical blocks with expansion t and c output channels, the first of
each with stride s (``TABLE_2``), a 1x1 convolution to 1280 channels, global average
pooling and a linear classifier (after dropout 0.2, as in the reference implementation).
On 224x224 images the maps go 112, 56, 28, 14, 7.  ``width_mult`` scales every
layer's channels (Section 6.1), rounded to multiples of 8 as the reference does.

Module names are torchvision's, so its weights load as they are: ``features.0`` is the
first convolution (``.0`` the conv, ``.1`` the BN, ``.2`` the ReLU6), ``features.1`` to
``features.17`` the blocks (``conv``: the expansion, the depthwise convolution, the
projection and its BN), ``features.18`` the last 1x1 convolution, ``classifier.1`` the
linear layer.

The CIFAR variant (``mobilenet_v2_cifar``) keeps Table 2 but gives the first
convolution and the first stride-2 sequence stride 1, so that 32x32 images leave 4x4
maps for the pooling (the widely used CIFAR adaptation).
"""
from __future__ import annotations

from .. import nn
from ..functions import global_avg_pool2d
from ..nn import init

# Table 2: each sequence of n blocks, expansion factor t, c output channels, the first
# block with stride s (the others 1).
TABLE_2 = (
    # t,   c, n, s        input of the sequence (ImageNet)
    (1, 16, 1, 1),      # 112^2 x 32
    (6, 24, 2, 2),      # 112^2 x 16
    (6, 32, 3, 2),      # 56^2 x 24
    (6, 64, 4, 2),      # 28^2 x 32
    (6, 96, 3, 1),      # 14^2 x 64
    (6, 160, 3, 2),     # 14^2 x 96
    (6, 320, 1, 1),     # 7^2 x 160
)
# CIFAR: the first stride-2 sequence with stride 1 (and the first convolution, below).
TABLE_2_CIFAR = tuple((t, c, n, 1 if c == 24 else s) for t, c, n, s in TABLE_2)
FIRST_CHANNELS, LAST_CHANNELS = 32, 1280


def make_divisible(channels, divisor=8):
    """``channels`` rounded to the nearest multiple of ``divisor``, never more than 10%
    below it (the reference implementation's rule for width multipliers)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


class ConvBNReLU6(nn.Sequential):
    """A convolution (no bias: the BN shifts), BN, then ReLU6: modules "0", "1", "2"
    (torchvision's Conv2dNormActivation).  ``groups`` = channels: depthwise."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, groups=1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                      padding=(kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6())


class InvertedResidual(nn.Module):
    """Table 1: expand (1x1, t-fold), filter (3x3 depthwise, stride s), project (1x1,
    linear); the input added when s = 1 and the channels agree.  ``conv`` holds the
    layers in torchvision's order and names."""

    def __init__(self, in_channels, out_channels, stride, expand_ratio):
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_channels, hidden, 1))                     # expansion
        layers += [
            ConvBNReLU6(hidden, hidden, 3, stride=stride, groups=hidden),          # depthwise
            nn.Conv2d(hidden, out_channels, 1, bias=False),                        # projection,
            nn.BatchNorm2d(out_channels),                                          # linear
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.use_res_connect else y

    def extra_repr(self):
        return f"residual={self.use_res_connect}"


class MobileNetV2(nn.Module):
    """Table 2's network: ``table`` rows (t, c, n, s), the first convolution's stride,
    ``width_mult``, ``dropout`` before the classifier and ``num_classes``."""

    def __init__(self, table=TABLE_2, first_stride=2, width_mult=1.0, dropout=0.2,
                 num_classes=1000):
        super().__init__()
        self.table, self.first_stride, self.width_mult = tuple(map(tuple, table)), first_stride, width_mult
        channels = make_divisible(FIRST_CHANNELS * width_mult)
        last = make_divisible(LAST_CHANNELS * max(1.0, width_mult))
        layers = [ConvBNReLU6(3, channels, 3, stride=first_stride)]
        for t, c, n, s in self.table:
            out = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        layers.append(ConvBNReLU6(channels, last, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        _initialise(self)

    def forward(self, x):
        return self.classifier(global_avg_pool2d(self.features(x)))   # pooled: (N, 1280)

    def extra_repr(self):
        return f"first_stride={self.first_stride}, width_mult={self.width_mult}"


def _initialise(model):
    """The reference implementation's initialisation (torchvision's): convolutions He
    normal with fan-out, BN 1 and 0, the classifier N(0, 0.01), biases zero."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out")
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, 0, 0.01)
            init.zeros_(module.bias)


def mobilenet_v2(num_classes=1000, width_mult=1.0, dropout=0.2):
    """MobileNetV2 for ImageNet (Table 2): 3,504,872 parameters at width 1."""
    return MobileNetV2(TABLE_2, 2, width_mult, dropout, num_classes)


def mobilenet_v2_cifar(num_classes=10, width_mult=1.0, dropout=0.2):
    """MobileNetV2 for 32x32 images: Table 2 with stride 1 in the first convolution and
    in the first stride-2 sequence (maps 32, 16, 8, 4)."""
    return MobileNetV2(TABLE_2_CIFAR, 1, width_mult, dropout, num_classes)

"""The papers' initialisation, set explicitly: the DenseNet and ResNet models do not
take PyTorch's layer defaults, but what the papers' reference code does.

* convolutions: He et al. (2015), "Delving Deep into Rectifiers", Eq. 14: normal with
  std sqrt(2 / n), n = kh * kw * out_channels (the fan-out, as fb.resnet.torch and
  the DenseNet authors' code count it); no bias (a BN follows each one);
* the classifier: weight uniform within +-1/sqrt(in_features), bias zero.

The layers are built with ``nn.utils.skip_init``, so that their default
initialisation draws nothing: ``md.manual_seed(s)`` then draws, layer by layer, the
same weights as minidense always has (a test pins them).
"""
from __future__ import annotations

import math

from .. import nn


def he_normal_conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=False):
    """``nn.Conv2d`` with He-normal (fan-out) weights and a zero bias, if any."""
    conv = nn.utils.skip_init(nn.Conv2d, in_channels, out_channels, kernel_size, stride=stride,
                              padding=padding, bias=bias)
    kh, kw = conv.kernel_size
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kh * kw * out_channels)))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def classifier_linear(in_features, out_features):
    """``nn.Linear`` with weights uniform within +-1/sqrt(in_features) and a zero bias."""
    fc = nn.utils.skip_init(nn.Linear, in_features, out_features)
    bound = 1.0 / math.sqrt(in_features)
    nn.init.uniform_(fc.weight, -bound, bound)
    nn.init.zeros_(fc.bias)
    return fc

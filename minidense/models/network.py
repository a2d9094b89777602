"""What DenseNet and ResNet share: a stem, named stages in order, and a classifier."""
from __future__ import annotations

from collections import OrderedDict

from .. import nn
from .initialization import he_normal_conv2d


class StagedNetwork(nn.Module):
    """A classifier laid out as the papers' tables draw it.

    Subclasses register ``stem`` first, then their stages (dense blocks and transitions,
    or residual stages) in the order they run, then ``classifier``.  ``features`` runs
    everything but the classifier, so every stage's output can be studied.
    """

    def features(self, x, return_all=False):
        """The feature map that enters the classifier; with ``return_all=True``, an
        OrderedDict of every stage's output by name ("stem", "block1", ...)."""
        outputs = OrderedDict()
        for name, stage in self.named_children():
            if name == "classifier":
                continue
            x = stage(x)
            if return_all:
                outputs[name] = x
        return outputs if return_all else x

    def forward(self, x):
        return self.classifier(self.features(x))


def imagenet_stem(out_channels):
    """7x7/2 convolution, BN, ReLU and 3x3/2 max pooling: 224x224 -> 56x56
    (ResNet Table 1 "conv1" and the first pooling; DenseNet Table 1 likewise)."""
    stem = nn.Sequential(OrderedDict([
        ("conv", he_normal_conv2d(3, out_channels, 7, stride=2, padding=3, bias=False)),
        ("norm", nn.BatchNorm2d(out_channels)),
        ("relu", nn.ReLU()),
        ("pool", nn.MaxPool2d(3, stride=2, padding=1)),
    ]))
    return nn.fuse_bn_relu(stem, ("norm", "relu"))   # the fast path: BN and ReLU as one op

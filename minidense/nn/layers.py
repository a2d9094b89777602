"""Layers: thin Modules that own parameters and call the functional ops."""
from __future__ import annotations

import math

from ..autograd import Tensor
from ..fast_paths import fast_paths_enabled
from ..functions import (avg_pool2d, batch_norm, batch_norm_relu, conv2d, dropout,
                         global_avg_pool2d, linear, max_pool2d, relu, relu6)
from ..functions._utils import pair
from . import init
from .module import Module, Parameter


class Conv2d(Module):
    """2-D convolution, PyTorch's signature: the weight is (out_channels, in_channels /
    groups, kh, kw).  Weights: He normal with fan-out (He et al. 2015; the DenseNet and
    ResNet reference code), bias zero."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True):
        super().__init__()
        for name, channels in (("in_channels", in_channels), ("out_channels", out_channels)):
            if channels % groups:
                raise ValueError(f"Conv2d: {name}={channels} is not divisible by groups={groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        kh, kw = self.kernel_size
        self.weight = Parameter(init.kaiming_normal((out_channels, in_channels // groups, kh, kw),
                                                    mode="fan_out"))
        self.bias = Parameter(init.zeros((out_channels,))) if bias else None

    def forward(self, x):
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self):
        options = "".join(f", {name}={value}" for name, value, default in (
            ("dilation", self.dilation, 1), ("groups", self.groups, 1)) if value != default)
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}{options}, bias={self.bias is not None}")


class BatchNorm2d(Module):
    """Batch normalisation over channels; gamma 1, beta 0; running statistics as buffers."""

    def __init__(self, num_features, momentum=0.1, eps=1e-5):
        super().__init__()
        self.num_features, self.momentum, self.eps = num_features, momentum, eps
        self.weight = Parameter(init.ones((num_features,)))
        self.bias = Parameter(init.zeros((num_features,)))
        self.register_buffer("running_mean", Tensor(init.zeros((num_features,))))
        self.register_buffer("running_var", Tensor(init.ones((num_features,))))

    def forward(self, x):
        return batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                          training=self.training, momentum=self.momentum, eps=self.eps)

    def extra_repr(self):
        return f"{self.num_features}, momentum={self.momentum}, eps={self.eps}"


class BatchNormReLU2d(BatchNorm2d):
    """BatchNorm2d then ReLU as one op (``md.batch_norm_relu``): one pass over memory fewer
    each way, and no ReLU output kept.  Its parameters and buffers are BatchNorm2d's,
    under the same names.  Models get it from ``nn.fuse_bn_relu``, which leaves their
    forward reading BN, then ReLU.  Under ``md.plain_ops()``, the two ops again."""

    def forward(self, x):
        if not fast_paths_enabled():
            return relu(super().forward(x))
        return batch_norm_relu(x, self.weight, self.bias, self.running_mean, self.running_var,
                               training=self.training, momentum=self.momentum, eps=self.eps)


class Linear(Module):
    """Fully connected layer.  Weight: PyTorch's default uniform(+-1/sqrt(fan_in)); bias 0
    (the DenseNet and ResNet reference code zero the classifier's bias)."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = Parameter(init.uniform((out_features, in_features), -bound, bound))
        self.bias = Parameter(init.zeros((out_features,))) if bias else None

    def forward(self, x):
        return linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class ReLU(Module):
    def forward(self, x):
        return relu(x)


class _Pool2d(Module):
    """The hyperparameters every pooling window has (stride defaults to the kernel size)."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AvgPool2d(_Pool2d):
    def forward(self, x):
        return avg_pool2d(x, self.kernel_size, self.stride, self.padding)


class MaxPool2d(_Pool2d):
    def forward(self, x):
        return max_pool2d(x, self.kernel_size, self.stride, self.padding)


class GlobalAvgPool2d(Module):
    """(N, C, H, W) -> (N, C)."""

    def forward(self, x):
        return global_avg_pool2d(x)


class Dropout(Module):
    def __init__(self, p=0.5):
        super().__init__()
        self.p = p

    def forward(self, x):
        return dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


class Identity(Module):
    def forward(self, x):
        return x


class Flatten(Module):
    def forward(self, x):
        return x.reshape(x.shape[0], -1)


class _ModuleSequence(Module):
    """Modules numbered "0", "1", ... in order: indexing, iteration, length, append."""

    def append(self, module):
        self.add_module(str(len(self._modules)), module)
        return self

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __iter__(self):
        return iter(self._modules.values())


class Sequential(_ModuleSequence):
    """Modules applied in order; ``Sequential(a, b)`` or ``Sequential(OrderedDict(...))``."""

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], dict):
            for name, m in modules[0].items():
                self.add_module(name, m)
        else:
            for m in modules:
                self.append(m)

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x


class ModuleList(_ModuleSequence):
    """A list of modules whose parameters the owner registers; it has no forward."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)


class ReLU6(Module):
    """min(max(x, 0), 6) (``md.relu6``).  ``inplace`` is accepted, as PyTorch's, and the
    op runs out of place."""

    def __init__(self, inplace=False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        return relu6(x)

"""Layers: thin Modules that own parameters and call the functional ops, with
PyTorch's constructors and default initialisation."""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from .. import backend
from ..autograd import Tensor
from ..fast_paths import fast_paths_enabled
from ..functions import (adaptive_avg_pool2d, avg_pool2d, batch_norm, batch_norm_relu, conv2d,
                         cross_entropy, dropout, flatten, global_avg_pool2d, linear, log_softmax,
                         max_pool2d, mse_loss, relu, relu6, sigmoid, softmax, tanh)
from ..functions._utils import pair
from ..recompute import is_recomputing
from . import init
from .module import Module, Parameter
from .utils import initialising


def _to(module, device, dtype):
    """PyTorch's ``device=``/``dtype=`` constructor arguments."""
    return module.to(device, dtype) if device is not None or dtype is not None else module


class Conv2d(Module):
    """2-D convolution, PyTorch's signature: the weight is (out_channels, in_channels /
    groups, kh, kw).  PyTorch's default initialisation: weight Kaiming-uniform with
    a = sqrt(5), that is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the bias likewise
    (the papers' models set their own: ``md.models``).  Padding modes other than zeros
    are not supported."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None):
        super().__init__()
        for name, channels in (("in_channels", in_channels), ("out_channels", out_channels)):
            if channels % groups:
                raise ValueError(f"Conv2d: {name}={channels} is not divisible by groups={groups}")
        if padding_mode != "zeros":
            raise NotImplementedError(f"Conv2d: padding_mode={padding_mode!r} is not supported; "
                                      f"minidense pads with zeros")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.padding_mode = padding_mode
        kh, kw = self.kernel_size
        self.weight = Parameter(np.zeros((out_channels, in_channels // groups, kh, kw), np.float32))
        self.bias = Parameter(np.zeros((out_channels,), np.float32)) if bias else None
        if initialising():
            self.reset_parameters()
        _to(self, device, dtype)

    def reset_parameters(self):
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input):
        return conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation,
                      self.groups)

    def extra_repr(self):
        options = "".join(f", {name}={value}" for name, value, default in (
            ("dilation", self.dilation, 1), ("groups", self.groups, 1)) if value != default)
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}{options}, bias={self.bias is not None}")


class BatchNorm2d(Module):
    """Batch normalisation over channels; gamma 1, beta 0; the running statistics and
    the count of batches seen (``num_batches_tracked``) as buffers.

    momentum: the running statistics' update weight; None for the cumulative mean over
    the batches seen.  affine=False: no gamma and beta.  track_running_stats=False: no
    running statistics, batch statistics in eval mode too."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = Parameter(np.ones((num_features,), np.float32))
            self.bias = Parameter(np.zeros((num_features,), np.float32))
        else:
            self.weight = self.bias = None
        if track_running_stats:
            self.register_buffer("running_mean", Tensor(np.zeros((num_features,), np.float32)))
            self.register_buffer("running_var", Tensor(np.ones((num_features,), np.float32)))
            self.register_buffer("num_batches_tracked", Tensor(np.array(0, dtype=np.int64)))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        _to(self, device, dtype)

    def reset_running_stats(self):
        if self.track_running_stats:
            init.zeros_(self.running_mean)
            init.ones_(self.running_var)
            init.zeros_(self.num_batches_tracked)

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            init.zeros_(self.bias)

    def upgrade_state_dict(self, state, prefix):
        """Checkpoints from before ``num_batches_tracked`` (older minidense) load: the
        count starts at 0, as PyTorch does for its own older checkpoints."""
        if (self.track_running_stats and prefix + "running_mean" in state
                and prefix + "num_batches_tracked" not in state):
            state[prefix + "num_batches_tracked"] = np.array(0, dtype=np.int64)

    def batch_norm_arguments(self, x):
        """The arguments of the op for this call, as PyTorch's ``_BatchNorm.forward``:
        in training mode the batch is counted, and with momentum=None the update weight
        is 1 / (batches seen)."""
        momentum = 0.0 if self.momentum is None else self.momentum
        # md.recompute runs this forward a second time in backward: count once (the op
        # likewise updates the running statistics once).
        if self.training and self.track_running_stats and not is_recomputing():
            self.num_batches_tracked.data += 1
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked.data)
        use_batch_statistics = self.training or self.running_mean is None
        keep_running = not self.training or self.track_running_stats
        weight, bias = self.weight, self.bias
        if weight is None:  # affine=False: gamma 1 and beta 0, not trained
            xp = backend.get_array_module(x.data)
            weight = Tensor(xp.ones(x.shape[1], dtype=x.dtype))
            bias = Tensor(xp.zeros(x.shape[1], dtype=x.dtype))
        return dict(weight=weight, bias=bias,
                    running_mean=self.running_mean if keep_running else None,
                    running_var=self.running_var if keep_running else None,
                    training=use_batch_statistics, momentum=momentum, eps=self.eps)

    def forward(self, input):
        return batch_norm(input, **self.batch_norm_arguments(input))

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


class BatchNormReLU2d(BatchNorm2d):
    """BatchNorm2d then ReLU as one op (``md.batch_norm_relu``): one pass over memory fewer
    each way, and no ReLU output kept.  Its parameters and buffers are BatchNorm2d's,
    under the same names.  Models get it from ``nn.fuse_bn_relu``, which leaves their
    forward reading BN, then ReLU.  Under ``md.plain_ops()``, the two ops again."""

    def forward(self, input):
        if not fast_paths_enabled():
            return relu(super().forward(input))
        return batch_norm_relu(input, **self.batch_norm_arguments(input))


class Linear(Module):
    """Fully connected layer, y = x W^T + b.  PyTorch's default initialisation: W and b
    uniform within +-1/sqrt(in_features) (W by Kaiming-uniform with a = sqrt(5))."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(np.zeros((out_features, in_features), np.float32))
        self.bias = Parameter(np.zeros((out_features,), np.float32)) if bias else None
        if initialising():
            self.reset_parameters()
        _to(self, device, dtype)

    reset_parameters = Conv2d.reset_parameters

    def forward(self, input):
        return linear(input, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _InplaceAccepted(Module):
    """``inplace=True`` is accepted, for PyTorch code, and runs out of place: the output
    is a new tensor and the input is unchanged (a deliberate difference)."""

    def __init__(self, inplace=False):
        super().__init__()
        self.inplace = inplace

    def extra_repr(self):
        return "inplace=True" if self.inplace else ""


class ReLU(_InplaceAccepted):
    def forward(self, input):
        return relu(input)


class Sigmoid(Module):
    def forward(self, input):
        return sigmoid(input)


class Tanh(Module):
    def forward(self, input):
        return tanh(input)


class Softmax(Module):
    def __init__(self, dim=None):
        super().__init__()
        self.dim = dim

    def forward(self, input):
        return softmax(input, self.dim)

    def extra_repr(self):
        return f"dim={self.dim}"


class LogSoftmax(Softmax):
    def forward(self, input):
        return log_softmax(input, self.dim)


class _Pool2d(Module):
    """What every pooling window prints (stride defaults to the kernel size)."""

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AvgPool2d(_Pool2d):
    """Mean over each window (stride defaults to the kernel size); padding counts as zeros."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode, self.count_include_pad = ceil_mode, count_include_pad
        self.divisor_override = divisor_override

    def forward(self, input):
        return avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                          self.count_include_pad, self.divisor_override)


class MaxPool2d(_Pool2d):
    """Maximum over each window (stride defaults to the kernel size); padding is -inf."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False,
                 ceil_mode=False):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.return_indices, self.ceil_mode = dilation, return_indices, ceil_mode

    def forward(self, input):
        if self.return_indices:
            raise NotImplementedError("MaxPool2d: return_indices=True is not supported by minidense")
        return max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                          self.ceil_mode)


class AdaptiveAvgPool2d(Module):
    """Means over windows that give an ``output_size`` map; AdaptiveAvgPool2d(1) is
    global average pooling, (N, C, H, W) -> (N, C, 1, 1)."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, input):
        return adaptive_avg_pool2d(input, self.output_size)

    def extra_repr(self):
        return f"output_size={self.output_size}"


class GlobalAvgPool2d(Module):
    """(N, C, H, W) -> (N, C): AdaptiveAvgPool2d(1) and the flattening in one."""

    def forward(self, input):
        return global_avg_pool2d(input)


class Dropout(_InplaceAccepted):
    def __init__(self, p=0.5, inplace=False):
        super().__init__(inplace)
        if not 0 <= p <= 1:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = p

    def forward(self, input):
        return dropout(input, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}" + (", inplace=True" if self.inplace else "")


class Identity(Module):
    """The input itself; any constructor arguments are ignored, as in PyTorch."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, input):
        return input


class Flatten(Module):
    """Dims ``start_dim`` to ``end_dim`` merged: (N, C, H, W) -> (N, C*H*W) by default."""

    def __init__(self, start_dim=1, end_dim=-1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, input):
        return flatten(input, self.start_dim, self.end_dim)

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class CrossEntropyLoss(Module):
    """``F.cross_entropy`` with its settings fixed: loss = criterion(logits, labels)."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.size_average, self.reduce = size_average, reduce
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing

    def forward(self, input, target):
        return cross_entropy(input, target, self.weight, self.size_average, self.ignore_index,
                             self.reduce, self.reduction, self.label_smoothing)


class MSELoss(Module):
    def __init__(self, size_average=None, reduce=None, reduction="mean"):
        super().__init__()
        self.size_average, self.reduce, self.reduction = size_average, reduce, reduction

    def forward(self, input, target):
        return mse_loss(input, target, self.size_average, self.reduce, self.reduction)


class _ModuleSequence(Module):
    """Modules numbered "0", "1", ... in order: indexing and slicing, iteration, length."""

    def append(self, module):
        self.add_module(str(len(self._modules)), module)
        return self

    def extend(self, modules):
        for m in modules:
            self.append(m)
        return self

    def __len__(self):
        return len(self._modules)

    def _key(self, index):
        keys = list(self._modules)
        if not -len(keys) <= index < len(keys):
            raise IndexError(f"{type(self).__name__}: index {index} is out of range for "
                             f"{len(keys)} modules")
        return keys[index]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._sliced(list(self._modules.items())[index])
        return self._modules[self._key(index)]

    def __setitem__(self, index, module):
        self.add_module(self._key(index), module)

    def __delitem__(self, index):
        """Removes the module(s); the rest are numbered again from 0, as in PyTorch."""
        gone = set(list(self._modules)[index] if isinstance(index, slice) else [self._key(index)])
        self._renumber([m for key, m in self._modules.items() if key not in gone])

    def insert(self, index, module):
        modules = list(self._modules.values())
        modules.insert(index, module)
        self._renumber(modules)

    def _renumber(self, modules):
        for key in list(self._modules):
            del self._modules[key]
            object.__delattr__(self, key)
        self.extend(modules)

    def __iter__(self):
        return iter(self._modules.values())


class Sequential(_ModuleSequence):
    """Modules applied in order; ``Sequential(a, b)`` or ``Sequential(OrderedDict(...))``.
    A slice is a Sequential of those modules, under their names."""

    def __init__(self, *args):
        super().__init__()
        if len(args) == 1 and isinstance(args[0], dict):
            for name, m in args[0].items():
                self.add_module(name, m)
        else:
            for m in args:
                self.append(m)

    def _sliced(self, items):
        return Sequential(OrderedDict(items))

    def forward(self, input):
        for m in self._modules.values():
            input = m(input)
        return input


class ModuleList(_ModuleSequence):
    """A list of modules whose parameters the owner registers; it has no forward.  A
    slice is a ModuleList, numbered from 0."""

    def __init__(self, modules=None):
        super().__init__()
        self.extend(modules or ())

    def _sliced(self, items):
        return ModuleList(m for _, m in items)


class ModuleDict(Module):
    """Modules by name, in insertion order; it has no forward."""

    def __init__(self, modules=None):
        super().__init__()
        if modules is not None:
            self.update(modules)

    def __getitem__(self, key):
        return self._modules[key]

    def __setitem__(self, key, module):
        self.add_module(key, module)

    def __delitem__(self, key):
        del self._modules[key]
        object.__delattr__(self, key)

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules)

    def __contains__(self, key):
        return key in self._modules

    def keys(self):
        return self._modules.keys()

    def items(self):
        return self._modules.items()

    def values(self):
        return self._modules.values()

    def update(self, modules):
        for key, module in (modules.items() if hasattr(modules, "items") else modules):
            self[key] = module

    def pop(self, key):
        module = self[key]
        del self[key]
        return module

    def clear(self):
        for key in list(self._modules):
            del self[key]


class ReLU6(Module):
    """min(max(x, 0), 6) (``md.relu6``).  ``inplace`` is accepted, as PyTorch's, and the
    op runs out of place."""

    def __init__(self, inplace=False):
        super().__init__()
        self.inplace = inplace

    def forward(self, input):
        return relu6(input)

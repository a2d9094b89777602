"""PyTorch twins of minidense's models: the same architectures written with torch.nn,
with the same module names, so that minidense's state dict loads into them directly
(only PyTorch's ``num_batches_tracked`` counters are missing).

    twin = torch_twins.get("densenet_bc100_k12")     # a named CIFAR model
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()},
                         strict=False)

Shared by tests/test_models.py (logits and gradients agree) and
benchmarks/train_step.py (the side-by-side training step).  Importing this module
needs torch.
"""
import math
from collections import OrderedDict

import torch


def densenet(blocks, k, bottleneck, theta, stem_channels, imagenet, classes):
    """The twin of md.models.DenseNet: block sizes, growth rate k, bottleneck layers or
    not, compression theta, the stem's channels, the ImageNet stem or the CIFAR one."""
    nn = torch.nn

    def composite(c_in, c_out, kernel, index):
        return [(f"norm{index}", nn.BatchNorm2d(c_in)), (f"relu{index}", nn.ReLU()),
                (f"conv{index}", nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False))]

    class Block(nn.Module):
        def __init__(self, n, c):
            super().__init__()
            for i in range(n):
                parts = (composite(c + i * k, 4 * k, 1, 1) + composite(4 * k, k, 3, 2) if bottleneck
                         else composite(c + i * k, k, 3, 1))
                self.add_module(f"layer{i + 1}", nn.Sequential(OrderedDict(parts)))

        def forward(self, x):
            for layer in self.children():
                x = torch.cat([x, layer(x)], dim=1)
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            if imagenet:
                self.stem = nn.Sequential(OrderedDict(
                    conv=nn.Conv2d(3, stem_channels, 7, 2, 3, bias=False), norm=nn.BatchNorm2d(stem_channels),
                    relu=nn.ReLU(), pool=nn.MaxPool2d(3, 2, 1)))
            else:
                self.stem = nn.Conv2d(3, stem_channels, 3, padding=1, bias=False)
            c = stem_channels
            for b, n in enumerate(blocks, start=1):
                self.add_module(f"block{b}", Block(n, c))
                c += n * k
                if b < len(blocks):
                    out = math.floor(theta * c)
                    self.add_module(f"transition{b}", nn.Sequential(OrderedDict(
                        composite(c, out, 1, "") + [("pool", nn.AvgPool2d(2))])))
                    c = out
            self.classifier = nn.Sequential(OrderedDict(
                norm=nn.BatchNorm2d(c), relu=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(), fc=nn.Linear(c, classes)))

        def forward(self, x):
            for module in self.children():
                x = module(x)
            return x

    return Net()


def resnet(bottleneck, blocks, widths, imagenet, shortcut, classes, stride_in_3x3=False):
    """The twin of md.models.ResNet: bottleneck or basic blocks, blocks and width per
    stage, the ImageNet stem or the CIFAR one, shortcut option "A" (zero padding) or "B"."""
    nn, F = torch.nn, torch.nn.functional
    expansion = 4 if bottleneck else 1

    class ZeroPad(nn.Module):
        def __init__(self, c_out, stride):
            super().__init__()
            self.c_out, self.stride = c_out, stride

        def forward(self, x):
            x = x[:, :, ::self.stride, ::self.stride]
            return F.pad(x, (0, 0, 0, 0, 0, self.c_out - x.shape[1]))

    class Block(nn.Module):
        def __init__(self, c_in, width, stride):
            super().__init__()
            c_out = width * expansion
            if bottleneck:
                s1, s2 = (1, stride) if stride_in_3x3 else (stride, 1)
                self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, s1, bias=False), nn.BatchNorm2d(width)
                self.conv2 = nn.Conv2d(width, width, 3, s2, 1, bias=False)
                self.bn2 = nn.BatchNorm2d(width)
                self.conv3, self.bn3 = nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
            else:
                self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(width)
                self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
            if stride == 1 and c_in == c_out:
                self.shortcut = nn.Identity()
            elif shortcut == "A":
                self.shortcut = ZeroPad(c_out, stride)
            else:
                self.shortcut = nn.Sequential(OrderedDict(
                    conv=nn.Conv2d(c_in, c_out, 1, stride, bias=False), norm=nn.BatchNorm2d(c_out)))

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            if bottleneck:
                y = F.relu(self.bn2(self.conv2(y)))
                y = self.bn3(self.conv3(y))
            else:
                y = self.bn2(self.conv2(y))
            return F.relu(y + self.shortcut(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            if imagenet:
                c = 64
                self.stem = nn.Sequential(OrderedDict(
                    conv=nn.Conv2d(3, c, 7, 2, 3, bias=False), norm=nn.BatchNorm2d(c), relu=nn.ReLU(),
                    pool=nn.MaxPool2d(3, 2, 1)))
            else:
                c = widths[0]
                self.stem = nn.Sequential(OrderedDict(
                    conv=nn.Conv2d(3, c, 3, 1, 1, bias=False), norm=nn.BatchNorm2d(c), relu=nn.ReLU()))
            for s, (n, width) in enumerate(zip(blocks, widths), start=1):
                stage = OrderedDict()
                for b in range(n):
                    stage[f"block{b + 1}"] = Block(c, width, 2 if s > 1 and b == 0 else 1)
                    c = width * expansion
                self.add_module(f"stage{s}", nn.Sequential(stage))
            self.classifier = nn.Sequential(OrderedDict(
                pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(c, classes)))

        def forward(self, x):
            for module in self.children():
                x = module(x)
            return x

    return Net()


def densenet_cifar(depth, growth_rate, bottleneck=False, compression=1.0, classes=10):
    """The twin of md.models.densenet_cifar: 3 blocks of (L - 4) / 3 layers, half as many
    with bottlenecks; 2k stem channels for DenseNet-BC, 16 otherwise."""
    per_layer = 6 if bottleneck else 3
    n = (depth - 4) // per_layer
    stem_channels = 2 * growth_rate if bottleneck and compression < 1 else 16
    return densenet((n, n, n), growth_rate, bottleneck, compression, stem_channels, False, classes)


def resnet_cifar(depth, shortcut="A", classes=10):
    """The twin of md.models.resnet_cifar: 3 stages of (L - 2) / 6 basic blocks, 16/32/64 channels."""
    n = (depth - 2) // 6
    return resnet(False, (n, n, n), (16, 32, 64), False, shortcut, classes)


# The CIFAR models of the papers' tables, by their md.models names.
CIFAR = {
    "densenet40_k12": lambda: densenet_cifar(40, 12),
    "densenet100_k12": lambda: densenet_cifar(100, 12),
    "densenet100_k24": lambda: densenet_cifar(100, 24),
    "densenet_bc100_k12": lambda: densenet_cifar(100, 12, bottleneck=True, compression=0.5),
    "densenet_bc250_k24": lambda: densenet_cifar(250, 24, bottleneck=True, compression=0.5),
    "densenet_bc190_k40": lambda: densenet_cifar(190, 40, bottleneck=True, compression=0.5),
    **{f"resnet{depth}": (lambda depth=depth: resnet_cifar(depth)) for depth in (20, 32, 44, 56, 110, 1202)},
}


def get(name):
    """The twin of ``md.models.get(name)`` for the CIFAR models of the papers' tables."""
    if name not in CIFAR:
        raise ValueError(f"torch_twins.get: no twin for {name!r}; twins: {', '.join(CIFAR)}")
    return CIFAR[name]()

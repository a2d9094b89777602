"""PyTorch twins of minidense's models: the same architectures written with torch.nn,
with the same module names, so that minidense's state dict loads into them directly
(only PyTorch's ``num_batches_tracked`` counters are missing).

    twin = torch_twins.get("densenet_bc100_k12")     # a named CIFAR model
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()},
                         strict=False)

Shared by tests/test_models.py (logits and gradients agree) and
benchmarks/train_step.py (the side-by-side training step).  Importing this module
needs torch.

``torchvision(name)`` builds torchvision's ImageNet DenseNets, ResNets and MobileNetV2
with torchvision's own module names and layout (torchvision 0.29's models/densenet.py,
models/resnet.py and models/mobilenetv2.py, without their options), for
tests/test_pretrained.py: torchvision itself does not import beside the CPU build of
torch these machines have.  minidense's MobileNetV2 has torchvision's names, so its
CIFAR twin is the same code with CIFAR's strides.
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
    "mobilenet_v2_cifar": lambda: torchvision_mobilenet_v2(num_classes=10, cifar=True),
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


# ---------------------------------------------------------------------------
# torchvision's ImageNet models, under torchvision's names
# ---------------------------------------------------------------------------
def torchvision_densenet(growth_rate, block_config, num_init_features, num_classes=1000):
    """torchvision.models.DenseNet (bn_size 4, no dropout): ``features`` holds conv0,
    norm0, relu0, pool0, denseblockN (denselayerM: norm1, relu1, conv1, norm2, relu2,
    conv2), transitionN (norm, relu, conv, pool) and norm5; ``classifier`` is a Linear."""
    nn, F = torch.nn, torch.nn.functional

    class DenseLayer(nn.Module):
        def __init__(self, c_in):
            super().__init__()
            width = 4 * growth_rate
            self.norm1, self.relu1 = nn.BatchNorm2d(c_in), nn.ReLU()
            self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
            self.norm2, self.relu2 = nn.BatchNorm2d(width), nn.ReLU()
            self.conv2 = nn.Conv2d(width, growth_rate, 3, padding=1, bias=False)

        def forward(self, features):
            x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
            return self.conv2(self.relu2(self.norm2(x)))

    class DenseBlock(nn.ModuleDict):
        def forward(self, x):
            features = [x]
            for layer in self.values():
                features.append(layer(features))
            return torch.cat(features, 1)

    class DenseNet(nn.Module):
        def __init__(self):
            super().__init__()
            c = num_init_features
            self.features = nn.Sequential(OrderedDict([
                ("conv0", nn.Conv2d(3, c, 7, 2, 3, bias=False)), ("norm0", nn.BatchNorm2d(c)),
                ("relu0", nn.ReLU()), ("pool0", nn.MaxPool2d(3, 2, 1))]))
            for i, n in enumerate(block_config):
                block = DenseBlock()
                for j in range(n):
                    block.add_module(f"denselayer{j + 1}", DenseLayer(c + j * growth_rate))
                self.features.add_module(f"denseblock{i + 1}", block)
                c += n * growth_rate
                if i != len(block_config) - 1:
                    self.features.add_module(f"transition{i + 1}", nn.Sequential(OrderedDict([
                        ("norm", nn.BatchNorm2d(c)), ("relu", nn.ReLU()),
                        ("conv", nn.Conv2d(c, c // 2, 1, bias=False)), ("pool", nn.AvgPool2d(2, 2))])))
                    c //= 2
            self.features.add_module("norm5", nn.BatchNorm2d(c))
            self.classifier = nn.Linear(c, num_classes)

        def forward(self, x):
            x = F.adaptive_avg_pool2d(F.relu(self.features(x)), (1, 1))
            return self.classifier(torch.flatten(x, 1))

    return DenseNet()


def torchvision_resnet(bottleneck, layers, num_classes=1000):
    """torchvision.models.ResNet: conv1, bn1, relu, maxpool, layer1..layer4 (blocks
    numbered from 0: conv1, bn1, conv2, bn2[, conv3, bn3], relu, downsample.0 / .1),
    avgpool, fc.  Bottlenecks subsample in conv2, the 3x3 convolution (ResNet v1.5)."""
    nn = torch.nn
    expansion = 4 if bottleneck else 1

    class Block(nn.Module):
        def __init__(self, c_in, planes, stride, downsample):
            super().__init__()
            if bottleneck:
                self.conv1, self.bn1 = nn.Conv2d(c_in, planes, 1, bias=False), nn.BatchNorm2d(planes)
                self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
                self.bn2 = nn.BatchNorm2d(planes)
                self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
                self.bn3 = nn.BatchNorm2d(planes * 4)
            else:
                self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(planes)
                self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
                self.bn2 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU()
            self.downsample = downsample

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            if bottleneck:
                out = self.bn3(self.conv3(self.relu(out)))
            identity = x if self.downsample is None else self.downsample(x)
            return self.relu(out + identity)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
            c = 64
            for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
                stride = 1 if i == 0 else 2
                downsample = None
                if stride != 1 or c != planes * expansion:
                    downsample = nn.Sequential(nn.Conv2d(c, planes * expansion, 1, stride, bias=False),
                                               nn.BatchNorm2d(planes * expansion))
                blocks = [Block(c, planes, stride, downsample)]
                c = planes * expansion
                blocks += [Block(c, planes, 1, None) for _ in range(1, n)]
                self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(c, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return ResNet()


def torchvision_mobilenet_v2(num_classes=1000, cifar=False, dropout=0.2):
    """torchvision.models.MobileNetV2 at width 1: ``features`` holds the first
    Conv2dNormActivation (conv, BN, ReLU6), 17 InvertedResiduals (``conv``: [the 1x1
    expansion (conv, BN, ReLU6)], the 3x3 depthwise one (conv, BN, ReLU6), the 1x1
    projection conv and its BN) and the last 1x1 Conv2dNormActivation; ``classifier`` is
    Dropout then Linear.  ``cifar``: stride 1 in the first convolution and in the first
    stride-2 sequence."""
    nn, F = torch.nn, torch.nn.functional
    # t, c, n, s (Sandler et al. 2018, Table 2; torchvision's inverted_residual_setting)
    setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
               [6, 160, 3, 2], [6, 320, 1, 1]]
    if cifar:
        setting[1][3] = 1

    def conv_norm_activation(c_in, c_out, kernel, stride=1, groups=1):
        return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups,
                                       bias=False),
                             nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True))

    class InvertedResidual(nn.Module):
        def __init__(self, inp, oup, stride, expand_ratio):
            super().__init__()
            hidden_dim = int(round(inp * expand_ratio))
            self.use_res_connect = stride == 1 and inp == oup
            layers = [conv_norm_activation(inp, hidden_dim, 1)] if expand_ratio != 1 else []
            layers += [conv_norm_activation(hidden_dim, hidden_dim, 3, stride, groups=hidden_dim),
                       nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res_connect else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            input_channel, last_channel = 32, 1280
            features = [conv_norm_activation(3, input_channel, 3, 1 if cifar else 2)]
            for t, c, n, s in setting:
                for i in range(n):
                    features.append(InvertedResidual(input_channel, c, s if i == 0 else 1, t))
                    input_channel = c
            features.append(conv_norm_activation(input_channel, last_channel, 1))
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_channel, num_classes))

        def forward(self, x):
            x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
            return self.classifier(torch.flatten(x, 1))

    return MobileNetV2()


TORCHVISION = {
    "mobilenet_v2": lambda **kw: torchvision_mobilenet_v2(**kw),
    "densenet121": lambda **kw: torchvision_densenet(32, (6, 12, 24, 16), 64, **kw),
    "densenet161": lambda **kw: torchvision_densenet(48, (6, 12, 36, 24), 96, **kw),
    "densenet169": lambda **kw: torchvision_densenet(32, (6, 12, 32, 32), 64, **kw),
    "densenet201": lambda **kw: torchvision_densenet(32, (6, 12, 48, 32), 64, **kw),
    "resnet18": lambda **kw: torchvision_resnet(False, (2, 2, 2, 2), **kw),
    "resnet34": lambda **kw: torchvision_resnet(False, (3, 4, 6, 3), **kw),
    "resnet50": lambda **kw: torchvision_resnet(True, (3, 4, 6, 3), **kw),
    "resnet101": lambda **kw: torchvision_resnet(True, (3, 4, 23, 3), **kw),
    "resnet152": lambda **kw: torchvision_resnet(True, (3, 8, 36, 3), **kw),
}


def torchvision(name, **options):
    """The twin of ``torchvision.models.<name>(**options)`` (options: num_classes)."""
    if name not in TORCHVISION:
        raise ValueError(f"torch_twins.torchvision: no twin for {name!r}; twins: {', '.join(TORCHVISION)}")
    return TORCHVISION[name](**options)

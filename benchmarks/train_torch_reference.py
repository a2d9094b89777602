"""The same training run in PyTorch, for comparison with ``python -m minidense.train``.

Everything but the framework is shared with minidense's run: the model starts from
minidense's initial weights (copied into an equivalent PyTorch model), the batches
come from ``md.data.DataLoader`` with the same seed (same order, crops, flips and
normalisation), and the learning rate of every step comes from minidense's schedule.
So the two runs differ only in the arithmetic of the framework, and their per-epoch
accuracies should agree to within run-to-run noise.

    python benchmarks/train_torch_reference.py --model resnet20 --epochs 5 --schedule cosine \\
        --out benchmarks/results/resnet20-cpu-5ep-torch.jsonl

Supports the CIFAR families: resnet20/32/44/56/110 (option A shortcuts), densenet40_k12,
densenet100_k12, densenet_bc100_k12 and "densenet_cifar" with --model-args.  Don't run
it at the same time as a minidense run on a small machine: both want every core.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minidense as md  # noqa: E402
from minidense import data, train  # noqa: E402


class BasicBlockA(tnn.Module):
    """He et al. (2016) basic block with the option-A (zero-padding) shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(cout)
        self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x[:, :, ::self.stride, ::self.stride]
        if self.extra:
            short = F.pad(short, (0, 0, 0, 0, 0, self.extra))
        return F.relu(out + short)


class ResNetCifar(tnn.Module):
    def __init__(self, depth, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv = tnn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = tnn.BatchNorm2d(16)
        blocks, cin = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for b in range(n):
                blocks.append(BasicBlockA(cin, width, 2 if stage and not b else 1))
                cin = width
        self.blocks = tnn.Sequential(*blocks)
        self.fc = tnn.Linear(64, num_classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(x.mean(dim=(2, 3)))


def bn_relu_conv(cin, cout, k):
    return [tnn.BatchNorm2d(cin), tnn.ReLU(), tnn.Conv2d(cin, cout, k, 1, k // 2, bias=False)]


class DenseBlock(tnn.Module):
    def __init__(self, layers, cin, k, bottleneck):
        super().__init__()
        self.layers = tnn.ModuleList(
            tnn.Sequential(*(bn_relu_conv(cin + i * k, 4 * k, 1) + bn_relu_conv(4 * k, k, 3)
                             if bottleneck else bn_relu_conv(cin + i * k, k, 3)))
            for i in range(layers))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class DenseNetCifar(tnn.Module):
    """Huang et al. (2017), CIFAR layout; the same module order as md.models.DenseNet."""

    def __init__(self, depth, k, bottleneck, compression, num_classes=10):
        super().__init__()
        per_block = (depth - 4) // (6 if bottleneck else 3)
        channels = 2 * k if bottleneck and compression < 1 else 16
        parts = [tnn.Conv2d(3, channels, 3, 1, 1, bias=False)]
        for b in range(3):
            parts.append(DenseBlock(per_block, channels, k, bottleneck))
            channels += per_block * k
            if b < 2:
                reduced = math.floor(compression * channels)
                parts.append(tnn.Sequential(*bn_relu_conv(channels, reduced, 1), tnn.AvgPool2d(2)))
                channels = reduced
        parts += [tnn.BatchNorm2d(channels), tnn.ReLU()]
        self.features = tnn.Sequential(*parts)
        self.fc = tnn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def torch_model(name, model_args):
    named = {"resnet20": ("resnet", 20), "resnet32": ("resnet", 32), "resnet44": ("resnet", 44),
             "resnet56": ("resnet", 56), "resnet110": ("resnet", 110),
             "densenet40_k12": ("densenet", dict(depth=40, growth_rate=12)),
             "densenet100_k12": ("densenet", dict(depth=100, growth_rate=12)),
             "densenet_bc100_k12": ("densenet", dict(depth=100, growth_rate=12, bottleneck=True,
                                                     compression=0.5))}
    kind, config = named.get(name, (None, None))
    if name == "resnet_cifar":
        kind, config = "resnet", model_args["depth"]
    if name == "densenet_cifar":
        kind, config = "densenet", model_args
    if kind == "resnet":
        return ResNetCifar(config)
    if kind == "densenet":
        return DenseNetCifar(config["depth"], config["growth_rate"], config.get("bottleneck", False),
                             config.get("compression", 1.0))
    raise SystemExit(f"train_torch_reference: no PyTorch version of {name}")


def copy_weights(source, target):
    """minidense parameters and BN statistics into the PyTorch model, in registration
    order (both models register them in the same order), shapes checked."""
    ours = list(source.state_dict().items())
    theirs = [(k, v) for k, v in target.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(ours) != len(theirs):
        raise SystemExit(f"different models: {len(ours)} tensors here, {len(theirs)} in PyTorch")
    # minidense lists parameters first, then buffers; order PyTorch's the same way.
    params = [k for k, _ in target.named_parameters()]
    buffers = [k for k, _ in target.named_buffers() if not k.endswith("num_batches_tracked")]
    state = target.state_dict()
    for (name, array), key in zip(ours, params + buffers):
        if tuple(array.shape) != tuple(state[key].shape):
            raise SystemExit(f"shape mismatch: {name} {array.shape} vs {key} {tuple(state[key].shape)}")
        state[key].copy_(torch.from_numpy(np.asarray(array)))


def main(argv=None):
    p = train.build_parser()
    p.prog = "train_torch_reference"
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    settings = train.resolve_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_set, test_set = data.open_datasets(settings["data"], workers=settings["workers"] or None)
    if settings["subset"]:
        train_set = train_set.subset(settings["subset"])
    if settings["test_subset"]:
        test_set = test_set.subset(settings["test_subset"])
    mean, std = data.channel_mean_std(train_set.images)
    seed = settings["seed"]
    md.manual_seed(seed)
    reference = train.build_model(settings, train_set.num_classes)
    model = torch_model(settings["model"], train.parse_model_args(settings["model_args"]))
    copy_weights(reference, model)
    train_loader = data.DataLoader(train_set, settings["batch_size"], shuffle=True, drop_last=True,
                                   augment=settings["augment"], mean=mean, std=std, seed=seed)
    test_loader = data.DataLoader(test_set, max(settings["batch_size"], 256), mean=mean, std=std)
    steps = len(train_loader)
    schedule = train.build_scheduler(settings, md.optim.SGD([md.nn.Parameter(np.zeros(1))], lr=1.0),
                                     steps)
    opt = torch.optim.SGD(model.parameters(), lr=settings["lr"], momentum=settings["momentum"],
                          weight_decay=settings["wd"], nesterov=bool(settings["nesterov"]))
    out = Path(settings["out"] or f"benchmarks/results/{settings['model']}-torch.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, step = [], 0
    print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads; {settings['model']}, "
          f"{len(train_set)} training images, {settings['epochs']} epochs of {steps} batches")
    print(f"{'epoch':>5} {'train loss':>10} {'train acc':>9} {'test acc':>8} {'img/s':>7} {'time':>7}")
    for epoch in range(settings["epochs"]):
        model.train()
        start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        for images, labels in train_loader.iterate(epoch):
            for group in opt.param_groups:
                group["lr"] = settings["lr"] * schedule.lrs_at(step)[0]
            x, y = torch.from_numpy(images.data), torch.from_numpy(labels.data)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        train_time = time.perf_counter() - start
        model.eval()
        test_correct = test_seen = 0
        with torch.no_grad():
            for images, labels in test_loader.iterate(0):
                logits = model(torch.from_numpy(images.data))
                test_correct += int((logits.argmax(1) == torch.from_numpy(labels.data)).sum())
                test_seen += len(labels)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": 100 * correct / seen,
               "test_acc": 100 * test_correct / test_seen, "images_per_s": seen / train_time,
               "train_time_s": train_time, "peak_memory_mb": train.peak_memory_mb()}
        rows.append(row)
        print(f"{row['epoch']:5d} {row['train_loss']:10.4f} {row['train_acc']:8.2f}% "
              f"{row['test_acc']:7.2f}% {row['images_per_s']:7.0f} {train_time:6.0f}s", flush=True)
        train.write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows).encode())
    print(f"metrics: {out}")


if __name__ == "__main__":
    main()

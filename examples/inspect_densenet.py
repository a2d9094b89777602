"""Look inside DenseNet-BC (L=100, k=12) and follow the paper's Figure 2.

    python examples/inspect_densenet.py                        # untrained, random images
    python examples/inspect_densenet.py --weights run/best.npz --data ../shared/data/cifar10-jpeg.zip

1. The summary: output shape, parameters and multiply-accumulates of every stage
   (``--depth 0`` for every layer).
2. The autograd graph of one dense layer, layer 2 of block 1: the concatenation of x_0
   and x_1 followed by BN-ReLU-Conv(1x1)-BN-ReLU-Conv(3x3), written as DOT, and as SVG
   when Graphviz is installed.
3. The number of channels each layer sees: k_0 + (l-1)k in a block (Eq. 2).
4. Statistics of every stage's feature maps on a batch of images, and, inside each
   block, the mean magnitude of the block input's channels and of each layer's k new
   channels, all of which every later layer reads.
"""
import argparse
from pathlib import Path

import numpy as np

import minidense as md


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet_bc100_k12",
                        help="a DenseNet name from md.models.names (default: densenet_bc100_k12)")
    parser.add_argument("--weights", help="a state dict saved with md.save (e.g. a training run's)")
    parser.add_argument("--data", help="an image folder or .zip (train/<class>/*, test/<class>/*): "
                                       "use its first test images instead of random ones")
    parser.add_argument("--batch", type=int, default=8, help="images in the batch (default 8)")
    parser.add_argument("--depth", type=int, default=1,
                        help="summary rows: 1 per stage, 2 per dense layer, 0 every layer")
    parser.add_argument("--out", default="inspect_densenet", help="folder for the graph files")
    return parser.parse_args(argv)


def input_batch(args):
    """A batch of images: the first test images of --data, normalised, or N(0, 1) noise."""
    if args.data:
        test_set = md.data.ImageFolder(args.data, train=False)
        mean, std = md.data.channel_mean_std(test_set.images)
        images = test_set.images[:args.batch].astype(np.float32) / 255.0
        images = (images - mean) / std
        return md.tensor(images.transpose(0, 3, 1, 2).copy())
    return md.randn(args.batch, 3, 32, 32)


def write_dense_layer_graph(model, out_dir):
    """The graph of layer 2 of block 1, fed with two leaf feature maps x_0 and x_1."""
    block = model.block1
    k0, k = block.in_channels, model.growth_rate
    x0 = md.randn(2, k0, 8, 8, requires_grad=True)
    x1 = md.randn(2, k, 8, 8, requires_grad=True)
    layer = block.layer2
    x2 = layer(md.cat([x0, x1], 1))      # x_2 = H_2([x_0, x_1])
    names = {f"block1.layer2.{n}": p for n, p in layer.named_parameters()}
    names.update(x_0=x0, x_1=x1)
    dot = md.to_dot(x2, names=names, title="DenseNet-BC: layer 2 of block 1, x_2 = H_2([x_0, x_1])")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [md.render_dot(dot, out_dir / "dense_layer.dot")]
    try:
        written.append(md.render_dot(dot, out_dir / "dense_layer.svg"))
    except md.viz.GraphvizNotFound as error:
        print(f"(no picture: {error})")
    return written


def print_channels_seen(model):
    print("\nChannels each layer sees (Eq. 2: k_0 + (l-1)k), and what each block hands on:")
    for name, stage in model.named_children():
        if isinstance(stage, md.models.DenseBlock):
            seen = [layer.in_channels for layer in stage.children()]
            shown = ", ".join(map(str, seen[:4])) + (f", ..., {seen[-1]}" if len(seen) > 4 else "")
            print(f"  {name:12s} {len(seen):3d} layers see {shown} channels; "
                  f"output {stage.out_channels}")
        elif isinstance(stage, md.models.Transition):
            print(f"  {name:12s} compresses {stage.in_channels} -> {stage.out_channels} channels "
                  f"(theta = {model.compression}) and halves the map")


def print_feature_statistics(model, x, trained):
    # An untrained model's running statistics are still 0 and 1, so its eval mode would
    # not normalise at all: use the batch's statistics (training mode) instead.
    model.train(not trained)
    with md.no_grad():
        stages = model.features(x, return_all=True)
    mode = "eval mode" if trained else "untrained: training-mode BN, batch statistics"
    print(f"\nFeature maps of a batch of {x.shape[0]} images ({mode}):")
    print(f"  {'stage':12s} {'shape':>14s} {'mean':>8s} {'std':>8s} {'min':>8s} {'max':>8s}")
    for name, t in stages.items():
        a = t.numpy()
        print(f"  {name:12s} {str(a.shape[1:]):>14s} {a.mean():8.3f} {a.std():8.3f} "
              f"{a.min():8.3f} {a.max():8.3f}")
    print("\nInside each block: mean |activation| of the block input and of each layer's new "
          "channels\n(every layer adds k channels that all later layers read):")
    for name, stage in model.named_children():
        if not isinstance(stage, md.models.DenseBlock):
            continue
        a = np.abs(stages[name].numpy())
        k0, k = stage.in_channels, model.growth_rate
        layers = len(list(stage.children()))
        new_channels = " ".join(f"{a[:, k0 + i * k:k0 + (i + 1) * k].mean():.2f}" for i in range(layers))
        print(f"  {name}: input {a[:, :k0].mean():.2f} | layers 1..{layers}: {new_channels}")


def main(argv=None):
    args = parse_args(argv)
    md.manual_seed(0)
    model = md.models.get(args.model)
    if not isinstance(model, md.models.DenseNet):
        raise SystemExit(f"--model must be a DenseNet, got {args.model}")
    if args.weights:
        model.load_state_dict(md.load(args.weights))
    x = input_batch(args)
    md.summary(model, x.shape[1:], depth=args.depth or None)
    for path in write_dense_layer_graph(model, Path(args.out)):
        print(f"wrote {path}")
    print_channels_seen(model)
    print_feature_statistics(model, x, trained=bool(args.weights))


if __name__ == "__main__":
    main()

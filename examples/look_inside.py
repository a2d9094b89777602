"""Look inside an ImageNet DenseNet: what it sees in a photo, which channels of each dense
block respond, and how much each layer draws on the layers before it.

    python examples/look_inside.py --weights densenet121.safetensors --image photo.jpg
    python examples/look_inside.py --image photo.jpg      # random weights; says how to get torchvision's

1. ImageNet preprocessing with Pillow, as torchvision's weights expect: the shorter side
   resized to 256, the centre 224x224 cropped, scaled to [0, 1] and normalised with the
   ImageNet mean and std.
2. The top-5 classes, with their names.
3. Per dense block, the channels with the strongest mean response, and which layer made
   each one: block b's output holds its input's k_0 channels, then k new channels from each
   layer in turn (Eq. 2).  Their feature maps are drawn in feature_maps.png.
4. How much each layer of a block draws on each earlier one, as in the paper's Figure 5:
   layer l's first convolution reads the block input and the k channels of every earlier
   layer, and the mean absolute weight over each source's channels is drawn as a heat map
   (connectivity.png); the transition after the block (or, after the last block, the
   classifier) is the last target.
"""
import argparse
from pathlib import Path

import numpy as np

import minidense as md

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="a photo (any format Pillow reads)")
    parser.add_argument("--weights", help="a .safetensors file of torchvision's weights (or minidense's)")
    parser.add_argument("--model", default="densenet121",
                        help="densenet121, densenet161, densenet169 or densenet201 (default densenet121)")
    parser.add_argument("--resize", type=int, default=256, help="the shorter side first becomes this (256)")
    parser.add_argument("--crop", type=int, default=224, help="then the centre square of this side (224)")
    parser.add_argument("--channels", type=int, default=8, help="strongest channels shown per block (8)")
    parser.add_argument("--out", default="look_inside", help="folder for the PNG files")
    return parser.parse_args(argv)


def preprocess(path, resize, crop):
    """torchvision's ImageNet evaluation transform: resize, centre crop, normalise; (1, 3, crop, crop)."""
    from PIL import Image
    image = Image.open(path).convert("RGB")
    w, h = image.size
    scale = resize / min(w, h)
    image = image.resize((max(crop, round(w * scale)), max(crop, round(h * scale))), Image.BILINEAR)
    w, h = image.size
    left, top = int(round((w - crop) / 2)), int(round((h - crop) / 2))
    image = image.crop((left, top, left + crop, top + crop))
    x = (np.asarray(image, dtype=np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    return md.tensor(x.transpose(2, 0, 1)[None].copy())


def dense_blocks(model):
    """(name, block, the module after it) for each dense block: a transition or the classifier."""
    children = list(model.named_children())
    return [(name, stage, children[i + 1][1]) for i, (name, stage) in enumerate(children)
            if isinstance(stage, md.models.DenseBlock)]


def source_of(block, channel):
    """Which part of the block made this channel of its output: its input or layer l."""
    k0, k = block.in_channels, next(block.children()).growth_rate
    return "input" if channel < k0 else f"layer {(channel - k0) // k + 1}"


def top5(logits):
    names = md.data.imagenet_classes()
    z = logits.astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    print("\nTop-5 classes:")
    for i in np.argsort(-p)[:5]:
        print(f"  {p[i]:7.2%}  {i:4d}  {names[i]}")


def strongest_channels(model, stages, count):
    """Per block: the channels with the largest mean response, printed; {name: [(c, map), ...]}."""
    print(f"\nStrongest {count} channels of each dense block's output (mean activation, and which "
          f"layer made the channel):")
    chosen = {}
    for name, block, _ in dense_blocks(model):
        maps = stages[name].numpy()[0]
        response = maps.mean(axis=(1, 2))
        best = np.argsort(-response)[:count]
        chosen[name] = [(f"{name} c{c}\n({source_of(block, c)})", maps[c]) for c in best]
        print(f"  {name} ({maps.shape[0]} channels, {maps.shape[1]}x{maps.shape[2]}): " +
              ", ".join(f"{c} ({source_of(block, c)}) {response[c]:.2f}" for c in best))
    return chosen


def draws_on(model):
    """Per block, the matrix of the paper's Figure 5: entry (s, t) is the mean |weight| of
    target t's first convolution over the channels of source s (0: the block input, s:
    layer s); targets are layers 1..L and then the transition or the classifier."""
    matrices = {}
    for name, block, after in dense_blocks(model):
        layers = list(block.children())
        k0, k = block.in_channels, layers[0].growth_rate
        targets = [layer.conv1.weight for layer in layers]
        targets.append(after.conv.weight if isinstance(after, md.models.Transition) else after.fc.weight)
        grid = np.full((len(layers) + 1, len(targets)), np.nan)
        for t, weight in enumerate(targets):
            w = np.abs(weight.numpy()).reshape(weight.shape[0], weight.shape[1], -1)
            for s in range(t + 1):  # target t (from 0) reads the input and layers 1..t
                lo, hi = (0, k0) if s == 0 else (k0 + (s - 1) * k, k0 + s * k)
                grid[s, t] = w[:, lo:hi].mean()
        matrices[name] = grid
    print("\nHow much the last layer of each block draws on each source (mean |weight| of its first "
          "convolution,\nrelative to the strongest source; Figure 5 of the paper):")
    for name, grid in matrices.items():
        column = grid[:, -2]
        column = column[~np.isnan(column)]
        print(f"  {name}: input {column[0] / column.max():.2f}, layers 1..{len(column) - 1}: " +
              " ".join(f"{v / column.max():.2f}" for v in column[1:]))
    return matrices


def save_figure(figure, path):
    with md.files.atomic_write(path) as f:  # never a half-written picture under the real name
        figure.savefig(f, format="png", dpi=80)
    print(f"wrote {path}")


def draw_feature_maps(chosen, path, random_weights):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, cols = len(chosen), max(len(v) for v in chosen.values())
    figure, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.6 * rows), squeeze=False)
    for row, (name, maps) in zip(axes, chosen.items()):
        for ax, (title, feature_map) in zip(row, maps):
            ax.imshow(feature_map, cmap="viridis")
            ax.set_title(title, fontsize=7)
        for ax in row:
            ax.axis("off")
    figure.suptitle("Strongest feature maps per dense block" +
                    (" (random weights)" if random_weights else ""), fontsize=9)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.86 if rows == 1 else 0.9,
                           wspace=0.1, hspace=0.45)  # fixed: tight_layout costs a second here
    save_figure(figure, path)
    plt.close(figure)


def draw_connectivity(matrices, path, random_weights):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    figure, axes = plt.subplots(1, len(matrices), figsize=(3.2 * len(matrices), 3.3), squeeze=False)
    for ax, (name, grid) in zip(axes[0], matrices.items()):
        image = ax.imshow(grid, cmap="jet", origin="lower", aspect="auto", interpolation="nearest")
        last = "transition" if name != list(matrices)[-1] else "classifier"
        ax.set_title(name, fontsize=8)
        ax.set_xlabel(f"target layer (last: the {last})", fontsize=8)
        ax.set_ylabel("source layer (0: block input)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        figure.colorbar(image, ax=ax, fraction=0.046)
    figure.suptitle("Mean |weight| from each source to each target layer (paper, Fig. 5)" +
                    (": random weights" if random_weights else ""), fontsize=9)
    figure.subplots_adjust(left=0.05, right=0.97, bottom=0.16, top=0.84, wspace=0.45)
    save_figure(figure, path)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    md.manual_seed(0)
    if args.weights:
        model = md.models.get(args.model, weights=args.weights)
    else:
        print("No --weights: random weights, so the classes and pictures below mean nothing.\n"
              "To look inside a trained network, get torchvision's weights as .safetensors:\n" +
              md.models.pretrained.CONVERT_HINT)
        model = md.models.get(args.model)
    if not isinstance(model, md.models.DenseNet) or not dense_blocks(model):
        raise SystemExit(f"--model must be an ImageNet DenseNet, got {args.model}")
    x = preprocess(args.image, args.resize, args.crop)
    # Random weights come with running statistics of 0 and 1, which would not normalise at
    # all: use the image's own statistics (training-mode BN) for them.
    model.train(not args.weights)
    with md.no_grad():
        stages = model.features(x, return_all=True)
        logits = model.classifier(list(stages.values())[-1]).numpy()[0]
    top5(logits)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    draw_feature_maps(strongest_channels(model, stages, args.channels), out / "feature_maps.png",
                      not args.weights)
    draw_connectivity(draws_on(model), out / "connectivity.png", not args.weights)


if __name__ == "__main__":
    main()

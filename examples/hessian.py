"""The sharpest direction of a trained network: the top eigenvalue of the Hessian of
its loss with respect to its parameters, by power iteration (as PyHessian does).

    python -m minidense.train --data digits --epochs 3 --out runs/digits
    python examples/hessian.py runs/digits/best.npz

Power iteration needs only Hessian-vector products, never the Hessian itself (a
ResNet-20's would have 0.27M x 0.27M entries).  One product is two backward passes:
the gradient g of the loss, kept as a graph (``create_graph=True``), then the gradient
of g . v, which is H v:

    g = md.grad(loss, params, create_graph=True)
    hv = md.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), params)

The model is in eval mode (batch norm uses its running statistics), so the loss is a
function of the parameters alone, and the batch is the first ``--batch-size`` training
images, fixed.
"""
import argparse

import numpy as np

import minidense as md
from minidense import data
from minidense.evaluate import load_model


def hessian_vector_product(loss_fn, params, v):
    g = md.grad(loss_fn(), params, create_graph=True)
    dot = sum(((gi * vi).sum() for gi, vi in zip(g, v)), md.tensor(0.0, dtype=params[0].dtype))
    return md.grad(dot, params)


def top_eigenvalue(loss_fn, params, iterations=20, tolerance=1e-3, seed=0, log=print):
    """(eigenvalue, [the estimate at each iteration]): v <- Hv / |Hv|, estimate v . Hv."""
    rng = np.random.default_rng(seed)
    v = [md.tensor(rng.standard_normal(p.shape).astype(p.dtype)) for p in params]
    estimates = []
    for i in range(iterations):
        norm = float(np.sqrt(sum(float((vi * vi).sum().item()) for vi in v)))
        v = [vi / norm for vi in v]
        hv = hessian_vector_product(loss_fn, params, v)
        estimates.append(float(sum(float((h * vi).sum().item()) for h, vi in zip(hv, v))))
        change = abs(estimates[-1] - estimates[-2]) / abs(estimates[-1]) if i else float("inf")
        log(f"iteration {i + 1:3d}: eigenvalue {estimates[-1]:.6g}"
            + (f"  (relative change {change:.2e})" if i else ""))
        if change < tolerance:
            break
        v = hv
    return estimates[-1], estimates


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a last.npz or best.npz of minidense.train")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--tolerance", type=float, default=1e-3, help="stop when the estimate changes less")
    parser.add_argument("--data", help="the images (default: those the run was trained on)")
    args = parser.parse_args(argv)
    model, checkpoint = load_model(args.checkpoint)
    settings = checkpoint["settings"]
    train_set, _ = data.open_datasets(args.data or settings.get("data_used") or settings.get("data"),
                                      log=lambda *a: None)
    normalization = checkpoint["normalization"]
    loader = data.DataLoader(train_set, args.batch_size, mean=normalization["mean"],
                             std=normalization["std"])
    images, labels = next(iter(loader.iterate(0)))
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"{settings['model']}: {sum(p.data.size for p in params):,} parameters, "
          f"{len(labels)} training images, eval mode")
    value, _ = top_eigenvalue(lambda: md.cross_entropy(model(images), labels), params,
                              args.iterations, args.tolerance)
    print(f"top Hessian eigenvalue: {value:.6g}")


if __name__ == "__main__":
    main()

"""One MAML meta-step (Finn et al., 2017) on the digits: adapt to a task with one
gradient step, and learn from how well the adapted weights do.

    python examples/maml.py

A task is a 2-way classification of two digit classes.  For each task, the inner step
adapts the weights on a few support images; the outer loss is the adapted weights' loss
on query images; its gradient with respect to the *original* weights flows through the
inner step, so it needs the inner gradient as a graph (``create_graph=True``):

    adapted = [w - inner_lr * g for w, g in zip(weights, md.grad(support_loss, weights, create_graph=True))]
    meta_gradient = md.grad(query_loss(adapted), weights)

The network is written with functional weights (a list of tensors, not a Module), as
MAML needs: conv -> batch norm (the batch's statistics) -> ReLU -> max pooling -> linear.
"""
import argparse

import numpy as np

import minidense as md


def init_weights(rng, channels=8, classes=2):
    return [md.tensor(a.astype(np.float32), requires_grad=True) for a in (
        rng.normal(size=(channels, 1, 3, 3)) * np.sqrt(2 / 9), np.zeros(channels),
        np.ones(channels), np.zeros(channels), rng.normal(size=(classes, channels)),
        np.zeros(classes))]


def net(x, w):
    conv, bias, gamma, beta, fc, fc_bias = w
    h = md.relu(md.batch_norm(md.conv2d(x, conv, bias, padding=1), gamma, beta))
    return md.linear(md.global_avg_pool2d(md.max_pool2d(h, 2)), fc, fc_bias)


def meta_gradient(weights, tasks, inner_lr=0.4):
    """The mean over tasks of the query loss after one inner step, and its gradient."""
    total = None
    for support, support_labels, query, query_labels in tasks:
        inner = md.cross_entropy(net(support, weights), support_labels)
        grads = md.grad(inner, weights, create_graph=True)
        adapted = [w - inner_lr * g for w, g in zip(weights, grads)]
        loss = md.cross_entropy(net(query, adapted), query_labels)
        total = loss if total is None else total + loss
    total = total / len(tasks)
    return total, md.grad(total, weights)


def sample_tasks(digits, rng, count, shots, size):
    images = digits.images[..., :1].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    tasks = []
    for _ in range(count):
        a, b = rng.choice(10, 2, replace=False)
        picks = [rng.choice(np.flatnonzero(digits.labels == c), 2 * shots, replace=False) for c in (a, b)]
        support = np.concatenate([p[:shots] for p in picks])
        query = np.concatenate([p[shots:] for p in picks])
        labels = np.repeat([0, 1], shots)
        tasks.append((md.tensor(images[support]), md.tensor(labels), md.tensor(images[query]),
                      md.tensor(labels)))
    return tasks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--meta-lr", type=float, default=0.5)
    parser.add_argument("--meta-steps", type=int, default=3)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    digits = md.data.Digits(size=args.size)
    weights = init_weights(rng)
    tasks = sample_tasks(digits, rng, args.tasks, args.shots, args.size)
    for step in range(args.meta_steps):
        loss, grads = meta_gradient(weights, tasks)
        print(f"meta-step {step + 1}: query loss after adaptation {loss.item():.4f}")
        with md.no_grad():   # plain SGD on the meta-gradient
            weights = [md.tensor(w.data - args.meta_lr * g.data, requires_grad=True)
                       for w, g in zip(weights, grads)]


if __name__ == "__main__":
    main()

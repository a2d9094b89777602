"""Higher-order gradients against ``torch.autograd.grad(..., create_graph=True)`` in
float64, on the workloads that need them: a gradient penalty, a Hessian-vector product
of a ResNet-20, a MAML meta-gradient, and a third derivative through conv and batch
norm."""
import sys

import numpy as np
import pytest

import minidense as md
from conftest import REPO_ROOT

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
RTOL = 1e-8


def close(ours, theirs, name="", scale=None):
    """Equal to RTOL relative, an absolute RTOL * ``scale`` allowed (the largest value of
    the gradients compared together: a gradient that is zero in exact arithmetic, such
    as a bias's before batch norm, is rounding noise in both)."""
    theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else theirs
    scale = max(np.abs(theirs).max(), 1e-30) if scale is None else scale
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=RTOL, atol=RTOL * scale, err_msg=name)


def both(array, requires_grad=True):
    return (md.tensor(array, dtype=np.float64, requires_grad=requires_grad),
            torch.tensor(array, dtype=torch.float64, requires_grad=requires_grad))


def test_gradient_penalty_through_conv_bn_pool():
    """WGAN-GP's penalty, (||d critic / d x||_2 - 1)^2 per sample, differentiated with
    respect to the critic's weights, through conv, train-mode BN, ReLU, max pooling."""
    rng = np.random.default_rng(0)
    (x, xt), (w, wt), (g, gt), (b, bt), (fc, fct) = (
        both(a) for a in (rng.normal(size=(3, 2, 6, 6)), rng.normal(size=(4, 2, 3, 3)) * 0.5,
                          rng.uniform(0.5, 1.5, 4), rng.normal(size=4) * 0.1, rng.normal(size=(1, 4))))

    def ours(x):
        h = md.relu(md.batch_norm(md.conv2d(x, w, padding=1), g, b))
        return md.linear(md.global_avg_pool2d(md.max_pool2d(h, 2)), fc)

    def theirs(x):
        h = torch.relu(torch.nn.functional.batch_norm(torch.nn.functional.conv2d(xt if x is None else x, wt, padding=1),
                                                      None, None, gt, bt, training=True))
        return torch.nn.functional.linear(torch.nn.functional.max_pool2d(h, 2).mean(dim=(2, 3)), fct)

    (gx,) = md.grad(ours(x).sum(), [x], create_graph=True)
    penalty = ((gx.reshape(3, -1) ** 2).sum(axis=1) ** 0.5 - 1) ** 2
    grads = md.grad(penalty.sum(), [w, g, b, fc])
    (gxt,) = torch.autograd.grad(theirs(xt).sum(), [xt], create_graph=True)
    penalty_t = ((gxt.reshape(3, -1) ** 2).sum(dim=1) ** 0.5 - 1) ** 2
    grads_t = torch.autograd.grad(penalty_t.sum(), [wt, gt, bt, fct])
    close(penalty, penalty_t, "penalty")
    for name, a, bb in zip(["conv", "gamma", "beta", "fc"], grads, grads_t):
        close(a, bb, name)


def test_hessian_vector_product_of_a_resnet20():
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import torch_twins
    md.manual_seed(0)
    ours = md.models.resnet20().double()
    theirs = torch_twins.resnet_cifar(20).double()
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()}, strict=False)
    rng = np.random.default_rng(1)
    x_np, labels = rng.normal(size=(2, 3, 16, 16)), rng.integers(0, 10, 2)
    params = list(ours.parameters())
    named_t = dict(theirs.named_parameters())
    params_t = [named_t[name] for name, _ in ours.named_parameters()]
    v = [rng.normal(size=p.shape) for p in params]

    loss = md.cross_entropy(ours(md.tensor(x_np)), md.tensor(labels))
    g = md.grad(loss, params, create_graph=True)
    hv = md.grad(sum(((gi * md.tensor(vi)).sum() for gi, vi in zip(g, v)), md.tensor(0.0, dtype=np.float64)), params)

    loss_t = torch.nn.functional.cross_entropy(theirs(torch.tensor(x_np)), torch.tensor(labels))
    g_t = torch.autograd.grad(loss_t, params_t, create_graph=True)
    hv_t = torch.autograd.grad(sum((gi * torch.tensor(vi)).sum() for gi, vi in zip(g_t, v)), params_t)
    for (name, _), a, b in zip(ours.named_parameters(), hv, hv_t):
        close(a, b, name)


def test_maml_meta_gradient_through_bn_and_max_pooling():
    """One MAML meta-step with functional weights: an inner SGD step on the support set
    (its gradient kept as a graph), the query loss of the adapted weights, and its
    gradient with respect to the original weights."""
    rng = np.random.default_rng(2)
    shapes = [(3, 1, 3, 3), (3,), (3,), (3,), (2, 3)]
    init = [rng.normal(size=s) * 0.5 + (1.0 if i == 2 else 0.0) for i, s in enumerate(shapes)]
    ws, wts = zip(*(both(a) for a in init))
    support, query = rng.normal(size=(4, 1, 6, 6)), rng.normal(size=(4, 1, 6, 6))
    ys, yq = np.array([0, 1, 0, 1]), np.array([1, 0, 0, 1])
    F = torch.nn.functional

    def net(x, w):
        h = md.conv2d(x, w[0], w[1], padding=1)
        h = md.max_pool2d(md.relu(md.batch_norm(h, w[2], w[3])), 2)
        return md.linear(md.global_avg_pool2d(h), w[4])

    def net_t(x, w):
        h = F.conv2d(x, w[0], w[1], padding=1)
        h = F.max_pool2d(torch.relu(F.batch_norm(h, None, None, w[2], w[3], training=True)), 2)
        return F.linear(h.mean(dim=(2, 3)), w[4])

    inner = md.cross_entropy(net(md.tensor(support), ws), md.tensor(ys))
    adapted = [w - 0.4 * g for w, g in zip(ws, md.grad(inner, list(ws), create_graph=True))]
    meta = md.grad(md.cross_entropy(net(md.tensor(query), adapted), md.tensor(yq)), list(ws))

    inner_t = F.cross_entropy(net_t(torch.tensor(support), wts), torch.tensor(ys))
    adapted_t = [w - 0.4 * g for w, g in zip(wts, torch.autograd.grad(inner_t, list(wts), create_graph=True))]
    meta_t = torch.autograd.grad(F.cross_entropy(net_t(torch.tensor(query), adapted_t), torch.tensor(yq)), list(wts))
    scale = max(float(b.abs().max()) for b in meta_t)
    for i, (a, b) in enumerate(zip(meta, meta_t)):
        close(a, b, f"weight {i}", scale)


def torch_batch_norm(x, eps=1e-5):
    """Batch norm (training mode, gamma 1, beta 0) written with torch's elementary ops.
    PyTorch's own F.batch_norm is right to second order, but its third derivative is not:
    on this test's input it differs from that of these very ops by 1.9% (torch 2.13), so
    the third-order reference is this."""
    centred = x - x.mean(dim=(0, 2, 3), keepdim=True)
    return centred * ((centred * centred).mean(dim=(0, 2, 3), keepdim=True) + eps) ** -0.5


def test_third_derivative_through_conv_and_batch_norm():
    rng = np.random.default_rng(3)
    (x, xt), (w, wt) = both(rng.normal(size=(3, 2, 4, 4))), both(rng.normal(size=(2, 2, 3, 3)))
    g, b = md.tensor(np.ones(2)), md.tensor(np.zeros(2))
    y = md.batch_norm(md.conv2d(x, w, padding=1), g, b) ** 3
    yt = torch_batch_norm(torch.nn.functional.conv2d(xt, wt, padding=1)) ** 3
    (d1,) = md.grad(y.sum(), [x], create_graph=True)
    (d2,) = md.grad((d1 * d1).sum(), [w], create_graph=True)
    (d3,) = md.grad(d2.sum(), [x])
    (d1t,) = torch.autograd.grad(yt.sum(), [xt], create_graph=True)
    (d2t,) = torch.autograd.grad((d1t * d1t).sum(), [wt], create_graph=True)
    (d3t,) = torch.autograd.grad(d2t.sum(), [xt])
    close(d1, d1t, "first")
    close(d2, d2t, "second")
    close(d3, d3t, "third")

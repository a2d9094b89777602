"""The second-order examples on tiny sizes: examples/hessian.py on a checkpoint of the
training command, examples/gradient_penalty.py and examples/maml.py on the digits."""
import runpy
import sys

import numpy as np
import pytest

import minidense as md
from conftest import REPO_ROOT

pytest.importorskip("sklearn")   # the digits
EXAMPLES = REPO_ROOT / "examples"


def example(name):
    sys.path.insert(0, str(EXAMPLES))
    try:
        return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=name)
    finally:
        sys.path.remove(str(EXAMPLES))


def test_hessian_example_on_a_training_checkpoint(tmp_path, capsys):
    from minidense import train
    assert train.main(["--data", "digits", "--model", "resnet_cifar", "--model-args", "depth=8",
                       "--subset", "64", "--test-subset", "32", "--batch-size", "16", "--epochs", "1",
                       "--no-plot", "--out", str(tmp_path / "run")]) == 0
    hessian = example("hessian")
    hessian["main"]([str(tmp_path / "run" / "last.npz"), "--batch-size", "8", "--iterations", "4"])
    out = capsys.readouterr().out
    assert "iteration   4" in out or "relative change" in out
    assert "top Hessian eigenvalue:" in out
    # The product it iterates is H v: the central difference of the gradient along v.
    md.manual_seed(0)
    layer = md.nn.Linear(3, 2).double()
    x, y = md.tensor(np.random.default_rng(0).normal(size=(4, 3))), md.tensor(np.array([0, 1, 1, 0]))
    params = list(layer.parameters())
    v = [md.tensor(np.random.default_rng(1).normal(size=p.shape)) for p in params]
    hv = hessian["hessian_vector_product"](lambda: md.cross_entropy(layer(x), y), params, v)

    def gradient_at(step):
        for p, vi in zip(params, v):
            p.data += step * vi.data
        g = md.grad(md.cross_entropy(layer(x), y), params)
        for p, vi in zip(params, v):
            p.data -= step * vi.data
        return g
    plus, minus = gradient_at(1e-5), gradient_at(-1e-5)
    for h, a, b in zip(hv, plus, minus):
        np.testing.assert_allclose(h.numpy(), (a.numpy() - b.numpy()) / 2e-5, rtol=1e-5, atol=1e-8)


def test_gradient_penalty_example(capsys):
    gp = example("gradient_penalty")
    gp["main"](["--steps", "2", "--batch-size", "8", "--size", "8"])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step")]
    assert len(lines) == 2 and all("gradient penalty" in l for l in lines)
    # The loss's weight gradient (through the penalty's second derivative) against a
    # central difference along a random direction, in float64.
    md.manual_seed(0)
    critic = gp["Critic"](channels=2).double()
    rng = np.random.default_rng(0)
    real, fake = (md.tensor(rng.uniform(size=(3, 1, 8, 8))) for _ in range(2))
    loss_of = lambda: gp["critic_loss"](critic, real, fake, rng=np.random.default_rng(5))[0]
    params = list(critic.parameters())
    grads = md.grad(loss_of(), params)
    direction = [rng.normal(size=p.shape) for p in params]
    analytic = sum(float((g.numpy() * d).sum()) for g, d in zip(grads, direction))
    values = []
    for step in (1e-6, -1e-6):
        for p, d in zip(params, direction):
            p.data += step * d
        values.append(loss_of().item())
        for p, d in zip(params, direction):
            p.data -= step * d
    assert analytic == pytest.approx((values[0] - values[1]) / 2e-6, rel=1e-4)


def test_maml_example(capsys):
    maml = example("maml")
    maml["main"](["--tasks", "2", "--shots", "2", "--size", "8", "--meta-steps", "2"])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("meta-step")]
    assert len(lines) == 2 and all(np.isfinite(float(l.split()[-1])) for l in lines)

"""Memory-efficient DenseNet (issue 10): md.recompute, the shared block storage and
``memory_efficient=True``.  Equality alone would pass for a flag that does nothing, so
the memory kept for backward is measured too (tracemalloc sees NumPy's allocations)."""
import inspect
import tracemalloc

import numpy as np
import pytest

import minidense as md
from minidense import models
from minidense.functions import normalization
from minidense.recompute import is_recomputing

RTOL = 1e-12


def one_step(memory_efficient, seed=0, size=8, device="cpu", **config):
    """Logits, input gradient, parameter gradients and state (running statistics) after one
    float64 training step of a freshly built DenseNet; dropout draws from md's generator."""
    md.manual_seed(seed)
    builder = config.pop("builder", models.densenet_cifar)
    model = builder(memory_efficient=memory_efficient, **config).double().to(device)
    x = md.tensor(np.random.default_rng(seed + 1).standard_normal((2, 3, size, size)),
                  device=device, requires_grad=True)
    md.manual_seed(seed + 2)   # the step's dropout masks, as the trainer seeds them
    logits = model(x)
    (logits * logits).sum().backward()
    grads = {name: p.grad.numpy() for name, p in model.named_parameters()}
    return logits.numpy(), x.grad.numpy(), grads, model.state_dict()


def assert_same_step(a, b):
    for what, u, v in (("logits", a[0], b[0]), ("input gradient", a[1], b[1])):
        np.testing.assert_allclose(v, u, rtol=RTOL, atol=0, err_msg=what)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        np.testing.assert_allclose(b[2][name], a[2][name], rtol=RTOL, atol=0, err_msg=name)
    assert list(a[3]) == list(b[3])   # identical state-dict keys
    for name in a[3]:
        np.testing.assert_allclose(b[3][name], a[3][name], rtol=RTOL, atol=0, err_msg=name)


@pytest.mark.parametrize("config", [
    dict(depth=10, growth_rate=4, bottleneck=True, compression=0.5),                  # -BC
    dict(depth=10, growth_rate=4, bottleneck=True, compression=0.5, drop_rate=0.2),   # with dropout
    dict(depth=7, growth_rate=3, drop_rate=0.2),                                      # plain
    dict(depth=10, growth_rate=3, bottleneck=True),                                   # -B
    dict(depth=7, growth_rate=3, compression=0.5),                                    # -C
], ids=["bc", "bc-dropout", "plain-dropout", "b", "c"])
def test_memory_efficient_step_equals_the_ordinary_one(config):
    ordinary = one_step(False, **config)
    efficient = one_step(True, **config)
    assert_same_step(ordinary, efficient)
    # Not vacuous: the running statistics moved, and dropout (where there is any) zeroed something.
    assert not np.allclose(ordinary[3]["block1.layer1.norm1.running_mean"], 0)


def test_memory_efficient_step_equals_the_ordinary_one_on_the_test_device(device):
    # On CuPy: the block storage, the recomputation and the replayed dropout generator.
    config = dict(depth=10, growth_rate=4, bottleneck=True, compression=0.5, drop_rate=0.2)
    assert_same_step(one_step(False, device=device, **config), one_step(True, device=device, **config))


def test_memory_efficient_densenet_bc100_batch2_equals_the_ordinary_one():
    config = dict(builder=models.densenet_bc100_k12, size=32, drop_rate=0.2)
    assert_same_step(one_step(False, **config), one_step(True, **config))


def test_memory_efficient_reaches_every_densenet_constructor_and_not_resnets():
    assert models.DenseNet((1, 1), 4, memory_efficient=True).memory_efficient
    assert models.get("densenet_cifar", depth=10, growth_rate=4, bottleneck=True, compression=0.5,
                      memory_efficient=True).block1.layer1.memory_efficient
    assert models.get("densenet_bc100_k12", memory_efficient=True).block3.layer16.memory_efficient
    assert models.densenet_imagenet((1, 1), growth_rate=4, memory_efficient=True).memory_efficient
    assert not models.get("densenet40_k12").block1.layer1.memory_efficient   # off by default
    # Every named DenseNet passes its options to one of the two families, which take the flag.
    for name in models.names:
        if name.startswith("densenet"):
            assert "options" in inspect.signature(getattr(models, name)).parameters, name
    for family in (models.densenet_cifar, models.densenet_imagenet):
        assert inspect.signature(family).parameters["memory_efficient"].default is False
    for name in ("resnet20", "resnet18"):
        with pytest.raises(ValueError, match="memory_efficient is a DenseNet option"):
            models.get(name, memory_efficient=True)


def test_state_dicts_move_between_the_modes():
    md.manual_seed(0)
    ordinary = models.densenet_cifar(10, 4, bottleneck=True, compression=0.5).double()
    efficient = models.densenet_cifar(10, 4, bottleneck=True, compression=0.5,
                                      memory_efficient=True).double()
    efficient.load_state_dict(ordinary.state_dict())   # strict: the keys are the same
    x = md.tensor(np.random.default_rng(0).standard_normal((2, 3, 8, 8)))
    for model in (ordinary, efficient):
        model.eval()
    with md.no_grad():
        np.testing.assert_array_equal(efficient(x).numpy(), ordinary(x).numpy())


def test_gradcheck_through_the_recomputation():
    # A functional concat-BN-ReLU-Conv segment: every parameter is an input, so gradcheck
    # checks the gradients that the recomputation in backward produces for all of them.
    def segment(a, b, gamma, beta, w):
        return md.conv2d(md.relu(md.batch_norm(md.cat([a, b], 1), gamma, beta)), w,
                         padding=1)

    rng = np.random.default_rng(0)
    inputs = [md.tensor(rng.standard_normal(shape), requires_grad=True)
              for shape in ((2, 2, 4, 4), (2, 1, 4, 4), (3,), (3,), (2, 3, 3, 3))]
    assert md.gradcheck(lambda *xs: md.recompute(segment, *xs), inputs)
    out = md.recompute(segment, *inputs)
    assert type(out.grad_fn).__name__ == "Recompute"   # the check went through the node


def test_gradcheck_of_a_memory_efficient_densenet():
    model = models.densenet_cifar(10, 4, bottleneck=True, compression=0.5,
                                  memory_efficient=True).double()
    x = md.tensor(np.random.default_rng(0).standard_normal((2, 3, 8, 8)), requires_grad=True)
    # The input's gradient passes through every recomputed segment.
    assert md.gradcheck(model, [x])


def test_recompute_records_the_node_for_parameters_alone_and_is_plain_without_grad():
    w = md.tensor([2.0, 3.0], requires_grad=True)
    x = md.tensor([1.0, -1.0])          # needs no gradient; w does
    y = md.recompute(lambda t: md.relu(t * w), x, params=[w])
    y.sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), [1.0, 0.0])
    with md.no_grad():
        assert md.recompute(lambda t: t * w, x, params=[w]).grad_fn is None
    assert md.checkpoint is md.recompute
    with pytest.raises(ValueError, match="at least one input"):
        md.recompute(lambda: w * 2.0, params=[w])


def test_dropout_draws_the_same_mask_in_both_passes_and_leaves_the_stream_alone():
    x = md.tensor(np.ones((4, 50)), requires_grad=True)
    md.manual_seed(3)
    y = md.recompute(lambda t: md.dropout(t, 0.5) * 1.0, x)
    y.sum().backward()
    after = md.randn(3).numpy()
    # The gradient of sum(mask * x) is the mask drawn in the recomputation; y shows the
    # forward's: zero at the same places, 2 elsewhere.
    assert 0 < (y.numpy() == 0).sum() < y.numel()
    np.testing.assert_array_equal(x.grad.numpy(), y.numpy())
    # The generator went on as if the dropout had run once, without recomputation: the
    # replay drew from a copy of the forward's snapshot.
    md.manual_seed(3)
    plain = md.dropout(md.tensor(np.ones((4, 50))), 0.5)
    np.testing.assert_array_equal(plain.numpy(), y.numpy())
    np.testing.assert_array_equal(md.randn(3).numpy(), after)


def test_batch_norm_runs_twice_but_updates_its_running_statistics_once(monkeypatch):
    calls = []   # (the running mean's id, whether the call was a recomputation)
    forward = normalization.BatchNorm.forward

    def counting(self, *arrays):
        calls.append((id(self.running_mean), is_recomputing()))
        return forward(self, *arrays)

    monkeypatch.setattr(normalization.BatchNorm, "forward", counting)
    md.manual_seed(0)
    model = models.densenet_cifar(10, 4, bottleneck=True, compression=0.5, memory_efficient=True)
    x = md.tensor(np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32))
    logits = model(x)
    norms = {name: m for name, m in model.named_modules() if isinstance(m, md.nn.BatchNorm2d)}
    after_forward = {name: (m.running_mean.numpy(), m.running_var.numpy())
                     for name, m in norms.items()}
    logits.sum().backward()
    for name, module in norms.items():
        mine = [recomputing for key, recomputing in calls if key == id(module.running_mean.data)]
        recomputed = ".layer" in name   # every BN of a dense layer is in its segment (-BC)
        assert mine == ([False, True] if recomputed else [False]), name
        # The recomputation left the statistics as the forward had updated them (once).
        np.testing.assert_array_equal(module.running_mean.numpy(), after_forward[name][0])
        np.testing.assert_array_equal(module.running_var.numpy(), after_forward[name][1])
        assert not np.array_equal(after_forward[name][1], np.ones_like(after_forward[name][1]))


def bytes_kept_for_backward(memory_efficient, depth):
    """What one forward pass leaves allocated (the graph's saved arrays, the block
    storage, the logits), as tracemalloc counts it."""
    md.manual_seed(0)
    model = models.densenet_cifar(depth, 12, bottleneck=True, compression=0.5,
                                  memory_efficient=memory_efficient)
    x = md.tensor(np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        logits = model(x)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del logits
    return kept


def test_memory_efficient_mode_keeps_at_most_half_and_grows_linearly_with_depth():
    depths = (40, 64, 88, 112)   # 6, 10, 14, 18 bottleneck layers per block: steps of 4
    ordinary = [bytes_kept_for_backward(False, d) for d in depths]
    efficient = [bytes_kept_for_backward(True, d) for d in depths]
    assert efficient[-2] <= 0.5 * ordinary[-2] and efficient[-1] <= 0.5 * ordinary[-1], \
        (ordinary, efficient)
    # Linear: each step of 12 layers adds the same (within 5%) in memory-efficient mode,
    # while the ordinary mode's steps grow (its memory is quadratic in depth).
    steps = np.diff(efficient)
    assert steps.max() <= 1.05 * steps.min(), efficient
    ordinary_steps = np.diff(ordinary)
    assert np.all(ordinary_steps[1:] >= 1.15 * ordinary_steps[:-1]), ordinary

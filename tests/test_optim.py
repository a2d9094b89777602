"""Optimizers and schedules against PyTorch, step by step; state dicts round trip."""
import numpy as np
import pytest

import minidense as md
from minidense import optim
from minidense.optim import lr_scheduler

SHAPES = [(3, 4), (5,), (2, 3, 2, 2)]


def make_problem(seed=0):
    """Parameters and a fixed sequence of gradients, float64."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s) for s in SHAPES]
    grads = [[rng.standard_normal(s) for s in SHAPES] for _ in range(6)]
    return params, grads


def run_steps(make_optimizer, params, grads, as_parameter, as_gradient, to_numpy):
    """Set each step's gradients and step; the parameters after every step, as NumPy."""
    tensors = [as_parameter(p.copy()) for p in params]
    opt = make_optimizer(tensors)
    history = []
    for step_grads in grads:
        for t, g in zip(tensors, step_grads):
            t.grad = as_gradient(g.copy())
        opt.step()
        history.append([to_numpy(t) for t in tensors])
    return history


def run_minidense(make_optimizer, params, grads):
    return run_steps(make_optimizer, params, grads, md.nn.Parameter, md.tensor,
                     lambda t: t.numpy())


def run_torch(torch, make_optimizer, params, grads):
    return run_steps(make_optimizer, params, grads,
                     lambda p: torch.tensor(p, requires_grad=True), torch.tensor,
                     lambda t: t.detach().numpy().copy())


OPTIMIZERS = {
    "sgd": dict(lr=0.1),
    "sgd-momentum": dict(lr=0.1, momentum=0.9),
    "sgd-momentum-dampening-wd": dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-2),
    "sgd-nesterov-wd": dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True),
    "adam": dict(lr=1e-2),
    "adam-wd": dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-2),
    "adamw": dict(lr=1e-2, weight_decay=0.1),
}


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(OPTIMIZERS))
def test_optimizer_matches_torch_step_by_step(case):
    torch = pytest.importorskip("torch")
    kind = case.split("-")[0]
    ours = {"sgd": optim.SGD, "adam": optim.Adam, "adamw": optim.AdamW}[kind]
    theirs = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    kwargs = OPTIMIZERS[case]
    params, grads = make_problem()
    expected = run_torch(torch, lambda ps: theirs(ps, **kwargs), params, grads)
    got = run_minidense(lambda ps: ours(ps, **kwargs), params, grads)
    for step, (e_step, g_step) in enumerate(zip(expected, got)):
        for e, g in zip(e_step, g_step):
            np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-14, err_msg=f"{case}, step {step}")


def test_sgd_momentum_follows_its_definition():
    """Without torch: the update written out from Sutskever et al. / PyTorch's docs."""
    params, grads = make_problem(1)
    lr, mu, wd = 0.1, 0.9, 1e-3
    got = run_minidense(lambda ps: optim.SGD(ps, lr=lr, momentum=mu, weight_decay=wd, nesterov=True),
                        params, grads)
    p = [x.copy() for x in params]
    bufs = [None] * len(p)
    for step, step_grads in enumerate(grads):
        for i, g in enumerate(step_grads):
            d = g + wd * p[i]
            bufs[i] = d.copy() if bufs[i] is None else mu * bufs[i] + d
            p[i] = p[i] - lr * (d + mu * bufs[i])
            np.testing.assert_allclose(got[step][i], p[i], rtol=1e-12, atol=1e-14)


def test_float32_parameters_stay_float32():
    w = md.nn.Parameter(np.ones((2, 2), dtype=np.float32))
    for opt in (optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=1e-4), optim.Adam([w]), optim.AdamW([w])):
        w.grad = md.tensor(np.full((2, 2), 0.5, dtype=np.float32))
        opt.step()
        assert w.dtype == np.float32


def test_parameters_without_gradient_are_left_alone():
    a, b = md.nn.Parameter(np.ones(3)), md.nn.Parameter(np.ones(3))
    opt = optim.SGD([a, b], lr=0.5, momentum=0.9)
    a.grad = md.tensor(np.ones(3))
    opt.step()
    np.testing.assert_array_equal(b.numpy(), np.ones(3))
    np.testing.assert_array_equal(a.numpy(), np.full(3, 0.5))
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_bad_hyperparameters_are_rejected():
    w = md.nn.Parameter(np.ones(2))
    with pytest.raises(ValueError, match="SGD"):
        optim.SGD([w], lr=-1)
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD([w], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="Adam"):
        optim.Adam([w], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)


# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------
def schedule_values(sched, opt, steps, lr_of):
    values = [lr_of(opt)]
    for _ in range(steps):
        opt.step()
        sched.step()
        values.append(lr_of(opt))
    return values


SCHEDULES = ["multistep", "cosine", "cosine-eta-min", "cosine-past-t-max", "linear", "constant",
             "constant-half", "step", "exponential", "lambda", "warmup-cosine", "warmup-multistep",
             "resumed-multistep"]


def build_schedule(module, opt, case):
    """The same schedule from minidense's or torch's lr_scheduler module."""
    if case == "multistep":
        return module.MultiStepLR(opt, milestones=[7, 12], gamma=0.1)
    if case == "cosine":
        return module.CosineAnnealingLR(opt, T_max=20)
    if case == "cosine-eta-min":
        return module.CosineAnnealingLR(opt, T_max=13, eta_min=1e-3)
    if case == "cosine-past-t-max":
        return module.CosineAnnealingLR(opt, T_max=7)
    if case == "linear":
        return module.LinearLR(opt, start_factor=0.25, total_iters=6)
    if case == "constant":  # PyTorch's default: a third for 5 steps
        return module.ConstantLR(opt)
    if case == "constant-half":
        return module.ConstantLR(opt, 0.5, 3)
    if case == "step":
        return module.StepLR(opt, 4, gamma=0.5)
    if case == "exponential":
        return module.ExponentialLR(opt, 0.9)
    if case == "lambda":
        return module.LambdaLR(opt, lambda epoch: 1 / (epoch + 1))
    if case == "resumed-multistep":  # an optimizer restored at step 8, one milestone passed
        opt.param_groups[0].update(initial_lr=0.1, lr=0.01)
        return module.MultiStepLR(opt, milestones=[7, 12], gamma=0.1, last_epoch=8)
    first = module.LinearLR(opt, start_factor=0.2, total_iters=5)
    if case == "warmup-cosine":
        second = module.CosineAnnealingLR(opt, T_max=15)
    else:
        second = module.MultiStepLR(opt, milestones=[4, 9], gamma=0.1)
    return module.SequentialLR(opt, [first, second], milestones=[5])


@pytest.mark.torch
@pytest.mark.parametrize("case", SCHEDULES)
def test_schedule_matches_torch(case):
    torch = pytest.importorskip("torch")
    import warnings
    w = md.nn.Parameter(np.zeros(1))
    opt = optim.SGD([w], lr=0.1, momentum=0.9)
    ours = schedule_values(build_schedule(lr_scheduler, opt, case), opt, 20,
                           lambda o: o.param_groups[0]["lr"])
    tw = torch.zeros(1, requires_grad=True)
    topt = torch.optim.SGD([tw], lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch warns about SequentialLR internals
        theirs = schedule_values(build_schedule(torch.optim.lr_scheduler, topt, case), topt, 20,
                                 lambda o: o.param_groups[0]["lr"])
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-15)


def test_warmup_then_cosine_shape():
    """Without torch: the warm-up rises linearly to the peak, then the cosine falls to 0."""
    w = md.nn.Parameter(np.zeros(1))
    opt = optim.SGD([w], lr=0.4)
    warm, total = 4, 12
    sched = optim.warmup_then(opt, optim.CosineAnnealingLR(opt, T_max=total - warm), warm)
    values = schedule_values(sched, opt, total, lambda o: o.param_groups[0]["lr"])
    np.testing.assert_allclose(values[:warm + 1], [0.4 * (1 / warm + (1 - 1 / warm) * s / warm)
                                                   for s in range(warm + 1)], rtol=1e-12)
    rest = [0.4 * (1 + np.cos(np.pi * s / (total - warm))) / 2 for s in range(total - warm + 1)]
    np.testing.assert_allclose(values[warm:], rest, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------
def roundtrip(obj, tmp_path, name):
    """Through md.save and md.load."""
    path = tmp_path / f"{name}.npz"
    md.save(obj, path)
    return md.load(path)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_optimizer_and_scheduler_state_round_trip(kind, tmp_path):
    """Stop after 3 steps, save, restore into fresh objects, continue: the parameters
    are bit-identical with an uninterrupted run."""
    params, grads = make_problem(2)
    make = {"sgd": lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True),
            "adam": lambda ps: optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95)),
            "adamw": lambda ps: optim.AdamW(ps, lr=1e-2)}[kind]

    def fresh():
        tensors = [md.nn.Parameter(p.copy()) for p in params]
        opt = make(tensors)
        sched = optim.warmup_then(opt, optim.CosineAnnealingLR(opt, T_max=4), 2)
        return tensors, opt, sched

    def steps(tensors, opt, sched, step_grads):
        for gs in step_grads:
            for t, g in zip(tensors, gs):
                t.grad = md.tensor(g.copy())
            opt.step()
            sched.step()

    straight = fresh()
    steps(*straight, grads)

    first = fresh()
    steps(*first, grads[:3])
    saved = roundtrip({"optimizer": first[1].state_dict(), "scheduler": first[2].state_dict(),
                       "params": {str(i): t.numpy() for i, t in enumerate(first[0])}}, tmp_path, kind)
    second = fresh()
    for i, t in enumerate(second[0]):
        t.data = np.array(saved["params"][str(i)])
    second[1].load_state_dict(saved["optimizer"])
    second[2].load_state_dict(saved["scheduler"])
    assert second[1].param_groups[0]["lr"] == first[1].param_groups[0]["lr"]
    steps(*second, grads[3:])
    for a, b in zip(straight[0], second[0]):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert second[1].param_groups[0] .keys() == straight[1].param_groups[0].keys()
    if kind != "sgd":
        assert second[1].param_groups[0]["betas"] == straight[1].param_groups[0]["betas"]


def test_load_state_dict_rejects_another_model():
    a = [md.nn.Parameter(np.ones((2, 2)))]
    b = [md.nn.Parameter(np.ones((3,)))]
    opt_a = optim.SGD(a, lr=0.1, momentum=0.9)
    a[0].grad = md.tensor(np.ones((2, 2)))
    opt_a.step()
    with pytest.raises(ValueError, match="shape"):
        optim.SGD(b, lr=0.1, momentum=0.9).load_state_dict(opt_a.state_dict())


def test_warmup_schedule_restores_the_rates_of_its_inner_schedules():
    """A resumed warm-up + cosine schedule follows the saved base rates, not the ones the
    new optimizer happened to be built with."""
    from minidense import optim
    saved_opt = optim.SGD([md.nn.Parameter(np.zeros(2, np.float32))], lr=0.4)
    saved = optim.lr_scheduler.warmup_then(
        saved_opt, optim.lr_scheduler.CosineAnnealingLR(saved_opt, T_max=10), 3)
    fresh_opt = optim.SGD([md.nn.Parameter(np.zeros(2, np.float32))], lr=0.1)
    fresh = optim.lr_scheduler.warmup_then(
        fresh_opt, optim.lr_scheduler.CosineAnnealingLR(fresh_opt, T_max=10), 3)
    fresh.load_state_dict(saved.state_dict())
    for step in (0, 2, 5, 9):
        assert fresh.lrs_at(step) == saved.lrs_at(step)

"""Batch norm and the fused BN-ReLU, on every path (the plain algorithm, the CPU fast
path, the fused CUDA kernels on the fake device), against the textbook reference
``minidense.testing.batch_norm_reference``, which shares no code with the op."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import minidense as md
from fake_device import fake_cuda
from minidense.testing import batch_norm_cases, batch_norm_reference

TOLERANCE = {np.float64: dict(rtol=1e-9, atol=1e-10), np.float32: dict(rtol=2e-4, atol=2e-4)}


def _run(case, dtype, training, relu, device):
    x, gamma, beta, running_mean, running_var, gy = (np.asarray(a, dtype=dtype) for a in case)
    xt, gt, bt = (md.tensor(a, device=device, requires_grad=True) for a in (x, gamma, beta))
    rm, rv = md.tensor(running_mean, device=device), md.tensor(running_var, device=device)
    op = md.batch_norm_relu if relu else md.batch_norm
    y = op(xt, gt, bt, rm, rv, training=training, momentum=0.25, eps=1e-3)
    y.backward(md.tensor(gy, device=device))
    got = [t.numpy() for t in (y, rm, rv, xt.grad, gt.grad, bt.grad)]
    ref = batch_norm_reference(*(a.astype(np.float64) for a in (x, gamma, beta, running_mean, running_var)),
                               training=training, momentum=0.25, eps=1e-3, gy=gy.astype(np.float64),
                               relu=relu)
    expected = [ref.y, ref.running_mean, ref.running_var, ref.gx, ref.ggamma, ref.gbeta]
    for name, a, b in zip(["y", "running_mean", "running_var", "gx", "ggamma", "gbeta"], got, expected):
        assert a.dtype == dtype, name
        np.testing.assert_allclose(a, b, err_msg=name, **TOLERANCE[dtype])


@pytest.fixture(params=["fast", "plain", "fake_gpu"])
def path(request, monkeypatch):
    if request.param == "fake_gpu":
        fake_cuda(monkeypatch)
    return request.param


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])   # the same fixture for every example
@given(case=batch_norm_cases())
def test_batch_norm_matches_the_reference(path, dtype, training, relu, case):
    device = "cuda" if path == "fake_gpu" else "cpu"
    with md.plain_ops(path == "plain"):
        _run(case, dtype, training, relu, device)


def test_the_reference_matches_finite_differences():
    # The reference's own gradient, checked once against central differences, so that
    # the tests above compare with something right.
    rng = np.random.default_rng(0)
    x, gamma, beta, gy = rng.normal(size=(3, 2, 2, 2)), rng.normal(size=2), rng.normal(size=2), rng.normal(size=(3, 2, 2, 2))
    ref = batch_norm_reference(x, gamma, beta, gy=gy)
    loss = lambda x, gamma, beta: (batch_norm_reference(x, gamma, beta).y * gy).sum()
    for name, value, grad in (("x", x, ref.gx), ("gamma", gamma, ref.ggamma), ("beta", beta, ref.gbeta)):
        numeric = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            args = {"x": x, "gamma": gamma, "beta": beta}
            plus, minus = value.copy(), value.copy()
            plus[i] += 1e-6
            minus[i] -= 1e-6
            numeric[i] = (loss(**{**args, name: plus}) - loss(**{**args, name: minus})) / 2e-6
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8, err_msg=name)

"""Every conv2d algorithm (md.CONV_ALGORITHMS) against the naive loops of
minidense.testing, on hypothesis-drawn geometries (groups and dilation included), in
float64 and float32; choosing an algorithm with md.conv_algorithm; and the workspace."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minidense as md
from minidense.testing import conv2d_loops, conv2d_loops_backward, conv_cases


def run(algorithm, case, dtype, gy):
    x = md.tensor(case.x.astype(dtype), requires_grad=True)
    w = md.tensor(case.w.astype(dtype), requires_grad=True)
    inputs = [x, w] + ([md.tensor(case.b.astype(dtype), requires_grad=True)]
                       if case.b is not None else [])
    with md.conv_algorithm(algorithm):
        y = md.conv2d(*inputs, **case.options)
    y.backward(gy.astype(dtype))   # outside the block: the op keeps its algorithm
    return [y.numpy()] + [t.grad.numpy() for t in inputs]


def expected(case, gy):
    y = conv2d_loops(case.x, case.w, case.b, **case.options)
    gx, gw = conv2d_loops_backward(case.x, case.w, gy, **case.options)
    return [y, gx, gw] + ([gy.sum(axis=(0, 2, 3))] if case.b is not None else [])


@pytest.mark.parametrize("algorithm", md.CONV_ALGORITHMS)
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_every_algorithm_matches_the_naive_loops(algorithm, data, seed):
    """Groups (1 to 3, depthwise among them) and dilations (1 to 2) included; the
    depthwise algorithm on depthwise convolutions, the only ones it computes."""
    case = data.draw(conv_cases(max_channels=5, max_side=8, max_kernel=4, max_groups=3,
                                max_dilation=2, depthwise=algorithm == "depthwise"))
    gy = np.random.default_rng(seed).standard_normal(
        conv2d_loops(case.x, case.w, None, **case.options).shape)
    want = expected(case, gy)
    for name, got, ref in zip(("y", "gx", "gw", "gb"), run(algorithm, case, np.float64, gy), want):
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12, err_msg=f"{algorithm}: {name}")
    for name, got, ref in zip(("y", "gx", "gw", "gb"), run(algorithm, case, np.float32, gy), want):
        assert got.dtype == np.float32
        # float32 rounding of sums of at most 5*4*4 = 80 products of values below 2 in size
        # (y, gx) or of up to 3*8*8 = 192 (gw): well inside 1e-5 of the largest value.
        scale = np.abs(ref).max() + 1.0
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=f"{algorithm}: {name} in float32")


@st.composite
def winograd_cases(draw):
    """Stride-1 3x3 convolutions, the ones Winograd F(2x2, 3x3) computes: odd and even
    output sides (a partial last tile), padding 0-3 (beyond 2, its input gradient crops)."""
    n, c, o = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    h, w = draw(st.integers(max(1, 3 - 2 * ph), 9)), draw(st.integers(max(1, 3 - 2 * pw), 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return (rng.uniform(-2, 2, (n, c, h, w)), rng.uniform(-1, 1, (o, c, 3, 3)), (ph, pw),
            rng.standard_normal((n, o, h + 2 * ph - 2, w + 2 * pw - 2)))


@given(case=winograd_cases())
def test_winograd_matches_the_naive_loops_within_the_issue_tolerances(case):
    """Issue 12's tolerances: float64 within 1e-10 relative of the direct path; float32
    within 1e-4 relative of the float64 direct result (relative to the largest value)."""
    x, w, padding, gy = case
    want = [conv2d_loops(x, w, None, (1, 1), padding)]
    want += conv2d_loops_backward(x, w, gy, (1, 1), padding)
    for dtype, rtol in ((np.float64, 1e-10), (np.float32, 1e-4)):
        xt, wt = md.tensor(x.astype(dtype), requires_grad=True), md.tensor(w.astype(dtype), requires_grad=True)
        with md.conv_algorithm("winograd"):
            y = md.conv2d(xt, wt, padding=padding)
        assert y.grad_fn.algorithm == "winograd"   # taken, not fallen back from
        y.backward(gy.astype(dtype))
        for name, got, ref in zip(("y", "gx", "gw"), (y.numpy(), xt.grad.numpy(), wt.grad.numpy()), want):
            assert got.dtype == dtype
            np.testing.assert_allclose(got, ref, rtol=0, atol=rtol * np.abs(ref).max(),
                                       err_msg=f"winograd {name} in {dtype.__name__}")


def test_winograd_leaves_other_convolutions_to_the_default():
    w = md.randn(3, 2, 3, 3)
    with md.conv_algorithm("winograd"):
        y = md.conv2d(md.randn(1, 2, 6, 6, requires_grad=True), w, stride=2, padding=1)
        z = md.conv2d(md.randn(1, 2, 6, 6, requires_grad=True), md.randn(3, 2, 1, 1))
        v = md.conv2d(md.randn(1, 2, 6, 6, requires_grad=True), w, padding=1)
    assert (y.grad_fn.algorithm, z.grad_fn.algorithm, v.grad_fn.algorithm) == (
        "phase_grid", "phase_grid", "winograd")


def test_a_model_trains_on_the_textbook_path_with_the_same_numbers():
    """One SGD step of a small DenseNet in float64: im2col and the default give the same
    loss and weights (to rounding)."""
    results = []
    for algorithm in (None, "im2col"):
        md.manual_seed(0)
        model = md.models.get("densenet_cifar", depth=10, growth_rate=4, bottleneck=True,
                              compression=0.5, num_classes=3).to(dtype=np.float64)
        opt = md.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x = md.tensor(np.random.default_rng(1).standard_normal((2, 3, 8, 8)))
        with md.conv_algorithm(algorithm):
            for _ in range(2):
                loss = md.cross_entropy(model(x), md.tensor([0, 2]))
                opt.zero_grad()
                loss.backward()
                opt.step()
        results.append((loss.item(), [p.numpy() for p in model.parameters()]))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    for a, b in zip(params_a, params_b):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_conv_algorithm_nests_restores_and_refuses_unknown_names():
    from minidense.functions import connection
    x, w = md.tensor(np.ones((1, 1, 3, 3))), md.tensor(np.ones((1, 1, 3, 3)))
    with md.conv_algorithm("im2col"):
        with md.conv_algorithm("phase_grid"):
            assert connection.chosen_conv_algorithm(x.data) == "phase_grid"
            with md.plain_ops():   # the plain paths win: the textbook algorithm
                assert connection.chosen_conv_algorithm(x.data) == "im2col"
            assert connection.chosen_conv_algorithm(x.data) == "phase_grid"
        assert connection.chosen_conv_algorithm(x.data) == "im2col"
    assert connection.chosen_conv_algorithm(x.data) == connection.default_conv_algorithm(x.data)
    with pytest.raises(ValueError, match="unknown algorithm 'fft'; expected one of im2col, phase_grid, winograd"):
        with md.conv_algorithm("fft"):
            pass
    assert md.conv2d(x, w, padding=1).shape == (1, 1, 3, 3)


def test_workspace_is_reused_counted_and_freed():
    md.workspace.free()
    assert md.workspace.nbytes() == 0
    x = md.tensor(np.ones((2, 4, 8, 8), np.float32))
    w = md.tensor(np.ones((4, 4, 3, 3), np.float32))
    md.conv2d(x, w, padding=1)          # the default CPU algorithm keeps its temporaries
    held = md.workspace.nbytes()
    assert held > 0
    md.conv2d(x, w, padding=1)
    assert md.workspace.nbytes() == held   # reused, not grown
    a = md.workspace.get("probe", (3, 4), np.float32, like=x.data)
    b = md.workspace.get("probe", (2, 2), np.float64, like=x.data)
    assert np.shares_memory(a, b)          # one live array per name
    md.workspace.free()
    assert md.workspace.nbytes() == 0

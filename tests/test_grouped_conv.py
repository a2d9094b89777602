"""Grouped, depthwise and dilated convolution (md.conv2d's groups and dilation, as
PyTorch's): gradient checks and PyTorch in float64 on hypothesis-drawn cases, the clear
errors, which algorithm the default takes, the depthwise fast path (what it keeps, its
CuPy kernels on the pretend GPU), and the clamp of ReLU6."""
import numpy as np
import pytest
from hypothesis import given

import minidense as md
from minidense.functions import connection
from minidense.testing import arrays, conv2d_loops, conv2d_loops_backward, conv_cases, tensors_from

from test_gpu_path import gpu  # noqa: F401  (the pretend GPU, and the real one under -m gpu)

GROUPED = dict(max_groups=3, max_dilation=2, max_side=6)


def inputs_of(case, device="cpu"):
    return [t for t in tensors_from(case.x, case.w, case.b, device=device) if t is not None]


@pytest.mark.parametrize("plain", [False, True], ids=["default", "plain"])
@given(case=conv_cases(max_channels=2, **GROUPED))
def test_gradcheck_grouped_and_dilated(case, plain):
    """Finite differences on both paths: the default (phase grids, or the depthwise fast
    path) and the plain one (im2col, one batched product per group)."""
    with md.plain_ops(plain):
        assert md.gradcheck(lambda *a: md.conv2d(*a, **case.options), inputs_of(case))


@given(case=conv_cases(max_channels=2, depthwise=True, **GROUPED))
def test_gradcheck_depthwise(case):
    y = md.conv2d(*inputs_of(case), **case.options)
    assert y.grad_fn.algorithm == ("depthwise" if case.groups > 1 else "phase_grid")
    assert md.gradcheck(lambda *a: md.conv2d(*a, **case.options), inputs_of(case))


def compare_with_torch(case):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    ours = inputs_of(case)
    theirs = [torch.tensor(a, requires_grad=True) for a in (case.x, case.w, case.b) if a is not None]
    y = md.conv2d(*ours, **case.options)
    yt = F.conv2d(*theirs, **case.options)
    np.testing.assert_allclose(y.numpy(), yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    g = np.random.default_rng(0).standard_normal(y.shape)
    y.backward(g)
    yt.backward(torch.tensor(g))
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-11, atol=1e-12)


@pytest.mark.torch
@given(case=conv_cases(max_channels=3, bias=True, **GROUPED))
def test_grouped_and_dilated_against_torch(case):
    compare_with_torch(case)


@pytest.mark.torch
@given(case=conv_cases(max_channels=3, depthwise=True, max_groups=6, max_dilation=3, max_side=9))
def test_depthwise_against_torch(case):
    """Channel multipliers 1 to 3 (out_channels = m * in_channels), dilations 1 to 3; the
    NumPy path in both its layouts (NCHW, and channels-last as on narrow maps)."""
    from minidense.functions.conv_depthwise import _Geometry
    for narrow in (0, 10 ** 6):   # maps narrower than this are laid out channels-last
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_Geometry, "NARROW", narrow)
            compare_with_torch(case)


def test_the_errors_name_the_numbers():
    x = md.ones(1, 6, 5, 5)
    with pytest.raises(ValueError, match=r"conv2d: the input's 6 channels \(shape \(1, 6, 5, 5\)\) "
                                         r"are not divisible by groups=4"):
        md.conv2d(x, md.ones(4, 1, 3, 3), groups=4)
    with pytest.raises(ValueError, match=r"conv2d: the weight's 5 output channels \(weight shape "
                                         r"\(5, 2, 3, 3\)\) are not divisible by groups=3"):
        md.conv2d(x, md.ones(5, 2, 3, 3), groups=3)
    with pytest.raises(ValueError, match=r"conv2d: input has 6 channels .* expects 9 \(3 per group, "
                                         r"groups=3\) \(weight shape \(3, 3, 3, 3\)\)"):
        md.conv2d(x, md.ones(3, 3, 3, 3), groups=3)
    with pytest.raises(ValueError, match=r"a 3x3 kernel with dilation \(3, 3\) and padding \(0, 0\) "
                                         r"do not fit an input of shape \(1, 6, 5, 5\)"):
        md.conv2d(x, md.ones(6, 1, 3, 3), dilation=3, groups=6)
    for options, message in ((dict(groups=0), "groups must be a positive integer, got 0"),
                             (dict(groups=1.5), "groups must be a positive integer, got 1.5"),
                             (dict(dilation=0), r"dilation must be positive, got \(0, 0\)"),
                             (dict(stride=(1, 0)), r"stride must be positive, got \(1, 0\)"),
                             (dict(padding=-1), r"padding must be non-negative, got \(-1, -1\)")):
        with pytest.raises(ValueError, match="conv2d: " + message):
            md.conv2d(x, md.ones(6, 6, 3, 3), **options)
    with pytest.raises(ValueError, match="Conv2d: in_channels=6 is not divisible by groups=4"):
        md.nn.Conv2d(6, 8, 3, groups=4)
    with pytest.raises(ValueError, match="Conv2d: out_channels=6 is not divisible by groups=4"):
        md.nn.Conv2d(8, 6, 3, groups=4)


def test_the_default_takes_the_depthwise_path_and_an_explicit_choice_is_kept_or_refused():
    x, w_dw, w = md.randn(2, 4, 6, 6), md.randn(8, 1, 3, 3), md.randn(4, 2, 3, 3)
    assert md.conv2d(x, w_dw, groups=4, padding=1).grad_fn is None   # no graph: nothing needed
    taken = lambda *a, **k: md.conv2d(*a, **k).grad_fn.algorithm      # noqa: E731
    x.requires_grad_(True)
    assert taken(x, w_dw, groups=4, padding=1) == "depthwise"        # channel multiplier 2
    assert taken(x, w, groups=2, padding=1) == "phase_grid"          # grouped, not depthwise
    with md.plain_ops():
        assert taken(x, w_dw, groups=4, padding=1) == "im2col"
    for algorithm in ("im2col", "phase_grid", "winograd"):
        with md.conv_algorithm(algorithm):
            assert taken(x, w_dw, groups=4, padding=1) == algorithm
            assert taken(x, w, groups=2, padding=1, dilation=2) == algorithm
    with md.conv_algorithm("depthwise"):
        assert taken(x, w_dw, groups=4, padding=1) == "depthwise"
        with pytest.raises(ValueError, match=r"conv2d: the depthwise algorithm computes depthwise "
                                             r"convolutions only .* groups=2, input shape \(2, 4, 6, 6\) "
                                             r"and weight shape \(4, 2, 3, 3\)"):
            md.conv2d(x, w, groups=2, padding=1)
    assert connection.default_conv_algorithm(x.data, w_dw.data, 4) == "depthwise"
    assert connection.default_conv_algorithm(x.data) == "phase_grid"


def test_the_depthwise_path_keeps_x_and_w_and_no_patch_matrix():
    x = md.randn(4, 8, 16, 16, requires_grad=True)
    w = md.randn(8, 1, 3, 3, requires_grad=True)
    y = md.conv2d(x, w, padding=1, groups=8)
    assert y.grad_fn.algorithm == "depthwise"
    assert [id(a) for a in y.grad_fn.saved] == [id(x.data), id(w.data)]
    with md.profiler() as prof:
        md.conv2d(x, w, padding=1, groups=8)
    assert prof.stats["Conv2d"]["kept_bytes"] == x.data.nbytes + w.data.nbytes


@pytest.mark.parametrize("threads", [1, 2])
def test_the_depthwise_path_gives_the_same_numbers_for_any_thread_count(threads):
    """Its weight gradient adds per-piece sums in piece order; pieces are cut by size."""
    rng = np.random.default_rng(3)
    x0, w0 = rng.standard_normal((9, 16, 20, 20)).astype(np.float32), rng.standard_normal((16, 1, 3, 3))
    gy = rng.standard_normal((9, 16, 10, 10)).astype(np.float32)
    previous = md.get_num_threads()
    results = []
    try:
        for n in (threads, 1):
            md.set_num_threads(n)
            x, w = md.tensor(x0, requires_grad=True), md.tensor(w0.astype(np.float32), requires_grad=True)
            y = md.conv2d(x, w, stride=2, padding=1, groups=16)
            y.backward(gy)
            results.append([y.numpy(), x.grad.numpy(), w.grad.numpy()])
    finally:
        md.set_num_threads(previous)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    expected = conv2d_loops_backward(x0.astype(np.float64), w0, gy.astype(np.float64), (2, 2), (1, 1),
                                     groups=16)[1]
    np.testing.assert_allclose(results[0][2], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("side", [4, 9])
def test_pointwise_gradients_on_small_maps_and_large(side):
    """1x1 convolutions take their weight gradient as one product over the batch on maps
    under 64 pixels, as one product per image on larger ones: both against the loops."""
    rng = np.random.default_rng(side)
    x0, w0 = rng.standard_normal((3, 5, side, side)), rng.standard_normal((7, 5, 1, 1))
    gy = rng.standard_normal((3, 7, side, side))
    x, w = tensors_from(x0, w0)
    md.conv2d(x, w).backward(gy)
    gx, gw = conv2d_loops_backward(x0, w0, gy)
    np.testing.assert_allclose(x.grad.numpy(), gx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w.grad.numpy(), gw, rtol=1e-12, atol=1e-12)


def test_nn_conv2d_takes_pytorchs_signature():
    conv = md.nn.Conv2d(8, 16, 3, 2, 1, 2, 4, False)   # stride, padding, dilation, groups, bias
    assert conv.weight.shape == (16, 2, 3, 3) and conv.bias is None
    assert repr(conv) == "Conv2d(8, 16, kernel_size=(3, 3), stride=2, padding=1, dilation=2, groups=4, bias=False)"
    assert repr(md.nn.Conv2d(3, 4, 1)) == "Conv2d(3, 4, kernel_size=(1, 1), stride=1, padding=0, bias=True)"
    x = md.randn(2, 8, 9, 9)
    np.testing.assert_allclose(conv(x).numpy(), conv2d_loops(x.numpy(), conv.weight.numpy(), None, (2, 2),
                                                             (1, 1), (2, 2), 4), rtol=1e-5, atol=1e-5)


# -- CuPy: the depthwise kernels and the dilated gather kernels on the pretend GPU -----
@pytest.mark.parametrize("geometry", [
    ((2, 3, 7, 6), (3, 1, 3, 3), dict(padding=1)),
    ((2, 3, 7, 6), (6, 1, 3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))),   # multiplier 2
    ((1, 4, 8, 8), (4, 1, 3, 3), dict(stride=2, padding=2, dilation=2)),
    ((2, 4, 6, 7), (8, 2, 3, 3), dict(padding=1, dilation=(2, 1), groups=2)),           # im2col, grouped
], ids=["depthwise", "multiplier-2-strided-dilated", "depthwise-dilated", "grouped-dilated-im2col"])
def test_grouped_convolution_on_the_gpu_matches_the_loops(gpu, geometry):  # noqa: F811
    x_shape, w_shape, options = geometry
    options.setdefault("groups", x_shape[1])
    rng = np.random.default_rng(0)
    x0, w0, b0 = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
    pairs = {k: v if isinstance(v, tuple) else (v, v) for k, v in options.items() if k != "groups"}
    case = dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=options["groups"])
    case.update(pairs)
    y_ref = conv2d_loops(x0, w0, b0, **case)
    gy = rng.standard_normal(y_ref.shape)
    gx_ref, gw_ref = conv2d_loops_backward(x0, w0, gy, **case)
    x, w, b = tensors_from(x0, w0, b0, device="cuda")
    y = md.conv2d(x, w, b, **options)
    assert y.device == "cuda"
    assert y.grad_fn.algorithm == ("im2col" if w_shape[1] > 1 else "depthwise")
    y.backward(md.tensor(gy, device="cuda"))
    for got, want in ((y, y_ref), (x.grad, gx_ref), (w.grad, gw_ref), (b.grad, gy.sum(axis=(0, 2, 3)))):
        assert got.device == "cuda"
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


# -- ReLU6 and hardtanh ---------------------------------------------------------------
@given(x=arrays((3, 4), -8, 8, margin=0.01))
def test_relu6_and_hardtanh_gradcheck(x):
    x = np.where(np.abs(x - 6) < 0.01, x + 0.02, x)          # away from the kink at 6 too
    assert md.gradcheck(md.relu6, [tensors_from(x)])
    assert md.gradcheck(lambda t: md.hardtanh(t, -0.5, 2.0), [tensors_from(np.where(
        np.abs(np.abs(x - 0.75) - 1.25) < 0.01, x + 0.02, x))])


@pytest.mark.torch
def test_relu6_against_torch_at_and_off_its_corners():
    torch = pytest.importorskip("torch")
    x0 = np.array([-3.0, 0.0, 0.5, 6.0, 7.0, 5.999])
    x, xt = md.tensor(x0, requires_grad=True), torch.tensor(x0, requires_grad=True)
    y, yt = md.nn.ReLU6(inplace=True)(x), torch.nn.functional.relu6(xt)
    np.testing.assert_array_equal(y.numpy(), yt.detach().numpy())
    y.backward(np.arange(6.0) + 1)
    yt.backward(torch.arange(6.0, dtype=torch.float64) + 1)
    np.testing.assert_array_equal(x.grad.numpy(), xt.grad.numpy())   # 0 at 0 and at 6, as PyTorch
    with pytest.raises(ValueError, match=r"hardtanh: min_val \(1\) must be less than max_val \(1\)"):
        md.hardtanh(x, 1, 1)

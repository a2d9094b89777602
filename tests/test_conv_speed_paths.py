"""Every path of conv2d (minidense/functions/connection.py) on NumPy.

The phase-grid algorithm (conv_phase_grid.py) picks, by channel counts, which side
of its matrix products to expand (output shifts or im2col forward; the output
gradient or x backward); the im2col algorithm is the textbook path (CuPy's default).  Each
path is forced here on small float64 inputs and checked against naive loops
(forward) and finite differences (backward), for strides 1 to 3, padding 0 to 2,
square and non-square kernels and images, batch 1, and in > out and in < out.
"""
import numpy as np
import pytest

import minidense as md
from minidense.functions.connection import Conv2d

from test_forward_reference import naive_conv2d

# (input shape, weight shape, stride, padding, with bias)
CASES = [
    ((2, 5, 7, 6), (3, 5, 3, 2), 1, (1, 0), True),     # in > out, non-square kernel and image
    ((2, 3, 6, 5), (4, 3, 3, 3), 2, 1, False),         # in < out, stride 2
    ((1, 2, 6, 6), (3, 2, 5, 5), 1, 2, True),          # batch 1, 5x5, padding 2
    ((2, 3, 9, 8), (2, 3, 2, 3), 2, 0, False),         # even kernel height, stride 2, no padding
    ((2, 3, 5, 7), (4, 3, 1, 1), 1, 0, True),          # 1x1 (no patches at all)
    ((2, 3, 7, 7), (2, 3, 1, 1), 2, 0, False),         # 1x1, stride 2
    ((2, 4, 4, 4), (3, 4, 1, 1), 1, 1, True),          # 1x1 with padding
    ((1, 2, 5, 6), (3, 2, 3, 3), (2, 1), (0, 2), False),
    ((1, 4, 5, 5), (4, 4, 3, 3), 3, 2, True),          # stride 3, in == out
    ((1, 2, 7, 6), (2, 2, 2, 2), 3, 0, False),         # stride > kernel: pixels no tap reads
    ((3, 2, 4, 5), (3, 2, 3, 3), 1, 3, True),          # padding > kernel - 1, batch 3
    ((3, 3, 8, 8), (2, 3, 3, 3), 2, 1, False),         # images sharing padding, stride 2
    ((2, 3, 6, 7), (4, 3, 2, 2), 1, (0, 1), True),     # even kernel, one-sided reach
    ((2, 4, 9, 4), (1, 4, 3, 4), 1, (2, 3), False),    # one output channel, nothing to crop
]
CASE_IDS = [f"x{c[0]}-w{c[1]}-s{c[2]}-p{c[3]}" + ("-bias" if c[4] else "") for c in CASES]

# (algorithm, forward_expands, backward_expands); None = the automatic choice.
PATHS = [
    (None, None, None),
    ("phase_grid", "output", "gy"),
    ("phase_grid", "input", "x"),
    ("phase_grid", "output", "x"),
    ("phase_grid", "input", "gy"),
    ("im2col", None, None),
]
PATH_IDS = ["-".join(str(part) for part in path) for path in PATHS]


def conv_on_path(path, stride, padding):
    """conv2d as a function of (x, w[, b]) that always takes ``path``."""
    def conv(*inputs):
        op = Conv2d(stride, padding)
        op.algorithm, op.forward_expands, op.backward_expands = path
        return op(*inputs)
    return conv


def make_inputs(case, dtype=np.float64, seed=0):
    x_shape, w_shape, _, _, bias = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if bias else None
    return x, w, b


def pairs(value):
    return value if isinstance(value, tuple) else (value, value)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_naive_loops(case, path):
    x, w, b = make_inputs(case)
    stride, padding = case[2], case[3]
    inputs = [md.tensor(x), md.tensor(w)] + ([md.tensor(b)] if b is not None else [])
    y = conv_on_path(path, stride, padding)(*inputs)
    expected = naive_conv2d(x, w, b, pairs(stride), pairs(padding))
    assert y.shape == expected.shape
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradients_match_finite_differences(case, path):
    x, w, b = make_inputs(case)
    inputs = [md.tensor(x, requires_grad=True), md.tensor(w, requires_grad=True)]
    if b is not None:
        inputs.append(md.tensor(b, requires_grad=True))
    assert md.gradcheck(conv_on_path(path, case[2], case[3]), inputs)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("wanted", ["x", "w"])
def test_gradient_of_one_input_only(path, wanted):
    """The choice of expansion depends on which gradients are wanted: check each alone."""
    for case in (CASES[0], CASES[1]):
        x, w, _ = make_inputs(case)
        inputs = [md.tensor(x, requires_grad=wanted == "x"), md.tensor(w, requires_grad=wanted == "w")]
        assert md.gradcheck(conv_on_path(path, case[2], case[3]), inputs)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_inputs_outputs_and_upstream_gradient_are_not_mutated(path):
    for case in CASES:
        x, w, b = make_inputs(case)
        inputs = [md.tensor(a.copy(), requires_grad=True) for a in (x, w, b) if a is not None]
        y = conv_on_path(path, case[2], case[3])(*inputs)
        y_before = y.numpy()
        gy = np.random.default_rng(1).standard_normal(y.shape)
        gy_before = gy.copy()
        y.backward(gy)
        np.testing.assert_array_equal(y.data, y_before)  # the output owns its memory...
        conv_on_path(path, case[2], case[3])(*[t * 2 for t in inputs])
        np.testing.assert_array_equal(y.data, y_before)  # ...that no later call reuses
        np.testing.assert_array_equal(inputs[0].data, x)
        np.testing.assert_array_equal(inputs[1].data, w)
        if b is not None:
            np.testing.assert_array_equal(inputs[2].data, b)
        np.testing.assert_array_equal(gy, gy_before)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_float32_stays_float32(path):
    """No silent float64: outputs and gradients keep the inputs' float32, and agree with
    the float64 computation to float32 precision."""
    case = CASES[0]
    x, w, b = make_inputs(case, np.float32)
    inputs = [md.tensor(a, requires_grad=True) for a in (x, w, b)]
    y = conv_on_path(path, case[2], case[3])(*inputs)
    y.sum().backward()
    assert y.dtype == np.float32
    assert all(t.grad.dtype == np.float32 for t in inputs)
    expected = naive_conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
                            pairs(case[2]), pairs(case[3]))
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_random_geometries_agree_with_naive_loops_and_the_im2col_path():
    """Many random kernel/stride/padding/image geometries: every grid path's output
    against naive loops, and its gradients against the im2col path (im2col/col2im,
    checked against finite differences above)."""
    rng = np.random.default_rng(7)
    checked = 0
    while checked < 60:
        n, c, o = rng.integers(1, 4), rng.integers(1, 5), rng.integers(1, 5)
        kh, kw, sy, sx, ph, pw = (int(v) for v in rng.integers([1, 1, 1, 1, 0, 0], [5, 5, 4, 4, 4, 4]))
        h, w = (int(v) for v in rng.integers(1, 10, 2))
        if h + 2 * ph < kh or w + 2 * pw < kw:
            continue
        x = rng.standard_normal((n, c, h, w))
        weight = rng.standard_normal((o, c, kh, kw))
        expected = naive_conv2d(x, weight, None, (sy, sx), (ph, pw))
        gy = rng.standard_normal(expected.shape)
        grads = {}
        for path in [p for p in PATHS if p[0] != "phase_grid"] + [p for p in PATHS if p[0] == "phase_grid"]:
            inputs = [md.tensor(x, requires_grad=True), md.tensor(weight, requires_grad=True)]
            y = conv_on_path(path, (sy, sx), (ph, pw))(*inputs)
            np.testing.assert_allclose(y.numpy(), expected, rtol=1e-10, atol=1e-12)
            y.backward(gy)
            grads[path] = [t.grad.numpy() for t in inputs]
        reference = grads[("im2col", None, None)]
        for path, (gx, gw) in grads.items():
            np.testing.assert_allclose(gx, reference[0], rtol=1e-10, atol=1e-12, err_msg=str(path))
            np.testing.assert_allclose(gw, reference[1], rtol=1e-10, atol=1e-12, err_msg=str(path))
        checked += 1


def test_large_temporaries_are_not_kept(monkeypatch):
    """Above the keep limit conv2d still works, with fresh temporaries."""
    from minidense import workspace
    monkeypatch.setattr(workspace, "KEEP_LIMIT", 0)
    case = CASES[0]
    x, w, b = make_inputs(case)
    y = conv_on_path((None, None, None), case[2], case[3])(md.tensor(x), md.tensor(w), md.tensor(b))
    np.testing.assert_allclose(y.numpy(), naive_conv2d(x, w, b, pairs(case[2]), pairs(case[3])),
                               rtol=1e-10, atol=1e-12)
    assert workspace.get("unkept", (4, 5), np.float32, like=np.zeros(1)).base is None

"""Higher-order gradients: every op differentiated twice, against finite differences of
its first derivatives (``md.gradgradcheck``, float64, random upstream gradients and
directions), and its first derivatives computed with ``create_graph=True`` equal to
the raw path's.  Runs on MINIDENSE_TEST_DEVICE (cpu by default)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minidense as md
from minidense.testing import (arrays, broadcastable_shapes, conv_cases, distinct_arrays,
                               pool_cases, shapes, tensors_from)

from conftest import TEST_DEVICE

# Second derivatives cost a forward and a create_graph backward per probe: fewer probes.
CHEAP = dict(max_elements=12, directions=3)


def T(*arrays_):
    return tensors_from(*arrays_, device=TEST_DEVICE)


def check(fn, inputs):
    """fn's double backward against finite differences, and its first derivatives the
    same with create_graph=True as on the raw path."""
    inputs = list(inputs)
    out = fn(*inputs)
    v = md.tensor(np.random.default_rng(3).standard_normal(out.shape), dtype=np.float64,
                  device=TEST_DEVICE)
    wanted = [t for t in inputs if t.requires_grad]
    with_graph = md.grad(fn(*inputs), wanted, v, create_graph=True, allow_unused=True)
    raw = md.grad(fn(*inputs), wanted, v, allow_unused=True)
    for a, b in zip(with_graph, raw):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-12)
    assert md.gradgradcheck(fn, inputs, **CHEAP)
    return True


# -- arithmetic ---------------------------------------------------------------------
@pytest.mark.parametrize("op", [md.add, md.sub, md.mul, md.div])
@given(data=st.data())
def test_binary_ops(op, data):
    shape_a, shape_b = data.draw(broadcastable_shapes())
    a, b = data.draw(arrays(shape_a)), data.draw(arrays(shape_b, 0.5, 2.0))
    check(op, T(a, b))


@given(x=shapes(max_dims=3).flatmap(lambda s: arrays(s, 0.2, 2.0)), c=st.sampled_from([2, 3, 0.5, -1.5]))
def test_pow_scalar(x, c):
    check(lambda x: x ** c, [T(x)])


@given(data=st.data())
def test_pow_tensor_exponent(data):
    shape = data.draw(shapes(max_dims=2))
    a, b = data.draw(arrays(shape, 0.2, 2.0)), data.draw(arrays(shape, -2, 2))
    check(lambda a, b: a ** b, T(a, b))


@pytest.mark.parametrize("fn,low", [(md.exp, -2.0), (md.log, 0.2), (md.sqrt, 0.2), (md.neg, -2.0),
                                    (md.sigmoid, -4.0), (md.tanh, -2.0)])
@given(data=st.data())
def test_unary_ops(fn, low, data):
    x = data.draw(shapes(max_dims=3).flatmap(lambda s: arrays(s, low, 3.0)))
    check(lambda x: fn(x) * x, [T(x)])   # times x: a linear op's second derivative is zero


@given(x=shapes(max_dims=3).flatmap(lambda s: arrays(s, margin=0.05)))
def test_relu(x):
    check(lambda x: md.relu(x) * x, [T(x)])


@given(data=st.data())
def test_matmul(data):
    m, k, n = (data.draw(st.integers(1, 3)) for _ in range(3))
    batch = data.draw(st.sampled_from([(), (2,)]))
    a, b = data.draw(arrays(batch + (m, k))), data.draw(arrays((k, n)))
    check(lambda a, b: a @ b, T(a, b))


# -- reductions and layout ----------------------------------------------------------
@given(x=shapes(min_dims=2, max_dims=3).flatmap(arrays))
def test_sum_and_mean(x):
    check(lambda x: (x.sum(axis=1, keepdims=True) * x).mean(axis=0), [T(x)])


@given(x=shapes(min_dims=2, max_dims=3).flatmap(distinct_arrays))
def test_max_amax_min(x):
    check(lambda x: md.amax(x, dim=-1) * x.sum(dim=-1), [T(x)])
    check(lambda x: x.max(dim=0).values * x.min(dim=0).values, [T(x)])


@given(x=shapes(min_dims=2, max_dims=3).flatmap(lambda s: arrays(s, margin=0.05)))
def test_abs_clamp_norm_softmax(x):
    check(lambda x: md.abs(x) * x + md.clamp(x, -0.5, 0.7) * x, [T(x)])
    check(lambda x: md.norm(x, dim=-1) * x.sum(dim=-1), [T(x)])
    check(lambda x: md.softmax(x, dim=-1) * x + md.log_softmax(x, dim=0) * x, [T(x)])


@given(x=shapes(min_dims=2, max_dims=3).flatmap(arrays))
def test_split_pad_expand_clone(x):
    def fn(x):
        a, b = md.split(x, [1, x.shape[0] - 1], dim=0) if x.shape[0] > 1 else (x, x)
        padded = md.nn.functional.pad(x, (1, 2))
        return (a * a).sum() + (b * b).sum() + (padded * padded).sum() + (x[:1].expand(*x.shape) * x.clone()).sum()
    check(fn, [T(x)])


@given(x=shapes(min_dims=2, max_dims=3).flatmap(arrays))
def test_reshape_transpose_getitem_concat(x):
    def fn(x):
        y = x.reshape(x.shape[0], -1)
        y = md.concat([y, y[:, :1] * y[:, -1:]], axis=1)
        return md.transpose(y, 1, 0) * md.transpose(y, 1, 0)
    check(fn, [T(x)])


def test_fancy_index_repeats_add_up():
    x = T(np.linspace(-1, 1, 6))
    check(lambda x: x[np.array([0, 2, 2, 5])] ** 2, [x])


# -- the layers ---------------------------------------------------------------------
@settings(max_examples=6)
@given(case=conv_cases(max_batch=2, max_channels=3, max_side=5))
def test_conv2d_both_arguments(case):
    x, w = T(case.x, case.w)
    check(lambda x, w: md.conv2d(x, w, stride=case.stride, padding=case.padding) ** 2, [x, w])


@settings(max_examples=6)
@given(case=conv_cases(max_batch=2, max_channels=2, max_side=6, max_groups=3, max_dilation=2))
def test_conv2d_groups_and_dilation(case):
    x, w = T(case.x, case.w)
    check(lambda x, w: md.conv2d(x, w, stride=case.stride, padding=case.padding,
                                 dilation=case.dilation, groups=case.groups) ** 2, [x, w])


# The gradient ops compute with the convolution's own algorithm: each one on a square
# stride-1 case, a strided rectangular one, a 1x1 one (the pointwise products) and a
# dilated one (Winograd takes its stride-1 3x3 cases and leaves the rest to the default).
GEOMETRIES = {"3x3": ((2, 2, 5, 5), (3, 3), dict(padding=1)),
              "strided": ((2, 2, 6, 5), (3, 2), dict(stride=2, padding=(1, 0))),
              "1x1": ((1, 3, 4, 4), (1, 1), dict()),
              "dilated": ((1, 2, 7, 6), (3, 3), dict(padding=2, dilation=2))}


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("algorithm", md.CONV_ALGORITHMS)
def test_conv2d_every_algorithm(algorithm, geometry):
    rng = np.random.default_rng(0)
    x_shape, kernel, options = GEOMETRIES[geometry]
    c = x_shape[1]
    groups = c if algorithm == "depthwise" else 1
    w_shape = (2 * c, 1) + kernel if algorithm == "depthwise" else (3, c) + kernel
    x, w = T(rng.normal(size=x_shape), rng.normal(size=w_shape))
    with md.conv_algorithm(algorithm):
        check(lambda x, w: md.conv2d(x, w, groups=groups, **options) ** 2, [x, w])


@given(data=st.data())
def test_linear(data):
    n, i, o = (data.draw(st.integers(1, 3)) for _ in range(3))
    x, w, b = data.draw(arrays((n, i))), data.draw(arrays((o, i))), data.draw(arrays((o,)))
    check(lambda x, w, b: md.linear(x, w, b) ** 2, T(x, w, b))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op", [md.batch_norm, md.batch_norm_relu])
@given(data=st.data())
def test_batch_norm(op, training, data):
    n, c, h = data.draw(st.integers(2, 3)), data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    x = data.draw(arrays((n, c, h, h), margin=0.05))
    gamma, beta = data.draw(arrays((c,), 0.5, 2)), data.draw(arrays((c,), -0.3, 0.3))
    mean, var = data.draw(arrays((c,))), data.draw(arrays((c,), 0.5, 2))
    check(lambda x, g, b: op(x, g, b, md.tensor(mean), md.tensor(var), training=training), T(x, gamma, beta))


@pytest.mark.parametrize("op", ["avg", "max", "global"])
@given(case=pool_cases(max_side=5))
def test_pooling(op, case):
    def fn(x):
        if op == "global":
            return md.global_avg_pool2d(x) ** 2
        pool = md.avg_pool2d if op == "avg" else md.max_pool2d
        return pool(x, case.kernel, case.stride, case.padding) ** 2
    check(fn, [T(case.x)])


def test_dropout_applies_the_same_mask_again():
    md.manual_seed(0)
    x = T(np.linspace(-1, 1, 12).reshape(3, 4))
    y = md.dropout(x, 0.5)
    (g,) = md.grad((y * y).sum(), [x], create_graph=True)
    (h,) = md.grad(g.sum(), [x])
    mask = (y.data != 0) * 2.0   # kept elements, scaled by 1/(1-p) = 2
    np.testing.assert_allclose(h.numpy(), 2 * md.tensor(mask * mask).numpy())


# -- the API ------------------------------------------------------------------------
def test_grad_api_errors():
    x, y = T(np.ones(3)), T(np.ones(3))
    out = (x * 2).sum()
    with pytest.raises(RuntimeError, match="input 1 .*gets no gradient.*allow_unused=True"):
        md.grad(out, [x, y], retain_graph=True)
    gx, gy = md.grad(out, [x, y], allow_unused=True)
    assert gy is None and np.allclose(gx.numpy(), 2)
    with pytest.raises(RuntimeError, match="only for a scalar output, got shape \\(3,\\)"):
        md.grad(x * 2, [x])
    with pytest.raises(RuntimeError, match="upstream gradient has shape \\(2,\\) but the output has shape \\(3,\\)"):
        md.grad(x * 2, [x], md.tensor(np.ones(2)))


def test_third_order_and_out_of_place_grad():
    x = T(np.array([0.5, -1.0, 2.0]))
    (g,) = md.grad((x ** 4).sum(), [x], create_graph=True)         # 4 x^3
    (h,) = md.grad(g.sum(), [x], create_graph=True)                 # 12 x^2
    (k,) = md.grad(h.sum(), [x])                                    # 24 x
    np.testing.assert_allclose(k.numpy(), 24 * x.numpy())
    # .grad under create_graph: a tensor with a graph, accumulated out of place.
    (x ** 3).sum().backward(create_graph=True)
    first = x.grad
    (x ** 3).sum().backward(create_graph=True)
    assert x.grad is not first and first.grad_fn is not None
    np.testing.assert_allclose(first.numpy(), 3 * x.numpy() ** 2)
    np.testing.assert_allclose(x.grad.numpy(), 6 * x.numpy() ** 2)
    (h2,) = md.grad(x.grad.sum(), [x])
    np.testing.assert_allclose(h2.numpy(), 12 * x.numpy())


def test_an_op_with_a_raw_backward_only_is_differentiable_once():
    @md.once_differentiable
    class Cube(md.Function):
        def forward(self, x):
            self.save_for_backward(x)
            return x ** 3

        def backward(self, gy):
            (x,) = self.saved
            return 3 * x ** 2 * gy
    x = T(np.array([1.0, 2.0]))
    (g,) = md.grad(Cube()(x).sum(), [x], create_graph=True)    # the first backward works
    np.testing.assert_allclose(g.numpy(), [3.0, 12.0])
    with pytest.raises(RuntimeError, match="Cube is not differentiable twice"):
        md.grad(g.sum(), [x])


def test_recompute_refuses_create_graph_clearly():
    layer = md.nn.Linear(3, 3).double()
    x = T(np.ones((2, 3)))
    y = md.recompute(layer, x)
    with pytest.raises(RuntimeError, match="md.recompute .* supports only loss.backward\\(\\) without create_graph"):
        md.grad(y.sum(), [x], create_graph=True)


def test_create_graph_on_the_fake_device(monkeypatch):
    """The CuPy path runs the same code: a gradient penalty's weight gradient on the fake
    GPU (kernels emulated, arrays refusing to mix with host arrays) equals the CPU's."""
    from fake_device import fake_cuda
    rng = np.random.default_rng(0)
    arrays_ = [rng.normal(size=(2, 2, 5, 5)), rng.normal(size=(3, 2, 3, 3)), rng.uniform(0.5, 1.5, 3),
               rng.normal(size=3) * 0.1]

    def penalty_gradients(device):
        x, w, g, b = (md.tensor(a, device=device, requires_grad=True) for a in arrays_)
        h = md.max_pool2d(md.batch_norm_relu(md.conv2d(x, w, padding=1), g, b), 2)
        (gx,) = md.grad((md.global_avg_pool2d(h) ** 2).sum(), [x], create_graph=True)
        return [t.numpy() for t in md.grad((gx * gx).sum(), [w, g, b])]

    on_cpu = penalty_gradients("cpu")
    fake_cuda(monkeypatch)
    for a, b in zip(penalty_gradients("cuda"), on_cpu):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)

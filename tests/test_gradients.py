"""Every op's backward against central finite differences (float64), on shapes,
hyperparameters and values drawn by hypothesis, and on the composites DenseNet and
ResNet are built from.  Runs on MINIDENSE_TEST_DEVICE (cpu by default)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minidense as md
from minidense import backend
from minidense.testing import (arrays, broadcastable_shapes, conv_cases, distinct_arrays,
                               pool_cases, shapes, tensors_from)

from conftest import TEST_DEVICE


def T(*arrays_):
    return tensors_from(*arrays_, device=TEST_DEVICE)


# -- elementwise arithmetic with broadcasting ---------------------------------------
@pytest.mark.parametrize("op", [md.add, md.sub, md.mul, md.div])
@given(data=st.data())
def test_binary_ops_with_broadcasting(op, data):
    shape_a, shape_b = data.draw(broadcastable_shapes())
    if data.draw(st.booleans()):
        shape_a, shape_b = shape_b, shape_a
    a = data.draw(arrays(shape_a))
    b = data.draw(arrays(shape_b, 0.5, 2.0))  # away from 0 for division
    assert md.gradcheck(op, T(a, b))


@given(x=shapes().flatmap(lambda s: arrays(s, 0.2, 2.0)), c=st.sampled_from([2, 3, 0.5, -1.5]))
def test_pow_scalar(x, c):
    assert md.gradcheck(lambda x: x ** c, [T(x)])


@given(data=st.data())
def test_pow_tensor_exponent(data):
    shape = data.draw(shapes(max_dims=3))
    a, b = data.draw(arrays(shape, 0.2, 2.0)), data.draw(arrays(shape, -2, 2))
    assert md.gradcheck(lambda a, b: a ** b, T(a, b))


@pytest.mark.parametrize("fn,low", [(md.exp, -2.0), (md.log, 0.2), (md.sqrt, 0.2), (md.neg, -2.0),
                                    (md.sigmoid, -4.0), (md.tanh, -2.0)])
@given(data=st.data())
def test_unary_ops(fn, low, data):
    x = data.draw(shapes().flatmap(lambda s: arrays(s, low, 3.0)))
    assert md.gradcheck(fn, [T(x)])


@given(x=shapes().flatmap(lambda s: arrays(s, margin=0.05)))
def test_relu_away_from_zero(x):
    assert md.gradcheck(md.relu, [T(x)])


@given(data=st.data())
def test_matmul_batched_and_broadcast(data):
    m, k, n = (data.draw(st.integers(1, 4)) for _ in range(3))
    batch_a = data.draw(st.sampled_from([(), (2,), (3, 1)]))
    batch_b = data.draw(st.sampled_from([(), (1,), (2,)])) if batch_a != (3, 1) else (2,)
    a, b = data.draw(arrays(batch_a + (m, k))), data.draw(arrays(batch_b + (k, n)))
    assert md.gradcheck(lambda a, b: a @ b, T(a, b))


@given(data=st.data())
def test_matmul_vector_operands(data):
    k, n = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    v, m = data.draw(arrays((k,))), data.draw(arrays((k, n)))
    assert md.gradcheck(lambda v, m: v @ m, T(v, m))
    assert md.gradcheck(lambda m, v: m.T @ v, T(m, v))


# -- reductions -----------------------------------------------------------------------
def _axes(shape):
    return st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1),
                     st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True).map(tuple))


@pytest.mark.parametrize("name", ["sum", "mean", "amax", "amin", "norm"])
@given(data=st.data())
def test_reductions(name, data):
    shape = data.draw(shapes(1, 4))
    x = data.draw(distinct_arrays(shape) if name in ("amax", "amin", "norm") else arrays(shape))
    dim, keepdim = data.draw(_axes(shape)), data.draw(st.booleans())
    fn = getattr(md, name)
    if name == "norm":
        p = data.draw(st.sampled_from([1, 2, 3.5, float("inf")]))
        assert md.gradcheck(lambda t: fn(t, p, dim, keepdim), [T(x)])
    else:
        assert md.gradcheck(lambda t: fn(t, dim=dim if dim is not None else (), keepdim=keepdim)
                            if name in ("amax", "amin") else fn(t, dim=dim, keepdim=keepdim), [T(x)])


@pytest.mark.parametrize("name", ["max", "min"])
@given(data=st.data())
def test_max_and_min_along_a_dim(name, data):
    shape = data.draw(shapes(1, 4))
    x = data.draw(distinct_arrays(shape))
    dim, keepdim = data.draw(st.integers(-len(shape), len(shape) - 1)), data.draw(st.booleans())
    assert md.gradcheck(lambda t: getattr(t, name)(dim, keepdim).values, [T(x)])


def test_max_ties_share_the_gradient_and_max_along_a_dim_picks_the_first():
    """PyTorch's rules: amax (and max over every element) split the gradient among tied
    maxima; max(dim) sends it to the index it returns, the first."""
    x = md.tensor(np.array([[1.0, 3.0, 3.0]]), requires_grad=True, device=TEST_DEVICE)
    x.amax(dim=1).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [[0.0, 0.5, 0.5]])
    x.grad = None
    x.max().backward()
    np.testing.assert_allclose(x.grad.numpy(), [[0.0, 0.5, 0.5]])
    x.grad = None
    values, indices = x.max(1)
    values.sum().backward()
    assert indices.tolist() == [1]
    np.testing.assert_allclose(x.grad.numpy(), [[0.0, 1.0, 0.0]])


# -- shape ops ----------------------------------------------------------------------
@given(data=st.data())
def test_reshape_and_transpose(data):
    shape = data.draw(shapes(1, 4))
    x = data.draw(arrays(shape))
    perm = tuple(data.draw(st.permutations(range(len(shape)))))
    assert md.gradcheck(lambda t: t.reshape(-1), [T(x)])
    assert md.gradcheck(lambda t: t.permute(perm), [T(x)])
    assert md.gradcheck(lambda t: t.transpose(0, -1).flatten(), [T(x)])
    assert md.gradcheck(lambda t: t.unsqueeze(1).squeeze(), [T(x)])


@given(data=st.data())
def test_getitem_slices_and_fancy_indices(data):
    shape = data.draw(shapes(2, 3, 2, 5))
    x = data.draw(arrays(shape))
    start = data.draw(st.integers(0, shape[0] - 1))
    step = data.draw(st.integers(1, 2))
    assert md.gradcheck(lambda t: t[start::step, ..., :1], [T(x)])
    xp = backend.array_module(TEST_DEVICE)
    rows = xp.asarray(data.draw(st.lists(st.integers(0, shape[0] - 1), min_size=1, max_size=6)))
    assert md.gradcheck(lambda t: t[rows], [T(x)])  # repeated rows add up


@given(data=st.data())
def test_concat_on_any_axis(data):
    base = data.draw(shapes(1, 4))
    axis = data.draw(st.integers(-len(base), len(base) - 1))
    count = data.draw(st.integers(1, 4))
    pieces = []
    for _ in range(count):
        shape = list(base)
        shape[axis] = data.draw(st.integers(1, 3))
        pieces.append(data.draw(arrays(tuple(shape))))
    assert md.gradcheck(lambda *ts: md.cat(ts, dim=axis), T(*pieces) if count > 1 else [T(*pieces)])
    sizes = [p.shape[axis] for p in pieces]
    assert md.gradcheck(lambda t: md.cat([part * (i + 1) for i, part in enumerate(t.split(sizes, axis))],
                                         axis), [T(np.concatenate(pieces, axis))])


# -- the other ops with PyTorch's names (each also compared with PyTorch in test_pytorch_idioms)
_rng = np.random.default_rng(11)
_X = _rng.standard_normal((3, 4))
_LABELS = np.array([2, 0, 3])
OTHER_OPS = {
    "abs": lambda t: md.abs(t),
    "clamp": lambda t: t.clamp(-0.5, 0.7),
    "softmax": lambda t: md.softmax(t, 1),
    "log_softmax": lambda t: md.log_softmax(t, 0),
    "stack": lambda t: md.stack([t, t * 2], 1),
    "chunk": lambda t: t.chunk(3, 1)[1],
    "pad": lambda t: md.nn.functional.pad(t, (1, 2, 0, 1), value=0.5),
    "cross_entropy_weighted_smoothed": lambda t: md.nn.functional.cross_entropy(
        t, md.tensor(_LABELS, device=TEST_DEVICE), weight=md.tensor([1.0, 2.0, 0.5, 1.5], dtype=np.float64,
                                                                    device=TEST_DEVICE),
        label_smoothing=0.1),
    "cross_entropy_ignore_index": lambda t: md.nn.functional.cross_entropy(
        t, md.tensor([2, -100, 1], device=TEST_DEVICE), reduction="sum"),
    "mse_loss": lambda t: md.nn.functional.mse_loss(t, md.tensor(_X[::-1] * 0.5, device=TEST_DEVICE)),
    "adaptive_avg_pool2d": lambda t: md.nn.functional.adaptive_avg_pool2d(t.reshape(1, 1, 3, 4), (2, 3)),
}


@pytest.mark.parametrize("name", sorted(OTHER_OPS))
def test_other_ops(name):
    assert md.gradcheck(OTHER_OPS[name], T(_X))


# -- layers -------------------------------------------------------------------------
@given(case=conv_cases())
def test_conv2d(case):
    x, w, b = T(case.x, case.w, case.b)
    inputs = [x, w] if b is None else [x, w, b]
    fn = lambda *a: md.conv2d(*a, stride=case.stride, padding=case.padding)  # noqa: E731
    assert md.gradcheck(fn, inputs)


@given(data=st.data())
def test_linear(data):
    n, i, o = (data.draw(st.integers(1, 5)) for _ in range(3))
    lead = data.draw(st.sampled_from([(n,), (2, n)]))
    x, w, b = data.draw(arrays(lead + (i,))), data.draw(arrays((o, i))), data.draw(arrays((o,)))
    assert md.gradcheck(md.linear, T(x, w, b))
    assert md.gradcheck(md.linear, T(x, w))


@given(data=st.data(), training=st.booleans())
def test_batch_norm(data, training):
    shape = data.draw(st.sampled_from([(3, 2), (2, 3, 2, 3), (1, 2, 3, 2), (4, 1, 1, 1)]))
    c = shape[1]
    x = data.draw(arrays(shape))
    gamma, beta = data.draw(arrays((c,), 0.5, 2)), data.draw(arrays((c,)))
    xp = backend.array_module(TEST_DEVICE)
    running_mean = xp.asarray(data.draw(arrays((c,))))
    running_var = xp.asarray(data.draw(arrays((c,), 0.5, 2)))

    def fn(x, g, b):
        # Copies, so that repeated evaluations see the same running statistics.
        return md.batch_norm(x, g, b, running_mean.copy(), running_var.copy(), training=training)
    assert md.gradcheck(fn, T(x, gamma, beta))


@pytest.mark.parametrize("fn", [md.batch_norm, md.batch_norm_relu], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_in_pieces_of_the_batch_agrees_with_one_piece(fn, training, monkeypatch):
    """On NumPy, batch norm works through the batch a few images at a time (in cache):
    one image per piece gives what one piece for the whole batch gives, and batch norm
    in pieces passes the gradient check."""
    from minidense import threads
    rng = np.random.default_rng(3)
    x, gy = rng.standard_normal((5, 3, 4, 4)), rng.standard_normal((5, 3, 4, 4))
    gamma, beta = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
    stats = rng.standard_normal(3), rng.uniform(0.5, 2, 3)

    def run():
        inputs = T(x, gamma, beta)
        y = fn(*inputs, stats[0].copy(), stats[1].copy(), training=training)
        y.backward(gy)
        return [y.numpy()] + [t.grad.numpy() for t in inputs]
    whole = run()
    monkeypatch.setattr(threads, "PIECE_BYTES", 1)   # one image per piece
    for got, want in zip(run(), whole):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
    if fn is md.batch_norm:
        assert md.gradcheck(lambda *a: fn(*a, stats[0].copy(), stats[1].copy(), training=training),
                            T(x, gamma, beta))


@given(case=pool_cases())
def test_max_pool2d(case):
    fn = lambda x: md.max_pool2d(x, case.kernel, case.stride, case.padding)  # noqa: E731
    assert md.gradcheck(fn, [T(case.x)])


@given(case=pool_cases(distinct=False))
def test_avg_pool2d(case):
    fn = lambda x: md.avg_pool2d(x, case.kernel, case.stride, case.padding)  # noqa: E731
    assert md.gradcheck(fn, [T(case.x)])


@given(x=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 5), st.integers(1, 5))
       .flatmap(arrays))
def test_global_avg_pool2d(x):
    assert md.gradcheck(md.global_avg_pool2d, [T(x)])


@given(x=shapes(1, 4).flatmap(arrays), p=st.sampled_from([0.1, 0.5, 0.8]))
def test_dropout_with_a_fixed_generator(x, p):
    xp = backend.array_module(TEST_DEVICE)
    fn = lambda t: md.dropout(t, p, generator=xp.random.default_rng(7))  # noqa: E731
    assert md.gradcheck(fn, [T(x)])


@given(data=st.data())
def test_cross_entropy(data):
    n, k = data.draw(st.integers(1, 6)), data.draw(st.integers(2, 5))
    logits = data.draw(arrays((n, k), -3, 3))
    labels = data.draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    labels = md.tensor(labels, device=TEST_DEVICE)
    assert md.gradcheck(lambda z: md.cross_entropy(z, labels), [T(logits)])


# -- composites: the building blocks of DenseNet and ResNet ------------------------------
def _bn_relu_conv(x, gamma, beta, w, padding):
    return md.conv2d(md.relu(md.batch_norm(x, gamma, beta)), w, padding=padding)


def test_densenet_bc_layer():
    """BN-ReLU-1x1 conv (4k) - BN-ReLU-3x3 conv (k), concatenated with the input."""
    rng = np.random.default_rng(1)
    c, k = 3, 2
    x = rng.standard_normal((2, c, 5, 4))
    params = [rng.uniform(0.5, 1.5, c), rng.standard_normal(c), rng.standard_normal((4 * k, c, 1, 1)),
              rng.uniform(0.5, 1.5, 4 * k), rng.standard_normal(4 * k), rng.standard_normal((k, 4 * k, 3, 3))]

    def layer(x, g1, b1, w1, g2, b2, w2):
        bottleneck = _bn_relu_conv(x, g1, b1, w1, 0)
        new_features = _bn_relu_conv(bottleneck, g2, b2, w2, 1)
        return md.cat([x, new_features], 1)
    assert md.gradcheck(layer, T(x, *params))


def test_densenet_transition():
    """BN-ReLU-1x1 conv (compression) - 2x2 average pool."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 6, 4))
    g, b, w = rng.uniform(0.5, 1.5, 4), rng.standard_normal(4), rng.standard_normal((2, 4, 1, 1))
    assert md.gradcheck(lambda *a: md.avg_pool2d(_bn_relu_conv(*a, 0), 2), T(x, g, b, w))


def _basic_block(x, shortcut, w1, g1, b1, w2, g2, b2, stride):
    out = md.relu(md.batch_norm(md.conv2d(x, w1, stride=stride, padding=1), g1, b1))
    out = md.batch_norm(md.conv2d(out, w2, padding=1), g2, b2)
    return md.relu(out + shortcut)


def _block_params(rng, c_in, c_out):
    return [rng.standard_normal((c_out, c_in, 3, 3)) * 0.5, rng.uniform(0.5, 1.5, c_out),
            rng.standard_normal(c_out), rng.standard_normal((c_out, c_out, 3, 3)) * 0.5,
            rng.uniform(0.5, 1.5, c_out), rng.standard_normal(c_out)]


def test_residual_block_identity_shortcut():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 5))
    assert md.gradcheck(lambda x, *p: _basic_block(x, x, *p, stride=1), T(x, *_block_params(rng, 3, 3)))


def test_residual_block_zero_padded_strided_shortcut():
    """ResNet option A: subsample by 2 and pad the new channels with zeros."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 2, 6, 5))

    def block(x, *p):
        sub = x[:, :, ::2, ::2]
        zeros = md.tensor(backend.get_array_module(x.data).zeros(sub.shape))
        shortcut = md.cat([sub, zeros], 1)
        return _basic_block(x, shortcut, *p, stride=2)
    assert md.gradcheck(block, T(x, *_block_params(rng, 2, 4)))

"""The autograd engine: order, accumulation, memory, dtype rule and clear errors."""
import gc
import re
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

import minidense as md
from minidense import backend
from minidense.autograd import Function

from conftest import TEST_DEVICE


def leaf(a, requires_grad=True):
    return md.tensor(np.asarray(a, dtype=np.float64), requires_grad=requires_grad, device=TEST_DEVICE)


# -- order and accumulation ---------------------------------------------------------
def test_ten_thousand_op_chain_backprops_without_recursion():
    x = leaf([1.0, 2.0])
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200)  # a recursive backward would fail here
    try:
        y.sum().backward()
    finally:
        sys.setrecursionlimit(limit)
    np.testing.assert_allclose(x.grad.numpy(), [1.0001 ** 10_000] * 2, rtol=1e-9)


def test_diamond_graph_sums_both_paths():
    # y = (x*2) * (x+3): dy/dx = 2(x+3) + 2x = 4x + 6
    x = leaf([1.0, -2.0, 0.5])
    a, b = x * 2, x + 3
    (a * b).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 4 * x.numpy() + 6)


def test_one_tensor_feeding_many_consumers_in_different_generations():
    # z = x + x*x + exp(x*x*x): gradient collected from three depths before x's node runs
    x = leaf([0.3, -0.7])
    h = x * 2  # an interior node with three consumers
    z = h + h * h + md.exp(h * h * h)
    z.sum().backward()
    hv = 2 * x.numpy()
    np.testing.assert_allclose(x.grad.numpy(), 2 * (1 + 2 * hv + 3 * hv ** 2 * np.exp(hv ** 3)))


def test_leaf_gradients_accumulate_until_zeroed():
    x = leaf([1.0, 2.0])
    (x * 3).sum().backward()
    (x * 4).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [7.0, 7.0])
    x.zero_grad()
    (x * 5).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [5.0, 5.0])


def test_grads_never_alias_each_other_or_the_upstream_gradient():
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    upstream = backend.array_module(TEST_DEVICE).asarray([1.0, 1.0])
    y = a + b  # Add's backward hands the same array to both inputs
    y.backward(upstream)
    a.grad.data += 10
    np.testing.assert_allclose(b.grad.numpy(), [1.0, 1.0])
    np.testing.assert_allclose(backend.to_numpy(upstream), [1.0, 1.0])
    assert a.grad.data is not b.grad.data


def test_second_backward_needs_retain_graph():
    x = leaf([2.0])
    y = x * x
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), [8.0])
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward()


def test_saved_arrays_are_released_after_backward():
    x = leaf(np.ones((2, 3)))
    y = md.relu(x)
    node = y.grad_fn
    assert node.saved
    y.sum().backward()
    assert node.saved is None


def _kept_shapes(y):
    """The shapes of the arrays y's node keeps for backward (None for a slot left empty)."""
    return [None if a is None else tuple(a.shape) for a in y.grad_fn.saved]


def test_each_op_keeps_only_what_its_backward_needs():
    x = leaf(np.random.default_rng(0).standard_normal((2, 3, 6, 6)))
    w = leaf(np.ones((4, 3, 3, 3)))
    constant = md.tensor(np.full((2, 3, 6, 6), 2.0), device=TEST_DEVICE)
    # Shapes only: add, concat, average pooling, sums.
    for y in (x + x, md.cat([x, x], dim=1), md.avg_pool2d(x, 2), x.sum(dim=1), x.reshape(-1)):
        assert y.grad_fn.saved == (), type(y.grad_fn).__name__
    # conv2d: x and W themselves, never the patch matrix.
    y = md.conv2d(x, w, padding=1)
    assert [a is b for a, b in zip(y.grad_fn.saved, (x.data, w.data))] == [True, True]
    # ReLU: its output (the mask).  BN, on every path and device: x itself (no new
    # array), the per-channel mean and 1/std, and gamma; the fused BN-ReLU beta too.
    y = md.relu(x)
    assert y.grad_fn.saved[0] is y.data and len(y.grad_fn.saved) == 1
    for plain in (False, True):
        with md.plain_ops(plain):
            y = md.batch_norm(x, leaf(np.ones(3)), leaf(np.zeros(3)))
            assert y.grad_fn.saved[0] is x.data
            assert _kept_shapes(y) == [(2, 3, 6, 6), (3,), (3,), (3,)]
            y = md.batch_norm_relu(x, leaf(np.ones(3)), leaf(np.zeros(3)))
            assert _kept_shapes(y) == [(2, 3, 6, 6), (3,), (3,), (3,), (3,)]
    # max pooling: one small integer per output pixel.
    y = md.max_pool2d(x, 2)
    assert _kept_shapes(y) == [(2, 3, 3, 3)] and y.grad_fn.saved[0].itemsize <= 2
    # A product or a power by a constant keeps only what the varying input's gradient needs.
    assert _kept_shapes(x * constant) == [None, (2, 3, 6, 6)]
    y = x ** constant                          # d/dx = c x^(c-1): x and c, not the output
    assert _kept_shapes(y) == [(2, 3, 6, 6), (2, 3, 6, 6), None]
    y = constant ** x                          # d/dx = y log c: c and the output, not x
    assert _kept_shapes(y) == [(2, 3, 6, 6), None, (2, 3, 6, 6)]


def test_retain_grad_on_intermediate():
    x = leaf([1.0, 2.0])
    h = x * 3
    h.retain_grad()
    (h * h).sum().backward()
    np.testing.assert_allclose(h.grad.numpy(), 2 * h.numpy())


def test_no_grad_as_context_and_decorator():
    x = leaf([1.0])
    with md.no_grad():
        y = x * 2
    assert y.grad_fn is None and not y.requires_grad

    @md.no_grad()
    def f(t):
        return t * 2
    assert f(x).grad_fn is None
    assert (x * 2).grad_fn is not None  # grad mode restored


def test_no_grad_decorator_restores_grad_mode_after_a_recursive_call():
    # A decorated function that calls itself enters the same context twice; the inner
    # exit must not overwrite what the outer one restores.
    @md.no_grad()
    def depth(n):
        assert not md.is_grad_enabled()
        return depth(n - 1) if n else 0

    with md.enable_grad():  # restores grad mode for the other tests even if this one fails
        depth(3)
        assert md.is_grad_enabled()
        assert (leaf([1.0]) * 2).grad_fn is not None


def test_intermediate_activations_are_freed_when_no_backward_needs_them():
    """A node keeps edges, not input tensors: the output of a Mul by a constant is
    not kept alive by the next op when that op saves nothing (Add)."""
    x = leaf(np.ones(3))
    h = x * 2.0
    ref = weakref.ref(h)
    y = h + 1.0
    del h
    gc.collect()
    assert ref() is None
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [2.0] * 3)


class _RecordSentGradients(Function):
    """a + b whose backward sends fresh gradients to both inputs and remembers them
    by weak reference."""

    def __init__(self, sent):
        self.sent = sent

    def forward(self, a, b):
        return a + b

    def backward(self, gy):
        ga, gb = gy * 1.0, gy * 2.0
        self.sent += [weakref.ref(gy), weakref.ref(ga), weakref.ref(gb)]
        return ga, gb


class _CheckReleased(Function):
    """The identity, whose backward records which remembered gradients are still alive."""

    def __init__(self, sent, alive):
        self.sent, self.alive = sent, alive

    def forward(self, x):
        return x.copy()

    def backward(self, gy):
        self.alive += [ref() is not None for ref in self.sent]
        return gy * 1.0


def test_an_intermediate_gradient_is_released_as_soon_as_it_has_been_used():
    """Once a node's gradients have been summed into its producer's slot, nothing in the
    engine may keep them: by the time the producer runs, only the sum is alive."""
    sent, alive = [], []
    x = leaf(np.ones(4))
    h = _CheckReleased(sent, alive)(x)
    z = _RecordSentGradients(sent)(h, h)  # both gradients go to h's producer
    z.sum().backward()
    assert len(alive) == 3
    assert not any(alive), f"gradients still alive when the producer ran: {alive}"
    np.testing.assert_allclose(x.grad.numpy(), [3.0] * 4)


def test_the_upstream_gradient_takes_the_dtype_of_the_tensor():
    x = md.tensor(np.ones(3, dtype=np.float32), requires_grad=True, device=TEST_DEVICE)
    seen = []

    class Spy(Function):
        def forward(self, x):
            return x * 2

        def backward(self, gy):
            seen.append(gy.dtype)
            return gy * 2

    Spy()(x).backward(np.ones(3, dtype=np.float64))
    assert seen == [np.float32]
    assert x.grad.dtype == np.float32


def _count_graph_objects():
    gc.collect()
    return sum(isinstance(o, (md.Tensor, Function)) for o in gc.get_objects())


def test_memory_is_flat_over_200_training_steps():
    rng = np.random.default_rng(0)
    w1 = md.tensor(rng.standard_normal((4, 3, 3, 3)) * 0.3, requires_grad=True)
    g1, b1 = md.tensor(np.ones(4), requires_grad=True), md.tensor(np.zeros(4), requires_grad=True)
    w2 = md.tensor(rng.standard_normal((5, 8)) * 0.3, requires_grad=True)
    rm, rv = md.tensor(np.zeros(4)), md.tensor(np.ones(4))
    params = [w1, g1, b1, w2]
    x = md.tensor(rng.standard_normal((8, 3, 6, 6)))
    labels = md.tensor(rng.integers(0, 5, 8))
    counts = []
    for step in range(200):
        h = md.relu(md.batch_norm(md.conv2d(x, w1, padding=1), g1, b1, rm, rv))
        h = md.cat([md.global_avg_pool2d(h), md.global_avg_pool2d(md.max_pool2d(h, 2))], dim=1)
        loss = md.cross_entropy(md.linear(h, w2), labels)
        for p in params:
            p.grad = None
        loss.backward()
        for p in params:
            p.data -= 0.01 * p.grad.data
        if step in (10, 199):
            counts.append(_count_graph_objects())
    assert counts[1] <= counts[0], f"live Tensors+Functions grew from {counts[0]} to {counts[1]}"


# -- ops never mutate their inputs or the upstream gradient ---------------------------------
# (Arrays on TEST_DEVICE are made when a test runs, never at import: a module that made
# GPU arrays at import would fail to collect, and take its tests with it.)
def _on_device(values):
    return backend.array_module(TEST_DEVICE).asarray(values)


OPS = {
    "conv2d": (lambda x, w: md.conv2d(x, w, stride=2, padding=1), [(2, 3, 5, 6), (4, 3, 3, 3)]),
    "conv2d_fewer_outputs": (lambda x, w: md.conv2d(x, w, padding=1), [(2, 3, 5, 6), (2, 3, 3, 3)]),
    "conv2d_more_outputs_bias": (lambda x, w, b: md.conv2d(x, w, b, padding=(0, 1)),
                                 [(2, 3, 5, 6), (8, 3, 3, 2), (8,)]),
    "conv1x1": (lambda x, w: md.conv2d(x, w), [(2, 3, 4, 4), (5, 3, 1, 1)]),
    "linear": (lambda x, w: md.linear(x, w), [(3, 4), (2, 4)]),
    "linear_bias": (md.linear, [(3, 4), (2, 4), (2,)]),
    "batch_norm": (lambda x, g, b: md.batch_norm(x, g, b), [(3, 2, 2, 2), (2,), (2,)]),
    "batch_norm_eval": (lambda x, g, b: md.batch_norm(x, g, b, _on_device([0.5, -0.5]),
                                                      _on_device([2.0, 0.5]), training=False),
                        [(3, 2, 2, 2), (2,), (2,)]),
    "relu": (md.relu, [(3, 4)]),
    "sigmoid": (md.sigmoid, [(3, 4)]),
    "tanh": (md.tanh, [(3, 4)]),
    "max_pool2d": (lambda x: md.max_pool2d(x, 2), [(2, 2, 4, 4)]),
    "max_pool2d_overlapping": (lambda x: md.max_pool2d(x, 3, 2, 1), [(2, 2, 5, 4)]),
    "avg_pool2d": (lambda x: md.avg_pool2d(x, 3, 2, 1), [(2, 2, 5, 4)]),
    "global_avg_pool2d": (md.global_avg_pool2d, [(2, 3, 2, 2)]),
    "cat": (lambda a, b: md.cat([a, b], dim=1), [(2, 1, 3), (2, 2, 3)]),
    "stack": (lambda a, b: md.stack([a, b], dim=1), [(2, 3), (2, 3)]),
    "split": (lambda x: x.split([1, 2], dim=1)[1], [(2, 3)]),
    "add": (md.add, [(2, 3), (3,)]),
    "sub": (md.sub, [(2, 3), (3,)]),
    "mul": (md.mul, [(2, 3), (2, 3)]),
    "div": (md.div, [(2, 3), (2, 1)]),
    "neg": (md.neg, [(2, 3)]),
    "pow": (md.pow, [(2, 3), (2, 3)]),
    "pow_scalar": (lambda x: x ** 3, [(2, 3)]),
    "exp": (md.exp, [(2, 3)]),
    "log": (md.log, [(2, 3)]),
    "sqrt": (md.sqrt, [(2, 3)]),
    "dropout": (lambda x: md.dropout(x, 0.5), [(4, 4)]),
    "cross_entropy": (lambda z: md.cross_entropy(z, md.tensor(_on_device([0, 2, 1]))), [(3, 4)]),
    "matmul": (md.matmul, [(2, 3), (3, 2)]),
    "sum": (lambda x: x.sum(dim=1), [(2, 3)]),
    "mean": (lambda x: x.mean(dim=(0, 2), keepdim=True), [(2, 3, 2)]),
    "amax": (lambda x: x.amax(dim=0), [(2, 3)]),
    "max_dim": (lambda x: x.max(0).values, [(2, 3)]),
    "min_dim": (lambda x: x.min(1, keepdim=True).values, [(2, 3)]),
    "abs": (md.abs, [(2, 3)]),
    "clamp": (lambda x: x.clamp(-0.5, 0.5), [(2, 3)]),
    "norm": (lambda x: x.norm(dim=1), [(2, 3)]),
    "softmax": (lambda x: md.softmax(x, 1), [(2, 3)]),
    "log_softmax": (lambda x: md.log_softmax(x, 1), [(2, 3)]),
    "reshape": (lambda x: x.reshape(-1), [(2, 3)]),
    "view": (lambda x: x.view(3, 2), [(2, 3)]),
    "permute": (lambda x: x.permute(1, 0, 2), [(2, 3, 2)]),
    "transpose": (lambda x: x.transpose(0, 2), [(2, 3, 2)]),
    "clone": (lambda x: x.clone(), [(2, 3)]),
    "getitem": (lambda x: x[:, 1:], [(2, 3)]),
    "getitem_repeated_rows": (lambda x: x[[0, 1, 0]], [(2, 3)]),
}
POSITIVE_INPUTS = {"log", "sqrt", "pow", "pow_scalar"}  # their derivatives need x > 0


@pytest.mark.parametrize("name", sorted(OPS))
def test_ops_do_not_mutate_inputs_or_upstream_gradient(name):
    fn, shapes = OPS[name]
    rng = np.random.default_rng(5)
    draw = (lambda shape: rng.uniform(0.5, 2.0, shape)) if name in POSITIVE_INPUTS else rng.standard_normal
    inputs = [leaf(draw(s)) for s in shapes]
    before = [t.numpy() for t in inputs]
    y = fn(*inputs)
    upstream = backend.array_module(TEST_DEVICE).asarray(rng.standard_normal(y.shape))
    upstream_before = backend.to_numpy(upstream).copy()
    y.backward(upstream)
    for t, b in zip(inputs, before):
        np.testing.assert_array_equal(t.numpy(), b)
    np.testing.assert_array_equal(backend.to_numpy(upstream), upstream_before)


# -- dtype rule -----------------------------------------------------------------------
def test_dtype_rule():
    assert md.tensor([1.0, 2.0]).dtype == np.float32           # Python floats: float32
    assert md.tensor([1, 2]).dtype == np.int64                 # Python ints: int64
    assert md.tensor(np.zeros(2)).dtype == np.float64          # arrays keep their dtype
    assert md.tensor([1, 2], dtype=np.float64).dtype == np.float64
    assert (md.tensor([1.0]) * 2.5).dtype == np.float32        # a Python scalar never promotes
    assert (md.tensor([1.0]) + md.tensor(np.ones(1))).dtype == np.float64  # NumPy promotion
    x = md.tensor(np.ones(3))
    assert x.sum().dtype == np.float64                         # full reductions too


@pytest.mark.parametrize("op", [md.add, md.sub, md.mul, md.div, md.pow])
def test_a_python_number_never_changes_the_dtype_in_either_position(op):
    x = md.tensor(np.array([1.0, 2.0], dtype=np.float32), device=TEST_DEVICE)
    for number in (2, 0.5):
        assert op(x, number).dtype == np.float32
        assert op(number, x).dtype == np.float32, (op.__name__, number)


# -- clear errors ---------------------------------------------------------------------
def test_conv_channel_mismatch():
    with pytest.raises(ValueError, match=r"conv2d: input has 3 channels .*expects 4"):
        md.conv2d(md.ones(1, 3, 5, 5), md.ones(2, 4, 3, 3))


def test_linear_feature_mismatch():
    with pytest.raises(ValueError, match=r"linear: input has 5 features .*expects 4"):
        md.linear(md.ones(2, 5), md.ones(3, 4))


def test_concat_shapes_differ_off_axis():
    with pytest.raises(ValueError, match=r"concat: .*same shape except in dim 1.*\(1, 2, 4, 4\).*\(1, 3, 5, 4\)"):
        md.cat([md.ones(1, 2, 4, 4), md.ones(1, 3, 5, 4)], dim=1)


@pytest.mark.parametrize("call,pattern", [
    (lambda: md.conv2d(md.ones(3, 5, 5), md.ones(2, 3, 3, 3)), r"conv2d: input must be 4-D"),
    (lambda: md.conv2d(md.ones(1, 3, 5, 5), md.ones(2, 3, 3)), r"conv2d: weight must be 4-D"),
    (lambda: md.max_pool2d(md.ones(3, 4, 4), 2), r"MaxPool2d: input must be 4-D"),
    (lambda: md.batch_norm(md.ones(4), md.ones(1), md.ones(1)), r"batch_norm: input must have a channel axis"),
    (lambda: md.cross_entropy(md.ones(4), md.tensor([0])), r"cross_entropy: input must be 2-D"),
    (lambda: md.global_avg_pool2d(md.ones(2, 3)), r"global_avg_pool2d: input must be 4-D"),
    (lambda: md.avg_pool2d(md.ones(4, 4), 2), r"AvgPool2d: input must be 4-D"),
    (lambda: md.linear(md.ones(2, 3), md.ones(3)), r"linear: weight must be 2-D"),
    (lambda: md.matmul(md.ones(2, 3, 4), md.ones(3, 2)), r"matmul: cannot multiply shapes \(2, 3, 4\) and \(3, 2\)"),
])
def test_wrong_ranks(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_backward_on_non_scalar_needs_a_gradient():
    y = md.ones(2, 3, requires_grad=True) * 2
    with pytest.raises(RuntimeError, match=r"only for a scalar output, got shape \(2, 3\)"):
        y.backward()


def test_integer_tensors_cannot_require_grad():
    with pytest.raises(TypeError, match="only floating-point tensors can require a gradient"):
        md.tensor([1, 2, 3], requires_grad=True)


def test_cross_entropy_labels_out_of_range():
    with pytest.raises(ValueError, match=r"cross_entropy: labels must be in \[0, 3\).*\[3, -1\]"):
        md.cross_entropy(md.ones(3, 3), md.tensor([0, 3, -1]))


def test_cross_entropy_float_labels():
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        md.cross_entropy(md.ones(2, 3), md.tensor([0.0, 1.0]))


def test_minidense_imports_and_runs_without_cupy():
    """``sys.modules['cupy'] = None`` makes ``import cupy`` fail as if it were not installed."""
    import subprocess
    code = ("import sys; sys.modules['cupy'] = None; sys.modules['cupyx'] = None\n"
            "import minidense as md\n"
            "assert not md.cuda_available()\n"
            "x = md.tensor([1.0, 2.0], requires_grad=True); (x * x).sum().backward()\n"
            "assert x.grad.tolist() == [2.0, 4.0]\n"
            "try:\n    md.tensor([1.0], device='cuda')\nexcept RuntimeError as e:\n"
            "    assert 'CuPy is not installed' in str(e), e\n"
            "else:\n    raise AssertionError('no error for cuda without CuPy')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr


def test_import_minidense_leaves_cupy_unimported_and_says_nothing():
    """CuPy's import costs 0.15 s warm, a second cold: ``import minidense`` does not pay
    it, and asking whether there is a GPU (which does) prints nothing on a machine
    without one, with CuPy installed or not."""
    import subprocess
    code = ("import sys, minidense as md\n"
            "assert 'cupy' not in sys.modules, 'import minidense imported CuPy'\n"
            "print(md.cuda_available())\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout == f"{md.cuda_available()}\n"


def test_only_the_backend_module_imports_cupy():
    import re
    package = Path(md.__file__).resolve().parent
    importing = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                       if re.search(r"^\s*(import|from)\s+cupy", p.read_text(encoding="utf-8"), re.M))
    assert importing == ["backend.py"]


def test_cuda_request_without_gpu_is_clear():
    if md.cuda_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="device 'cuda' was requested but"):
        md.tensor([1.0], device="cuda")


@pytest.mark.gpu
def test_mixing_devices_names_the_op_and_both_devices():
    a = md.tensor([1.0, 2.0], device="cuda")
    b = md.tensor([1.0, 2.0], device="cpu")
    with pytest.raises(RuntimeError, match=r"Add: all inputs must be on one device, got cuda .*cpu"):
        a + b


@pytest.mark.gpu
def test_to_device_round_trip_keeps_gradients():
    x = md.tensor(np.arange(3.0), requires_grad=True)
    y = (x.to("cuda") * 2).to("cpu").sum()
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), [2.0] * 3)
    assert x.grad.device == "cpu"


def test_mixing_devices_error_on_any_machine(monkeypatch):
    """The same check as the GPU test above, with one array pretending to live on the GPU."""
    a, b = md.tensor([1.0, 2.0]), md.tensor([3.0, 4.0])
    real = backend.device_of
    monkeypatch.setattr(backend, "device_of", lambda arr: "cuda" if arr is b.data else real(arr))
    with pytest.raises(RuntimeError, match=r"Mul: all inputs must be on one device, got cpu \(2,\), cuda \(2,\)"):
        a * b


def test_tensor_copies_and_as_tensor_shares():
    array = np.zeros(3)
    copied, shared = md.tensor(array), md.as_tensor(array)
    array[0] = 1.0
    assert copied.numpy()[0] == 0.0 and shared.numpy()[0] == 1.0


def test_only_the_first_gpu_is_accepted():
    """'cuda:1' used to run silently on GPU 0: any index but 0 is refused, on any machine,
    with the way to pick another GPU."""
    for name in ("cuda:1", "cuda:7", "cpu:0"):
        with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
            md.backend.check_device(name)
        with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
            md.tensor([1.0], device=name)
    assert md.backend.check_device("cpu") == "cpu"


# ---------------------------------------------------------------------------
# Traps a learner falls into: truth values, len(), a Function called twice
# ---------------------------------------------------------------------------
def test_truth_value_is_that_of_a_one_element_tensor():
    assert not (md.tensor([1.0]) == md.tensor([2.0]))
    with pytest.raises(AssertionError):
        assert md.tensor([1.0]) == md.tensor([2.0])
    assert md.tensor([1.0]) not in [md.tensor([2.0])]
    loss = md.tensor(0.25)
    assert loss < 0.5 and bool(md.tensor([[3.0]]))
    for shape in [(2,), (0,), (2, 3)]:
        with pytest.raises(RuntimeError, match=rf"truth value of a tensor of shape {re.escape(str(shape))} is ambiguous"):
            bool(md.tensor(np.ones(shape)))


def test_len_of_a_0d_tensor_is_a_clear_type_error():
    assert len(md.tensor([[1.0, 2.0]] * 3)) == 3
    with pytest.raises(TypeError, match="len\\(\\) of a 0-d tensor"):
        len(md.tensor(1.0))


def test_a_function_object_is_used_once():
    from minidense.functions.math import Mul
    a = md.tensor([1.0, 2.0], requires_grad=True)
    f = Mul()
    y1 = f(a, md.tensor([3.0, 4.0]))
    with pytest.raises(RuntimeError, match="Mul: this Function object was already called.*make a new one"):
        f(a, md.tensor([10.0, 20.0], requires_grad=True))
    y1.sum().backward()   # the first graph is intact
    np.testing.assert_array_equal(a.grad.numpy(), [3.0, 4.0])


# ---------------------------------------------------------------------------
# Per-thread state: grad mode, the convolution algorithm, the plain-ops switch and the
# recomputation flag of one thread do not leak into another
# ---------------------------------------------------------------------------
def test_modes_are_per_thread():
    import threading
    from minidense import fast_paths
    from minidense.functions import connection
    from minidense.recompute import _recomputation, is_recomputing
    x = np.zeros((1, 1, 3, 3))

    def modes():
        return (md.is_grad_enabled(), connection.chosen_conv_algorithm(x),
                fast_paths.fast_paths_enabled(), is_recomputing())

    default = modes()
    assert default == (True, connection.default_conv_algorithm(x), True, False)
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def other_thread():
        with md.no_grad(), md.conv_algorithm("winograd"), _recomputation():
            seen["inside"] = modes()
            entered.set()
            release.wait(5)
    thread = threading.Thread(target=other_thread)
    thread.start()
    assert entered.wait(5)
    seen["main"] = modes()       # while the other thread is inside its blocks
    with md.plain_ops():
        seen["main_plain"] = modes()
        release.set()
        thread.join(5)
    assert seen["inside"] == (False, "winograd", True, True)
    assert seen["main"] == default
    assert seen["main_plain"] == (True, "im2col", False, False)
    y = md.tensor([1.0], requires_grad=True) * 2   # this thread's graph is recorded
    assert y.grad_fn is not None and modes() == default

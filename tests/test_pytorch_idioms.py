"""PyTorch's names mean what they mean in PyTorch: methods, functions, modules,
initialisation and schedules against torch in float64, each silent difference of the
old NumPy meanings among them; then model files and a training script written in plain
PyTorch (tests/pytorch_style) run with only their import lines replaced."""
import math
import re
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

import minidense as md
import minidense.nn.functional as F

torch = pytest.importorskip("torch")
TF = torch.nn.functional
pytestmark = pytest.mark.torch

STYLE = Path(__file__).resolve().parent / "pytorch_style"
rng = np.random.default_rng(0)


def both(array, requires_grad=True):
    """The same float64 data as a minidense and a torch tensor."""
    array = np.asarray(array)
    grad = requires_grad and array.dtype.kind == "f"
    return md.tensor(array.copy(), requires_grad=grad), torch.tensor(array.copy(), requires_grad=grad)


def value(t):
    if isinstance(t, (tuple, list)):
        return [value(v) for v in t]
    if isinstance(t, md.Tensor):
        return t.numpy()
    if isinstance(t, torch.Tensor):
        return t.detach().numpy()
    return t


def assert_same(ours, theirs, rtol=1e-12, atol=1e-12):
    """Equal values (and, for tuples, equal fields); the dtypes' kinds agree."""
    if isinstance(theirs, (tuple, list)):
        assert isinstance(ours, (tuple, list)) and len(ours) == len(theirs)
        if hasattr(theirs, "_fields"):   # torch.return_types.max and the like
            assert tuple(ours._fields) == ("values", "indices")
        for a, b in zip(ours, theirs):
            assert_same(a, b, rtol, atol)
        return
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, md.Tensor), type(ours)
        a, b = value(ours), value(theirs)
        assert a.shape == b.shape, (a.shape, b.shape)
        assert a.dtype.kind == b.dtype.kind, (a.dtype, b.dtype)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
        return
    assert ours == theirs or (isinstance(theirs, float) and math.isclose(ours, theirs, rel_tol=rtol))


def compare_with_gradients(fn, *arrays, upstream_seed=1):
    """fn(*tensors) on both sides: the outputs, and the inputs' gradients of a random
    projection of the (first) output."""
    pairs = [both(a) for a in arrays]
    ours, theirs = fn(md, *[p[0] for p in pairs]), fn(torch, *[p[1] for p in pairs])
    assert_same(ours, theirs)
    out, tout = (ours[0], theirs[0]) if isinstance(theirs, tuple) else (ours, theirs)
    if not (isinstance(tout, torch.Tensor) and tout.requires_grad):
        return
    v = np.random.default_rng(upstream_seed).standard_normal(tuple(tout.shape))
    out.backward(gradient=md.tensor(v))     # PyTorch's keyword: gradient=, not grad=
    tout.backward(gradient=torch.tensor(v))
    for (a, b) in pairs:
        if b.grad is not None:
            np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# Tensor methods and md functions, with gradients where there are some
# ---------------------------------------------------------------------------
X23, X234 = rng.standard_normal((2, 3)), rng.standard_normal((2, 3, 4))
METHODS = {
    # the silent differences of the old NumPy meanings
    "transpose 2-D (was a no-op)": (lambda m, x: x.transpose(0, 1), X23),
    "flatten() flattens every dim (kept the first)": (lambda m, x: x.flatten(), X234),
    "max(1) is (values, indices) (unpacked rows)": (lambda m, x: x.max(1), X23),
    "cat joins on dim 0 by default (joined on 1)": (lambda m, x: m.concat([x, x * 2]), X23),
    "md.transpose(x, dim0, dim1) (took NumPy's axes)": (lambda m, x: m.transpose(x, 0, 2), X234),
    # the rest
    "view": (lambda m, x: x.view(x.size(0), -1), X234),
    "view(-1, 2)": (lambda m, x: x.view(-1, 2), X234),
    "reshape of a transposed tensor": (lambda m, x: x.transpose(0, 1).reshape(6), X23),
    "view_as": (lambda m, x: x.view_as(x.flatten(1)), X234),
    "permute": (lambda m, x: x.permute(2, 0, 1), X234),
    "T": (lambda m, x: x.T, X23),
    "flatten(1)": (lambda m, x: x.flatten(1), X234),
    "flatten(0, 1)": (lambda m, x: x.flatten(0, 1), X234),
    "md.flatten(x, 1)": (lambda m, x: m.flatten(x, 1), X234),
    "unsqueeze": (lambda m, x: x.unsqueeze(-1), X23),
    "squeeze": (lambda m, x: x.unsqueeze(0).unsqueeze(2).squeeze(), X23),
    "squeeze(dim)": (lambda m, x: x.unsqueeze(0).squeeze(0).squeeze(1), X23),
    "split(2, 2)": (lambda m, x: x.split(2, 2)[1], X234),
    "split([1, 2], 1)": (lambda m, x: x.split([1, 2], 1)[1], X234),
    "chunk": (lambda m, x: x.chunk(3, 2)[1], X234),
    "clone": (lambda m, x: x.clone() * 2, X23),
    "contiguous": (lambda m, x: x.transpose(0, 1).contiguous(), X23),
    "expand_as": (lambda m, x: x[:, :1].expand_as(x), X23),
    "stack": (lambda m, x: m.stack([x, x * 3], 1), X23),
    "cat(dim=-1)": (lambda m, x: m.cat([x, x[:, :1]], dim=-1), X23),
    "sum(dim, keepdim)": (lambda m, x: x.sum(dim=1, keepdim=True), X234),
    "sum(axis=, keepdims=) aliases": (lambda m, x: x.sum(axis=(0, 2), keepdims=True), X234),
    "sum over a tuple": (lambda m, x: m.sum(x, (0, 2)), X234),
    "mean(dim)": (lambda m, x: x.mean(-1), X234),
    "max()": (lambda m, x: x.max(), X23),
    "max(dim, keepdim)": (lambda m, x: x.max(dim=2, keepdim=True), X234),
    "min(dim)": (lambda m, x: x.min(0), X23),
    "md.max(x, 1)": (lambda m, x: m.max(x, 1), X23),
    "amax": (lambda m, x: x.amax((0, 2)), X234),
    "argmax(1)": (lambda m, x: x.argmax(1), X23),
    "argmax()": (lambda m, x: x.argmax(), X23),
    "argmin(dim, keepdim)": (lambda m, x: x.argmin(0, keepdim=True), X23),
    "sigmoid": (lambda m, x: x.sigmoid(), X23),
    "tanh": (lambda m, x: x.tanh(), X23),
    "exp": (lambda m, x: x.exp(), X23),
    "log": (lambda m, x: x.abs().log(), X23),
    "abs": (lambda m, x: x.abs(), X23),
    "clamp": (lambda m, x: x.clamp(min=-0.3, max=0.4), X23),
    "clamp(max=)": (lambda m, x: x.clamp(max=0.1), X23),
    "norm": (lambda m, x: x.norm(), X23),
    "norm(p, dim)": (lambda m, x: x.norm(1, dim=1), X23),
    "norm(3, dim, keepdim)": (lambda m, x: x.norm(3, 0, True), X23),
    "softmax(dim)": (lambda m, x: x.softmax(1), X23),
    "log_softmax(dim)": (lambda m, x: m.log_softmax(x, 0), X23),
    "pow": (lambda m, x: x.pow(2), X23),
    "eq/ne/lt/le/gt/ge": (lambda m, x: [x.eq(x[0]), x.ne(0.1), x.lt(x * 0), x.le(0), x.gt(x[1]), x.ge(0)], X23),
    "size, numel, dim": (lambda m, x: [x.size(), x.size(1), x.size(-1), x.numel(), x.dim()], X234),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_tensor_methods_and_functions(name):
    fn, array = METHODS[name]
    compare_with_gradients(fn, array)


def test_the_old_meanings_would_have_differed():
    """The values PyTorch gives for the cases above are not what NumPy's meanings gave,
    so the comparisons above tell them apart."""
    x = np.arange(6.0).reshape(2, 3)
    assert np.array_equal(x.transpose(0, 1), x)    # NumPy's meaning: axes 0, 1 in order, a no-op
    np.testing.assert_array_equal(md.tensor(x).transpose(0, 1).numpy(), x.T)
    assert md.tensor(np.ones((2, 3, 4))).flatten().shape == (24,)
    values, indices = md.tensor([[1.0, 5.0], [7.0, 2.0]]).max(1)    # a batch of 2: not its two rows
    assert values.tolist() == [5.0, 7.0] and indices.tolist() == [1, 0]
    assert md.concat([md.tensor(x), md.tensor(x)]).shape == (4, 3)


def test_view_refuses_what_pytorch_refuses_and_points_to_reshape():
    ours, theirs = both(X23)
    with pytest.raises(RuntimeError):
        theirs.transpose(0, 1).view(6)
    with pytest.raises(RuntimeError, match=r"view: .*\(3, 2\).*without a copy.*use \.reshape"):
        ours.transpose(0, 1).view(6)
    # a view that keeps the layout's contiguous runs is fine on both sides
    assert_same(ours.transpose(0, 1).view(3, 2, 1), theirs.transpose(0, 1).view(3, 2, 1))
    with pytest.raises(RuntimeError, match=r"view: shape \[4, -1\] is invalid for input of shape \(2, 3\)"):
        ours.view(4, -1)


def test_backward_takes_pytorchs_arguments():
    ours, theirs = both(X23)
    for t, lib in ((ours, md), (theirs, torch)):
        y = (t * t).sum(1)
        y.backward(lib.tensor([1.0, 2.0], dtype=lib.float64 if lib is torch else np.float64),
                   retain_graph=True)
        y.backward(gradient=lib.ones(2, dtype=lib.float64 if lib is torch else np.float64))
    np.testing.assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), rtol=1e-14)
    with pytest.raises(TypeError):
        (ours * 2).sum().backward(grad=None)   # the old keyword is gone
    # inputs=: only those tensors' .grad; create_graph=True: a .grad with a graph.
    a, b = both(X23), both(X23)
    for t, u in ((a[0], b[0]), (a[1], b[1])):
        (t * t * u).sum().backward(inputs=[t], create_graph=True)
        assert u.grad is None and t.grad.grad_fn is not None
    np.testing.assert_allclose(a[0].grad.numpy(), a[1].grad.detach().numpy(), rtol=1e-14)


def test_creation_functions_take_pytorchs_arguments():
    for ours, theirs in (
            (md.zeros(2, 3), torch.zeros(2, 3)), (md.ones((2, 3)), torch.ones((2, 3))),
            (md.zeros(2, dtype="float64"), torch.zeros(2, dtype=torch.float64)),
            (md.full((2, 2), 7), torch.full((2, 2), 7)), (md.full((2,), 0.5), torch.full((2,), 0.5)),
            (md.arange(5), torch.arange(5)), (md.arange(1, 2, 0.25), torch.arange(1, 2, 0.25)),
            (md.tensor([1, 2]), torch.tensor([1, 2])), (md.tensor([1.0, 2]), torch.tensor([1.0, 2])),
            (md.zeros_like(md.ones(2, 3)), torch.zeros_like(torch.ones(2, 3))),
            (md.ones_like(md.tensor([1, 2])), torch.ones_like(torch.tensor([1, 2])))):
        assert_same(ours, theirs)
        assert str(ours.dtype) == str(theirs.dtype).replace("torch.", "")
    for dtype in ("float64", "int64", "float32"):
        assert_same(md.ones(2, 3).to(getattr(md, dtype)), torch.ones(2, 3).to(getattr(torch, dtype)))
    x = md.randn(2, 3, requires_grad=True)
    assert x.shape == (2, 3) and x.dtype == np.float32 and x.requires_grad
    assert md.rand(4).numpy().min() >= 0 and md.randint(3, 10, (5,)).numpy().min() >= 3
    array = np.zeros(3)
    assert md.from_numpy(array).data is array and md.as_tensor(array).data is array
    assert md.tensor(array).data is not array
    assert md.cuda.is_available() == torch.cuda.is_available() or not torch.cuda.is_available()
    assert md.cuda.is_available() is md.cuda_available()


# ---------------------------------------------------------------------------
# nn.functional
# ---------------------------------------------------------------------------
IMAGES, LABELS = rng.standard_normal((3, 4, 6, 6)), np.array([1, 0, 2])
W3, B3 = rng.standard_normal((5, 4, 3, 3)) * 0.3, rng.standard_normal(5)
LOGITS, WL = rng.standard_normal((3, 4)), rng.standard_normal((5, 144)) * 0.1
FUNCTIONAL = {
    "conv2d": lambda m, F, x: F.conv2d(x, m.tensor(W3), m.tensor(B3), 2, 1),
    "conv2d padding='same'": lambda m, F, x: F.conv2d(x, m.tensor(W3), padding="same"),
    "linear": lambda m, F, x: F.linear(x.flatten(1), m.tensor(WL), m.tensor(B3)),
    "relu": lambda m, F, x: F.relu(x),
    "relu(inplace=True) runs out of place": lambda m, F, x: F.relu(x * 1, inplace=True),
    "sigmoid": lambda m, F, x: F.sigmoid(x),
    "tanh": lambda m, F, x: F.tanh(x),
    "softmax": lambda m, F, x: F.softmax(x, dim=1),
    "log_softmax": lambda m, F, x: F.log_softmax(x, dim=-1),
    "avg_pool2d": lambda m, F, x: F.avg_pool2d(x, 3, 2, 1),
    "max_pool2d": lambda m, F, x: F.max_pool2d(x, 3, stride=1, padding=1),
    "adaptive_avg_pool2d(1)": lambda m, F, x: F.adaptive_avg_pool2d(x, 1),
    "adaptive_avg_pool2d((2, 3))": lambda m, F, x: F.adaptive_avg_pool2d(x, (2, 3)),
    "adaptive_avg_pool2d(4), overlapping windows": lambda m, F, x: F.adaptive_avg_pool2d(x, 4),
    "batch_norm, training": lambda m, F, x: F.batch_norm(x, None, None, training=True),
    "batch_norm, weight and bias": lambda m, F, x: F.batch_norm(
        x, m.zeros(4, dtype=m.float64), m.ones(4, dtype=m.float64), m.tensor(np.arange(1.0, 5)),
        m.tensor(np.ones(4)), True, 0.3, 1e-3),
    "batch_norm, eval": lambda m, F, x: F.batch_norm(x, m.tensor(np.arange(4.0)), m.tensor(np.arange(1.0, 5))),
    "dropout in eval mode": lambda m, F, x: F.dropout(x, 0.5, training=False),
    "pad": lambda m, F, x: F.pad(x, (1, 2, 0, 1), value=0.25),
    "cross_entropy": lambda m, F, x: F.cross_entropy(x[:, :, 0, 0], m.tensor(LABELS)),
    "cross_entropy(weight, sum)": lambda m, F, x: F.cross_entropy(
        x[:, :, 0, 0], m.tensor(LABELS), weight=m.tensor([0.5, 2.0, 1.0, 1.5]), reduction="sum"),
    "cross_entropy(label_smoothing, weight)": lambda m, F, x: F.cross_entropy(
        x[:, :, 1, 2], m.tensor(LABELS), m.tensor([0.5, 2.0, 1.0, 1.5]), label_smoothing=0.2),
    "cross_entropy(ignore_index, none)": lambda m, F, x: F.cross_entropy(
        x[:, :, 0, 0], m.tensor([1, -100, 3]), reduction="none"),
    "cross_entropy(probabilities)": lambda m, F, x: F.cross_entropy(
        x[:, :, 0, 0], m.tensor(np.full((3, 4), 0.25)), label_smoothing=0.1),
    "nll_loss": lambda m, F, x: F.nll_loss(F.log_softmax(x[:, :, 0, 0], 1), m.tensor(LABELS)),
    "mse_loss": lambda m, F, x: F.mse_loss(x, x * 0 + 0.5),
    "mse_loss(sum)": lambda m, F, x: F.mse_loss(x, x.detach() * 0.5, reduction="sum"),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_functional(name):
    fn = FUNCTIONAL[name]
    def library(lib):   # lists become float64 arrays, as the inputs are
        def tensor(a):
            a = np.asarray(a)
            return lib.tensor(a.astype(np.float64) if a.dtype.kind == "f" else a)
        return types.SimpleNamespace(tensor=tensor,
                                     zeros=lib.zeros, ones=lib.ones, float64=lib.float64)
    compare_with_gradients(lambda lib, x: fn(library(lib), F if lib is md else TF, x), IMAGES)


def test_unsupported_arguments_raise_errors_that_name_them():
    x = md.ones(1, 2, 5, 5)
    for call, pattern in (
            (lambda: F.max_pool2d(x, 2, ceil_mode=True), "ceil_mode=True"),
            (lambda: F.max_pool2d(x, 2, return_indices=True), "return_indices"),
            (lambda: F.avg_pool2d(x, 2, count_include_pad=False), "count_include_pad=False"),
            (lambda: F.pad(x, (1, 1), mode="reflect"), "mode='reflect'"),
            (lambda: F.cross_entropy(md.ones(2, 3), md.tensor([0, 1]), size_average=True), "size_average"),
            (lambda: md.max(x, x), r"max\(input, other\)")):
        with pytest.raises((NotImplementedError, TypeError), match=pattern):
            call()


# ---------------------------------------------------------------------------
# Modules: PyTorch's constructors, state dicts loaded strictly, the same numbers
# ---------------------------------------------------------------------------
def copy_weights(ours, theirs):
    """torch -> minidense, strictly, from torch tensors (duck-typed, as a user would)."""
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())   # PyTorch's order too


MODULES = {
    "Conv2d(4, 5, 3, 2, 1)": lambda nn: nn.Conv2d(4, 5, 3, 2, 1),
    "Conv2d(..., bias=False)": lambda nn: nn.Conv2d(4, 2, kernel_size=1, bias=False),
    "BatchNorm2d(4, 1e-3) sets eps (set the momentum)": lambda nn: nn.BatchNorm2d(4, 1e-3),
    "BatchNorm2d(momentum=None)": lambda nn: nn.BatchNorm2d(4, momentum=None),
    "BatchNorm2d(affine=False)": lambda nn: nn.BatchNorm2d(4, affine=False),
    "BatchNorm2d(track_running_stats=False)": lambda nn: nn.BatchNorm2d(4, track_running_stats=False),
    "ReLU(True)": lambda nn: nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(True)),
    "Sigmoid": lambda nn: nn.Sigmoid(),
    "Tanh": lambda nn: nn.Tanh(),
    "Softmax(dim=1)": lambda nn: nn.Softmax(dim=1),
    "AvgPool2d(2)": lambda nn: nn.AvgPool2d(2),
    "MaxPool2d(3, 2, 1)": lambda nn: nn.MaxPool2d(3, 2, 1),
    "AdaptiveAvgPool2d((1, 1))": lambda nn: nn.AdaptiveAvgPool2d((1, 1)),
    "AdaptiveAvgPool2d(4)": lambda nn: nn.AdaptiveAvgPool2d(4),
    "Flatten()": lambda nn: nn.Flatten(),
    "Identity(54, unused=1)": lambda nn: nn.Identity(54, unused=1),
    "Dropout(0.3), eval": lambda nn: nn.Dropout(0.3).eval(),
    "Sequential of Linear": lambda nn: nn.Sequential(nn.Flatten(), nn.Linear(144, 3), nn.Tanh()),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules(name):
    torch.manual_seed(0)
    theirs = MODULES[name](torch.nn).double()
    ours = MODULES[name](md.nn).double()
    copy_weights(ours, theirs)
    x, xt = both(IMAGES)
    for _ in range(2):   # twice: the running statistics (and batch counts) move
        compare_with_gradients(lambda lib, x: (ours if lib is md else theirs)(x), IMAGES)
    assert_same(ours(x), theirs(xt))
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-12, err_msg=k)
    ours.eval(), theirs.eval()
    assert_same(ours(x), theirs(xt))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_modules(reduction):
    logits, logits_t = both(LOGITS)
    labels = np.array([3, 1, 0])
    weight = np.array([1.0, 0.5, 2.0, 1.0])
    ours = md.nn.CrossEntropyLoss(md.tensor(weight), reduction=reduction, label_smoothing=0.05)
    theirs = torch.nn.CrossEntropyLoss(torch.tensor(weight), reduction=reduction, label_smoothing=0.05)
    assert_same(ours(logits, md.tensor(labels)), theirs(logits_t, torch.tensor(labels)))
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    assert_same(md.nn.MSELoss(reduction=reduction)(logits, logits * 0.5),
                torch.nn.MSELoss(reduction=reduction)(logits_t, logits_t * 0.5))


def test_containers():
    layers = [md.nn.ReLU(), md.nn.Tanh(), md.nn.Sigmoid()]
    seq = md.nn.Sequential(*layers)
    head = seq[1:]
    assert isinstance(head, md.nn.Sequential) and list(head) == layers[1:]   # was a list
    assert [name for name, _ in head.named_children()] == ["1", "2"]          # PyTorch keeps the names
    assert seq[-1] is layers[2] and len(seq[:0]) == 0
    named = md.nn.Sequential(OrderedDict([("a", layers[0]), ("b", layers[1])]))
    assert [n for n, _ in named[1:].named_children()] == ["b"]
    del seq[0]
    assert [n for n, _ in seq.named_children()] == ["0", "1"] and seq[0] is layers[1]
    ml = md.nn.ModuleList(layers)
    assert isinstance(ml[:2], md.nn.ModuleList) and list(ml[:2]) == layers[:2]
    ml.insert(0, md.nn.Identity())
    assert [n for n, _ in ml.named_children()] == ["0", "1", "2", "3"]
    md_dict = md.nn.ModuleDict({"conv": md.nn.Conv2d(1, 2, 3), "act": md.nn.ReLU()})
    t_dict = torch.nn.ModuleDict({"conv": torch.nn.Conv2d(1, 2, 3), "act": torch.nn.ReLU()})
    assert list(md_dict) == list(t_dict) and "conv" in md_dict and len(md_dict) == 2
    assert list(md_dict.state_dict()) == list(t_dict.state_dict())
    md_dict["fc"] = md.nn.Linear(2, 2)
    assert list(md_dict.keys()) == ["conv", "act", "fc"]
    assert [n for n, _ in md_dict.named_parameters()] == ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    md_dict.pop("act")
    assert list(md_dict) == ["conv", "fc"]


def test_state_dicts_are_ordered_module_by_module_as_pytorchs():
    def build(nn):
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3)
                self.bn = nn.BatchNorm2d(4)
                self.head = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm2d(4))
        return Net()
    assert list(build(md.nn).state_dict()) == list(build(torch.nn).state_dict())
    assert [n for n, _ in build(md.nn).named_parameters()] == [n for n, _ in build(torch.nn).named_parameters()]
    assert [n for n, _ in build(md.nn).named_buffers()] == [n for n, _ in build(torch.nn).named_buffers()]


def test_batchnorm_counts_batches_and_older_checkpoints_load():
    ours, theirs = md.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    for _ in range(3):
        ours(md.tensor(IMAGES.astype(np.float32)))
        theirs(torch.tensor(IMAGES.astype(np.float32)))
    assert int(ours.num_batches_tracked.item()) == int(theirs.num_batches_tracked) == 3
    assert ours.num_batches_tracked.dtype == np.int64
    older = md.nn.BatchNorm2d(4).state_dict()
    del older["num_batches_tracked"]
    ours.load_state_dict(older)   # strict: a checkpoint from before the counter still loads
    assert int(ours.num_batches_tracked.item()) == 0
    with pytest.raises(RuntimeError, match="missing keys: running_var"):
        del older["running_var"]
        ours.load_state_dict(older)


# ---------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------
def test_init_functions_fill_tensors_in_place_with_pytorchs_formulas():
    w = md.nn.Parameter(np.zeros((64, 32, 3, 3), np.float32))
    fan_in, fan_out = 32 * 9, 64 * 9
    assert md.nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu") is w   # took a shape
    assert abs(w.numpy().std() / math.sqrt(2 / fan_out) - 1) < 0.03
    assert w.dtype == np.float32
    cases = [
        (lambda i, t: i.kaiming_normal_(t), lambda: torch.nn.init.calculate_gain("leaky_relu", 0) / math.sqrt(fan_in)),
        (lambda i, t: i.xavier_normal_(t, gain=2.0), lambda: 2.0 * math.sqrt(2.0 / (fan_in + fan_out))),
        (lambda i, t: i.normal_(t, 1.0, 0.5), lambda: 0.5),
    ]
    for fill, std in cases:
        fill(md.nn.init, w)
        assert abs(w.numpy().std() / std() - 1) < 0.03
    for fill, bound in (
            (lambda i, t: i.kaiming_uniform_(t, a=math.sqrt(5)), 1 / math.sqrt(fan_in)),
            (lambda i, t: i.kaiming_uniform_(t, mode="fan_out", nonlinearity="relu"), math.sqrt(6 / fan_out)),
            (lambda i, t: i.xavier_uniform_(t), math.sqrt(6 / (fan_in + fan_out))),
            (lambda i, t: i.uniform_(t, -0.2, 0.2), 0.2)):
        fill(md.nn.init, w)
        assert 0.99 * bound < np.abs(w.numpy()).max() <= bound
    md.nn.init.constant_(w, 0.25)
    assert (w.numpy() == 0.25).all()
    md.nn.init.ones_(w), md.nn.init.zeros_(w)
    assert not w.numpy().any()
    for nonlinearity, param in (("relu", None), ("tanh", None), ("leaky_relu", 0.2), ("sigmoid", None),
                                ("conv2d", None), ("selu", None), ("linear", None)):
        assert md.nn.init.calculate_gain(nonlinearity, param) == pytest.approx(
            torch.nn.init.calculate_gain(nonlinearity, param), rel=1e-15)


@pytest.mark.parametrize("layer", ["Conv2d", "Linear"])
def test_default_initialisation_is_pytorchs(layer):
    """Kaiming-uniform weights (a = sqrt(5)) and a bias within +-1/sqrt(fan_in) (it was 0)."""
    build = {"Conv2d": lambda nn: nn.Conv2d(16, 48, 3), "Linear": lambda nn: nn.Linear(144, 400)}[layer]
    ours, theirs = build(md.nn), build(torch.nn)
    for name, t in theirs.named_parameters():
        a, b = getattr(ours, name).numpy(), t.detach().numpy()
        bound = 1 / math.sqrt(144)
        assert np.abs(a).max() <= bound and np.abs(b).max() <= bound
        assert np.abs(a).max() > 0.9 * bound, name           # the bias is not zero
        if name == "weight":
            assert abs(a.std() / b.std() - 1) < 0.1


def test_skip_init_draws_nothing():
    md.manual_seed(3)
    first = md.randn(3).numpy()
    md.manual_seed(3)
    conv = md.nn.utils.skip_init(md.nn.Conv2d, 2, 3, 3)
    assert not conv.weight.numpy().any() and not conv.bias.numpy().any()
    np.testing.assert_array_equal(md.randn(3).numpy(), first)


def test_constant_lr_multiplies_as_pytorchs():
    """ConstantLR(opt) is a third of the rate for 5 steps (it kept the rate)."""
    opt = md.optim.SGD([md.nn.Parameter(np.zeros(1))], lr=0.3)
    sched = md.optim.lr_scheduler.ConstantLR(opt)
    rates = []
    for _ in range(7):
        rates.append(opt.param_groups[0]["lr"])
        sched.step()
    np.testing.assert_allclose(rates, [0.1] * 5 + [0.3] * 2, rtol=1e-15)


# ---------------------------------------------------------------------------
# Model files and a training script in plain PyTorch, with only the imports replaced
# ---------------------------------------------------------------------------
def load_file(name, framework):
    """tests/pytorch_style/<name>.py as a module, as written (torch) or with its import
    lines pointed at minidense; no other line changes."""
    source = (STYLE / f"{name}.py").read_text()
    if framework == "minidense":
        lines = source.splitlines()
        changed = []
        for i, line in enumerate(lines):
            if re.match(r"(import|from) torch\b", line):
                line = line.replace("torch", "minidense", 1)
                lines[i] = "import minidense as torch" if line == "import minidense" else line
                changed.append(i)
        assert changed and all(re.match(r"(import|from) ", lines[i]) for i in changed)
        source = "\n".join(lines) + "\n"
    module = types.ModuleType(f"{framework}_{name}")
    exec(compile(source, str(STYLE / f"{name}.py"), "exec"), module.__dict__)
    return module


MODEL_FILES = {
    "densenet": (lambda m: m.densenet_tiny(), 16),
    "resnet": (lambda m: m.resnet_tiny(), 8),
    "googlenet": (lambda m: m.TinyGoogLeNet(), 8),
    "senet": (lambda m: m.TinySENet(), 8),
}


@pytest.mark.parametrize("name", sorted(MODEL_FILES))
def test_a_pytorch_model_file_runs_with_only_its_imports_replaced(name):
    build, size = MODEL_FILES[name]
    torch.manual_seed(0)
    theirs = build(load_file(name, "torch")).double()
    ours = build(load_file(name, "minidense")).double()
    copy_weights(ours, theirs)                   # PyTorch's state dict, strictly
    x_np = np.random.default_rng(1).standard_normal((2, 3, size, size))
    for training in (True, False):
        ours.train(training), theirs.train(training)
        ours.zero_grad(), theirs.zero_grad()
        x, xt = both(x_np)
        y, yt = ours(x), theirs(xt)
        np.testing.assert_allclose(y.numpy(), yt.detach().numpy(), rtol=1e-10, atol=1e-12)
        v = np.random.default_rng(2).standard_normal(tuple(yt.shape))
        y.backward(md.tensor(v))
        yt.backward(torch.tensor(v))
        np.testing.assert_allclose(x.grad.numpy(), xt.grad.numpy(), rtol=1e-9, atol=1e-12)
        grads = {n: p.grad for n, p in theirs.named_parameters()}
        for n, p in ours.named_parameters():
            np.testing.assert_allclose(p.grad.numpy(), grads[n].numpy(), rtol=1e-9, atol=1e-12, err_msg=n)
    for (n, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-12, atol=1e-14, err_msg=n)


def test_nn_init_in_init_sets_the_weights_as_written():
    """resnet.py initialises in __init__ (kaiming_normal_ fan_out, constant_, normal_,
    zeros_): the minidense model's weights follow the same rules."""
    model = load_file("resnet", "minidense").resnet_tiny()
    conv = model.layer2[0].conv1.weight.numpy()
    assert abs(conv.std() / math.sqrt(2 / (conv.shape[0] * 9)) - 1) < 0.2
    assert (model.bn1.weight.numpy() == 1).all() and not model.bn1.bias.numpy().any()
    assert abs(model.fc.weight.numpy().std() / 0.01 - 1) < 0.2 and not model.fc.bias.numpy().any()


def test_a_pytorch_training_script_runs_with_only_its_imports_replaced():
    """Two epochs of SGD with a cosine schedule in float64: the same losses, accuracies
    and rates per epoch, and the same weights at the end."""
    data = np.random.default_rng(3)
    images = data.standard_normal((24, 3, 16, 16))
    labels = data.integers(0, 10, 24)
    train_data, test_data = (images[:16], labels[:16]), (images[16:], labels[16:])
    torch.manual_seed(0)
    theirs = load_file("densenet", "torch").densenet_tiny().double()
    ours = load_file("densenet", "minidense").densenet_tiny().double()
    copy_weights(ours, theirs)
    their_history = load_file("train", "torch").main(theirs, train_data, test_data)
    our_history = load_file("train", "minidense").main(ours, train_data, test_data)
    assert their_history.shape == (2, 5)
    np.testing.assert_allclose(our_history, their_history, rtol=1e-9, atol=1e-12)
    for (n, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-8, atol=1e-11, err_msg=n)

"""md.nn and md.models: Module bookkeeping and the papers' initialisation; parameter
counts against the published tables, output shapes, float64 gradient checks end to
end, batch-norm behaviour, and PyTorch twins of the models."""
import math
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

import minidense as md
from minidense import models

# benchmarks/torch_twins.py holds the PyTorch twins; it imports torch, so the tests that
# use it import it after pytest.importorskip("torch").
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

# ---------------------------------------------------------------------------
# md.nn: registration, traversal, modes, state, hooks and initialisation
# ---------------------------------------------------------------------------
class TwoLayers(md.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = md.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = md.nn.BatchNorm2d(4)
        self.head = md.nn.Sequential(md.nn.ReLU(), md.nn.GlobalAvgPool2d(), md.nn.Linear(4, 2))
        self.shared = self.conv  # the same module twice: its parameters count once

    def forward(self, x):
        return self.head(self.norm(self.conv(x)))


def test_module_registers_parameters_buffers_and_children_in_definition_order():
    model = TwoLayers()
    assert [n for n, _ in model.named_parameters()] == [
        "conv.weight", "norm.weight", "norm.bias", "head.2.weight", "head.2.bias"]
    assert [n for n, _ in model.named_buffers()] == ["norm.running_mean", "norm.running_var",
                                                     "norm.num_batches_tracked"]
    assert [n for n, _ in model.named_children()] == ["conv", "norm", "head", "shared"]
    assert [type(m).__name__ for m in model.modules()] == [
        "TwoLayers", "Conv2d", "BatchNorm2d", "Sequential", "ReLU", "GlobalAvgPool2d", "Linear"]
    assert all(p.requires_grad for p in model.parameters())
    assert not any(b.requires_grad for b in model.buffers())  # saved, never trained
    state = model.state_dict()
    # PyTorch's order: module by module, parameters then buffers; a module reachable by
    # two names (shared) is saved under both.
    assert list(state) == ["conv.weight", "norm.weight", "norm.bias", "norm.running_mean",
                           "norm.running_var", "norm.num_batches_tracked", "head.2.weight",
                           "head.2.bias", "shared.weight"]
    state["norm.weight"][0] = 5.0  # host copies: changing them leaves the model alone
    assert model.norm.weight.numpy()[0] == 1.0


def test_module_modes_zero_grad_and_dtype_moves_keep_parameter_identity():
    model = TwoLayers()
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    md.cross_entropy(model(md.randn(2, 3, 4, 4)), md.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in model.parameters())
    grads = [p.grad.numpy() for p in model.parameters()]
    before = list(model.parameters())
    model.double()
    assert all(a is b for a, b in zip(model.parameters(), before))
    assert all(t.dtype == np.float64 for t in list(model.parameters()) + list(model.buffers())
               if t is not model.norm.num_batches_tracked)
    assert model.norm.num_batches_tracked.dtype == np.int64  # a count stays an integer
    for p, g in zip(model.parameters(), grads):  # gradients move with their parameters
        assert p.grad.dtype == np.float64
        np.testing.assert_array_equal(p.grad.numpy(), g)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_load_state_dict_strict_and_lenient():
    source, target = TwoLayers(), TwoLayers()
    state = source.state_dict()
    del state["head.2.bias"]
    state["extra"] = np.zeros(1)
    with pytest.raises(RuntimeError, match=r"missing keys: head.2.bias.*unexpected keys: extra"):
        target.load_state_dict(state)
    missing, unexpected = target.load_state_dict(state, strict=False)
    assert (missing, unexpected) == (["head.2.bias"], ["extra"])
    np.testing.assert_array_equal(target.conv.weight.numpy(), source.conv.weight.numpy())


def test_forward_hooks_run_once_per_registration_and_can_be_removed():
    layer, calls = md.nn.ReLU(), []

    def hook(module, inputs, output):
        calls.append(output.shape)

    first, second = layer.register_forward_hook(hook), layer.register_forward_hook(hook)
    layer(md.ones(2, 3))
    assert len(calls) == 2  # as in PyTorch: the same function registered twice runs twice
    first.remove()
    layer(md.ones(2, 3))
    assert len(calls) == 3
    second.remove()
    layer(md.ones(2, 3))
    assert len(calls) == 3


def test_max_and_average_pooling_layers_are_separate_kinds():
    assert not isinstance(md.nn.MaxPool2d(2), md.nn.AvgPool2d)
    assert not isinstance(md.nn.AvgPool2d(2), md.nn.MaxPool2d)
    x = md.randn(1, 2, 4, 4)
    np.testing.assert_array_equal(md.nn.MaxPool2d(3, 1, 1)(x).numpy(), md.max_pool2d(x, 3, 1, 1).numpy())
    np.testing.assert_array_equal(md.nn.AvgPool2d(3, 1, 1)(x).numpy(), md.avg_pool2d(x, 3, 1, 1).numpy())


def test_initialisation_follows_the_papers():
    """The models' layers: He et al. (2015) normal with fan-out for convolutions, std
    sqrt(2 / (out*kh*kw)); BN gamma 1 and beta 0; the classifier's bias 0 and its weight
    uniform(+-1/sqrt(in))."""
    from minidense.models.initialization import classifier_linear, he_normal_conv2d
    conv = he_normal_conv2d(16, 64, 3)  # fan-out 576 and fan-in 144 give stds 2x apart
    w = conv.weight.numpy()
    he_std = math.sqrt(2.0 / (64 * 3 * 3))
    standard_error = he_std / math.sqrt(2 * w.size)  # of a sample standard deviation
    assert abs(w.std() - he_std) < 6 * standard_error
    assert abs(w.mean()) < 6 * he_std / math.sqrt(w.size)
    assert conv.weight.dtype == np.float32
    norm = md.nn.BatchNorm2d(5)
    for tensor, value in ((norm.weight, 1), (norm.bias, 0), (norm.running_mean, 0), (norm.running_var, 1)):
        np.testing.assert_array_equal(tensor.numpy(), np.full(5, value, dtype=np.float32))
    assert conv.bias is None
    fc = classifier_linear(400, 300)
    bound = 1 / math.sqrt(400)
    assert np.abs(fc.weight.numpy()).max() <= bound and np.abs(fc.weight.numpy()).max() > 0.99 * bound
    np.testing.assert_array_equal(fc.bias.numpy(), np.zeros(300, dtype=np.float32))


def test_layers_take_pytorchs_default_initialisation():
    """nn.Conv2d and nn.Linear as PyTorch: weight Kaiming-uniform with a = sqrt(5), i.e.
    U(+-1/sqrt(fan_in)), and the bias U(+-1/sqrt(fan_in))."""
    for layer, fan_in in ((md.nn.Conv2d(16, 64, 3), 16 * 9), (md.nn.Linear(400, 300), 400)):
        bound = 1 / math.sqrt(fan_in)
        for p in (layer.weight.numpy(), layer.bias.numpy()):
            assert np.abs(p).max() <= bound and np.abs(p).max() > 0.95 * bound
            assert abs(p.std() - bound / math.sqrt(3)) < 6 * bound / math.sqrt(p.size)


# The SHA-256 of the sorted (name, bytes) pairs of each model's state dict after
# md.manual_seed(0), computed by running the code before the PyTorch-names change
# (commit 0ef6887, when the models took nn.Conv2d's and nn.Linear's own He-normal and
# zero-bias initialisation); BatchNorm's num_batches_tracked, added since, is left out.
SEEDED_WEIGHTS = {
    "resnet20": "fe9787c0c87397f5dbaa211a79a41b651ff8429f8801fe88f07960aacde22cc6",
    "densenet_bc100_k12": "c603c060ea1964d6836ce6e9e682732325ce17eda4b57dec4fb4e8e78a278459",
}


@pytest.mark.parametrize("name", sorted(SEEDED_WEIGHTS))
def test_the_same_seed_draws_the_same_initial_weights_as_before(name):
    import hashlib
    md.manual_seed(0)
    state = models.get(name).state_dict()
    digest = hashlib.sha256()
    for key, value in sorted(state.items()):
        if not key.endswith("num_batches_tracked"):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(value).tobytes())
    assert digest.hexdigest() == SEEDED_WEIGHTS[name]


# ---------------------------------------------------------------------------
# Parameter counts: every trainable tensor (conv weights, BN gamma and beta, linear
# weight and bias).  Exact integers: the figures and torchvision's documented
# counts for its ImageNet models; strings: the papers' rounded figures (DenseNet paper
# Table 2, ResNet paper Table 6), compared at the precision they are printed with.
# ---------------------------------------------------------------------------
PUBLISHED = {
    "densenet40_k12": 1_019_722,
    "densenet100_k12": "7.0M",
    "densenet100_k24": "27.2M",
    "densenet_bc100_k12": 769_162,
    "densenet_bc250_k24": "15.3M",
    "densenet_bc190_k40": "25.6M",
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "resnet20": 269_722,
    "resnet32": "0.46M",
    "resnet44": "0.66M",
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "resnet1202": "19.4M",
    "resnet18": 11_689_512,
    "mobilenet_v2": 3_504_872,   # the MobileNetV2 paper's Table 3 gives "3.4M"; torchvision's exact count
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}


def matches_published(count, published):
    if isinstance(published, int):
        return count == published
    decimals = len(published[:-1].split(".")[1])
    return round(count / 1e6, decimals) == float(published[:-1])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_equals_the_published_one(name):
    count = models.get(name).num_parameters()
    assert matches_published(count, PUBLISHED[name]), (name, count, PUBLISHED[name])


def densenet_parameter_formula(blocks, k, bottleneck, theta, stem_channels, imagenet, classes):
    """Parameters of a DenseNet counted from the paper's description, layer by layer."""
    count = 3 * stem_channels * (49 if imagenet else 9) + (2 * stem_channels if imagenet else 0)
    c = stem_channels
    for b, n in enumerate(blocks):
        for _ in range(n):
            if bottleneck:
                count += 2 * c + c * 4 * k + 2 * 4 * k + 4 * k * k * 9
            else:
                count += 2 * c + c * k * 9
            c += k
        if b < len(blocks) - 1:
            reduced = math.floor(theta * c)
            count += 2 * c + c * reduced
            c = reduced
    return count + 2 * c + c * classes + classes


def test_densenet264_count_follows_the_formula_that_gives_the_published_counts():
    # DenseNet-264 has no exact published count; the formula is checked on the
    # models that do, then applied to it.
    for name, blocks in (("densenet121", (6, 12, 24, 16)), ("densenet169", (6, 12, 32, 32)),
                         ("densenet201", (6, 12, 48, 32))):
        assert densenet_parameter_formula(blocks, 32, True, 0.5, 64, True, 1000) == PUBLISHED[name]
    assert densenet_parameter_formula((16,) * 3, 12, True, 0.5, 24, False, 10) == PUBLISHED["densenet_bc100_k12"]
    expected = densenet_parameter_formula((6, 12, 64, 48), 32, True, 0.5, 64, True, 1000)
    assert models.densenet264().num_parameters() == expected


def test_names_cover_every_model_and_get_rejects_unknown_names():
    assert set(models.list_models()) == set(PUBLISHED) | {"densenet264", "mobilenet_v2_cifar"}
    with pytest.raises(ValueError, match="unknown model 'densenet99'.*densenet121"):
        models.get("densenet99")


def test_get_builds_the_families_from_their_configuration():
    tiny = models.get("densenet_cifar", depth=10, growth_rate=4, bottleneck=True, compression=0.5)
    assert [n for n, _ in tiny.named_children()] == [
        "stem", "block1", "transition1", "block2", "transition2", "block3", "classifier"]
    assert tiny.stem.out_channels == 2 * 4  # 2k for DenseNet-BC
    assert models.get("resnet_cifar", depth=20).num_parameters() == PUBLISHED["resnet20"]


def test_options_reach_the_model():
    assert models.get("resnet20", num_classes=100).classifier.fc.out_features == 100
    assert models.get("densenet40_k12", stem_channels=24).stem.out_channels == 24
    assert isinstance(models.get("resnet20", shortcut="B").stage2.block1.shortcut, md.nn.Sequential)
    with_dropout = models.get("densenet_bc100_k12", drop_rate=0.2)
    dropouts = [m for m in with_dropout.modules() if isinstance(m, md.nn.Dropout)]
    convs = [m for m in with_dropout.modules() if isinstance(m, md.nn.Conv2d)]
    assert len(dropouts) == len(convs) - 1 and all(d.p == 0.2 for d in dropouts)  # all but the first conv
    assert not any(isinstance(m, md.nn.Dropout) for m in models.get("densenet_bc100_k12").modules())


def test_bad_configurations_say_what_is_expected():
    with pytest.raises(ValueError, match=r"depth L = 6n \+ 4.*L=41"):
        models.densenet_cifar(41, 12, bottleneck=True)
    with pytest.raises(ValueError, match=r"6n \+ 2.*21"):
        models.resnet_cifar(21)
    with pytest.raises(ValueError, match="shortcut option must be 'A' or 'B'"):
        models.resnet_cifar(20, shortcut="C")
    with pytest.raises(TypeError):
        models.get("resnet20", drop_rate=0.2)


# ---------------------------------------------------------------------------
# Output shapes
# ---------------------------------------------------------------------------
# Forwards that take more than a second or two on 2 CPU cores run only with --runslow.
SLOW_FORWARD = {"densenet100_k12", "densenet100_k24", "densenet_bc250_k24", "densenet_bc190_k40",
                "resnet1202"}
IMAGENET = {"densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
            "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v2"}


def check_output_shape(name):
    model = models.get(name)
    classes = 1000 if name in IMAGENET else 10
    # ImageNet models on a 32x32 input: the stem and 3 halvings leave a 1x1 map.
    x = md.randn(2, 3, 32, 32)
    with md.no_grad():
        y = model(x)
    assert y.shape == (2, classes)
    assert np.isfinite(y.numpy()).all()


@pytest.mark.parametrize("name", sorted(set(models.names) - SLOW_FORWARD))
def test_output_shape(name):
    check_output_shape(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_FORWARD))
def test_output_shape_of_the_deepest_models(name):
    check_output_shape(name)


def test_densenet_features_follow_the_papers_channel_arithmetic():
    k, n, theta = 12, 16, 0.5
    model = models.densenet_bc100_k12()
    model.eval()
    x = md.randn(1, 3, 32, 32)
    with md.no_grad():
        stages = model.features(x, return_all=True)
        last = model.features(x)
    channels, size, expected = 2 * k, 32, OrderedDict(stem=(1, 2 * k, 32, 32))
    for b in (1, 2, 3):
        channels += n * k
        expected[f"block{b}"] = (1, channels, size, size)
        if b < 3:
            channels, size = math.floor(theta * channels), size // 2
            expected[f"transition{b}"] = (1, channels, size, size)
    assert OrderedDict((name, t.shape) for name, t in stages.items()) == expected
    np.testing.assert_array_equal(stages["block3"].numpy(), last.numpy())
    # Layer l of a block sees k0 + (l-1)k channels (Eq. 2).
    block2 = model.block2
    assert [layer.in_channels for layer in block2.children()] == [
        expected["transition1"][1] + i * k for i in range(n)]


def test_resnet_features_halve_the_map_and_double_the_channels():
    model = models.resnet20()
    with md.no_grad():
        stages = model.features(md.randn(2, 3, 32, 32), return_all=True)
    assert [t.shape for t in stages.values()] == [(2, 16, 32, 32), (2, 16, 32, 32),
                                                  (2, 32, 16, 16), (2, 64, 8, 8)]
    assert list(stages) == ["stem", "stage1", "stage2", "stage3"]


def test_option_a_shortcut_subsamples_and_pads_with_zeros():
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((2, 3, 5, 5))
    shortcut = models.ZeroPadShortcut(3, 7, stride=2)
    y = shortcut(md.tensor(x_np)).numpy()
    expected = np.zeros((2, 7, 3, 3))
    for i in range(3):
        for j in range(3):
            expected[:, :3, i, j] = x_np[:, :, 2 * i, 2 * j]
    np.testing.assert_array_equal(y, expected)
    x = md.tensor(x_np, requires_grad=True)
    assert md.gradcheck(lambda t: shortcut(t), [x])


# ---------------------------------------------------------------------------
# Gradient checks of whole models in float64 (batch norm in training mode)
# ---------------------------------------------------------------------------
def gradcheck_model(model, x, param_names):
    """md.gradcheck of the logits with respect to the input and the named parameters:
    each call of the checked function puts the perturbed copies in the parameters' place."""
    modules = dict(model.named_modules())
    originals = dict(model.named_parameters())
    slots = [(modules[n.rpartition(".")[0]], n.rpartition(".")[2]) for n in param_names]

    def logits(x, *params):
        for (module, attr), p in zip(slots, params):
            object.__setattr__(module, attr, p)
        try:
            return model(x)
        finally:
            for (module, attr), name in zip(slots, param_names):
                object.__setattr__(module, attr, originals[name])

    params = [md.tensor(originals[n].data.copy(), requires_grad=True) for n in param_names]
    return md.gradcheck(logits, [x, *params])


def tiny_input(seed=0, size=8):
    return md.tensor(np.random.default_rng(seed).standard_normal((2, 3, size, size)),
                     requires_grad=True)


def test_gradcheck_tiny_densenet_bc():
    model = models.densenet_cifar(10, 4, bottleneck=True, compression=0.5).double()
    names = ["stem.weight", "block1.layer1.norm1.weight", "block1.layer1.conv1.weight",
             "block2.layer1.norm2.bias", "block2.layer1.conv2.weight", "transition2.conv.weight",
             "block3.layer1.conv2.weight", "classifier.norm.weight", "classifier.fc.weight",
             "classifier.fc.bias"]
    assert gradcheck_model(model, tiny_input(), names)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_gradcheck_tiny_resnet(shortcut):
    model = models.resnet_cifar(8, shortcut=shortcut).double()
    names = ["stem.conv.weight", "stem.norm.weight", "stage1.block1.conv2.weight",
             "stage2.block1.bn1.bias", "stage3.block1.conv1.weight", "classifier.fc.weight"]
    if shortcut == "B":
        names += ["stage2.block1.shortcut.conv.weight", "stage3.block1.shortcut.norm.weight"]
    assert gradcheck_model(model, tiny_input(1), names)


def test_gradcheck_cross_entropy_of_a_tiny_densenet():
    model = models.densenet_cifar(7, 3).double()
    labels = md.tensor(np.array([3, 7]))
    assert md.gradcheck(lambda x: md.cross_entropy(model(x), labels), [tiny_input(2)])


# ---------------------------------------------------------------------------
# Batch normalisation: training and eval behaviour
# ---------------------------------------------------------------------------
def test_eval_output_of_a_sample_does_not_depend_on_the_rest_of_the_batch():
    model = models.densenet_cifar(10, 4, bottleneck=True, compression=0.5).double()
    rng = np.random.default_rng(0)
    with md.no_grad():
        for _ in range(3):  # give the running statistics non-trivial values
            model(md.tensor(rng.standard_normal((4, 3, 8, 8)) * 2 + 1))
        batch_a = rng.standard_normal((4, 3, 8, 8))
        batch_b = batch_a.copy()
        batch_b[1:] = rng.standard_normal((3, 3, 8, 8)) * 3
        model.train()
        trained_a, trained_b = model(md.tensor(batch_a)).numpy(), model(md.tensor(batch_b)).numpy()
        model.eval()
        alone = model(md.tensor(batch_a[:1])).numpy()
        in_a, in_b = model(md.tensor(batch_a)).numpy(), model(md.tensor(batch_b)).numpy()
    assert not np.allclose(trained_a[0], trained_b[0])  # training mode uses batch statistics
    np.testing.assert_allclose(in_a[:1], alone, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(in_b[:1], alone, rtol=1e-12, atol=1e-12)


def test_running_statistics_converge_to_the_data_statistics():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((16, 3, 4, 4)) * np.array([0.5, 2.0, 3.0])[:, None, None] \
        + np.array([-1.0, 0.0, 4.0])[:, None, None]
    norm = md.nn.BatchNorm2d(3).double()
    with md.no_grad():
        for _ in range(400):  # error shrinks as (1 - momentum)^steps
            norm(md.tensor(data))
    np.testing.assert_allclose(norm.running_mean.numpy(), data.mean(axis=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    # PyTorch's convention: the running variance is the unbiased one.
    np.testing.assert_allclose(norm.running_var.numpy(), data.var(axis=(0, 2, 3), ddof=1),
                               rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# PyTorch twins (benchmarks/torch_twins.py): the same architectures written with
# torch.nn, with the same module names, so that minidense's state dict loads into
# them directly.
# ---------------------------------------------------------------------------
TWINS = {
    "densenet-bc L=10 k=4": (
        lambda: models.densenet_cifar(10, 4, bottleneck=True, compression=0.5),
        lambda twins: twins.densenet((1, 1, 1), 4, True, 0.5, 8, False, 10), 8),
    "densenet L=10 k=3": (
        lambda: models.densenet_cifar(10, 3),
        lambda twins: twins.densenet((2, 2, 2), 3, False, 1.0, 16, False, 10), 8),
    "densenet-bc imagenet stem": (
        lambda: models.DenseNet((1, 2), 4, True, 0.5, 8, "imagenet", num_classes=5),
        lambda twins: twins.densenet((1, 2), 4, True, 0.5, 8, True, 5), 16),
    "resnet-8 option A": (
        lambda: models.resnet_cifar(8, shortcut="A"),
        lambda twins: twins.resnet(False, (1, 1, 1), (16, 32, 64), False, "A", 10), 8),
    "resnet-8 option B": (
        lambda: models.resnet_cifar(8, shortcut="B"),
        lambda twins: twins.resnet(False, (1, 1, 1), (16, 32, 64), False, "B", 10), 8),
    "bottleneck resnet imagenet stem": (
        lambda: models.ResNet(models.Bottleneck, (1, 2), (4, 8), "imagenet", num_classes=5),
        lambda twins: twins.resnet(True, (1, 2), (4, 8), True, "B", 5), 16),
    "bottleneck resnet, stride in 3x3": (
        lambda: models.ResNet(models.Bottleneck, (1, 1), (4, 8), "imagenet", num_classes=5,
                              stride_in_3x3=True),
        lambda twins: twins.resnet(True, (1, 1), (4, 8), True, "B", 5, stride_in_3x3=True), 16),
    "mobilenet_v2 cifar": (   # no dropout: its masks differ between the frameworks
        lambda: models.mobilenet_v2_cifar(dropout=0.0),
        lambda twins: twins.torchvision_mobilenet_v2(10, cifar=True, dropout=0.0), 16),
}


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(TWINS))
def test_same_logits_and_gradients_as_the_pytorch_twin(case, one_torch_thread):
    torch = one_torch_thread
    import torch_twins
    build_ours, build_theirs, size = TWINS[case]
    ours = build_ours().double()
    theirs = build_theirs(torch_twins).double()
    state = {k: torch.from_numpy(v) for k, v in ours.state_dict().items()}
    theirs.load_state_dict(state)  # strict: the same keys, BatchNorm's counts included
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((2, 3, size, size))
    for training in (True, False):  # batch statistics, then the running ones just updated
        ours.train(training)
        theirs.train(training)
        ours.zero_grad()
        theirs.zero_grad()
        x, xt = md.tensor(x_np, requires_grad=True), torch.tensor(x_np, requires_grad=True)
        y, yt = ours(x), theirs(xt)
        np.testing.assert_allclose(y.numpy(), yt.detach().numpy(), rtol=1e-10, atol=1e-12)
        v = rng.standard_normal(y.shape)
        y.backward(v)
        yt.backward(torch.from_numpy(v))
        np.testing.assert_allclose(x.grad.numpy(), xt.grad.numpy(), rtol=1e-9, atol=1e-12)
        their_params = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            # The absolute part scales with the gradient's size: an element that nearly
            # cancels (1e-4 of its neighbours) keeps only the rounding of the large terms.
            theirs_grad = their_params[name].grad.numpy()
            np.testing.assert_allclose(p.grad.numpy(), theirs_grad, rtol=1e-9,
                                       atol=1e-12 * max(1.0, np.abs(theirs_grad).max()), err_msg=name)
        their_buffers = dict(theirs.named_buffers())
        for name, b in ours.named_buffers():
            np.testing.assert_allclose(b.numpy(), their_buffers[name].numpy(), rtol=1e-12,
                                       atol=1e-14, err_msg=name)

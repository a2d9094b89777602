"""Pretrained weights in and out: torchvision's names both ways, through .safetensors,
checked on PyTorch twins with torchvision's module names (benchmarks/torch_twins.py)
and against a recorded list of torchvision's keys (tests/data/torchvision_keys.txt.gz)."""
import gzip
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

import minidense as md
from minidense import models
from minidense.models import pretrained

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))  # torch_twins, imported after torch
sys.path.insert(0, str(HERE / "data"))  # record_torchvision_keys

TORCHVISION_MODELS = ("densenet121", "densenet161", "densenet169", "densenet201",
                      "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
V1_5 = {"resnet50", "resnet101", "resnet152"}


def recorded_torchvision_keys():
    """{model: OrderedDict(key -> shape)} as torchvision 0.29.1 names them."""
    recorded, current = {}, None
    for line in gzip.decompress((HERE / "data" / "torchvision_keys.txt.gz").read_bytes()).decode().splitlines():
        if line.startswith("#"):
            continue
        if line.startswith("["):
            name, count = line[1:].split("] ")
            current = recorded[name] = OrderedDict()
            current.count = int(count)
            continue
        key, shape = line.split(" ")
        current[key] = () if shape == "-" else tuple(int(n) for n in shape.split("x"))
    return recorded


def minidense_model(name, **options):
    """The md.models model whose layout is torchvision's ``name``."""
    return models.get(name, **({"stride_in_3x3": True} if name in V1_5 else {}), **options)


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_the_mapping_gives_torchvisions_recorded_keys_and_shapes_in_order(name):
    recorded = recorded_torchvision_keys()[name]
    assert len(recorded) == recorded.count
    model = minidense_model(name)
    shapes = {n: tuple(t.shape) for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    names = pretrained.torchvision_names(model)
    assert list(names.values()) == list(recorded)
    for ours, theirs in names.items():
        assert shapes.get(ours, ()) == recorded[theirs], (ours, theirs)


def randomize_batch_norms(twin, torch):
    """BN statistics and affine parameters away from 0 and 1, so a BN loaded into the wrong
    place shows in the logits."""
    generator = torch.Generator().manual_seed(0)
    for module in twin.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.rand(n, generator=generator) + 0.5
            module.bias.data = torch.randn(n, generator=generator) * 0.1
            module.running_mean = torch.randn(n, generator=generator) * 0.1
            module.running_var = torch.rand(n, generator=generator) + 0.5
            module.num_batches_tracked.fill_(123)


def logits(model, x):
    model.double().eval()
    with md.no_grad():
        return model(md.tensor(x)).numpy()


def twin_logits(twin, x, torch):
    twin.double().eval()
    with torch.no_grad():
        return twin(torch.from_numpy(x)).numpy()


@pytest.mark.torch
@pytest.mark.parametrize("name", ["densenet121", "resnet50"])
def test_torchvision_weights_load_through_safetensors_with_equal_logits(name, tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    import torch_twins
    torch.manual_seed(0)
    twin = torch_twins.torchvision(name)
    randomize_batch_norms(twin, torch)
    path = tmp_path / f"{name}.safetensors"
    safetensors_torch.save_file(twin.state_dict(), path)  # what a user does with torchvision's weights
    model = models.get(name, weights=path)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32))
    ours, theirs = logits(model, x), twin_logits(twin, x, torch)
    assert ours.shape == (1, 1000)
    assert int(model.stem.norm.num_batches_tracked.item()) == 123  # BatchNorm's counts come too
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-10)
    if name == "resnet50":
        # The same weights in the paper's ResNet-50 (stride in the first 1x1): same shapes,
        # other logits, which is why torchvision's weights build stride_in_3x3=True.
        paper = models.get(name)
        paper.load_state_dict(model.state_dict())
        assert np.abs(logits(paper, x) - theirs).max() > 1e-3


@pytest.mark.torch
@pytest.mark.parametrize("name", ["densenet121", "resnet50"])
def test_minidense_weights_load_into_torchvision_with_equal_logits(name, tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    import torch_twins
    model = minidense_model(name)
    rng = np.random.default_rng(1)
    for module in model.modules():
        if isinstance(module, md.nn.Conv2d):  # fan-in scaling keeps the logits near 1 in eval mode
            shape = module.weight.shape
            module.weight.data = (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(np.float32)
        if isinstance(module, md.nn.BatchNorm2d):  # statistics away from 0 and 1
            n = module.num_features
            module.weight.data = rng.uniform(0.5, 1.5, n).astype(np.float32)
            module.bias.data = (rng.standard_normal(n) * 0.1).astype(np.float32)
            module.running_mean.data = (rng.standard_normal(n) * 0.1).astype(np.float32)
            module.running_var.data = rng.uniform(0.5, 1.5, n).astype(np.float32)
    exported = models.export_state_dict(model, "torchvision")
    counters = [k for k in exported if k.endswith("num_batches_tracked")]
    assert counters and all(exported[k].dtype == np.int64 and exported[k].shape == () for k in counters)
    assert all(v.flags.c_contiguous and isinstance(v, np.ndarray) for v in exported.values())
    md.save(exported, tmp_path / "w.safetensors")
    twin = torch_twins.torchvision(name)
    twin.load_state_dict(safetensors_torch.load_file(tmp_path / "w.safetensors"))  # strict
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32))
    np.testing.assert_allclose(logits(model, x), twin_logits(twin, x, torch), rtol=0, atol=1e-10)


def test_minidense_names_load_too_and_the_round_trip_is_bit_exact(tmp_path):
    source = models.get("resnet18", num_classes=7)
    md.save(source.state_dict(), tmp_path / "w.safetensors")
    for weights in (tmp_path / "w.safetensors", source.state_dict()):
        loaded = models.get("resnet18", weights=weights, num_classes=7).state_dict()
        for name, array in source.state_dict().items():
            assert loaded[name].tobytes() == array.tobytes(), name


def test_export_then_import_in_torchvisions_names_is_bit_exact():
    # (DenseNet-121 below, with old-style keys; ResNet-50 through the logits above)
    source = models.get("resnet18")
    loaded = models.get("resnet18", weights=models.export_state_dict(source, "torchvision")).state_dict()
    for key, array in source.state_dict().items():
        assert loaded[key].tobytes() == array.tobytes(), key


def test_old_style_denselayer_keys_and_batch_counters_are_understood():
    source = models.get("densenet121")
    exported = models.export_state_dict(source, "torchvision")
    # torchvision's downloadable .pth files name "denselayer1.norm1" as "denselayer1.norm.1"
    old_style = OrderedDict(
        (k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."), v) for k, v in exported.items())
    assert "features.denseblock1.denselayer1.norm.1.weight" in old_style
    loaded = models.get("densenet121", weights=old_style).state_dict()
    for key, array in source.state_dict().items():
        np.testing.assert_array_equal(loaded[key], array)
    # checkpoints from before BatchNorm's counts load, strictly, with the counts at 0
    older = OrderedDict((k, v) for k, v in source.state_dict().items()
                        if not k.endswith("num_batches_tracked"))
    assert len(older) < len(source.state_dict())
    counted = models.get("densenet121")
    counted.stem.norm.num_batches_tracked.data[...] = 7
    assert int(models.load_weights(counted, older).stem.norm.num_batches_tracked.item()) == 0
    models.get("densenet121").load_state_dict(older)
    # counters also load beside minidense's names; one without its BatchNorm is unexpected
    state = source.state_dict()
    state["stem.norm.num_batches_tracked"] = np.array(5)
    models.load_weights(models.get("densenet121"), state)
    state["stem.num_batches_tracked"] = np.array(5)
    with pytest.raises(RuntimeError, match=r"unexpected keys: stem.num_batches_tracked$"):
        models.load_weights(models.get("densenet121"), state)


def test_a_class_count_that_does_not_match_names_both_shapes():
    weights = models.export_state_dict(models.get("resnet18"), "torchvision")
    with pytest.raises(RuntimeError) as error:
        models.get("resnet18", weights=weights, num_classes=10)
    message = str(error.value)
    assert "fc.weight (minidense: classifier.fc.weight): model (10, 512), file (1000, 512)" in message
    assert "fc.bias (minidense: classifier.fc.bias): model (10,), file (1000,)" in message
    assert "pass num_classes=1000" in message
    assert models.get("resnet18", weights=weights).classifier.fc.weight.shape == (1000, 512)


def test_every_mismatch_is_listed_in_torchvisions_names_in_one_error():
    weights = models.export_state_dict(models.get("resnet18"), "torchvision")
    del weights["layer2.0.downsample.1.running_var"]
    weights["layer5.0.conv1.weight"] = np.ones((1, 1, 1, 1), dtype=np.float32)
    weights["layer1.1.conv2.weight"] = np.ones((64, 64, 1, 1), dtype=np.float32)
    with pytest.raises(RuntimeError) as error:
        models.get("resnet18", weights=weights)
    message = str(error.value)
    for expected in ("layer1.1.conv2.weight (minidense: stage1.block2.conv2.weight): "
                     "model (64, 64, 3, 3), file (64, 64, 1, 1)",
                     "missing keys: layer2.0.downsample.1.running_var "
                     "(minidense: stage2.block1.shortcut.norm.running_var)",
                     "unexpected keys: layer5.0.conv1.weight"):
        assert expected in message


def test_torchvision_bottleneck_weights_refuse_a_paper_style_model():
    weights = models.export_state_dict(models.get("resnet50", stride_in_3x3=True), "torchvision")
    assert models.get("resnet50", weights=weights).stage2.block1.conv2.stride == 2
    for load in (lambda: models.get("resnet50", weights=weights, stride_in_3x3=False),
                 lambda: models.load_weights(models.get("resnet50"), weights),
                 lambda: models.export_state_dict(models.get("resnet50"), "torchvision")):
        with pytest.raises(ValueError, match="build the model with stride_in_3x3=True"):
            load()


@pytest.mark.parametrize("name, why", [("resnet20", "CIFAR ResNet"), ("densenet_bc100_k12", "CIFAR DenseNet"),
                                       ("densenet264", None)])
def test_models_without_a_torchvision_counterpart_say_so(name, why):
    model = models.get(name)
    if why is None:  # DenseNet-264 has torchvision's layout, if not its weights
        assert len(models.export_state_dict(model, "torchvision")) > 0
        return
    with pytest.raises(ValueError, match=f"torchvision has no counterpart of this model: it is a {why}"):
        models.export_state_dict(model, "torchvision")


def test_bad_weights_arguments_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="names must be 'torchvision'"):
        models.export_state_dict(models.get("resnet18"), "keras")
    with pytest.raises(FileNotFoundError, match=r"'DEFAULT': no such file.*downloads nothing"):
        models.get("resnet18", weights="DEFAULT")
    with pytest.raises(ValueError, match="neither torchvision's nor minidense's: model.0.weight"):
        models.get("resnet18", weights={"model.0.weight": np.ones(3)})
    with pytest.raises(ValueError, match=r"'model' holds nested state.*md.load\(path\)\['model'\]"):
        models.get("resnet18", weights={"model": {}, "epoch": 3})
    (tmp_path / "resnet18.pth").write_bytes(b"\x80\x02")
    with pytest.raises(ValueError, match="is a PyTorch pickle file"):
        models.get("resnet18", weights=tmp_path / "resnet18.pth")
    with pytest.raises(TypeError, match="a path or a dict of arrays"):
        models.get("resnet18", weights=3)


def test_weights_may_be_torch_tensors():
    pytest.importorskip("torch")
    import torch_twins
    twin = torch_twins.torchvision("resnet18")
    model = models.get("resnet18", weights=twin.state_dict())
    np.testing.assert_array_equal(model.stem.conv.weight.numpy(), twin.conv1.weight.detach().numpy())


@pytest.mark.slow  # builds all nine of torchvision's models; where torchvision does not import, skipped
def test_with_torchvision_itself():
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors.torch")
    from record_torchvision_keys import import_torchvision
    try:
        torchvision = import_torchvision()  # also beside a torch it was not built for
    except ImportError:
        pytest.skip("torchvision is not installed")
    recorded = recorded_torchvision_keys()
    for name in TORCHVISION_MODELS:
        with torch.device("meta"):
            state = getattr(torchvision.models, name)().state_dict()
        assert {k: tuple(v.shape) for k, v in state.items()} == dict(recorded[name]), name
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32))
    for name in ("densenet121", "resnet50"):
        theirs = getattr(torchvision.models, name)()
        randomize_batch_norms(theirs, torch)
        ours = models.get(name, weights={k: v.numpy() for k, v in theirs.state_dict().items()})
        np.testing.assert_allclose(logits(ours, x), twin_logits(theirs, x, torch), rtol=0, atol=1e-10)
        back = getattr(torchvision.models, name)()
        back.load_state_dict({k: torch.from_numpy(v)
                              for k, v in models.export_state_dict(ours.float(), "torchvision").items()})
        np.testing.assert_allclose(twin_logits(back, x, torch), twin_logits(theirs, x, torch), rtol=0, atol=1e-10)

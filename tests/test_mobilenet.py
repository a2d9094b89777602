"""MobileNetV2 (Sandler et al. 2018) in md.models: Table 2's layout and parameter count,
the logits of an independent PyTorch build (benchmarks/torch_twins.py) in float64 (the
CIFAR variant's logits and gradients: tests/test_models.py's twins), torchvision's
weights in and out, and the training command."""
import sys
from pathlib import Path

import numpy as np
import pytest

import minidense as md
from minidense import models
from minidense.models.mobilenet import TABLE_2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))  # torch_twins


def count_from_the_paper(table, classes, first=32, last=1280):
    """Parameters of Table 2's network counted layer by layer: every convolution without
    bias and followed by BN (2 per channel), the depthwise ones 9 weights per channel."""
    count = 3 * first * 9 + 2 * first
    k = first
    for t, c, n, s in table:
        for _ in range(n):
            wide = t * k
            if t != 1:
                count += k * wide + 2 * wide                 # 1x1 expansion
            count += wide * 9 + 2 * wide                     # 3x3 depthwise
            count += wide * c + 2 * c                        # 1x1 linear projection
            k = c
    return count + k * last + 2 * last + last * classes + classes


def test_parameter_counts():
    assert count_from_the_paper(TABLE_2, 1000) == 3_504_872 == models.get("mobilenet_v2").num_parameters()
    assert models.get("mobilenet_v2_cifar").num_parameters() == count_from_the_paper(TABLE_2, 10)
    assert models.get("mobilenet_v2_cifar", num_classes=100).classifier[1].out_features == 100
    assert models.get("mobilenet_v2", width_mult=0.5).num_parameters() == 1_968_680   # torchvision's


def test_multiply_adds_match_the_papers_table_3():
    """300M multiply-adds at 224x224 (Table 3), the depthwise ones counted per group."""
    macs = md.summary(models.get("mobilenet_v2"), (3, 224, 224), show=False).total_macs
    assert abs(macs / 1e6 - 300) < 1, macs


@pytest.mark.parametrize("name, size, sizes", [
    ("mobilenet_v2", 64, (32, 32, 16, 8, 4, 4, 2, 2)),             # 224 -> 112, 56, 28, 14, 7
    ("mobilenet_v2_cifar", 32, (32, 32, 32, 16, 8, 8, 4, 4)),
])
def test_the_sequences_follow_table_2(name, size, sizes):
    """After the first convolution and after each of the seven sequences: Table 2's
    channels, and the map halved where its s is 2 (CIFAR: not in the first two places)."""
    model = models.get(name)
    layers = list(model.features)
    assert len(layers) == 1 + sum(n for _, _, n, _ in TABLE_2) + 1
    ends = np.cumsum([1] + [n for _, _, n, _ in TABLE_2])   # features index after each sequence
    x = md.randn(2, 3, size, size)
    shapes = []
    with md.no_grad():
        for i, layer in enumerate(layers):
            x = layer(x)
            if i + 1 in ends:
                shapes.append(x.shape[1:])
    assert shapes == [(c, s, s) for c, s in zip((32,) + tuple(c for _, c, _, _ in TABLE_2), sizes)]
    assert x.shape[1:] == (1280, sizes[-1], sizes[-1])
    residual = [block.use_res_connect for block in layers[1:-1]]
    assert sum(residual) == sum(n - 1 for _, _, n, _ in TABLE_2) == 10   # all but each first block
    depthwise = [m for m in model.modules() if isinstance(m, md.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)


def twin_with_our_weights(model, twin, torch):
    twin.double()   # first: loading copies into the twin's own tensors, in their dtype
    missing, unexpected = twin.load_state_dict(
        {k: torch.from_numpy(v) for k, v in model.state_dict().items()}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    return twin


def randomize_batch_norms(model, rng):
    """BN statistics and affine parameters away from 0 and 1 (so that the logits of
    eval mode are not vanishingly small, and a misplaced BN shows)."""
    for module in model.modules():
        if isinstance(module, md.nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = rng.uniform(0.5, 1.5, n)
            module.bias.data = rng.standard_normal(n) * 0.1
            module.running_mean.data = rng.standard_normal(n) * 0.1
            module.running_var.data = rng.uniform(0.5, 1.5, n)


@pytest.mark.torch
def test_imagenet_logits_against_the_pytorch_build(one_torch_thread):
    torch = one_torch_thread
    import torch_twins
    model = models.get("mobilenet_v2").double().eval()
    randomize_batch_norms(model, np.random.default_rng(0))
    twin = twin_with_our_weights(model, torch_twins.torchvision("mobilenet_v2"), torch).eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32))
    with md.no_grad():
        ours = model(md.tensor(x)).numpy()
    with torch.no_grad():
        theirs = twin(torch.from_numpy(x)).numpy()
    assert np.abs(theirs).max() > 1e-2
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.torch
def test_torchvision_weights_load_and_ours_export_to_torchvision(tmp_path, one_torch_thread):
    torch = one_torch_thread
    safetensors_torch = pytest.importorskip("safetensors.torch")
    import torch_twins
    torch.manual_seed(0)
    theirs = torch_twins.torchvision("mobilenet_v2")
    for module in theirs.modules():   # statistics away from 0 and 1, counters as a trained model's
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.num_batches_tracked.fill_(7)
    safetensors_torch.save_file(theirs.state_dict(), tmp_path / "mobilenet_v2.safetensors")
    model = models.get("mobilenet_v2", weights=tmp_path / "mobilenet_v2.safetensors")
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32))
    theirs.double().eval()
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    with md.no_grad():
        np.testing.assert_allclose(model.double().eval()(md.tensor(x)).numpy(), expected, rtol=0, atol=1e-10)
    # and back: the export loads strictly into torchvision's layout, with the same logits
    exported = models.export_state_dict(model.float(), "torchvision")
    assert list(exported) == list(theirs.state_dict())
    assert exported["features.1.conv.0.1.num_batches_tracked"].dtype == np.int64
    md.save(exported, tmp_path / "back.safetensors")
    back = torch_twins.torchvision("mobilenet_v2")
    back.load_state_dict(safetensors_torch.load_file(tmp_path / "back.safetensors"))   # strict
    with torch.no_grad():
        np.testing.assert_allclose(back.double().eval()(torch.from_numpy(x)).numpy(), expected,
                                   rtol=1e-6, atol=1e-6)   # through float32


def test_the_cifar_variant_has_no_torchvision_counterpart_but_loads_its_own_weights():
    model = models.get("mobilenet_v2_cifar")
    with pytest.raises(ValueError, match=r"torchvision has no counterpart of this model: it is a "
                                         r"CIFAR MobileNetV2 \(stride 1 in the first convolution"):
        models.export_state_dict(model, "torchvision")
    loaded = models.get("mobilenet_v2_cifar", weights=model.state_dict()).state_dict()
    for key, array in model.state_dict().items():
        assert loaded[key].tobytes() == array.tobytes(), key
    loaded = models.get("mobilenet_v2", weights=models.export_state_dict(models.get("mobilenet_v2"),
                                                                        "torchvision"))
    assert loaded.features[0][0].weight.shape == (32, 3, 3, 3)


def test_the_training_command_takes_both_names(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")   # the digits demo
    from minidense import train
    from minidense.training import recipes
    monkeypatch.setenv("MINIDENSE_DATA", str(tmp_path / "cache"))
    for name in ("mobilenet_v2", "mobilenet_v2_cifar"):
        assert name in models.list_models()
        recipes.check_model(name, "width_mult=0.5")
    with pytest.raises(recipes.SettingsError, match="mobilenet_v2_cifar has no parameter 'depth'"):
        recipes.check_model("mobilenet_v2_cifar", "depth=3")
    out = tmp_path / "run"
    assert train.main(["--data", "digits", "--model", "mobilenet_v2_cifar", "--model-args", "width_mult=0.25",
                       "--subset", "64", "--test-subset", "32", "--batch-size", "32", "--epochs", "1",
                       "--no-plot", "--out", str(out)]) == 0
    assert (out / "best.npz").is_file()


@pytest.mark.slow  # where torchvision imports: its own MobileNetV2's names, shapes and logits
def test_with_torchvision_itself():
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).resolve().parent / "data"))
    from record_torchvision_keys import import_torchvision
    try:
        torchvision = import_torchvision()
    except ImportError:
        pytest.skip("torchvision is not installed")
    theirs = torchvision.models.mobilenet_v2()
    model = models.get("mobilenet_v2", weights={k: v.numpy() for k, v in theirs.state_dict().items()})
    assert {k: tuple(v.shape) for k, v in theirs.state_dict().items()} == {
        k: tuple(np.shape(v)) for k, v in models.export_state_dict(model, "torchvision").items()}
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32))
    with torch.no_grad():
        expected = theirs.double().eval()(torch.from_numpy(x)).numpy()
    with md.no_grad():
        np.testing.assert_allclose(model.double().eval()(md.tensor(x)).numpy(), expected, rtol=0, atol=1e-10)

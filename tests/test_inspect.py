"""Looking inside models: md.summary, md.to_dot / md.render_dot, and the
inspect_densenet example."""
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import minidense as md
from minidense import models

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------
# md.summary
# ---------------------------------------------------------------------------
def test_summary_totals_add_up_and_match_the_model():
    model = models.densenet_bc100_k12()
    per_layer = md.summary(model, (3, 32, 32), show=False)
    per_stage = md.summary(model, (3, 32, 32), depth=1, show=False)
    assert per_layer.total_params == per_stage.total_params == model.num_parameters()
    assert sum(row.params for row in per_layer.layers) == model.num_parameters()
    assert sum(row.params for row in per_stage.layers) == model.num_parameters()
    assert per_layer.total_macs == per_stage.total_macs
    assert [row.name for row in per_stage.layers] == [
        "stem", "block1", "transition1", "block2", "transition2", "block3", "classifier"]
    assert per_stage.layers[-1].output_shape == (1, 10)
    leaves = [name for name, m in model.named_modules() if next(m.children(), None) is None]
    assert [row.name for row in per_layer.layers] == leaves  # every layer, in the order it runs
    # The figure: DenseNet-BC (L=100, k=12) on 32x32 costs about 288M MACs.
    assert round(per_layer.total_macs / 1e6) == 288


# ResNet paper, Table 1: FLOPs (multiply-adds) of the ImageNet models on 224x224, in 10^9.
# The paper's figures are neither all rounded nor all truncated versions of an exact
# count (3.66 is printed 3.6, 7.57 is printed 7.6), so they are held to their last digit,
# +-0.1.  That still tells the paper's model (subsampling in the bottleneck's first 1x1
# convolution: 3.86) from "ResNet v1.5" (in the 3x3 one: 4.09) for ResNet-50.
RESNET_TABLE1_GMACS = {"resnet18": 1.8, "resnet34": 3.6, "resnet50": 3.8, "resnet101": 7.6,
                       "resnet152": 11.3}


@pytest.mark.parametrize("name", sorted(RESNET_TABLE1_GMACS))
def test_imagenet_resnet_macs_match_the_papers_table(name):
    macs = md.summary(models.get(name), (3, 224, 224), show=False).total_macs
    assert abs(macs / 1e9 - RESNET_TABLE1_GMACS[name]) <= 0.1 + 1e-9, macs


@pytest.mark.torch
@pytest.mark.parametrize("name", ["resnet20", "densenet40_k12"])
def test_summary_macs_equal_pytorchs_flop_count(name):
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import torch_twins  # the PyTorch versions of the models, shared with the benchmarks
    finally:
        sys.path.pop(0)
    twin = torch_twins.get(name)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        twin.eval()(torch.zeros(1, 3, 32, 32))
    ours = md.summary(models.get(name), (3, 32, 32), show=False)
    assert 2 * ours.total_macs == counter.get_total_flops()  # a MAC is two FLOPs


def test_summary_restores_modes_and_leaves_no_hooks_or_statistics_changed():
    model = models.resnet_cifar(8)
    model.train()
    model.stage2.eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    before = model.state_dict()
    md.summary(model, (3, 16, 16), show=False)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(not m._forward_hooks for m in model.modules())
    for name, array in model.state_dict().items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)


def test_summary_prints_a_table_and_counts_a_shared_layer_once(capsys):
    conv = md.nn.Conv2d(4, 4, 3, padding=1, bias=False)
    model = md.nn.Sequential(md.nn.Conv2d(3, 4, 3, padding=1), conv, md.nn.ReLU(), conv)
    result = md.summary(model, (1, 3, 8, 8))
    printed = capsys.readouterr().out
    assert printed.strip() == str(result).strip()
    assert [row.name for row in result.layers] == ["0", "1", "2", "1"]  # the shared conv, twice
    assert [row.params for row in result.layers] == [3 * 4 * 9 + 4, 4 * 4 * 9, 0, 0]
    assert result.layers[3].macs == result.layers[1].macs == 4 * 8 * 8 * 4 * 9
    assert result.total_params == model.num_parameters()
    assert f"Parameters: {result.total_params:,}" in printed
    assert f"MACs per image: {result.total_macs:,}" in printed


def test_summary_rejects_a_batch_of_several():
    with pytest.raises(ValueError, match=r"summary: input_shape must be \(C, H, W\)"):
        md.summary(models.resnet20(), (2, 3, 32, 32))


# ---------------------------------------------------------------------------
# md.to_dot
# ---------------------------------------------------------------------------
def count_nodes_recursively(tensor):
    """An independent walk of the graph: distinct nodes and leaves reachable."""
    nodes, leaves = set(), set()

    def visit(node):
        if id(node) in nodes:
            return
        nodes.add(id(node))
        for edge in node.next_edges:
            if edge is not None:
                if isinstance(edge[0], md.Function):
                    visit(edge[0])
                else:
                    leaves.add(id(edge[0]))
    visit(tensor.grad_fn)
    return len(nodes), len(leaves)


def boxes(dot):
    return [line for line in dot.splitlines() if "shape=box" in line]


def test_to_dot_shows_every_op_its_shapes_and_what_it_keeps():
    layer = models.DenseLayer(6, 4, bottleneck=True)
    x = md.randn(2, 6, 5, 5, requires_grad=True)
    y = layer(x)
    dot = md.to_dot(y, names=dict(layer.named_parameters()))
    n_nodes, n_leaves = count_nodes_recursively(y)
    assert len(boxes(dot)) == n_nodes == 4   # BN-ReLU, conv, BN-ReLU, conv
    ellipses = [line for line in dot.splitlines() if "shape=ellipse" in line]
    assert len(ellipses) == n_leaves + 1  # and the output
    assert dot.count(" -> ") == sum(e is not None for node in _nodes(y) for e in node.next_edges) + 1
    for op in ("BatchNormReLU", "Conv2d"):
        assert any(line.split('label="')[1].startswith(op) for line in boxes(dot))
    # The 3x3 conv keeps its input and its weight; the fused BN-ReLU keeps no ReLU output,
    # so no array is shared between two ops here.
    conv2 = next(line for line in boxes(dot) if "out: (2, 4, 5, 5)" in line)
    assert "keeps: (2, 16, 5, 5) float32\\n" in conv2 and "keeps: (4, 16, 3, 3) float32 = conv2.weight" in conv2
    assert "[A]" not in dot
    # An unfused ReLU keeps its output and the conv after it keeps the same array: marked.
    w = md.randn(4, 16, 3, 3, requires_grad=True)
    shared = md.to_dot(md.conv2d(md.relu(md.randn(2, 16, 5, 5, requires_grad=True)), w, padding=1))
    conv = next(line for line in boxes(shared) if line.split('label="')[1].startswith("Conv2d"))
    relu = next(line for line in boxes(shared) if line.split('label="')[1].startswith("ReLU"))
    assert "keeps: (2, 16, 5, 5) float32 [A]" in conv and "keeps: (2, 16, 5, 5) float32 [A]" in relu
    assert "conv1.weight\\nParameter (16, 6, 1, 1) float32" in dot
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")


def _nodes(tensor):
    seen, stack, out = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        out.append(node)
        stack += [e[0] for e in node.next_edges if e is not None and isinstance(e[0], md.Function)]
    return out


def test_to_dot_walks_deep_graphs_without_recursion():
    x = md.randn(3, requires_grad=True)
    y = x
    depth = 3 * sys.getrecursionlimit()
    for _ in range(depth):
        y = y * 1.0
    assert len(boxes(md.to_dot(y))) == depth


def test_to_dot_marks_arrays_freed_by_backward_and_handles_leaves():
    x = md.randn(2, 3, requires_grad=True)
    y = md.relu(x).sum()
    y.backward()
    assert "keeps: (freed by backward)" in md.to_dot(y)
    leaf_only = md.to_dot(x)
    assert not boxes(leaf_only) and "output (2, 3) float32" in leaf_only


def test_dense_block_graph_has_one_concatenation_per_layer():
    block = models.DenseBlock(3, 4, 2, bottleneck=False)
    y = block(md.randn(1, 4, 4, 4, requires_grad=True))
    labels = [line.split('label="')[1] for line in boxes(md.to_dot(y))]
    # Eq. 2 in the graph: one concatenation per layer and one for the block's output, each
    # a view of the block's shared storage, into which each feature map is written once.
    assert sum(label.startswith("Concat") for label in labels) == 4
    assert sum(label.startswith("IntoStorage") for label in labels) == 4
    assert sum(label.startswith("Conv2d") for label in labels) == 3
    assert y.data.base is not None and y.shape == (1, 10, 4, 4)


# ---------------------------------------------------------------------------
# md.render_dot
# ---------------------------------------------------------------------------
def small_dot():
    x = md.randn(2, 2, requires_grad=True)
    return md.to_dot((x * x).sum(), names={"x": x})


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot program is not installed")
def test_render_dot_draws_svg_and_png(tmp_path):
    svg = md.render_dot(small_dot(), tmp_path / "g.svg").read_text()
    assert "<svg" in svg and "Mul" in svg
    assert md.render_dot(small_dot(), tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_dot_without_graphviz_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(md.viz.GraphvizNotFound, match="apt-get install graphviz"):
        md.render_dot(small_dot(), tmp_path / "g.svg")
    assert not list(tmp_path.iterdir())
    text = small_dot()
    assert md.render_dot(text, tmp_path / "g.dot").read_text() == text  # needs no Graphviz
    with pytest.raises(ValueError, match="cannot tell the format"):
        md.render_dot(text, tmp_path / "g.jpeg2000")


# ---------------------------------------------------------------------------
# The example
# ---------------------------------------------------------------------------
def test_inspect_densenet_example_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["inspect_densenet.py", "--batch", "2", "--out", str(tmp_path)])
    runpy.run_path(str(REPO / "examples" / "inspect_densenet.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert str(md.summary(models.densenet_bc100_k12(), (3, 32, 32), depth=1, show=False)) in out
    assert "Channels each layer sees" in out and "Feature maps of a batch of 2 images" in out
    assert (tmp_path / "dense_layer.dot").read_text().startswith("digraph")

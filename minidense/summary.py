"""``md.summary``: one row per layer with its output shape, parameters and
multiply-accumulates, found by running one image through the model with forward hooks."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import backend, nn
from .autograd import Tensor, no_grad


@dataclass
class LayerSummary:
    name: str             # dotted module name, as in state_dict keys
    kind: str             # the module's class name
    output_shape: tuple
    params: int           # parameters first used by this row (a shared module counts once)
    macs: int             # multiply-accumulates for one image


@dataclass
class ModelSummary:
    """What ``summary`` measured; ``str()`` gives the table."""
    model_name: str
    input_shape: tuple
    layers: list = field(default_factory=list)
    total_params: int = 0
    trainable_params: int = 0
    buffer_elements: int = 0
    total_macs: int = 0

    def __str__(self):
        return format_table(self)


def layer_macs(module, inputs, output) -> int:
    """Multiply-accumulates of one call of ``module``, per image.  Convolutions and linear
    layers: each output element costs one MAC per weight it sees (padding included, as
    the papers count; a grouped convolution's output sees one group's channels); normalisation, activations and pooling count as none."""
    if not isinstance(output, Tensor) or output.ndim == 0:
        return 0
    per_image = output.numel() // output.shape[0]
    if isinstance(module, nn.Conv2d):   # an output sees its group's in_channels / groups
        kh, kw = module.kernel_size
        return per_image * module.in_channels // module.groups * kh * kw
    if isinstance(module, nn.Linear):
        return per_image * module.in_features
    return 0


def _is_leaf(module) -> bool:
    return next(module.children(), None) is None


def _rows_at(model, depth):
    """(name, module) of the modules that get a row: the leaves, or with ``depth`` the
    modules that many levels down (and leaves above that level)."""
    if _is_leaf(model):
        return [(type(model).__name__, model)]
    rows = []
    for name, module in list(model.named_modules())[1:]:
        level = name.count(".") + 1
        if (depth is None and _is_leaf(module)) or (
                depth is not None and (level == depth or (level < depth and _is_leaf(module)))):
            rows.append((name, module))
    return rows


def summary(model, input_shape, depth=None, show=True) -> ModelSummary:
    """Run a batch of one image of ``input_shape`` ((C, H, W), or (1, C, H, W)) through
    ``model`` in eval mode without recording a graph, and tabulate each layer.

    depth: None for one row per leaf layer (conv, BN, ReLU, ...); 1 for one row per stage
    (stem, block1, transition1, ...), 2 for one level further down, and so on.
    show: print the table.  Returns a ModelSummary (totals as attributes; ``str()`` is
    the table).  The model's train/eval modes are restored afterwards.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4 or shape[0] != 1:
        raise ValueError(f"summary: input_shape must be (C, H, W) or (1, C, H, W), got {tuple(input_shape)}")
    first = next(model.parameters(), None)
    xp = backend.get_array_module(first.data) if first is not None else np
    dtype = first.dtype if first is not None else np.float32
    x = Tensor(xp.zeros(shape, dtype=dtype))

    rows = _rows_at(model, depth)
    row_names = [name for name, _ in rows]

    def owner_row(leaf_name):
        for name in row_names:
            if leaf_name == name or leaf_name.startswith(name + "."):
                return name
        return None

    result = ModelSummary(type(model).__name__, shape)
    pending_macs = {}
    counted = set()

    def count_macs(row_name):
        def hook(module, inputs, output):
            pending_macs[row_name] = pending_macs.get(row_name, 0) + layer_macs(module, inputs, output)
        return hook

    def add_row(row_name):
        def hook(module, inputs, output):
            params = 0
            for p in module.parameters():
                if id(p) not in counted:
                    counted.add(id(p))
                    params += p.numel()
            out_shape = tuple(output.shape) if isinstance(output, Tensor) else ()
            result.layers.append(LayerSummary(row_name, type(module).__name__, out_shape, int(params),
                                              int(pending_macs.pop(row_name, 0))))
        return hook

    handles = []
    leaves = ([(rows[0][0], model)] if _is_leaf(model) else
              [(n, m) for n, m in model.named_modules() if n and _is_leaf(m)])
    for leaf_name, leaf in leaves:
        row = owner_row(leaf_name)
        if row is not None:
            handles.append(leaf.register_forward_hook(count_macs(row)))
    for row_name, module in rows:  # after the MAC hooks: a leaf row reads its own MACs
        handles.append(module.register_forward_hook(add_row(row_name)))

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes:
            m.training = mode

    parameters = list(model.parameters())
    result.total_params = int(sum(p.numel() for p in parameters))
    result.trainable_params = int(sum(p.numel() for p in parameters if p.requires_grad))
    result.buffer_elements = int(sum(b.numel() for b in model.buffers()))
    result.total_macs = int(sum(row.macs for row in result.layers))
    if show:
        print(result)
    return result


def human(count: int) -> str:
    """1234567 -> '1.23M' (K, M, G: powers of 1000)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.{3 if scale == 1e9 else 2}f}{unit}"
    return str(count)


def format_table(s: ModelSummary) -> str:
    headers = ("Layer", "Type", "Output shape", "Params", "MACs")
    body = [(row.name, row.kind, str(row.output_shape), f"{row.params:,}", f"{row.macs:,}")
            for row in s.layers]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
    align = ("<", "<", "<", ">", ">")

    def line(cells):
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths)).rstrip()

    rule = "-" * len(line(headers))
    lines = [f"{s.model_name} on input {s.input_shape}", rule, line(headers), rule]
    lines += [line(r) for r in body]
    lines += [rule,
              f"Parameters: {s.total_params:,} ({human(s.total_params)}), "
              f"trainable {s.trainable_params:,}",
              f"Buffers (running statistics, not trained): {s.buffer_elements:,} values",
              f"MACs per image: {s.total_macs:,} ({human(s.total_macs)})"]
    return "\n".join(lines)

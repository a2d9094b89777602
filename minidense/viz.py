"""``md.to_dot``: the autograd graph behind a tensor as Graphviz DOT text, and
``md.render_dot`` to draw it as SVG, PNG or PDF with Graphviz's ``dot`` program.

Boxes are the graph's nodes (one per op call), labelled with the op, the shapes of its
outputs and the arrays it keeps for backward; ellipses are leaves (parameters and
inputs whose ``.grad`` backward fills).  Arrows follow the data, from inputs to outputs.
"""
from __future__ import annotations

import shutil
import subprocess
from collections import deque
from pathlib import Path

from .autograd import Function, Tensor
from .files import atomic_write
from .nn import Parameter


class GraphvizNotFound(RuntimeError):
    """Graphviz's ``dot`` program is not installed."""


def _describe(shape, dtype) -> str:
    return f"{tuple(int(s) for s in shape)} {dtype}"


def _quote(text: str) -> str:
    """A DOT string literal; newlines become line breaks in the picture."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _saved_arrays(node: Function):
    return [a for a in (node.saved or ()) if hasattr(a, "shape")]


def _node_label(node: Function, tags) -> str:
    lines = [type(node).__name__]
    lines += [f"out: {_describe(shape, dtype)}" for shape, dtype in node.output_meta]
    if node.saved is None:
        lines.append("keeps: (freed by backward)")
    elif not node.saved:
        lines.append("keeps: nothing")
    for array in node.saved or ():
        if hasattr(array, "shape"):
            tag = tags.get(id(array))
            lines.append(f"keeps: {_describe(array.shape, array.dtype)}" + (f" {tag}" if tag else ""))
        else:
            lines.append(f"keeps: {type(array).__name__}")
    return "\n".join(lines)


def _leaf_label(leaf: Tensor, names) -> str:
    name = names.get(id(leaf))
    kind = "Parameter" if isinstance(leaf, Parameter) else "leaf"
    return "\n".join(([name] if name else []) + [f"{kind} {_describe(leaf.shape, leaf.dtype)}"])


def _walk(root: Function):
    """Nodes (breadth first from the root), leaves and edges (source, target, output index)."""
    nodes, leaves, edges = [root], {}, []
    queue, seen = deque([root]), {id(root)}
    while queue:
        node = queue.popleft()
        for edge in node.next_edges:
            if edge is None:
                continue
            source, index = edge
            if isinstance(source, Function):
                if id(source) not in seen:
                    seen.add(id(source))
                    nodes.append(source)
                    queue.append(source)
            else:
                leaves.setdefault(id(source), source)
            edges.append((source, node, index))
    return nodes, list(leaves.values()), edges


def _array_tags(nodes, leaves, names):
    """Marks for kept arrays that are not private to one node: "= name" for a leaf's own
    data (a parameter costs no extra memory), "[A]", "[B]", ... for an array that several
    nodes keep.  Also the bytes kept beyond the leaves' data, each array counted once."""
    leaf_data = {id(leaf.data): names.get(id(leaf), "the leaf") for leaf in leaves}
    keepers, arrays = {}, {}
    for node in nodes:
        for array in _saved_arrays(node):
            keepers[id(array)] = keepers.get(id(array), 0) + 1
            arrays[id(array)] = array
    tags, letters = {}, iter("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    for key, count in keepers.items():
        if key in leaf_data:
            tags[key] = f"= {leaf_data[key]}"
        elif count > 1:
            tags[key] = f"[{next(letters, '*')}]"
    extra = sum(a.nbytes for k, a in arrays.items() if k not in leaf_data)
    return tags, extra, sum(1 for k in arrays if k not in leaf_data)


def to_dot(tensor: Tensor, names=None, title=None) -> str:
    """Graphviz DOT text of the graph that computed ``tensor``.

    names: optional {name: tensor} (e.g. ``dict(model.named_parameters())``) to label
    leaves.  Each box lists the arrays its op keeps for backward; "[A]" marks one array
    kept by several ops, "= name" a leaf's own data.  The title line adds up what the
    graph keeps beyond the leaves.  The walk is iterative, so any depth works.
    """
    names = {id(t): n for n, t in (names or {}).items()}
    nodes, leaves, edges = _walk(tensor.grad_fn) if tensor.grad_fn is not None else ([], [], [])
    tags, kept_bytes, kept_count = _array_tags(nodes, leaves, names)
    heading = f"{title}\n" if title else ""
    heading += f"{len(nodes)} ops; kept for backward: {kept_bytes / 2**20:.3g} MiB in {kept_count} arrays"
    lines = [
        "digraph autograd {",
        f'  graph [rankdir=TB, fontname="Helvetica", labelloc=t, label={_quote(heading)}];',
        '  node [fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    ids = {}

    def declare(obj, label, style):
        ids[id(obj)] = f"n{len(ids)}"
        lines.append(f"  {ids[id(obj)]} [label={_quote(label)}, {style}];")

    declare(tensor, f"output {_describe(tensor.shape, tensor.dtype)}",
            'shape=ellipse, style=filled, fillcolor="#c7e9c0"')
    for node in nodes:
        declare(node, _node_label(node, tags), 'shape=box, style=filled, fillcolor="#f0f0f0"')
    for leaf in leaves:
        declare(leaf, _leaf_label(leaf, names), 'shape=ellipse, style=filled, fillcolor="#c6dbef"')
    if tensor.grad_fn is not None:
        edges.insert(0, (tensor.grad_fn, tensor, tensor.output_index))
    for source, target, index in edges:
        several = isinstance(source, Function) and len(source.output_meta) > 1
        label = f" [label={_quote(f'output {index}')}]" if several else ""
        lines.append(f"  {ids[id(source)]} -> {ids[id(target)]}{label};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_dot(dot: str, path) -> Path:
    """Write ``dot`` to ``path``: as text when it ends in .dot or .gv, otherwise drawn by
    Graphviz in the format its suffix names (.svg, .png, .pdf).  Raises GraphvizNotFound,
    saying how to install it, when the ``dot`` program is missing."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt in ("dot", "gv"):
        with atomic_write(path, "w") as f:
            f.write(dot)
        return path
    if fmt not in ("svg", "png", "pdf"):
        raise ValueError(f"render_dot: cannot tell the format from {path.name!r}; use a .svg, "
                         f".png, .pdf, or .dot file name")
    program = shutil.which("dot")
    if program is None:
        raise GraphvizNotFound(
            f"render_dot: Graphviz's 'dot' program is not installed, so {path} cannot be drawn. "
            f"Install Graphviz (apt-get install graphviz, brew install graphviz or conda install "
            f"graphviz), or save the text with render_dot(dot, 'graph.dot') and draw it elsewhere.")
    drawn = subprocess.run([program, f"-T{fmt}"], input=dot.encode("utf-8"), capture_output=True)
    if drawn.returncode != 0:
        raise RuntimeError(f"render_dot: dot failed on the graph for {path}: "
                           f"{drawn.stderr.decode(errors='replace').strip()}")
    with atomic_write(path) as f:
        f.write(drawn.stdout)
    return path

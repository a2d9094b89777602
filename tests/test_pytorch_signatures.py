"""Every public name that PyTorch also has takes PyTorch's arguments: the same parameter
names, in the same order, with the same defaults (the issue's one rule).

For each public name of ``md``, ``md.cuda``, ``md.nn``, ``md.nn.functional``,
``md.nn.init``, ``md.nn.utils``, ``md.optim``, ``md.optim.lr_scheduler``, and each
public method of ``md.Tensor``, ``md.nn.Module``, ``md.optim.Optimizer`` and
``lr_scheduler.LRScheduler`` whose PyTorch counterpart exists, PyTorch's signatures are
read from ``inspect.signature`` where it works, else from the documented signatures
in the docstring (every overload), and from the ATen schemas of the operator.
minidense's must be *compatible* with one of them: every call valid in PyTorch means
the same in minidense.  So, position by position, minidense's parameters have
PyTorch's names; a default PyTorch has, minidense has too, equal (minidense may give a
default where PyTorch requires the argument); minidense may stop early (a trailing
argument it does not support is then a TypeError that names it); a keyword-only
parameter of minidense's exists in PyTorch, or is NumPy's alias ``axis``/``keepdims``
(PyTorch accepts them too).  Anything else must be in ALLOWLIST, with its reason:
minidense's deliberate exceptions and extensions, each also in the README.
"""
import ast
import inspect
import re

import pytest

import minidense as md
from minidense.optim import lr_scheduler

torch = pytest.importorskip("torch")

ALIASES = {"axis": "dim", "keepdims": "keepdim"}   # NumPy's names, accepted as PyTorch does

# name -> why it differs from PyTorch (also in the README's "Coming from PyTorch").
ALLOWLIST = {
    "md.save": "never pickles: writes .safetensors or .npz to `path` (`torch.save(obj, f, "
               "pickle_module=...)`)",
    "md.load": "never unpickles: reads .safetensors or .npz from `path`; .pth is refused with "
               "the conversion command (no `map_location`: arrays come to the host)",
    "md.set_num_threads": "PyTorch documents its argument as `int`, a type, not a name",
    "md.dropout": "the keyword-only `generator=` (a NumPy/CuPy Generator for the mask)",
    "md.batch_norm": "no `cudnn_enabled` (minidense has no cuDNN): torch.batch_norm's ninth "
                     "argument is refused (F.batch_norm matches PyTorch's)",
    "md.onnx.export": "the keyword-only metadata `model_name=`, `class_names=`, `mean=`, `std=` "
                      "(written into the file's metadata_props)",
    "md.nn.Module.load_state_dict": "the keyword-only `names=` (the source's names, such as "
                                    "torchvision's, shown in the error beside minidense's)",
}

NAMESPACES = [
    ("md", md, torch),
    ("md.cuda", md.cuda, torch.cuda),
    ("md.nn", md.nn, torch.nn),
    ("md.nn.functional", md.nn.functional, torch.nn.functional),
    ("md.nn.init", md.nn.init, torch.nn.init),
    ("md.nn.utils", md.nn.utils, torch.nn.utils),
    ("md.optim", md.optim, torch.optim),
    ("md.optim.lr_scheduler", lr_scheduler, torch.optim.lr_scheduler),
    ("md.onnx", md.onnx, torch.onnx),
]
CLASSES = [
    ("md.Tensor", md.Tensor, torch.Tensor),
    ("md.nn.Module", md.nn.Module, torch.nn.Module),
    ("md.optim.Optimizer", md.optim.Optimizer, torch.optim.Optimizer),
    ("md.optim.lr_scheduler.LRScheduler", lr_scheduler.LRScheduler, torch.optim.lr_scheduler.LRScheduler),
]
POSITIONAL, VAR_POSITIONAL, KEYWORD_ONLY, VAR_KEYWORD = "positional", "*", "keyword-only", "**"
NO_DEFAULT = inspect.Parameter.empty


# ---------------------------------------------------------------------------
# Signatures as lists of (name, kind, default)
# ---------------------------------------------------------------------------
def from_inspect(obj, drop_first=False):
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    kinds = {inspect.Parameter.POSITIONAL_ONLY: POSITIONAL,
             inspect.Parameter.POSITIONAL_OR_KEYWORD: POSITIONAL,
             inspect.Parameter.VAR_POSITIONAL: VAR_POSITIONAL,
             inspect.Parameter.KEYWORD_ONLY: KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD: VAR_KEYWORD}
    params = [(p.name, kinds[p.kind], p.default) for p in signature.parameters.values()]
    return params[1:] if drop_first and params else params


def _split_top_level(text):
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + ([current] if current.strip() else [])


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text.strip()   # such as torch.preserve_format: compared as written


def from_documented(text):
    """``cat(tensors, dim=0, *, out=None)``'s argument list, as PyTorch's docs write it."""
    params, keyword_only = [], False
    for token in _split_top_level(text.replace("\\*", "*")):
        token = token.strip()
        if token == "*":
            keyword_only = True
        elif token.startswith("**"):
            params.append((token[2:].split(":")[0].strip(), VAR_KEYWORD, NO_DEFAULT))
        elif token.startswith("*"):
            params.append((token[1:].split(":")[0].strip(), VAR_POSITIONAL, NO_DEFAULT))
            keyword_only = True
        else:
            name, _, default = token.partition("=")
            name = name.split(":")[0].strip()
            params.append((name, KEYWORD_ONLY if keyword_only else POSITIONAL,
                           _literal(default) if default else NO_DEFAULT))
    return params


def documented(obj, name):
    """Every signature of ``name`` written in ``obj``'s docstring (one per overload)."""
    found = []
    for line in (getattr(obj, "__doc__", None) or "").splitlines():
        match = re.match(rf"\s*(?:\.\. (?:function|method)::\s*)?{re.escape(name)}\((.*)\)\s*(->.*)?$", line)
        if match:
            found.append(from_documented(match.group(1)))
    return found


def _schema_default(value):
    """ATen's spellings of "not given" ([] for an int list) and of one number for every
    dim ([0, 0]), as the Python API takes them."""
    if isinstance(value, list):
        return None if not value else value[0] if len(set(value)) == 1 else tuple(value)
    return value


def from_schemas(name):
    signatures = []
    for schema in torch._C._jit_get_schemas_for_operator(f"aten::{name}"):
        params = []
        for arg in schema.arguments:
            if arg.name == "out":
                continue
            default = _schema_default(arg.default_value) if arg.has_default_value() else NO_DEFAULT
            params.append(("input" if arg.name == "self" else arg.name,
                           KEYWORD_ONLY if arg.kwarg_only else POSITIONAL, default))
        signatures.append(params)
    return signatures


def torch_signatures(obj, name, method=False):
    """PyTorch's signatures of ``obj`` (called ``name``); uninformative ones (*args,
    **kwargs) left out.  For a method, without self; ATen's schemas name it input."""
    candidates = []
    target = obj.__init__ if inspect.isclass(obj) and not method else obj
    signature = from_inspect(obj if inspect.isclass(obj) else target, drop_first=method)
    if signature is not None and {kind for _, kind, _ in signature} != {VAR_POSITIONAL, VAR_KEYWORD}:
        candidates.append(signature)
    candidates += documented(obj, name)
    schemas = from_schemas(name)
    candidates += [s[1:] for s in schemas if s and s[0][0] == "input"] if method else schemas
    return candidates


# ---------------------------------------------------------------------------
# Compatibility
# ---------------------------------------------------------------------------
def _same_default(ours, theirs):
    if theirs is NO_DEFAULT:
        return True   # minidense may give a default where PyTorch requires the argument
    if ours is NO_DEFAULT:
        return False
    try:
        return type(ours) is type(theirs) and ours == theirs or (
            isinstance(ours, (int, float)) and not isinstance(ours, bool)
            and isinstance(theirs, (int, float)) and not isinstance(theirs, bool) and ours == theirs)
    except Exception:
        return False


def incompatibility(ours, theirs):
    """Why the signature ``ours`` is not compatible with ``theirs``; None when it is."""
    their_positional = [p for p in theirs if p[1] in (POSITIONAL, VAR_POSITIONAL)]
    our_positional = [p for p in ours if p[1] in (POSITIONAL, VAR_POSITIONAL)]
    for i, (name, kind, default) in enumerate(our_positional):
        if i >= len(their_positional):
            return f"parameter {i} ({name}) is beyond PyTorch's {len(their_positional)} positional ones"
        their_name, their_kind, their_default = their_positional[i]
        if (name, kind) != (their_name, their_kind):
            return f"parameter {i} is {kind} {name!r}, PyTorch's is {their_kind} {their_name!r}"
        if not _same_default(default, their_default):
            return f"{name}'s default is {default!r}, PyTorch's {their_default!r}"
    for name, kind, default in their_positional[len(our_positional):]:
        if kind == POSITIONAL and default is NO_DEFAULT:
            return f"PyTorch's required parameter {name!r} is missing"
    their_names = {name: default for name, _, default in theirs}
    our_names = {name for name, _, _ in ours}
    for name, kind, default in ours:
        if kind != KEYWORD_ONLY:
            continue
        if name in ALIASES and ALIASES[name] in our_names:
            continue
        if name not in their_names:
            return f"keyword-only {name!r} is not PyTorch's"
        if not _same_default(default, their_names[name]):
            return f"{name}'s default is {default!r}, PyTorch's {their_names[name]!r}"
    return None


def mismatch(ours_obj, theirs_obj, name, method=False):
    """None when compatible (or PyTorch's signature says nothing), else the reasons."""
    ours = from_inspect(ours_obj, drop_first=method)
    candidates = torch_signatures(theirs_obj, name, method)
    if ours is None or not candidates:
        return None
    reasons = [incompatibility(ours, theirs) for theirs in candidates]
    return None if any(r is None for r in reasons) else "; ".join(sorted(set(reasons)))


def compared_names():
    """(qualified name, ours, theirs, is a method) for every public name PyTorch also has."""
    for prefix, ours_ns, theirs_ns in NAMESPACES:
        for name in sorted(getattr(ours_ns, "__all__", None) or dir(ours_ns)):
            ours, theirs = getattr(ours_ns, name, None), getattr(theirs_ns, name, None)
            if name.startswith("_") or not callable(ours) or not callable(theirs) or inspect.ismodule(ours):
                continue
            yield f"{prefix}.{name}", ours, theirs, False
    for prefix, ours_cls, theirs_cls in CLASSES:
        for name, ours in sorted(vars(ours_cls).items()):
            theirs = getattr(theirs_cls, name, None)
            if name.startswith("_") or not callable(ours) or not callable(theirs):
                continue
            yield f"{prefix}.{name}", ours, theirs, True


# PyTorch's signature of these is (*args, **kwargs), with no documented one: nothing to compare.
UNSPECIFIED_IN_PYTORCH = {"md.Tensor", "md.nn.Identity", "md.nn.Module", "md.nn.Sigmoid", "md.nn.Tanh"}


def test_every_name_pytorch_also_has_takes_pytorchs_arguments():
    problems, compared, unspecified = {}, [], set()
    for qualified, ours, theirs, method in compared_names():
        compared.append(qualified)
        name = qualified.rsplit(".", 1)[1]
        if not torch_signatures(theirs, name, method):
            unspecified.add(qualified)
        why = mismatch(ours, theirs, name, method)
        if why is not None:
            problems[qualified] = why
    unexpected = {k: v for k, v in problems.items() if k not in ALLOWLIST}
    assert not unexpected, "\n".join(f"{k}: {v}" for k, v in sorted(unexpected.items()))
    stale = sorted(set(ALLOWLIST) - set(problems))
    assert not stale, f"allowlisted but matching PyTorch now (remove them): {stale}"
    assert unspecified == UNSPECIFIED_IN_PYTORCH   # a new name's PyTorch signature was found
    assert len(compared) > 200
    # the names the issue lists are among those compared
    for name in ("md.cat", "md.concat", "md.stack", "md.flatten", "md.transpose", "md.zeros",
                 "md.tensor", "md.nn.Conv2d", "md.nn.BatchNorm2d", "md.nn.ReLU",
                 "md.nn.CrossEntropyLoss", "md.nn.functional.cross_entropy",
                 "md.nn.init.kaiming_normal_", "md.optim.SGD", "md.optim.lr_scheduler.ConstantLR",
                 "md.cuda.is_available", "md.Tensor.view", "md.Tensor.size", "md.Tensor.max",
                 "md.Tensor.backward", "md.nn.Module.state_dict", "md.nn.utils.skip_init"):
        assert name in compared, name


def test_the_comparison_catches_drift():
    """The old NumPy meanings, and other drifts, are told apart from PyTorch's."""
    def cat(tensors, axis=1):
        pass

    def flatten(input, start_dim=1, end_dim=-1):
        pass

    def transpose(input, *axes):
        pass

    def relu(input, inplace=True):
        pass

    class BatchNorm2d:
        def __init__(self, num_features, momentum=0.1, eps=1e-5):
            pass

    def backward(self, grad=None, retain_graph=False):
        pass

    def sum(input, dim=None, keepdim=False, *, squeeze=True):
        pass

    assert mismatch(cat, torch.cat, "cat") is not None
    assert mismatch(flatten, torch.flatten, "flatten") is not None
    assert mismatch(transpose, torch.transpose, "transpose") is not None
    assert mismatch(relu, torch.nn.functional.relu, "relu") is not None
    assert mismatch(BatchNorm2d, torch.nn.BatchNorm2d, "BatchNorm2d") is not None
    assert mismatch(backward, torch.Tensor.backward, "backward", method=True) is not None
    assert mismatch(sum, torch.sum, "sum") is not None
    # and the real ones pass
    assert mismatch(md.cat, torch.cat, "cat") is None
    assert mismatch(md.nn.BatchNorm2d, torch.nn.BatchNorm2d, "BatchNorm2d") is None

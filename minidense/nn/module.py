"""``Module``: a tree of layers that owns parameters and buffers, as in PyTorch."""
from __future__ import annotations

import itertools
from collections import OrderedDict, namedtuple

import numpy as np

from .. import backend
from ..autograd import Tensor, device_and_dtype


class Parameter(Tensor):
    """A Tensor that a Module trains: it requires a gradient (unless told otherwise)."""

    def __init__(self, data=None, requires_grad: bool = True):
        super().__init__(np.zeros(0, np.float32) if data is None else data,
                         requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter(" + super().__repr__() + ")"


_hook_keys = itertools.count()

# What load_state_dict returns, as PyTorch's.
IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class _HookHandle:
    """Returned by ``register_forward_hook``: ``remove()`` unregisters that hook."""

    def __init__(self, hooks, key):
        self.hooks, self.key = hooks, key

    def remove(self):
        self.hooks.pop(self.key, None)


class Module:
    """Base class of layers and models.

    Assigning a Parameter, a Module or (through ``register_buffer``) a buffer to an
    attribute registers it, in definition order.  ``__call__`` runs ``forward`` and
    then any forward hooks.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_forward_hooks", OrderedDict())
        object.__setattr__(self, "training", True)

    # -- registration ------------------------------------------------------
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}: call super().__init__() before assigning "
                               f"attributes")
        if isinstance(value, Parameter):
            target = self._parameters
        elif isinstance(value, Module):
            target = self._modules
        elif name in self.__dict__.get("_buffer_names", ()):
            target = self._buffers
        else:
            target = None
        for registry in (self._parameters, self._buffers, self._modules):
            if registry is not target:
                registry.pop(name, None)
        if target is not None:
            target[name] = value   # a replacement keeps its place in the order
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        """A tensor saved in the state dict (unless not ``persistent``) but not trained
        (BN running statistics)."""
        names = self.__dict__.setdefault("_buffer_names", set())
        names.add(name)
        transient = self.__dict__.setdefault("_non_persistent", set())
        (transient.discard if persistent else transient.add)(name)
        self.__setattr__(name, tensor)

    def register_forward_hook(self, hook):
        """``hook(module, inputs, output)`` runs after every forward (a result other than
        None replaces the output); returns a handle whose ``remove()`` unregisters it."""
        key = next(_hook_keys)  # one key per registration: the same function may be added twice
        self._forward_hooks[key] = hook
        return _HookHandle(self._forward_hooks, key)

    def add_module(self, name: str, module: "Module") -> None:
        self.__setattr__(name, module)

    # -- calling -----------------------------------------------------------
    def forward(self, *input):
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        for hook in list(self._forward_hooks.values()):
            result = hook(self, args, out)
            if result is not None:
                out = result
        return out

    # -- traversal ---------------------------------------------------------
    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        """Every module in the tree, depth first, self first, with dotted names; a module
        reachable by several names comes once (unless not ``remove_duplicate``)."""
        stack = [(prefix, self)]
        seen = set() if memo is None else memo
        while stack:
            name, module = stack.pop()
            if remove_duplicate:
                if module in seen:
                    continue
                seen.add(module)
            yield name, module
            children = [(f"{name}.{n}" if name else n, m) for n, m in module._modules.items()
                        if m is not None]
            stack.extend(reversed(children))

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def named_children(self):
        return iter((n, m) for n, m in self._modules.items() if m is not None)

    def children(self):
        return iter(m for _, m in self.named_children())

    def _named_tensors(self, registry: str, prefix: str, recurse: bool, remove_duplicate: bool):
        """(dotted name, tensor) for each tensor in every module's ``registry``
        ("_parameters" or "_buffers"); a tensor shared by several modules comes once
        (unless not ``remove_duplicate``)."""
        seen = set()
        modules = (self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate) if recurse
                   else [(prefix, self)])
        for module_name, module in modules:
            for name, tensor in getattr(module, registry).items():
                if tensor is not None and not (remove_duplicate and id(tensor) in seen):
                    seen.add(id(tensor))
                    yield (f"{module_name}.{name}" if module_name else name), tensor

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self._named_tensors("_parameters", prefix, recurse, remove_duplicate)

    def parameters(self, recurse: bool = True):
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self._named_tensors("_buffers", prefix, recurse, remove_duplicate)

    def buffers(self, recurse: bool = True):
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    def num_parameters(self) -> int:
        return int(sum(p.numel() for p in self.parameters()))

    def apply(self, fn) -> "Module":
        """``fn(module)`` for every submodule and then self, each module after its
        children (PyTorch's order), without recursion."""
        stack = [(self, False)]
        while stack:
            module, children_done = stack.pop()
            if children_done:
                fn(module)
                continue
            stack.append((module, True))
            stack.extend((child, False) for child in reversed(list(module.children())))
        return self

    # -- modes and devices -------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad.data[...] = 0

    def requires_grad_(self, requires_grad: bool = True) -> "Module":
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def to(self, device=None, dtype=None) -> "Module":
        """Move (and/or cast) every parameter and buffer in place; parameters keep their
        identity, so an optimizer built before the move still holds them.  Integer
        buffers (BN's batch counts) keep their dtype.  ``to(dtype)`` casts only."""
        device, dtype = device_and_dtype(device, dtype)
        device = backend.check_device(device) if device is not None else None

        def moved(array):
            array = array if device is None else backend.to_device(array, device)
            return array.astype(dtype) if dtype is not None and array.dtype.kind == "f" else array

        for t in list(self.parameters()) + list(self.buffers()):
            t.data = moved(t.data)
            if t.grad is not None:  # the gradient goes along, as in PyTorch
                t.grad.data = moved(t.grad.data)
        return self

    def double(self):
        return self.to(dtype=np.float64)

    def float(self):
        return self.to(dtype=np.float32)

    def cuda(self, device=None):
        return self.to("cuda" if device is None else device)

    def cpu(self):
        return self.to("cpu")

    # -- state -------------------------------------------------------------
    def _state_tensors(self):
        """(dotted name, tensor) for the state dict, in PyTorch's order: module by module
        (self first, depth first), each module's parameters and then its persistent
        buffers; a module reachable by two names appears under both, as in PyTorch."""
        for module_name, module in self.named_modules(remove_duplicate=False):
            transient = module.__dict__.get("_non_persistent", ())
            entries = list(module._parameters.items()) + [
                (n, b) for n, b in module._buffers.items() if n not in transient]
            for name, tensor in entries:
                if tensor is not None:
                    yield (f"{module_name}.{name}" if module_name else name), tensor

    def state_dict(self, *, destination=None, prefix: str = "", keep_vars: bool = False):
        """Every parameter and persistent buffer by dotted name, as host NumPy copies
        (minidense's difference from PyTorch: arrays, not tensors), or with ``keep_vars``
        the Tensors themselves."""
        state = OrderedDict() if destination is None else destination
        for name, t in self._state_tensors():
            state[prefix + name] = t if keep_vars else t.numpy()
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False, *, names=None):
        """Copy arrays (or minidense or PyTorch tensors) into the parameters and buffers,
        on their current device.

        Shape mismatches always raise; with ``strict`` missing and unexpected names do too,
        all reported in one error.  ``names`` (own name -> the name where the weights came
        from, such as torchvision's) makes the error show both.  A module may upgrade an
        older state (BatchNorm2d adds the ``num_batches_tracked`` older checkpoints lack).
        Returns (missing_keys, unexpected_keys)."""
        if assign:
            raise NotImplementedError("load_state_dict: assign=True is not supported; minidense "
                                      "copies the values into the existing parameters")
        state = OrderedDict(state_dict)
        for module_name, module in self.named_modules():
            upgrade = getattr(module, "upgrade_state_dict", None)
            if upgrade is not None:
                upgrade(state, f"{module_name}." if module_name else "")
        own = OrderedDict(self._state_tensors())

        def shown(k):
            return f"{names[k]} (minidense: {k})" if names and k in names else k

        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        mismatched = [f"{shown(k)}: model {tuple(own[k].shape)}, file {tuple(np.shape(state[k]))}"
                      for k in own if k in state and tuple(np.shape(state[k])) != tuple(own[k].shape)]
        problems = []
        if mismatched:
            problems.append("shape mismatch for " + "; ".join(mismatched))
        if strict and missing:
            problems.append("missing keys: " + ", ".join(map(shown, missing)))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if problems:
            raise RuntimeError(f"load_state_dict into {type(self).__name__}: " + " | ".join(problems))
        for name, t in own.items():
            if name in state:
                value = state[name]
                host = backend.to_numpy(value.data if isinstance(value, Tensor) else value)
                t.data = backend.to_device(np.array(host, dtype=t.dtype, copy=True), t.device)
        return IncompatibleKeys(missing, unexpected)

    # -- printing ----------------------------------------------------------
    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        children = list(self.named_children())
        if not children:
            return lines[0] + ")"
        for name, child in children:
            child_repr = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child_repr}")
        return "\n".join(lines) + "\n)"

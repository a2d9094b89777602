"""``Module``: a tree of layers that owns parameters and buffers, as in PyTorch."""
from __future__ import annotations

import itertools
from collections import OrderedDict

import numpy as np

from .. import backend
from ..autograd import Tensor


class Parameter(Tensor):
    """A Tensor that a Module trains: it always requires a gradient."""

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter(" + super().__repr__() + ")"


_hook_keys = itertools.count()


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

    def register_buffer(self, name: str, tensor: Tensor | None) -> None:
        """A tensor saved in the state dict but not trained (BN running statistics)."""
        names = self.__dict__.setdefault("_buffer_names", set())
        names.add(name)
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
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        for hook in list(self._forward_hooks.values()):
            result = hook(self, args, out)
            if result is not None:
                out = result
        return out

    # -- traversal ---------------------------------------------------------
    def named_modules(self, prefix: str = ""):
        """Every module in the tree, depth first, self first, with dotted names."""
        stack = [(prefix, self)]
        seen = set()
        while stack:
            name, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
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

    def _named_tensors(self, registry: str, prefix: str):
        """(dotted name, tensor) for each tensor in every module's ``registry``
        ("_parameters" or "_buffers"); a tensor shared by several modules comes once."""
        seen = set()
        for module_name, module in self.named_modules(prefix):
            for name, tensor in getattr(module, registry).items():
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    yield (f"{module_name}.{name}" if module_name else name), tensor

    def named_parameters(self, prefix: str = ""):
        return self._named_tensors("_parameters", prefix)

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self, prefix: str = ""):
        return self._named_tensors("_buffers", prefix)

    def buffers(self):
        for _, b in self.named_buffers():
            yield b

    def num_parameters(self) -> int:
        return int(sum(p.size for p in self.parameters()))

    # -- modes and devices -------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def to(self, device=None, dtype=None) -> "Module":
        """Move (and/or cast) every parameter and buffer in place; parameters keep their
        identity, so an optimizer built before the move still holds them."""
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

    # -- state -------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Every parameter and buffer by dotted name, as host NumPy copies."""
        state = OrderedDict()
        for name, p in self.named_parameters():
            state[name] = p.numpy()
        for name, b in self.named_buffers():
            state[name] = b.numpy()
        return state

    def load_state_dict(self, state, strict: bool = True, names=None):
        """Copy arrays into the parameters and buffers (on their current device).

        Shape mismatches always raise; with ``strict`` missing and unexpected names do too,
        all reported in one error.  ``names`` (own name -> the name where the weights came
        from, such as torchvision's) makes the error show both.  Returns (missing, unexpected)."""
        own = OrderedDict(list(self.named_parameters()) + list(self.named_buffers()))

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
                value = value.data if isinstance(value, Tensor) else value
                host = backend.to_numpy(value)
                t.data = backend.to_device(np.array(host, dtype=t.dtype, copy=True), t.device)
        return missing, unexpected

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

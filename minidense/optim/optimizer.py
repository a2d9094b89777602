"""Optimizers: SGD (momentum, Nesterov), Adam and AdamW, with PyTorch's update rules.

Each update is written exactly as ``torch.optim`` computes it (same order of
operations), so a step-by-step comparison in float64 agrees to rounding.  Updates
are in place on the parameters' arrays: on the CPU with NumPy, on the GPU with one
fused CuPy kernel per parameter (backend's "sgd_update" and "adam_update", the same
arithmetic in the same order).
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend, profiling
from ..autograd import Tensor


class Optimizer:
    """Base class: parameter groups (lists of dicts, as in PyTorch), per-parameter
    state, ``zero_grad``, ``step`` and ``state_dict``/``load_state_dict``.

    A state dict holds only strings, numbers and arrays in nested dicts (so it can be
    written by ``md.save`` without pickling): ``{"state": {"<index>": {name: array or
    number}}, "param_groups": {"<g>": {hyperparameters..., "params": int array}}}``,
    parameters numbered in group order as in PyTorch.
    """

    def __init__(self, params, defaults: dict):
        self.defaults = dict(defaults)
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = []
        for group in groups:
            group = dict(group)
            group["params"] = list(group["params"])
            for p in group["params"]:
                if not isinstance(p, Tensor) or not p.requires_grad:
                    raise TypeError(f"{type(self).__name__}: can only optimize tensors that require "
                                    f"a gradient, got {type(p).__name__}")
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            self.param_groups.append(group)
        self.state = {}   # id(parameter) -> dict of arrays and numbers

    def _parameters(self):
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self) -> None:
        for p in self._parameters():
            p.grad = None

    def step(self) -> None:
        with profiling.region(f"{type(self).__name__}.step", "optimizer", own_row=True):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self.update(p, p.grad.data, self.state.setdefault(id(p), {}), group)

    def update(self, p, grad, state, group):
        raise NotImplementedError

    # -- saving and restoring ------------------------------------------------
    def state_dict(self) -> dict:
        index = {id(p): i for i, p in enumerate(self._parameters())}
        state = {}
        for p in self._parameters():
            if self.state.get(id(p)):
                state[str(index[id(p)])] = {k: (backend.to_numpy(v).copy() if backend.is_array(v) else v)
                                            for k, v in self.state[id(p)].items()}
        groups = {}
        for g, group in enumerate(self.param_groups):
            saved = {k: (np.asarray(v, dtype=np.float64) if isinstance(v, tuple) else v)
                     for k, v in group.items() if k != "params"}
            saved["params"] = np.array([index[id(p)] for p in group["params"]], dtype=np.int64)
            groups[str(g)] = saved
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        name = type(self).__name__
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: the state has {len(groups)} parameter groups, "
                             f"this optimizer {len(self.param_groups)}")
        parameters = self._parameters()
        for g, group in enumerate(self.param_groups):
            saved = groups[str(g)]
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{name}.load_state_dict: group {g} has {len(saved['params'])} "
                                 f"parameters in the state, {len(group['params'])} here")
            for key, value in saved.items():
                if key == "params":
                    continue
                if isinstance(self.defaults.get(key), tuple):
                    value = tuple(float(v) for v in np.asarray(value))
                elif isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
                    value = value.item()
                group[key] = value
        self.state = {}
        for i, entries in state_dict["state"].items():
            p = parameters[int(i)]
            restored = {}
            for key, value in entries.items():
                if isinstance(value, np.ndarray) and value.ndim > 0:
                    if value.shape != p.shape:
                        raise ValueError(f"{name}.load_state_dict: {key} of parameter {i} has shape "
                                         f"{value.shape}, the parameter {tuple(p.shape)}")
                    value = backend.to_device(np.array(value, dtype=p.dtype), p.device)
                elif isinstance(value, (np.generic, np.ndarray)):
                    value = value.item()
                restored[key] = value
            self.state[id(p)] = restored

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for g, group in enumerate(self.param_groups):
            settings = ", ".join(f"{k}={v}" for k, v in group.items() if k != "params")
            lines.append(f"  group {g}: {len(group['params'])} tensors, {settings}")
        return "\n".join(lines + [")"])


# ---------------------------------------------------------------------------
# The fused updates on CuPy
# ---------------------------------------------------------------------------
# Optimizer updates, one thread per parameter element and one launch per parameter
# (instead of about 8 elementwise launches for SGD and 12 for Adam).  The arithmetic
# is that of the NumPy path in optim/optimizer.py, operation for operation; scalars
# computed on the host (1 - dampening, ...) come in as T.  No ?: between a T and an
# arithmetic result: with T = float16, CuPy's half type computes in float, and NVRTC
# rejects ?: of float16 and float as ambiguous (so if/else; the assignment rounds).
_SGD_BODY = """
    T g = grad;
    if (weight_decay != (T)0) g = g + weight_decay * p;
    if (first) buf = g; else buf = buf * momentum + one_minus_dampening * g;
    if (nesterov) g = g + momentum * buf; else g = buf;
    p = p - lr * g;
"""

_SGD_PLAIN_BODY = """
    T g = grad;
    if (weight_decay != (T)0) g = g + weight_decay * p;
    p = p - lr * g;
"""

_ADAM_BODY = """
    T g = grad;
    if (decay_factor != (T)1) p = p * decay_factor;
    if (weight_decay != (T)0) g = g + weight_decay * p;
    exp_avg = exp_avg + one_minus_beta1 * (g - exp_avg);
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * g * g;
    T denom = sqrt(exp_avg_sq) / bias2_sqrt + eps;
    p = p - step_size * (exp_avg / denom);
"""

backend.register_cuda_kernel(
    "sgd_update", "elementwise", "T grad, T lr, T weight_decay, T momentum, T one_minus_dampening, "
    "bool nesterov, bool first", "T p, T buf", _SGD_BODY,
    scalars=("lr", "weight_decay", "momentum", "one_minus_dampening", "nesterov", "first"),
    where=__name__)
backend.register_cuda_kernel(
    "sgd_plain_update", "elementwise", "T grad, T lr, T weight_decay", "T p", _SGD_PLAIN_BODY,
    scalars=("lr", "weight_decay"), where=__name__)
backend.register_cuda_kernel(
    "adam_update", "elementwise", "T grad, T decay_factor, T weight_decay, T one_minus_beta1, "
    "T beta2, T one_minus_beta2, T bias2_sqrt, T eps, T step_size", "T p, T exp_avg, T exp_avg_sq",
    _ADAM_BODY, scalars=("decay_factor", "weight_decay", "one_minus_beta1", "beta2",
                         "one_minus_beta2", "bias2_sqrt", "eps", "step_size"), where=__name__)


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, as PyTorch (Sutskever et al., 2013):

        g = grad + weight_decay * p            (L2 penalty added to the gradient)
        b = g at the first step, else momentum * b + (1 - dampening) * g
        g = g + momentum * b  (Nesterov)  or  g = b
        p = p - lr * g
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: lr, momentum and weight_decay must be >= 0, got lr={lr}, "
                             f"momentum={momentum}, weight_decay={weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum needs momentum > 0 and dampening 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def update(self, p, grad, state, group):
        momentum, decay = group["momentum"], group["weight_decay"]
        if backend.device_of(p.data) == "cuda":  # one fused kernel (_SGD_BODY)
            if momentum == 0:
                backend.cuda_kernel("sgd_plain_update")(grad, group["lr"], decay, p.data)
                return
            buf = state.get("momentum_buffer")
            first = buf is None
            if first:
                buf = state["momentum_buffer"] = backend.get_array_module(p.data).empty_like(p.data)
            backend.cuda_kernel("sgd_update")(
                grad, group["lr"], decay, momentum, 1 - group["dampening"], bool(group["nesterov"]),
                first, p.data, buf)
            return
        if decay != 0:
            grad = grad + decay * p.data
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.copy()
            else:
                buf *= momentum
                buf += (1 - group["dampening"]) * grad
            grad = grad + momentum * buf if group["nesterov"] else buf
        p.data -= group["lr"] * grad


class Adam(Optimizer):
    """Adam (Kingma and Ba, 2015), as PyTorch: with ``weight_decay`` the L2 penalty is
    added to the gradient (use AdamW for decoupled decay).

        m = m + (1 - beta1) * (g - m),   v = beta2 * v + (1 - beta2) * g^2
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    decoupled_decay = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"{type(self).__name__}: need lr, eps, weight_decay >= 0 and betas in "
                             f"[0, 1), got lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps,
                                      weight_decay=weight_decay))

    def update(self, p, grad, state, group):
        xp = backend.get_array_module(p.data)
        lr, (beta1, beta2), decay = group["lr"], group["betas"], group["weight_decay"]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(p.data)
            state["exp_avg_sq"] = xp.zeros_like(p.data)
        state["step"] += 1
        step = state["step"]
        if backend.device_of(p.data) == "cuda":  # one fused kernel (_ADAM_BODY)
            decoupled = self.decoupled_decay and decay != 0
            backend.cuda_kernel("adam_update")(
                grad, 1 - lr * decay if decoupled else 1.0, 0.0 if decoupled else decay,
                1 - beta1, beta2, 1 - beta2, math.sqrt(1 - beta2 ** step), group["eps"],
                lr / (1 - beta1 ** step), p.data, state["exp_avg"], state["exp_avg_sq"])
            return
        if decay != 0:
            if self.decoupled_decay:
                p.data *= 1 - lr * decay
            else:
                grad = grad + decay * p.data
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg += (1 - beta1) * (grad - exp_avg)
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * grad * grad
        step_size = lr / (1 - beta1 ** step)
        denom = xp.sqrt(exp_avg_sq) / math.sqrt(1 - beta2 ** step) + group["eps"]
        p.data -= step_size * (exp_avg / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov and Hutter, 2019), as PyTorch:
    ``p = p * (1 - lr * weight_decay)`` before the Adam step; default decay 0.01."""

    decoupled_decay = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, lr, betas, eps, weight_decay)

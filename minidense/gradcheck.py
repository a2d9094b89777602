"""Check analytical gradients against central finite differences.

For an op f and a random upstream gradient v, backward gives J^T v for each input.
Finite differences give the same thing one coordinate at a time:
    (v . f(x + eps e_i) - v . f(x - eps e_i)) / (2 eps)  ~  (J^T v)_i.
Small inputs are checked element by element; larger ones along a few random unit
directions d, comparing (J^T v) . d with the finite difference along d.  Use float64:
in float32 the rounding error of f swamps the difference quotient.
"""
from __future__ import annotations

import numpy as np

from . import backend
from .autograd import Tensor, enable_grad, grad, no_grad
from .functions.array import concat


class GradcheckError(RuntimeError):
    """An analytical gradient differs from its finite-difference estimate."""


def _scalar_projection(fn, inputs, v):
    with no_grad():
        out = fn(*inputs)
    return float((backend.to_numpy(out.data).astype(np.float64) * v).sum())


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, max_elements=64, directions=6,
              seed=0, raise_exception=True):
    """True if the gradients of ``fn(*inputs)`` agree with finite differences.

    ``inputs``: a Tensor or a sequence; those with ``requires_grad`` are checked.
    Inputs with at most ``max_elements`` elements are checked element by element,
    larger ones along ``directions`` random directions.  An element passes when
    |analytical - numerical| <= atol + rtol * |numerical|.  On failure, raises
    ``GradcheckError`` describing the worst mismatch (or returns False when
    ``raise_exception=False``).
    """
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    inputs = tuple(inputs)
    checked = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input requires a gradient; pass tensors with requires_grad=True")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise ValueError(f"gradcheck: input {i} has dtype {inputs[i].dtype}; use float64 "
                             f"(finite differences in float32 are mostly rounding error)")
    # Work on copies so that the caller's arrays are never touched.
    work = tuple(Tensor(t.data.copy(), requires_grad=t.requires_grad) if isinstance(t, Tensor) else t
                 for t in inputs)
    out = fn(*work)
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck: fn must return a Tensor, got {type(out).__name__}")
    op_name = type(out.grad_fn).__name__ if out.grad_fn is not None else getattr(fn, "__name__", "fn")
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(out.shape)
    xp = backend.get_array_module(out.data)
    out.backward(xp.asarray(v, dtype=out.dtype))

    worst = None  # (excess, description)
    for i in checked:
        x = work[i]
        analytic = np.zeros(x.shape) if x.grad is None else backend.to_numpy(x.grad.data).astype(np.float64)
        flat = x.data.reshape(-1)  # a view: perturbing it perturbs the input
        if x.numel() <= max_elements:
            probes = [(np.unravel_index(k, x.shape), None) for k in range(x.numel())]
        else:
            probes = []
            for _ in range(directions):
                d = rng.standard_normal(x.shape)
                probes.append((None, d / np.linalg.norm(d)))
        for index, direction in probes:
            original = x.data.copy() if direction is not None else None
            if direction is None:
                k = np.ravel_multi_index(index, x.shape) if x.ndim else 0
                base = flat[k].item()
                flat[k] = base + eps
                plus = _scalar_projection(fn, work, v)
                flat[k] = base - eps
                minus = _scalar_projection(fn, work, v)
                flat[k] = base
                a = analytic[index]
                where = f"element {tuple(int(j) for j in index)}"
            else:
                d = xp.asarray(direction, dtype=x.dtype)
                x.data[...] = original + eps * d
                plus = _scalar_projection(fn, work, v)
                x.data[...] = original - eps * d
                minus = _scalar_projection(fn, work, v)
                x.data[...] = original
                a = float((analytic * direction).sum())
                where = "a random direction"
            numeric = (plus - minus) / (2 * eps)
            tolerance = atol + rtol * abs(numeric)
            excess = abs(a - numeric) - tolerance
            if excess > 0 and (worst is None or excess > worst[0]):
                worst = (excess, f"gradcheck failed for {op_name}: input {i} (shape {tuple(x.shape)}), "
                                 f"{where}: analytical {a:.8g}, numerical {numeric:.8g}, "
                                 f"difference {abs(a - numeric):.3g} > tolerance {tolerance:.3g} "
                                 f"(atol={atol}, rtol={rtol}, eps={eps})")
    if worst is not None:
        if raise_exception:
            raise GradcheckError(worst[1])
        return False
    return True


def gradgradcheck(fn, inputs, grad_outputs=None, eps=1e-6, atol=1e-5, rtol=1e-3, max_elements=64,
                  directions=6, seed=0, raise_exception=True):
    """True if the second derivatives of ``fn(*inputs)`` agree with finite differences of
    its first derivatives.

    The first derivatives are g(x, v) = J(x)^T v, computed by ``grad(...,
    create_graph=True)`` for an upstream gradient v (``grad_outputs``, by default drawn
    at random, float64); ``gradcheck`` then checks g's own gradients, with respect to
    every input and to v, against central differences of g.  So a backward that forgets
    a dependence (a statistic kept as a constant, a mask applied twice) fails here even
    where the first derivatives are right.  Use float64.
    """
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    inputs = tuple(inputs)
    checked = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    with no_grad():
        out = fn(*inputs)
    if grad_outputs is None:
        v = np.random.default_rng(seed + 1).standard_normal(out.shape)
        xp = backend.get_array_module(out.data)
        grad_outputs = Tensor(xp.asarray(v, dtype=np.float64), requires_grad=True)
    elif not grad_outputs.requires_grad:
        grad_outputs = Tensor(grad_outputs.data, requires_grad=True)

    def first_derivatives(*args):
        xs, v = args[:-1], args[-1]
        with enable_grad():
            y = fn(*xs)
            grads = grad(y, [xs[i] for i in checked], v, create_graph=True, allow_unused=True)
        flat = [(g if g is not None else Tensor(xp_zeros(xs[i]))).reshape(-1)
                for g, i in zip(grads, checked)]
        return concat(flat, axis=0) if len(flat) > 1 else flat[0]

    return gradcheck(first_derivatives, inputs + (grad_outputs,), eps, atol, rtol, max_elements,
                     directions, seed, raise_exception)


def xp_zeros(t):
    """Zeros shaped like ``t``, on its device."""
    return backend.get_array_module(t.data).zeros(t.shape, dtype=t.dtype)

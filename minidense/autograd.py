"""Reverse-mode automatic differentiation: ``Tensor``, ``Function`` and ``backward``.

The graph
---------
Every op is a ``Function`` subclass with ``forward`` and ``backward`` on raw arrays.
Calling a Function on Tensors runs ``forward`` and, when a gradient is wanted,
records a node: the Function object itself.  A node remembers

* ``next_edges``: for each input, where its gradient must go: the producing node
  and which of its outputs it was (a non-leaf input), the leaf Tensor itself (a
  leaf input, whose ``.grad`` accumulates), or None (no gradient wanted);
* ``saved``: exactly the arrays its ``backward`` needs, declared by the op with
  ``save_for_backward``; nothing else.

A node does not hold its input Tensors, so an intermediate activation that no
backward needs is freed as soon as the Python code drops it.

The backward order
------------------
``Tensor.backward`` visits nodes in reverse topological order without recursion:
each node has a *generation*, one more than the newest node among its inputs, and a
heap pops the newest node first.  Every consumer of a node's outputs is newer than
the node, so by the time a node is popped all of its output gradients have arrived.
Gradients of a node's outputs live in a dict only until the node has run; saved
arrays are dropped after the node's backward unless ``retain_graph=True``.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import weakref

import numpy as np

from . import backend

# ---------------------------------------------------------------------------
# Grad mode: per thread, as in PyTorch, so that a thread evaluating under no_grad
# does not switch off the graph of another thread that is training.
# ---------------------------------------------------------------------------
class _ThreadState(threading.local):
    grad_enabled = True     # the class attribute is every new thread's starting value


_state = _ThreadState()


def is_grad_enabled() -> bool:
    return _state.grad_enabled


class _GradMode(contextlib.ContextDecorator):
    """Sets this thread's grad mode inside a ``with`` block or a decorated function,
    and restores it.

    As a decorator, one object serves every call of the function, so a recursive call
    enters it again before leaving: the modes to restore are kept on a stack.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.modes_to_restore = []

    def __enter__(self):
        self.modes_to_restore.append(_state.grad_enabled)
        _state.grad_enabled = self.enabled

    def __exit__(self, *exc):
        _state.grad_enabled = self.modes_to_restore.pop()
        return False


def no_grad():
    """Context manager and decorator: ops inside record no graph (in this thread)."""
    return _GradMode(False)


def enable_grad():
    return _GradMode(True)


# ---------------------------------------------------------------------------
# The observer: where a profiler hooks into the engine.  None, or an object with
# ``now()``, ``record_forward(name, start, kept_bytes)`` and
# ``record_backward(name, start)`` (``minidense.profiling.Profiler`` sets itself
# here while it records).  Process-wide: one profiler records every thread's ops.
# ---------------------------------------------------------------------------
observer = None

# The tracer: where an exporter hooks into the engine (``minidense.onnx`` sets it while it
# runs the model once).  None, or a callable ``tracer(function, inputs, outputs)`` called
# after every op's forward with the op object and its input and output Tensors.
# Process-wide, like the observer.
tracer = None


# ---------------------------------------------------------------------------
# Dtype rule
# ---------------------------------------------------------------------------
DEFAULT_FLOAT = np.float32


def _as_array(data, dtype, device):
    """The dtype rule, in one place.

    * An explicit ``dtype`` always wins.
    * A NumPy/CuPy array keeps its dtype (float64 stays float64 for gradient checks).
    * Python numbers and lists become float32 when they hold any float, int64 otherwise
      (PyTorch's rule, so training runs in float32 unless asked otherwise).
    Op results follow NumPy's promotion between the arrays; a Python scalar operand
    never changes the tensor's dtype.
    """
    if isinstance(data, Tensor):
        data = data.data
    if isinstance(data, np.generic):  # a NumPy scalar (from a full reduction) keeps its dtype
        data = np.asarray(data)
    if backend.is_array(data):  # every op output comes here: no device check when none is asked
        array = data if device is None else backend.to_device(data, device)
        return array if dtype is None else array.astype(dtype, copy=False)
    xp = backend.array_module(device or "cpu")
    try:
        return _from_python(data, dtype, xp)
    except TypeError:
        # CuPy values inside a list (``[loss1.data, loss2.data]``): NumPy cannot read
        # them, CuPy refusing implicit copies to the host, so copy them first.
        return _from_python(backend.host_nested(data), dtype, xp)


def _from_python(data, dtype, xp):
    """Numbers and (nested) lists as an ``xp`` array, by the rule above."""
    if dtype is None:
        probe = np.asarray(data)
        if probe.dtype.kind == "f":
            dtype = DEFAULT_FLOAT
        elif probe.dtype.kind in "iu":
            dtype = np.int64
        elif probe.dtype.kind == "b":
            dtype = np.bool_
        else:
            raise TypeError(f"tensor(): cannot make a tensor from data of type {probe.dtype}")
    return xp.asarray(data, dtype=dtype)


def _is_float(dtype) -> bool:
    return np.dtype(dtype).kind == "f"


def device_and_dtype(device, dtype):
    """``to(device, dtype)``'s arguments, where ``to(np.float64)`` (PyTorch's
    ``to(dtype)``) gives the dtype first: a dtype in the device's place moves over."""
    if device is not None and dtype is None and not (
            isinstance(device, str) and device.partition(":")[0] in backend.DEVICES):
        try:
            return None, np.dtype(device)
        except TypeError:
            pass
    return device, dtype


# ---------------------------------------------------------------------------
# Tensor
# ---------------------------------------------------------------------------
class Tensor:
    """An n-dimensional array that can remember how it was computed.

    ``data`` is the raw NumPy or CuPy array; ``grad`` is a Tensor (or None) filled by
    ``backward`` for leaves that require a gradient; ``grad_fn`` is the node that
    produced this tensor (None for a leaf).
    """

    __array_priority__ = 1000  # so that ndarray + Tensor calls Tensor.__radd__

    def __init__(self, data, requires_grad: bool = False, dtype=None, device=None):
        self.data = _as_array(data, dtype, device)
        self.grad: Tensor | None = None
        self.grad_fn: Function | None = None
        self.output_index = 0
        self._retain_grad = False
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

    # -- properties --------------------------------------------------------
    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def dtype(self):
        return self.data.dtype

    def size(self, dim=None):
        """The shape (PyTorch's ``torch.Size`` is a tuple too), or its entry ``dim``."""
        if dim is None:
            return tuple(self.data.shape)
        if not -self.data.ndim <= dim < self.data.ndim:
            raise IndexError(f"size: dim {dim} is out of range for a tensor of shape "
                             f"{tuple(self.data.shape)}")
        return self.data.shape[dim]

    def numel(self) -> int:
        """The number of elements (NumPy's ``size``)."""
        return int(self.data.size)

    def dim(self) -> int:
        return self.data.ndim

    @property
    def device(self) -> str:
        return backend.device_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self.grad_fn is None

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor: it has no first axis (use .item() for its value)")
        return len(self.data)

    def __bool__(self):
        # As NumPy and PyTorch: only a one-element tensor has a truth value.  Without
        # this, bool() would fall back to __len__, and ``assert a == b`` would pass for
        # any one-element a and b.
        if self.data.size != 1:
            raise RuntimeError(f"the truth value of a tensor of shape {tuple(self.shape)} is "
                               f"ambiguous: only one-element tensors have one (reduce it first, "
                               f"for example bool((a == b).data.all()))")
        return bool(self.data.reshape(()))

    def __repr__(self):
        body = np.array2string(self.numpy(), separator=", ", precision=4, threshold=20)
        extras = []
        if self.device != "cpu":
            extras.append(f"device='{self.device}'")
        if self.dtype != np.float32:
            extras.append(f"dtype={self.dtype}")
        if self.grad_fn is not None:
            extras.append(f"grad_fn=<{type(self.grad_fn).__name__}>")
        elif self.requires_grad:
            extras.append("requires_grad=True")
        return "tensor(" + ", ".join([body] + extras) + ")"

    # -- autograd ----------------------------------------------------------
    def requires_grad_(self, requires_grad: bool = True) -> "Tensor":
        flag = requires_grad
        if flag and not _is_float(self.dtype):
            raise TypeError(f"requires_grad: only floating-point tensors can require a gradient, "
                            f"got dtype {self.dtype} (shape {self.shape})")
        if not self.is_leaf and not flag:
            raise RuntimeError("requires_grad_(False) on a non-leaf tensor: use detach() instead")
        self.requires_grad = flag
        return self

    def retain_grad(self) -> None:
        """Keep ``.grad`` for this non-leaf tensor after backward."""
        self._retain_grad = True

    def backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``, as PyTorch's: ``gradient``
        is the gradient of a non-scalar ``self``; ``retain_graph`` keeps the saved arrays
        for a second backward.  Higher-order gradients (``create_graph``) and ``inputs``
        are not supported."""
        if create_graph:
            raise NotImplementedError("backward: create_graph=True (higher-order gradients) is "
                                      "not supported by minidense")
        if inputs is not None:
            raise NotImplementedError("backward: inputs= is not supported by minidense; "
                                      "gradients go to every leaf that requires one")
        run_backward(self, gradient, bool(retain_graph))

    def detach(self) -> "Tensor":
        """The same data (shared, not copied), cut from the graph."""
        return Tensor(self.data)

    def zero_grad(self) -> None:
        self.grad = None

    # -- conversions -------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """A host copy of the data as a NumPy array."""
        return np.array(backend.to_numpy(self.data), copy=True)

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item(): only a one-element tensor converts to a Python number, "
                             f"got shape {self.shape}")
        return self.data.reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    # Operators and methods built on ops (+, sum, reshape, to, ...) are attached by
    # ``minidense.functions``, which defines the ops: this module imports no op.


def tensor(data, requires_grad: bool = False, dtype=None, device=None) -> Tensor:
    """A new Tensor from a list, a number or an array (see the dtype rule above).

    Like ``torch.tensor``, it always copies: changing the array afterwards does not
    change the tensor.  ``md.as_tensor`` shares an array's memory instead."""
    if isinstance(data, Tensor):
        data = data.data
    if backend.is_array(data) and (device is None or backend.check_device(device) == backend.device_of(data)):
        data = data.copy()
    return Tensor(data, requires_grad=requires_grad, dtype=dtype, device=device)


def as_tensor(value, like: Tensor | None = None) -> Tensor:
    """``value`` as a Tensor; Python numbers take the dtype and device of ``like``."""
    if isinstance(value, Tensor):
        return value
    if like is not None and not backend.is_array(value):
        xp = backend.get_array_module(like.data)
        probe = np.asarray(value)
        dtype = like.dtype if (probe.dtype.kind != "f" or _is_float(like.dtype)) else DEFAULT_FLOAT
        if probe.ndim == 0:  # x * 0.5: a fill on the device, not a host-to-device copy
            return Tensor(xp.full((), value, dtype=dtype))
        return Tensor(xp.asarray(probe, dtype=dtype))
    return Tensor(value)


# ---------------------------------------------------------------------------
# Function: one node of the graph
# ---------------------------------------------------------------------------
_node_counter = itertools.count()


class Function:
    """Base class of every op.

    Subclasses implement ``forward(*arrays)`` and ``backward(*grad_outputs)`` on raw
    arrays.  ``forward`` returns an array or a tuple of arrays and calls
    ``save_for_backward`` with exactly the arrays ``backward`` will need; small
    non-array facts (shapes, axes) go in plain attributes.  ``backward`` returns one
    gradient per input (or None for an input that gets none); an output that got no
    gradient receives zeros.

    A Function object is one node of one graph, so it is called once: ``Mul()(a, b)``.
    A second call would overwrite the first call's saved arrays and edges, and the
    first graph's backward would silently use the second's, so it raises instead.
    """

    def __call__(self, *inputs):
        if "needs_input_grad" in self.__dict__:
            name = type(self).__name__
            raise RuntimeError(f"{name}: this Function object was already called; a Function "
                               f"is one node of the graph and is used once: make a new one "
                               f"for each call ({name}(...)(inputs))")
        tensors = [as_tensor(x) for x in inputs]
        _check_same_device(type(self).__name__, tensors)
        self.needs_input_grad = tuple(t.requires_grad for t in tensors)
        record = _state.grad_enabled and any(self.needs_input_grad)
        self.saved = ()
        prof = observer
        if prof is not None:
            start = prof.now()
        outputs = self.forward(*[t.data for t in tensors])
        single = not isinstance(outputs, tuple)
        if single:
            outputs = (outputs,)
        results = [Tensor(y) for y in outputs]
        if record:
            self.next_edges = tuple(_edge_of(t) for t in tensors)
            self.generation = max((e[0].generation for e in self.next_edges
                                   if e is not None and isinstance(e[0], Function)), default=-1) + 1
            self.output_meta = tuple((y.shape, y.dtype) for y in outputs)
            self.outputs = [weakref.ref(r) for r in results]
            self.order = next(_node_counter)
            for i, r in enumerate(results):
                if _is_float(r.dtype):
                    r.requires_grad = True
                    r.grad_fn = self
                    r.output_index = i
        else:
            self.saved = ()  # nothing will call backward: keep nothing
        if prof is not None:
            prof.record_forward(type(self).__name__, start,
                                sum(a.nbytes for a in self.saved if backend.is_array(a)))
        if tracer is not None:
            tracer(self, tensors, results)
        return results[0] if single else tuple(results)

    def save_for_backward(self, *arrays):
        self.saved = arrays

    def release(self):
        """Drop the arrays kept for backward (after backward, unless retain_graph)."""
        self.saved = None

    def forward(self, *xs):
        raise NotImplementedError

    def backward(self, *gys):
        raise NotImplementedError

    def __lt__(self, other):  # heap tie-break: newest node first
        return self.order > other.order


def _edge_of(t: Tensor):
    if not t.requires_grad:
        return None
    if t.grad_fn is not None:
        return (t.grad_fn, t.output_index)
    return (t, 0)


def _check_same_device(op_name: str, tensors) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        described = ", ".join(f"{t.device} {tuple(t.shape)}" for t in tensors)
        raise RuntimeError(f"{op_name}: all inputs must be on one device, got {described}; "
                           f"move them with .to(device) first")


# ---------------------------------------------------------------------------
# The backward pass
# ---------------------------------------------------------------------------
def _accumulate(existing, new):
    """Sum two gradient arrays without writing into either (they may be shared)."""
    return new if existing is None else existing + new


def _accumulate_into_grad(tensor: Tensor, grad) -> None:
    """Add ``grad`` to ``tensor.grad``: a leaf's, or a non-leaf's that asked for
    ``retain_grad``.  Sums across backward calls until the gradient is zeroed."""
    if grad.shape != tensor.shape:
        raise RuntimeError(f"backward: gradient of shape {grad.shape} for a tensor of shape "
                           f"{tensor.shape} (an op's backward returned the wrong shape)")
    if tensor.grad is None:
        # A copy, so that no .grad aliases another gradient or the upstream one.
        tensor.grad = Tensor(grad.astype(tensor.dtype, copy=True))
    else:
        tensor.grad.data += grad


def run_backward(root: Tensor, grad=None, retain_graph: bool = False) -> None:
    if not root.requires_grad:
        raise RuntimeError("backward: this tensor does not require a gradient and has no grad_fn "
                           "(did you forget requires_grad=True, or run under no_grad?)")
    xp = backend.get_array_module(root.data)
    if grad is None:
        if root.data.size != 1:
            raise RuntimeError(f"backward: grad can be implicitly created only for a scalar output, "
                               f"got shape {root.shape}; pass backward(gradient) with that shape")
        grad = xp.ones(root.shape, dtype=root.dtype)
    else:
        # In the tensor's dtype (as PyTorch does): a float64 gradient for a float32 loss
        # would otherwise turn the whole backward pass into float64.
        grad = _as_array(grad, root.dtype, root.device)
        if grad.shape != root.shape:
            raise RuntimeError(f"backward: grad has shape {grad.shape} but the tensor has shape "
                               f"{root.shape}")
    if root.grad_fn is None:
        _accumulate_into_grad(root, grad)
        return

    pending = {}   # node -> list of gradient arrays, one per output
    heap = []
    root_node = root.grad_fn
    pending[root_node] = [None] * len(root_node.output_meta)
    pending[root_node][root.output_index] = grad
    heapq.heappush(heap, (-root_node.generation, root_node))
    while heap:
        _, node = heapq.heappop(heap)
        # One expression, no local names: the gradients of the node's outputs and those
        # it computes for its inputs are freed as soon as they have been passed on.
        _pass_on(node, _call_backward(node, pending.pop(node), retain_graph), pending, heap)


def _call_backward(node: Function, grad_outputs, retain_graph: bool):
    """Run ``node.backward`` on the gradients of its outputs; one gradient per input."""
    if node.saved is None:
        raise RuntimeError(f"backward: {type(node).__name__} was already backpropagated and its "
                           f"saved arrays freed; pass retain_graph=True to the first backward "
                           f"to go through the graph twice")
    for ref, grad in zip(node.outputs, grad_outputs):  # retain_grad on non-leaf outputs
        output = ref()
        if output is not None and output._retain_grad and grad is not None:
            _accumulate_into_grad(output, grad)
    if any(g is None for g in grad_outputs):
        # Zeros on the node's own device (a graph can cross devices with .to()): the
        # array module of a gradient that arrived; a queued node has at least one.
        xp = backend.get_array_module(next(g for g in grad_outputs if g is not None))
        grad_outputs = [g if g is not None else xp.zeros(shape, dtype)
                        for g, (shape, dtype) in zip(grad_outputs, node.output_meta)]
    prof = observer
    if prof is None:
        grad_inputs = node.backward(*grad_outputs)
    else:
        start = prof.now()
        grad_inputs = node.backward(*grad_outputs)
        prof.record_backward(type(node).__name__, start)
    if not isinstance(grad_inputs, tuple):
        grad_inputs = (grad_inputs,)
    if len(grad_inputs) != len(node.next_edges):
        raise RuntimeError(f"{type(node).__name__}.backward returned {len(grad_inputs)} gradients "
                           f"for {len(node.next_edges)} inputs")
    if not retain_graph:
        node.release()
    return grad_inputs


def _pass_on(node: Function, grad_inputs, pending, heap) -> None:
    """Send each input gradient along its edge: into a leaf's ``.grad``, or into the
    producing node's slot in ``pending`` (summed with what has already arrived there),
    queueing that node when its first gradient arrives."""
    for edge, grad in zip(node.next_edges, grad_inputs):
        if edge is None or grad is None:
            continue
        target, index = edge
        if isinstance(target, Tensor):
            _accumulate_into_grad(target, grad)
        else:
            slots = pending.get(target)
            if slots is None:
                slots = pending[target] = [None] * len(target.output_meta)
                heapq.heappush(heap, (-target.generation, target))
            slots[index] = _accumulate(slots[index], grad)

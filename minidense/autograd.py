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
    backward_mode = None    # inside a backward pass: (create_graph, returns gradients)


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
        """Accumulate d self / d leaf into every leaf's ``.grad`` (``gradient``: the
        upstream gradient, needed unless self has one element), as PyTorch's.
        ``create_graph``: the gradients are Tensors with a graph of their own, to
        differentiate again; ``retain_graph`` (default: ``create_graph``) keeps the saved
        arrays for another backward; ``inputs``: only these tensors' ``.grad``."""
        if inputs is None:
            run_backward([self], [gradient], retain_graph, create_graph)
            return
        inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
        grads = run_backward([self], [gradient], retain_graph, create_graph, inputs, allow_unused=True)
        for t, g in zip(inputs, grads):
            if g is not None:
                _accumulate_into_grad(t, g if create_graph else g.data, create_graph)

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
        arrays = [t.data for t in tensors]
        outputs = self.forward(*arrays)
        single = not isinstance(outputs, tuple)
        if single:
            outputs = (outputs,)
        if record:
            # Which saved arrays are this node's inputs or outputs (a few identity
            # checks): ``saved_tensors`` gives those back as tensors of the graph, so
            # that a differentiable backward can be differentiated through them.
            self._saved_roles = tuple(_role(a, arrays, outputs) for a in self.saved)
            results = self._record(tuple(_edge_of(t) for t in tensors), outputs)
        else:
            self.saved = ()  # nothing will call backward: keep nothing
            results = [Tensor(y) for y in outputs]
        if prof is not None:
            prof.record_forward(type(self).__name__, start,
                                sum(a.nbytes for a in self.saved if backend.is_array(a)))
        if tracer is not None:
            tracer(self, tensors, results)
        return results[0] if single else tuple(results)

    def _record(self, edges, outputs):
        """Make this object the node of ``outputs`` (arrays), with ``edges`` to where the
        gradients of its inputs go; returns the output Tensors."""
        self.next_edges = edges
        self.generation = max((e[0].generation for e in edges
                               if e is not None and isinstance(e[0], Function)), default=-1) + 1
        self.output_meta = tuple((y.shape, y.dtype) for y in outputs)
        results = [Tensor(y) for y in outputs]
        self.outputs = [weakref.ref(r) for r in results]
        self.order = next(_node_counter)
        for i, r in enumerate(results):
            if _is_float(r.dtype):
                r.requires_grad = True
                r.grad_fn = self
                r.output_index = i
        return results

    def save_for_backward(self, *arrays):
        self.saved = arrays

    def saved_tensors(self):
        """The saved arrays as Tensors, for ``differentiable_backward``: an array that is
        one of this node's inputs or outputs comes back as that tensor of the graph
        (a gradient computed from it can be differentiated again), any other array as
        a constant.  So an op must not compute its differentiable backward from a
        saved array derived from its inputs (a mean, 1/std): those are constants here,
        and the second derivative would silently miss their dependence; recompute
        them from the inputs with ops instead."""
        if self.saved is None:
            raise RuntimeError(f"{type(self).__name__}: the saved arrays were freed by an "
                               f"earlier backward; pass retain_graph=True (create_graph=True "
                               f"implies it) to go through the graph twice")
        return tuple(None if a is None else self._as_graph_tensor(a, role)
                     for a, role in zip(self.saved, self._saved_roles))

    def _as_graph_tensor(self, array, role):
        if role is None:
            return Tensor(array)
        kind, index = role
        if kind == "output":
            edge = (self, index)
        else:
            edge = self.next_edges[index]
            if edge is None:
                return Tensor(array)
            if isinstance(edge[0], Tensor):   # a leaf: the tensor itself
                return edge[0]
        t = Tensor(array)
        t.requires_grad, (t.grad_fn, t.output_index) = True, edge
        return t

    differentiable = False   # True in ops that implement differentiable_backward

    def differentiable_backward(self, *grad_outputs):
        """The same gradients as ``backward``, computed from Tensors with ops, so that
        they are recorded as a graph and can be differentiated again
        (``create_graph=True``).  ``grad_outputs`` are Tensors; the node's saved arrays
        are ``saved_tensors()``.  Ops that implement it set ``differentiable = True``;
        for the others the backward pass uses ``backward`` and marks what it computes
        as differentiable once only (see ``once_differentiable``)."""
        raise NotImplementedError

    def release(self):
        """Drop the arrays kept for backward (after backward, unless retain_graph)."""
        self.saved = None

    def forward(self, *xs):
        raise NotImplementedError

    def backward(self, *gys):
        raise NotImplementedError

    def __lt__(self, other):  # heap tie-break: newest node first
        return self.order > other.order


def _role(array, inputs, outputs):
    """("input", i) or ("output", j) when ``array`` is that array itself, else None."""
    if array is None:
        return None
    for i, a in enumerate(inputs):
        if a is array:
            return ("input", i)
    for j, a in enumerate(outputs):
        if a is array:
            return ("output", j)
    return None


def once_differentiable(cls):
    """Marks a Function subclass whose ``backward`` works on raw arrays only, as
    PyTorch's ``once_differentiable``: its gradients are right, and a second backward
    that reaches them raises an error naming the op.  (Every op without a
    ``differentiable_backward`` behaves so; this says it explicitly.)"""
    if cls.differentiable:
        raise TypeError(f"once_differentiable: {cls.__name__} has a differentiable_backward")
    cls.once_differentiable = True
    return cls


class _NotDifferentiableTwice(Function):
    """The node under gradients that an op computed with its raw ``backward`` during a
    ``create_graph=True`` pass: a second backward that reaches it raises, naming the op,
    instead of returning a silently wrong (zero) second derivative."""

    def __init__(self, op_name):
        self.op_name = op_name
        self.saved, self._saved_roles, self.needs_input_grad = (), (), ()

    def backward(self, *grad_outputs):
        raise RuntimeError(f"{self.op_name} is not differentiable twice: its backward works on "
                           f"raw arrays (it has no differentiable_backward), so the gradients it "
                           f"computed under create_graph=True cannot be differentiated again")


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
#
# Gradients flow as raw arrays, each node's ``backward`` computing its inputs'
# gradients from its outputs'.  Under ``create_graph=True`` they flow as Tensors
# instead: each node's ``differentiable_backward`` computes them with ops, which are
# recorded (grad mode is on), so the gradients have a graph of their own and can be
# differentiated again.  The loop is the same either way.
# ---------------------------------------------------------------------------
def run_backward(roots, grad_outputs, retain_graph=None, create_graph=False, inputs=None,
                 allow_unused=False):
    """The backward pass from ``roots`` with upstream gradients ``grad_outputs`` (None:
    ones, for a one-element root).  Without ``inputs``, every leaf's ``.grad``
    accumulates its gradient; with ``inputs``, their gradients are returned instead (a
    tuple, None for an input that gets none) and no ``.grad`` changes."""
    retain_graph = create_graph if retain_graph is None else retain_graph
    grads = [_root_gradient(r, g, create_graph) for r, g in zip(roots, grad_outputs)]
    sink = _GradientSink(inputs, roots, allow_unused)
    pending = {}   # node -> list of gradients (arrays or Tensors), one per output
    heap = []
    with (enable_grad() if create_graph else no_grad()), _backward_mode(create_graph, inputs is not None):
        for root, grad in zip(roots, grads):
            _send(root.grad_fn, root.output_index, root, grad, pending, heap, sink, create_graph)
        while heap:
            _, node = heapq.heappop(heap)
            if not sink.needs(node):
                sink.capture_outputs(node, pending.pop(node), create_graph)
                continue
            # One expression, no local names: the gradients of the node's outputs and
            # those it computes for its inputs are freed as soon as they are passed on.
            _pass_on(node, _call_backward(node, pending.pop(node), retain_graph, create_graph, sink),
                     pending, heap, sink, create_graph)
    return sink.result()


@contextlib.contextmanager
def _backward_mode(create_graph, returns_gradients):
    previous, _state.backward_mode = _state.backward_mode, (create_graph, returns_gradients)
    try:
        yield
    finally:
        _state.backward_mode = previous


def backward_mode():
    """In a backward pass (this thread's): (create_graph, whether it returns gradients, as
    ``grad`` does, rather than accumulating ``.grad``); None outside one."""
    return _state.backward_mode


def grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False,
         allow_unused=False):
    """The gradients of ``outputs`` with respect to ``inputs``, as a tuple of Tensors,
    as ``torch.autograd.grad``: no ``.grad`` changes.  ``grad_outputs``: the upstream
    gradients (None: ones, for one-element outputs).  ``create_graph``: the gradients
    have a graph, to differentiate again; ``retain_graph`` defaults to it.
    ``allow_unused``: an input that the outputs do not depend on gets None instead of
    an error."""
    outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    single = isinstance(inputs, Tensor)
    inputs = [inputs] if single else list(inputs)
    if grad_outputs is None or isinstance(grad_outputs, Tensor) or backend.is_array(grad_outputs):
        grad_outputs = [grad_outputs] * len(outputs) if grad_outputs is None else [grad_outputs]
    grad_outputs = list(grad_outputs)
    if len(grad_outputs) != len(outputs):
        raise ValueError(f"grad: {len(grad_outputs)} grad_outputs for {len(outputs)} outputs")
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor) or not t.requires_grad:
            raise RuntimeError(f"grad: input {i} does not require a gradient (shape "
                               f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__})")
    return run_backward(outputs, grad_outputs, retain_graph, create_graph, inputs, allow_unused)


def _root_gradient(root, grad, create_graph):
    """The upstream gradient of ``root``: an array, or a Tensor under create_graph."""
    if not isinstance(root, Tensor) or not root.requires_grad:
        raise RuntimeError("backward: this tensor does not require a gradient and has no grad_fn "
                           "(did you forget requires_grad=True, or run under no_grad?)")
    if grad is None:
        if root.data.size != 1:
            raise RuntimeError(f"backward: a gradient can be implicitly created only for a scalar "
                               f"output, got shape {tuple(root.shape)}; pass the "
                               f"upstream gradient (grad_outputs, or backward(gradient)) of that "
                               f"shape")
        grad = backend.get_array_module(root.data).ones(root.shape, dtype=root.dtype)
    elif isinstance(grad, Tensor):
        if grad.shape != root.shape:
            raise RuntimeError(f"backward: the upstream gradient has shape {tuple(grad.shape)} "
                               f"but the output has shape {tuple(root.shape)}")
        if create_graph:
            return grad if grad.dtype == root.dtype else grad.to(dtype=root.dtype)
        grad = grad.data
    # In the tensor's dtype (as PyTorch does): a float64 gradient for a float32 loss
    # would otherwise turn the whole backward pass into float64.
    grad = _as_array(grad, root.dtype, root.device)
    if grad.shape != root.shape:
        raise RuntimeError(f"backward: the upstream gradient has shape {tuple(grad.shape)} but "
                           f"the output has shape {tuple(root.shape)}")
    return Tensor(grad) if create_graph else grad


class _GradientSink:
    """Where gradients end up: leaves' ``.grad`` (``inputs`` None), or, for ``grad``, the
    gradients of ``inputs`` only.  Then the pass runs only the nodes through which a
    gradient reaches an input (``needs``), and stops at an input that is not a leaf."""

    def __init__(self, inputs, roots, allow_unused):
        self.inputs, self.allow_unused = inputs, allow_unused
        if inputs is None:
            return
        self.grads = [None] * len(inputs)
        self.leaves, self.slots = {}, {}      # id(leaf) / (node, output index) -> positions
        for k, t in enumerate(inputs):
            if t.grad_fn is None:
                self.leaves.setdefault(id(t), []).append(k)
            else:
                self.slots.setdefault((t.grad_fn, t.output_index), []).append(k)
        self.needed = _nodes_reaching(roots, self.leaves, {n for n, _ in self.slots})

    def needs(self, node) -> bool:
        return self.inputs is None or node in self.needed

    def leaf(self, tensor, grad, create_graph):
        if self.inputs is None:
            _accumulate_into_grad(tensor, grad, create_graph)
        else:
            for k in self.leaves.get(id(tensor), ()):
                self.grads[k] = _accumulate(self.grads[k], grad)

    def capture_outputs(self, node, grads, create_graph):
        if self.inputs is None:
            for ref, g in zip(node.outputs, grads):   # retain_grad on non-leaf outputs
                output = ref()
                if output is not None and output._retain_grad and g is not None:
                    _accumulate_into_grad(output, g, create_graph)
            return
        for index, g in enumerate(grads):
            for k in self.slots.get((node, index), ()):
                self.grads[k] = _accumulate(self.grads[k], g)

    def capture_root(self, root, grad):
        """A root that is itself one of the inputs (or a leaf): d root / d root."""
        if root.grad_fn is None:
            self.leaf(root, grad, isinstance(grad, Tensor))

    def result(self):
        if self.inputs is None:
            return None
        out = []
        for k, g in enumerate(self.grads):
            if g is None and not self.allow_unused:
                t = self.inputs[k]
                raise RuntimeError(f"grad: input {k} (shape {tuple(t.shape)}) gets no gradient: the "
                                   f"outputs do not depend on it; pass allow_unused=True to get "
                                   f"None for it")
            out.append(g if g is None or isinstance(g, Tensor) else Tensor(g))
        return tuple(out)


def _nodes_reaching(roots, leaf_ids, target_nodes):
    """The nodes from whose backward a gradient reaches a target: a leaf in
    ``leaf_ids`` or an output of a node in ``target_nodes`` (depth first, no recursion)."""
    reaches = {}
    for root in roots:
        if root.grad_fn is None:
            continue
        stack = [(root.grad_fn, False)]
        while stack:
            node, children_done = stack.pop()
            if node in reaches and not children_done:
                continue
            edges = [e for e in node.next_edges if e is not None]
            if not children_done:
                reaches[node] = False   # open: a graph has no cycles, so no revisit
                stack.append((node, True))
                stack.extend((e[0], False) for e in edges
                             if isinstance(e[0], Function) and e[0] not in reaches)
                continue
            reaches[node] = any(id(e[0]) in leaf_ids if isinstance(e[0], Tensor)
                                else (e[0] in target_nodes or reaches.get(e[0], False))
                                for e in edges)
    return {node for node, yes in reaches.items() if yes}


def _send(node, index, root, grad, pending, heap, sink, create_graph):
    """Queue a root's gradient: into its node's slot, or straight to a leaf root."""
    if node is None:
        sink.capture_root(root, grad)
        return
    _queue(node, index, grad, pending, heap)


def _queue(node, index, grad, pending, heap):
    slots = pending.get(node)
    if slots is None:
        slots = pending[node] = [None] * len(node.output_meta)
        heapq.heappush(heap, (-node.generation, node))
    slots[index] = _accumulate(slots[index], grad)


def _accumulate(existing, new):
    """Sum two gradients without writing into either (they may be shared); for Tensors,
    an ``Add`` node of the gradient's graph."""
    return new if existing is None else existing + new


def _accumulate_into_grad(tensor: Tensor, grad, create_graph=False) -> None:
    """Add ``grad`` to ``tensor.grad``: a leaf's, or a non-leaf's that asked for
    ``retain_grad``.  Sums across backward calls until the gradient is zeroed; under
    create_graph out of place, so the graph of an earlier gradient stays as it was."""
    if grad.shape != tensor.shape:
        raise RuntimeError(f"backward: gradient of shape {grad.shape} for a tensor of shape "
                           f"{tensor.shape} (an op's backward returned the wrong shape)")
    if isinstance(grad, Tensor):
        if grad.dtype != tensor.dtype:
            grad = grad.to(dtype=tensor.dtype)
        # A new node (a copy), so that no .grad aliases another gradient or the upstream one.
        tensor.grad = grad.clone() if tensor.grad is None else tensor.grad + grad
    elif tensor.grad is None:
        # A copy, so that no .grad aliases another gradient or the upstream one.
        tensor.grad = Tensor(grad.astype(tensor.dtype, copy=True))
    elif tensor.grad.grad_fn is not None:
        tensor.grad = Tensor(tensor.grad.data + grad)   # after a create_graph pass: out of place
    else:
        tensor.grad.data += grad


def _call_backward(node: Function, grad_outputs, retain_graph: bool, create_graph: bool, sink):
    """Run the node's backward on the gradients of its outputs; one gradient per input."""
    sink.capture_outputs(node, grad_outputs, create_graph)
    if node.saved is None:
        raise RuntimeError(f"backward: {type(node).__name__} was already backpropagated and its "
                           f"saved arrays freed; pass retain_graph=True to the first backward "
                           f"to go through the graph twice")
    if any(g is None for g in grad_outputs):
        # Zeros on the node's own device (a graph can cross devices with .to()): the
        # array module of a gradient that arrived; a queued node has at least one.
        some = next(g for g in grad_outputs if g is not None)
        xp = backend.get_array_module(some.data if isinstance(some, Tensor) else some)
        grad_outputs = [g if g is not None else _wrap(xp.zeros(shape, dtype), create_graph)
                        for g, (shape, dtype) in zip(grad_outputs, node.output_meta)]
    prof = observer
    if prof is not None:
        start = prof.now()
    if not create_graph:
        grad_inputs = node.backward(*grad_outputs)
    elif node.differentiable:
        grad_inputs = node.differentiable_backward(*grad_outputs)
    else:
        grad_inputs = _once_differentiable_backward(node, grad_outputs)
    if prof is not None:
        prof.record_backward(type(node).__name__, start)
    if not isinstance(grad_inputs, tuple):
        grad_inputs = (grad_inputs,)
    if len(grad_inputs) != len(node.next_edges):
        raise RuntimeError(f"{type(node).__name__}.backward returned {len(grad_inputs)} gradients "
                           f"for {len(node.next_edges)} inputs")
    if not retain_graph:
        node.release()
    return grad_inputs


def _wrap(array, create_graph):
    return Tensor(array) if create_graph else array


def _once_differentiable_backward(node, grad_outputs):
    """Under create_graph, an op with a raw backward only: its gradients, computed from
    the arrays, under a node that raises if a second backward reaches it.  That node's
    edges are those of everything the gradients depend on: the upstream gradients and
    the op's inputs."""
    raw = node.backward(*[g.data for g in grad_outputs])
    raw = raw if isinstance(raw, tuple) else (raw,)
    edges = tuple(_edge_of(g) for g in grad_outputs if g.requires_grad)
    edges += tuple(e for e in node.next_edges if e is not None)
    present = [g for g in raw if g is not None]
    if not edges or not present:
        return tuple(None if g is None else Tensor(g) for g in raw)
    made = iter(_NotDifferentiableTwice(type(node).__name__)._record(edges, present))
    return tuple(None if g is None else next(made) for g in raw)


def _pass_on(node: Function, grad_inputs, pending, heap, sink, create_graph) -> None:
    """Send each input gradient along its edge: to a leaf (``sink``), or into the
    producing node's slot in ``pending`` (summed with what has already arrived there),
    queueing that node when its first gradient arrives."""
    for edge, g in zip(node.next_edges, grad_inputs):
        if edge is None or g is None:
            continue
        target, index = edge
        if isinstance(target, Tensor):
            sink.leaf(target, g, create_graph)
        else:
            _queue(target, index, g, pending, heap)

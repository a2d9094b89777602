"""``md.onnx.export``: a model as an ONNX file, for ONNX Runtime, TensorRT, OpenVINO and
the other runtimes that read ONNX (PyTorch's ``torch.onnx.export``, its arguments).

    model.eval()
    md.onnx.export(model, md.randn(1, 3, 32, 32), "model.onnx",
                   input_names=["input"], output_names=["logits"],
                   dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})

How the graph is found
----------------------
The model runs once on ``args``, in eval mode and under ``no_grad``, while
``autograd.tracer`` hands every op to this module: the op object (its settings: stride,
padding, epsilon ...) and its input and output Tensors.  Tensors link the ops into a
graph; a Tensor no op made and that is not an input is a constant: a parameter or buffer
(an initializer under its state-dict name) or another constant.  Each op then becomes
ONNX nodes by the table ``CONVERTERS`` (op class -> converter); an op the table lacks
is refused by name.  No model has code of its own here, so users' models built from
minidense's ops export too, and so does the memory-efficient DenseNet (under
``no_grad``, ``md.recompute`` just calls its function: the same ops, the same graph).

The batch dimension
-------------------
A dim named in ``dynamic_axes`` is a named dim in the file (``dim_param``).  The
exporter follows dim 0 of the inputs named dynamic there (the batch) through the
graph, so that the traced batch size never appears in it: ``x.view(x.size(0), -1)``
becomes ``Flatten(axis=1)``, other reshapes that keep the batch ``Reshape`` with 0 (copy
the dim) in its place, and a reshape that merges or moves the batch, or a constant
whose first dim is the traced batch size beside a batched input of as many dims, is
refused (trace at a batch of 2 or more for that check).  Other dims are written as
traced (a reshape fixes the image size it saw).

The known pitfalls, each handled and tested (tests/test_onnx.py)
----------------------------------------------------------------
* AveragePool's ``count_include_pad`` defaults to 0 in ONNX; minidense counts the zero
  padding (PyTorch's default): always written as 1.
* MaxPool pads with -inf in ONNX as in minidense: nothing to convert, but tested.
* BatchNormalization's epsilon defaults to 1e-5: always the model's own.
* ``ceil_mode``: minidense has floor windows only; written as 0 explicitly.
* ``make_model`` stamps the newest IR version, which older runtimes refuse: the IR
  version set is the oldest that the chosen opset needs.

``import minidense`` does not import onnx: ``export`` imports it on first use and names
the extra to install when it is missing (``pip install 'minidense[onnx]'``).
"""
from __future__ import annotations

import json
import threading

import numpy as np

from . import autograd, backend
from ._version import __version__
from .autograd import Tensor, no_grad
from .files import atomic_write
from .functions import activation, array, connection, math, noise, normalization, pooling
from .functions.softmax import LogSoftmax, Softmax
from .functions._utils import pair
from .models import densenet

# The opsets whose operators the converters write (Clip, Pad, Split, ReduceSum with
# their bounds, widths, sizes and axes as inputs: opset 13 on).
MIN_OPSET = 13
DEFAULT_OPSET = 17
INT64_MAX, INT64_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min
INSTALL_HINT = "pip install 'minidense[onnx]'"
# Where a value's batch is: in dim 0; somewhere else (its shape depends on the batch size,
# but not through dim 0: after a transpose, or a concatenation along dim 0); nowhere.
BATCH_DIM0, BATCH_MOVED, NO_BATCH = "dim 0", "moved", "none"


def _onnx():
    """The onnx package, imported now (never by ``import minidense``)."""
    try:
        import onnx
    except ImportError as error:
        raise ImportError(f"md.onnx.export needs the onnx package: {INSTALL_HINT} "
                          f"(the onnx extra; onnxruntime is in it too, to run the file)") from error
    return onnx


class ExportError(ValueError):
    """A model that cannot be exported as it is: an op with no ONNX counterpart, a model
    in training mode, a batch size the graph would fix."""


# ---------------------------------------------------------------------------
# Recording: autograd.tracer while the model runs once
# ---------------------------------------------------------------------------
class _Recorder:
    """Keeps every op call of one thread (the exporting one: another thread's ops are
    none of this graph's) with its Tensors, which stay alive until the export ends, so
    that no Tensor's id is reused by another."""

    def __init__(self):
        self.thread = threading.get_ident()
        self.calls = []

    def __call__(self, function, inputs, outputs):
        if threading.get_ident() == self.thread:
            self.calls.append((function, list(inputs), list(outputs)))


_tracing = threading.Lock()   # one export traces at a time: the tracer is process-wide


def trace(model, args):
    """Run ``model(*args)`` once under ``no_grad`` and record its ops: (calls, outputs),
    calls a list of (op, input Tensors, output Tensors) in the order they ran."""
    if not _tracing.acquire(blocking=False):
        raise RuntimeError("md.onnx.export: another export is already tracing (the engine's "
                           "tracer is process-wide)")
    recorder = _Recorder()
    try:
        if autograd.tracer is not None:
            raise RuntimeError("md.onnx.export: autograd.tracer is already set by someone else")
        autograd.tracer = recorder
        try:
            with no_grad():
                outputs = model(*args)
        finally:
            autograd.tracer = None
    finally:
        _tracing.release()
    return recorder.calls, outputs


# ---------------------------------------------------------------------------
# The graph under construction
# ---------------------------------------------------------------------------
class _Graph:
    """ONNX nodes, initializers, the value name of every Tensor seen and where its
    batch is.  Converters use ``name``, ``array``, ``ints``, ``scalar``, ``node``,
    ``alias``, ``batch_of`` and ``refuse``."""

    def __init__(self, onnx, named_tensors, named_arrays, batch_size, export_params):
        self.onnx = onnx
        self.named_tensors, self.named_arrays = named_tensors, named_arrays
        self.batch_size, self.export_params = batch_size, export_params
        self.nodes, self.initializers, self.parameter_inputs = [], [], []
        self.values = {}      # id(Tensor) -> value name
        self.arrays = {}      # id(array) -> value name (op attributes: BN running statistics)
        self.batch = {}       # id(Tensor) -> BATCH_DIM0, BATCH_MOVED or NO_BATCH
        self.used = set()
        self.counts = {}
        self.op = None        # the op being converted, for error messages
        self.outputs = set()  # the graph outputs' names, once named

    # -- names ---------------------------------------------------------------
    def unique(self, base):
        name, k = base, 1
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    def fresh(self, op_type):
        self.counts[op_type] = self.counts.get(op_type, 0) + 1
        return self.unique(f"{op_type}_{self.counts[op_type]}")

    def input(self, tensor, name, batched):
        self.values[id(tensor)] = self.unique(name)
        self.batch[id(tensor)] = BATCH_DIM0 if batched else NO_BATCH

    def name(self, tensor):
        """The value name of ``tensor``: an op's output or an input seen before, else a
        constant made an initializer now (a parameter or buffer under its state-dict
        name)."""
        key = id(tensor)
        if key not in self.values:
            self.values[key] = self._initializer(tensor.data, self.named_tensors.get(key))
            self.batch[key] = NO_BATCH
        return self.values[key]

    def array(self, values, dtype=None):
        """The value name of an array an op holds as an attribute (BN's running mean and
        variance), named after its buffer; in ``dtype`` when given."""
        key = (id(values), dtype)
        if key not in self.arrays:
            data = values if dtype is None else backend.to_numpy(values).astype(dtype, copy=False)
            self.arrays[key] = self._initializer(data, self.named_arrays.get(id(values)))
        return self.arrays[key]

    def _initializer(self, data, state_name):
        host = np.ascontiguousarray(backend.to_numpy(data))
        name = self.unique(state_name or f"constant_{len(self.initializers) + 1}")
        tensor = self.onnx.numpy_helper.from_array(host, name)
        if state_name is not None and not self.export_params:
            self.parameter_inputs.append(self.onnx.helper.make_tensor_value_info(
                name, tensor.data_type, list(host.shape)))
        else:
            self.initializers.append(tensor)
        return name

    def ints(self, values):
        """An int64 1-D constant (shapes, axes, pads) and its value name."""
        return self._constant(np.asarray(values, dtype=np.int64).reshape(-1))

    def scalar(self, value, dtype):
        """A 0-d constant of ``dtype`` (Clip's bounds, Pad's value) and its value name."""
        return self._constant(np.asarray(value, dtype=dtype))

    def _constant(self, host):
        name = self.unique(f"constant_{len(self.initializers) + 1}")
        self.initializers.append(self.onnx.numpy_helper.from_array(host, name))
        return name

    # -- nodes ---------------------------------------------------------------
    def node(self, op_type, inputs, outputs=None, **attributes):
        """Append a node; ``outputs``: the op's output Tensors it computes (named here),
        or None for one intermediate value.  Returns the output names."""
        if outputs is None:
            names = [self.fresh(op_type)]
        else:
            names = [self.fresh(op_type) for _ in outputs]
            for tensor, name in zip(outputs, names):
                self.values[id(tensor)] = name
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), names,
                                                     name=self.unique(f"node_{names[0]}"),
                                                     **attributes))
        return names

    def alias(self, output, source):
        """``output`` is ``source``'s value (an identity op: no node)."""
        self.values[id(output)] = self.name(source)
        self.batch[id(output)] = self.batch_of(source)

    def batch_of(self, tensor):
        return self.batch.get(id(tensor), NO_BATCH)

    def batched(self, tensor):
        return self.batch_of(tensor) == BATCH_DIM0

    def refuse(self, why):
        raise ExportError(f"md.onnx.export: {type(self.op).__name__}: {why}")


# ---------------------------------------------------------------------------
# The converters: op -> ONNX nodes.  Each returns where its outputs' batch is, or None
# for the rule of the ops that keep dim 0 (element-wise, convolution, pooling ...): in
# dim 0 when an input has it there.
# ---------------------------------------------------------------------------
def _elementwise(op_type):
    def convert(g, op, inputs, outputs):
        g.node(op_type, [g.name(t) for t in inputs], outputs)
    return convert


def _identity(g, op, inputs, outputs):
    g.alias(outputs[0], inputs[0])
    return g.batch_of(inputs[0])


def _conv(g, op, inputs, outputs):
    x, w = inputs[:2]
    (ph, pw), kernel = op.padding, w.shape[2:]
    # Grouped and dilated convolutions (when the op has them): ONNX's group and dilations.
    dilation = pair(getattr(op, "dilation", 1), "dilation")
    g.node("Conv", [g.name(t) for t in inputs], outputs, kernel_shape=list(kernel),
           strides=list(op.stride), pads=[ph, pw, ph, pw], dilations=list(dilation),
           group=int(getattr(op, "groups", 1)))


def _linear(g, op, inputs, outputs):
    x, w = inputs[:2]
    if x.ndim == 2:   # y = x W^T + b, Gemm's transB
        g.node("Gemm", [g.name(t) for t in inputs], outputs, transB=1)
        return
    (w_t,) = g.node("Transpose", [g.name(w)], perm=[1, 0])
    if len(inputs) == 2:
        g.node("MatMul", [g.name(x), w_t], outputs)
    else:
        (product,) = g.node("MatMul", [g.name(x), w_t])
        g.node("Add", [product, g.name(inputs[2])], outputs)


def _batch_norm(g, op, inputs, outputs):
    x, gamma, beta = inputs
    if op.training:
        g.refuse("normalises with the batch's statistics (a model in training mode, or a "
                 "BatchNorm2d with track_running_stats=False); ONNX's BatchNormalization "
                 "uses running statistics: call model.eval() and give every BN its running "
                 "statistics")
    names = [g.name(x), g.name(gamma), g.name(beta),
             g.array(op.running_mean, x.dtype), g.array(op.running_var, x.dtype)]
    if not op.relu:
        g.node("BatchNormalization", names, outputs, epsilon=float(op.eps))
        return
    # The fused BN-ReLU: two nodes (runtimes fuse them again themselves).
    (normalised,) = g.node("BatchNormalization", names, epsilon=float(op.eps))
    g.node("Relu", [normalised], outputs)


def _clip(low_name, high_name):
    def convert(g, op, inputs, outputs):
        x = inputs[0]
        bounds = [getattr(op, low_name), getattr(op, high_name)]
        g.node("Clip", [g.name(x)] + [g.scalar(b, x.dtype) if b is not None else ""
                                      for b in bounds], outputs)
    return convert


def _average_pool(g, op, inputs, outputs):
    (ph, pw) = op.padding
    # count_include_pad=1: minidense (and PyTorch by default) count the zero padding in
    # the mean; ONNX's default, 0, does not (0.49 off at padding 1).
    g.node("AveragePool", [g.name(inputs[0])], outputs, kernel_shape=list(op.kernel),
           strides=list(op.stride), pads=[ph, pw, ph, pw], count_include_pad=1, ceil_mode=0)


def _max_pool(g, op, inputs, outputs):
    (ph, pw) = op.padding
    # ONNX pads a max pooling with -inf, as minidense does.
    g.node("MaxPool", [g.name(inputs[0])], outputs, kernel_shape=list(op.kernel),
           strides=list(op.stride), pads=[ph, pw, ph, pw], ceil_mode=0)


def _global_average_pool(g, op, inputs, outputs):
    # ONNX keeps the 1x1 map: (N, C, 1, 1); minidense's op gives (N, C).
    (pooled,) = g.node("GlobalAveragePool", [g.name(inputs[0])])
    g.node("Flatten", [pooled], outputs, axis=1)


def _reshape(g, op, inputs, outputs):
    (x,), (y,) = inputs, outputs
    if g.batch_of(x) == NO_BATCH:
        g.node("Reshape", [g.name(x), g.ints(y.shape)], outputs)
        return NO_BATCH
    if g.batch_of(x) == BATCH_MOVED:
        g.refuse(f"reshapes {tuple(x.shape)} to {tuple(y.shape)}, a value whose shape "
                 f"depends on the batch size (traced at {g.batch_size}) outside dim 0: the "
                 f"graph would run at that batch size only; reshape while the batch is dim 0, "
                 f"or export without a dynamic batch")
    if y.ndim == 0 or y.shape[0] != x.shape[0]:
        g.refuse(f"reshapes {tuple(x.shape)} to {tuple(y.shape)}, which merges or moves the "
                 f"batch dim (traced at {x.shape[0]}): the graph would run at that batch size "
                 f"only; keep dim 0 as it is (x.view(x.size(0), -1)), or export without a "
                 f"dynamic batch")
    if y.ndim == 2:   # x.view(x.size(0), -1), x.flatten(1)
        g.node("Flatten", [g.name(x)], outputs, axis=1)
    else:             # 0: dim 0 copied from the input at run time
        g.node("Reshape", [g.name(x), g.ints((0,) + tuple(y.shape[1:]))], outputs)
    return BATCH_DIM0


def _transpose(g, op, inputs, outputs):
    x = inputs[0]
    axes = tuple(range(x.ndim))[::-1] if op.axes is None else tuple(a % x.ndim for a in op.axes)
    g.node("Transpose", [g.name(x)], outputs, perm=list(axes))
    if g.batched(x):
        return BATCH_DIM0 if axes[0] == 0 else BATCH_MOVED
    return g.batch_of(x)


def _getitem(g, op, inputs, outputs):
    """Basic indexing (slices, ints, None, ...) as Slice, then Squeeze for the ints and
    Unsqueeze for the Nones; open ends stay open (no traced size is written)."""
    x = inputs[0]
    index = op.index if isinstance(op.index, tuple) else (op.index,)
    if not array._is_basic_index(index):
        g.refuse("indexes with arrays (advanced indexing), which this exporter does not "
                 "convert; only slices, ints, None and ... are")
    real = sum(1 for i in index if i is not None and i is not Ellipsis)
    items = []
    for item in index:
        items += [slice(None)] * (x.ndim - real) if item is Ellipsis else [item]
    items += [slice(None)] * (x.ndim + sum(i is None for i in items) - len(items))
    starts, ends, axes, steps, squeeze, unsqueeze = [], [], [], [], [], []
    axis = position = 0
    for item in items:
        if item is None:
            unsqueeze.append(position)
            position += 1
            continue
        if isinstance(item, slice):
            step = 1 if item.step is None else int(item.step)
            start = (0 if step > 0 else -1) if item.start is None else int(item.start)
            stop = (INT64_MAX if step > 0 else INT64_MIN) if item.stop is None else int(item.stop)
            if (start, stop, step) != (0, INT64_MAX, 1):
                starts, ends, axes, steps = (starts + [start], ends + [stop], axes + [axis],
                                             steps + [step])
            position += 1
        else:
            i = int(item)
            starts, ends, axes, steps = (starts + [i], ends + [i + 1 if i != -1 else INT64_MAX],
                                         axes + [axis], steps + [1])
            squeeze.append(axis)
        axis += 1
    nodes = []
    if axes:
        nodes.append(("Slice", [g.ints(starts), g.ints(ends), g.ints(axes), g.ints(steps)]))
    if squeeze:
        nodes.append(("Squeeze", [g.ints(squeeze)]))
    if unsqueeze:
        nodes.append(("Unsqueeze", [g.ints(unsqueeze)]))
    if not nodes:
        return _identity(g, op, inputs, outputs)
    value = g.name(x)
    for k, (op_type, more) in enumerate(nodes):
        (value,) = g.node(op_type, [value] + more, outputs if k == len(nodes) - 1 else None)
    if not g.batched(x):
        return g.batch_of(x)
    # The batch stays in dim 0 when dim 0 is taken whole and nothing is put before it; an
    # int or a slice of dim 0 leaves a size that does not follow the batch.
    if items[0] is None:
        return BATCH_MOVED
    return BATCH_DIM0 if isinstance(items[0], slice) and 0 not in axes else NO_BATCH


def _concat(g, op, inputs, outputs):
    g.node("Concat", [g.name(t) for t in inputs], outputs, axis=int(op.axis_))
    if op.axis_ == 0 and any(g.batched(t) for t in inputs):
        return BATCH_MOVED   # k batches one after another


def _split(g, op, inputs, outputs):
    g.node("Split", [g.name(inputs[0]), g.ints(op.sizes)], outputs, axis=int(op.axis))
    if op.axis == 0 and g.batched(inputs[0]):
        return BATCH_MOVED   # the sizes are the traced batch's


def _pad(g, op, inputs, outputs):
    x = inputs[0]
    pads = [int(b) for b, _ in op.widths] + [int(a) for _, a in op.widths]
    g.node("Pad", [g.name(x), g.ints(pads), g.scalar(op.value, x.dtype)], outputs, mode="constant")
    if g.batched(x) and tuple(op.widths[0]) != (0, 0):
        return BATCH_MOVED


def _sum(g, op, inputs, outputs):
    x = inputs[0]
    g.node("ReduceSum", [g.name(x), g.ints(op.axes)], outputs, keepdims=int(op.keepdims))
    if g.batched(x) and 0 in op.axes:
        return NO_BATCH   # summed over the batch


def _power_of_constant(g, op, inputs, outputs):
    x = inputs[0]
    g.node("Pow", [g.name(x), g.scalar(op.exponent, x.dtype)], outputs)


def _softmax(op_type):
    def convert(g, op, inputs, outputs):
        g.node(op_type, [g.name(inputs[0])], outputs, axis=int(op.axis))
    return convert


def _to_device_and_dtype(g, op, inputs, outputs):
    x, y = inputs[0], outputs[0]
    if y.dtype == x.dtype:   # a move between devices: nothing in the graph
        return _identity(g, op, inputs, outputs)
    g.node("Cast", [g.name(x)], outputs,
           to=g.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(y.dtype)))


def _optional(module, name):
    """An op class that this minidense may not have yet (grouped convolution's branch
    brings Hardtanh), or None."""
    return getattr(module, name, None)


# op class -> converter.  Anything else is refused by name.
CONVERTERS = {
    connection.Conv2d: _conv,
    connection.Linear: _linear,
    math.MatMul: _elementwise("MatMul"),
    normalization.BatchNorm: _batch_norm,
    normalization.BatchNormReLU: _batch_norm,
    activation.ReLU: _elementwise("Relu"),
    activation.Sigmoid: _elementwise("Sigmoid"),
    activation.Tanh: _elementwise("Tanh"),
    _optional(activation, "Hardtanh"): _clip("min_val", "max_val"),   # ReLU6, hardtanh
    math.Clamp: _clip("low", "high"),
    pooling.AvgPool2d: _average_pool,
    pooling.MaxPool2d: _max_pool,
    pooling.GlobalAvgPool2d: _global_average_pool,
    math.Add: _elementwise("Add"),
    math.Sub: _elementwise("Sub"),
    math.Mul: _elementwise("Mul"),
    math.Div: _elementwise("Div"),
    math.Neg: _elementwise("Neg"),
    math.Pow: _elementwise("Pow"),
    math.PowScalar: _power_of_constant,
    math.Exp: _elementwise("Exp"),
    math.Log: _elementwise("Log"),
    math.Sqrt: _elementwise("Sqrt"),
    math.Abs: _elementwise("Abs"),
    math.Sum: _sum,
    Softmax: _softmax("Softmax"),
    LogSoftmax: _softmax("LogSoftmax"),
    array.Concat: _concat,
    array.Split: _split,
    array.Pad: _pad,
    array.GetItem: _getitem,
    array.Reshape: _reshape,
    array.Transpose: _transpose,
    array.Copy: _identity,
    array.ToDeviceAndDtype: _to_device_and_dtype,
    noise.Dropout: _identity,             # inference: dropout is the identity
    densenet.IntoStorage: _identity,      # a DenseNet's shared storage: the feature itself
}
CONVERTERS.pop(None, None)


def supported_ops():
    """The names of the ops ``export`` converts."""
    return sorted(cls.__name__ for cls in CONVERTERS)


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------
def export(model, args=(), f=None, *, export_params=True, opset_version=None,
           input_names=None, output_names=None, dynamic_axes=None, model_name=None,
           class_names=None, mean=None, std=None):
    """Write ``model`` as an ONNX file at ``f`` (a path, written atomically, or a binary
    file object; None writes nothing), as ``torch.onnx.export``: ``args`` is the input
    Tensor (or a tuple of them) the model runs on once; ``input_names`` and
    ``output_names`` name the graph's inputs and outputs (default "input", "output";
    numbered when there are several); ``dynamic_axes`` maps those names to the dims left
    free, ``{0: "batch"}`` or ``[0]``;
    ``export_params=False`` makes the parameters graph inputs instead of initializers;
    ``opset_version`` None is 17 (``DEFAULT_OPSET``), and 13 is the oldest written.

    The model must be in eval mode.  Metadata (keyword-only): ``model_name`` (default
    the model's class), ``class_names`` (the output's classes in order), ``mean`` and
    ``std`` (the per-channel normalisation of inputs in [0, 1] the model was trained
    with: input = (pixel / 255 - mean) / std); the minidense version is always written.
    Returns the ``onnx.ModelProto`` written."""
    onnx = _onnx()
    opset_version = DEFAULT_OPSET if opset_version is None else opset_version
    if not MIN_OPSET <= opset_version <= onnx.defs.onnx_opset_version():
        raise ValueError(f"md.onnx.export: opset_version {opset_version} is not supported; "
                         f"expected {MIN_OPSET} to {onnx.defs.onnx_opset_version()} (this onnx's "
                         f"newest)")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:3]) + (" ..." if len(training) > 3 else "")
        raise ExportError(f"md.onnx.export: the model is in training mode ({shown}): batch "
                          f"norm would use the batch's statistics and dropout would drop; call "
                          f"model.eval() first")
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    args = tuple(a if isinstance(a, Tensor) else Tensor(a) for a in args)
    calls, result = trace(model, args)
    results = tuple(result) if isinstance(result, (tuple, list)) else (result,)
    if not all(isinstance(r, Tensor) for r in results):
        raise ExportError(f"md.onnx.export: the model returned {type(result).__name__}; "
                          f"expected a Tensor or a tuple of Tensors")
    input_names = _names(input_names, len(args), "input")
    output_names = _names(output_names, len(results), "output")
    if set(input_names) & set(output_names):
        raise ValueError(f"md.onnx.export: {sorted(set(input_names) & set(output_names))} "
                         f"named both an input and an output")
    dynamic = _dynamic_axes(dynamic_axes, input_names + output_names)
    for name, tensor in zip(input_names + output_names, args + results):
        if any(not 0 <= axis < tensor.ndim for axis in dynamic.get(name, {})):
            raise ValueError(f"md.onnx.export: dynamic_axes {dynamic[name]} of {name!r}: it has "
                             f"{tensor.ndim} dims (shape {tuple(tensor.shape)})")

    batch_inputs = [a for a, name in zip(args, input_names) if 0 in dynamic.get(name, {})]
    batch_size = batch_inputs[0].shape[0] if batch_inputs else None
    named_tensors = {id(t): name for name, t in (*model.named_parameters(), *model.named_buffers())
                     if t is not None}
    named_arrays = {id(t.data): name for name, t in model.named_buffers() if t is not None}
    g = _Graph(onnx, named_tensors, named_arrays, batch_size, export_params)
    graph_inputs = []
    for tensor, name in zip(args, input_names):
        g.input(tensor, name, any(tensor is b for b in batch_inputs))
        graph_inputs.append(_value_info(onnx, name, tensor, dynamic.get(name, {})))
    for op, inputs, outputs in _needed(calls, results):
        _convert(g, op, inputs, outputs)
    graph_outputs = []
    for tensor, name in zip(results, output_names):
        axes = dynamic.get(name, {})
        if 0 in axes and batch_size is not None and not g.batched(tensor):
            raise ExportError(f"md.onnx.export: output {name!r} is declared with a dynamic dim "
                              f"0 but does not follow the batch of the inputs")
        _name_output(g, tensor, name)
        graph_outputs.append(_value_info(onnx, name, tensor, axes))

    helper = onnx.helper
    graph = helper.make_graph(g.nodes, model_name or type(model).__name__, graph_inputs
                              + g.parameter_inputs, graph_outputs, initializer=g.initializers)
    opset = helper.make_opsetid("", opset_version)
    proto = helper.make_model(graph, opset_imports=[opset], producer_name="minidense",
                              producer_version=__version__)
    # The oldest IR version the opset needs, not the newest onnx knows: older runtimes
    # refuse a file stamped with an IR version they do not know.
    proto.ir_version = helper.find_min_ir_version_for([opset])
    proto.doc_string = ("Exported by minidense. Input: NCHW float, RGB, pixel / 255 then "
                        "(x - mean) / std per channel (mean and std in the metadata when known).")
    helper.set_model_props(proto, _metadata(model, model_name, class_names, mean, std))
    onnx.checker.check_model(proto, full_check=True)
    if hasattr(f, "write"):
        f.write(proto.SerializeToString())
    elif f is not None:
        with atomic_write(f) as out:
            out.write(proto.SerializeToString())
    return proto


def _names(names, count, base):
    names = list(names or [])
    if len(names) > count:
        raise ValueError(f"md.onnx.export: {len(names)} {base} names for {count} {base}s")
    if len(set(names)) != len(names):
        raise ValueError(f"md.onnx.export: {base} names must be unique, got {names}")
    default = [base] if count == 1 else [f"{base}{i}" for i in range(count)]
    return names + [n for n in default[len(names):]]


def _dynamic_axes(dynamic_axes, known):
    """{value name: {axis: dim name}} from PyTorch's forms: {axis: name} or [axes]."""
    out = {}
    for name, axes in (dynamic_axes or {}).items():
        if name not in known:
            raise ValueError(f"md.onnx.export: dynamic_axes names {name!r}, which is neither an "
                             f"input nor an output (they are {', '.join(known)})")
        if isinstance(axes, dict):
            out[name] = {int(a): str(d) for a, d in axes.items()}
        else:
            out[name] = {int(a): f"{name}_dynamic_axes_{i + 1}" for i, a in enumerate(axes)}
    return out


def _value_info(onnx, name, tensor, dynamic):
    shape = [dynamic.get(i, n) for i, n in enumerate(tensor.shape)]
    return onnx.helper.make_tensor_value_info(
        name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype)), shape)


def _needed(calls, results):
    """The calls that the outputs depend on, in order (an op whose result the model
    computed but did not use is left out, whatever it is)."""
    needed = {id(t) for t in results}
    kept = []
    for call in reversed(calls):
        op, inputs, outputs = call
        if any(id(t) in needed for t in outputs):
            kept.append(call)
            needed.update(id(t) for t in inputs)
    return kept[::-1]


def _convert(g, op, inputs, outputs):
    converter = CONVERTERS.get(type(op))
    g.op = op
    if converter is None:
        g.refuse(f"no ONNX counterpart in md.onnx's table (it converts "
                 f"{', '.join(supported_ops())})")
    # A constant the size of the batch beside a batched input of as many dims (the zeros
    # of an old option-A shortcut) would fix the batch size.  (A per-channel constant,
    # such as an affine=False BN's gamma, has fewer dims than the images it scales.)
    batched_dims = {t.ndim for t in inputs if g.batched(t)}
    if g.batch_size is not None and g.batch_size > 1 and batched_dims:
        for t in inputs:
            if (id(t) not in g.values and id(t) not in g.named_tensors and t.ndim in batched_dims
                    and t.shape[0] == g.batch_size):
                g.refuse(f"reads a constant of shape {tuple(t.shape)}, whose first dim is the "
                         f"traced batch size {g.batch_size}, beside the batch: the graph would "
                         f"run at that batch size only.  Make it from the input instead (zero "
                         f"channels: md.nn.functional.pad), or export without a dynamic batch")
    batch = converter(g, op, inputs, outputs)
    if batch is None:
        states = {g.batch_of(t) for t in inputs}
        batch = next((s for s in (BATCH_DIM0, BATCH_MOVED) if s in states), NO_BATCH)
    for t in outputs:
        if id(t) not in g.values:
            raise RuntimeError(f"md.onnx: the converter of {type(op).__name__} left an output "
                               f"without a value (a bug in minidense/onnx.py)")
        g.batch.setdefault(id(t), batch)


def _name_output(g, tensor, name):
    """Give the graph output ``name`` to the node that computes ``tensor``: its value is
    renamed everywhere; an Identity node when the value is an input, a constant, or
    already another output."""
    value = g.name(tensor)
    producer = next((node for node in g.nodes if value in node.output), None)
    if producer is None or value in g.outputs:
        g.nodes.append(g.onnx.helper.make_node("Identity", [value], [name],
                                               name=g.unique(f"node_{name}")))
        g.outputs.add(name)
        return
    for node in g.nodes:
        node.input[:] = [name if v == value else v for v in node.input]
        node.output[:] = [name if v == value else v for v in node.output]
    for key, v in list(g.values.items()):
        if v == value:
            g.values[key] = name
    g.outputs.add(name)


def _metadata(model, model_name, class_names, mean, std):
    props = {"model_name": model_name or type(model).__name__, "minidense_version": __version__}
    if class_names is not None:
        props["class_names"] = json.dumps([str(c) for c in class_names])
    if mean is not None:
        props["mean"] = json.dumps([float(v) for v in np.asarray(mean).reshape(-1)])
    if std is not None:
        props["std"] = json.dumps([float(v) for v in np.asarray(std).reshape(-1)])
    return props

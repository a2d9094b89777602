"""The CuPy path's known problems (issue 9), checked on the CPU against a pretend GPU
(tests/fake_device.py: device arrays that refuse to mix with host arrays, as CuPy's
do; kernels compiled with g++), and the same checks on the real GPU under
MINIDENSE_TEST_DEVICE=cuda (marked gpu)."""
import numpy as np
import pytest

import minidense as md
from minidense import backend
from minidense.autograd import Function

from fake_device import DeviceArray, fake_cuda


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.gpu)])
def gpu(request, monkeypatch):
    """The pretend GPU on the CPU; the real one under MINIDENSE_TEST_DEVICE=cuda (the
    "real" variants are marked gpu, so that ``-m gpu`` runs them alone)."""
    if request.param == "fake":
        fake_cuda(monkeypatch)
    return request.param


class TwoOutputs(Function):
    """(2x, 3x): a node with two outputs, of which a graph may use one."""

    def forward(self, x):
        return x * 2, x * 3

    def backward(self, g2, g3):
        return g2 * 2 + g3 * 3


def test_backward_through_a_move_to_the_cpu(gpu):
    """The zeros for an unused output are made on the node's device, not the root's."""
    x = md.tensor(np.arange(6.0).reshape(2, 3), device="cuda", requires_grad=True)
    doubled, _ = TwoOutputs()(x)
    loss = (doubled.to("cpu") * md.tensor(np.ones((2, 3)))).sum()
    assert loss.device == "cpu"
    loss.backward()
    assert x.grad.device == "cuda"
    np.testing.assert_array_equal(x.grad.numpy(), np.full((2, 3), 2.0))


def test_compare_a_cuda_tensor_with_a_numpy_array(gpu):
    x = md.tensor([[1.0, 2.0], [3.0, 4.0]], device="cuda")
    host = np.array([[1.0, 0.0], [3.0, 5.0]], dtype=np.float32)
    assert (x == host).tolist() == [[True, False], [True, False]]
    assert (x < host).tolist() == [[False, False], [False, True]]
    with pytest.raises(RuntimeError, match="one device"):
        x == md.tensor(host)


def test_tensor_of_a_list_of_device_scalars(gpu):
    x = md.tensor([1.0, 2.0, 3.0], device="cuda")
    scalars = [x.sum().data, x.max().data, (x * 0.5).sum().data]
    for device in ("cpu", "cuda"):
        t = md.tensor(scalars, device=device)
        assert t.device == device and t.dtype == np.float32
        assert t.tolist() == [6.0, 3.0, 3.0]
    assert md.tensor([[scalars[0]], [2.0]]).tolist() == [[6.0], [2.0]]


def test_host_nested_copies_device_values_to_the_host(monkeypatch):
    """What md.tensor falls back on when NumPy refuses CuPy values inside a list."""
    fake = fake_cuda(monkeypatch)
    x = md.tensor([1.0, 2.0], device="cuda").data
    one, two = fake.asarray(1.0), fake.asarray(2.0)     # 0-d device arrays, as CuPy's scalars are
    nested = md.backend.host_nested([one, [two, 3.0], (x, 4)])
    assert type(nested[0]) is np.ndarray and type(nested[1][0]) is np.ndarray
    assert type(nested[2][0]) is np.ndarray and nested[2][1] == 4 and nested[1][1] == 3.0
    assert np.asarray(nested[2][0]).tolist() == [1.0, 2.0]
    assert md.backend.host_nested(5.0) == 5.0


def test_tensor_of_a_list_of_numpy_scalars():
    t = md.tensor([np.float32(1.5), np.float64(2.0), 3])
    assert t.dtype == np.float32 and t.tolist() == [1.5, 2.0, 3.0]
    assert md.tensor([np.int32(1), np.int64(2)]).dtype == np.int64


def test_dropout_with_a_generator_of_the_other_device(gpu):
    x = md.tensor(np.ones((4, 50), dtype=np.float32), device="cuda", requires_grad=True)
    y = md.dropout(x, 0.5, generator=np.random.default_rng(0))
    assert y.device == "cuda"
    expected = (np.random.default_rng(0).random((4, 50), dtype=np.float32) >= 0.5) * 2.0
    np.testing.assert_array_equal(y.numpy(), expected)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), expected)


def test_cuda_generator_is_philox_and_seeded_once(monkeypatch):
    """XORWOW sets up a cuRAND state per thread on every reseed; Philox is counter-based."""
    fake_cuda(monkeypatch)
    md.manual_seed(3)
    gen = md.backend.generator("cuda")
    assert isinstance(gen.numpy.bit_generator, np.random.Philox)
    assert md.backend.generator("cuda") is gen


def test_cross_entropy_checks_device_labels_without_a_sync(gpu):
    logits = md.tensor(np.random.default_rng(0).standard_normal((4, 3)), device="cuda",
                       requires_grad=True)
    before = DeviceArray.syncs
    loss = md.cross_entropy(logits, md.tensor([0, 2, 1, 2], device="cuda"))
    loss.backward()
    if gpu == "fake":
        assert DeviceArray.syncs == before, "cross_entropy read a device value on the host"
    expected = md.cross_entropy(md.tensor(logits.numpy()), md.tensor([0, 2, 1, 2]))
    np.testing.assert_allclose(loss.item(), expected.item(), rtol=1e-12)
    # An out-of-range label poisons the loss and the gradient instead of wrapping around.
    logits.zero_grad()
    bad = md.cross_entropy(logits, md.tensor([0, 3, 1, 2], device="cuda"))
    bad.backward()
    assert np.isnan(bad.item()) and np.isnan(logits.grad.numpy()).all()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        md.cross_entropy(md.tensor(logits.numpy()), md.tensor([0, -1, 1, 2]))


@pytest.mark.parametrize("op", ["avg_pool", "avg_pool_padded", "max", "global_avg_pool"])
def test_pooling_and_max_gradients_stay_float32(op):
    x = md.tensor(np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32),
                  requires_grad=True)
    y = {"avg_pool": lambda: md.avg_pool2d(x, 2),
         "avg_pool_padded": lambda: md.avg_pool2d(x, 3, 2, 1),
         "max": lambda: x.amax(dim=(2, 3)),
         "global_avg_pool": lambda: md.global_avg_pool2d(x)}[op]()
    assert y.dtype == np.float32
    # The op's own gradient (a leaf's .grad is cast to its dtype, which would hide it).
    (gx,) = (y.grad_fn.backward(np.ones(y.shape, dtype=np.float32)),)
    assert gx.dtype == np.float32


def _small_dataset(labels=None):
    from minidense import data
    images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(10) % 3 if labels is None else labels
    return data.ImageDataset(images, labels, ["a", "b", "c"])


def test_loader_queues_device_work_from_the_training_thread(monkeypatch):
    """On the GPU the loader thread gathers on the host only; the copy, augmentation and
    normalisation are queued from the consuming thread (its stream), and the batches
    are those of the unthreaded loader."""
    import threading
    from minidense import data
    fake = fake_cuda(monkeypatch)
    threads = set()
    asarray = fake.asarray

    def recording_asarray(a, dtype=None):
        if isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.ndim == 4:
            threads.add(threading.current_thread().name)
        return asarray(a, dtype)
    monkeypatch.setattr(fake, "asarray", recording_asarray)
    kwargs = dict(batch_size=4, shuffle=True, augment=True, device="cuda", seed=1)
    threaded = list(data.DataLoader(_small_dataset(), prefetch=2, **kwargs).iterate(0))
    plain = list(data.DataLoader(_small_dataset(), prefetch=0, **kwargs).iterate(0))
    assert threads == {threading.current_thread().name}
    assert len(threaded) == len(plain) == 3
    for (x1, y1), (x2, y2) in zip(threaded, plain):
        assert x1.device == "cuda"
        np.testing.assert_array_equal(x1.numpy(), x2.numpy())
        np.testing.assert_array_equal(y1.numpy(), y2.numpy())


def test_loader_checks_labels_once_on_the_host():
    from minidense import data
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        data.DataLoader(_small_dataset(np.arange(10) % 4), batch_size=4)


@pytest.mark.parametrize("make", [
    lambda ps: md.optim.SGD(ps, lr=0.1),
    lambda ps: md.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4),
    lambda ps: md.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=5e-4),
    lambda ps: md.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True),
    lambda ps: md.optim.Adam(ps, lr=1e-2),
    lambda ps: md.optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
    lambda ps: md.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2),
], ids=["sgd", "momentum", "dampening", "nesterov", "adam", "adam-l2", "adamw"])
def test_fused_optimizer_kernels_match_the_numpy_updates(make, gpu):
    """Four steps of the one-kernel update (compiled with g++ on the pretend GPU) against
    the NumPy path, in float64: the same arithmetic in the same order."""
    rng = np.random.default_rng(0)
    start = [rng.standard_normal((3, 4)), rng.standard_normal(5)]
    grads = [[rng.standard_normal(p.shape) for p in start] for _ in range(4)]
    results = []
    for device in ("cpu", "cuda"):
        params = [md.tensor(p, device=device, requires_grad=True) for p in start]
        optimizer = make(params)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = md.tensor(g, device=device)
            optimizer.step()
        results.append([p.numpy() for p in params])
    for ours, reference in zip(*results):
        np.testing.assert_allclose(ours, reference, rtol=1e-14, atol=1e-15)


class _FakePool:
    """CuPy's pool as far as MemoryCounter uses it: malloc returns an object with .ptr."""

    def __init__(self):
        self.next = 4096

    def malloc(self, size):
        self.next += 1 << 20
        return type("Pointer", (), {"ptr": self.next})()


def test_memory_counter_tracks_the_high_water_mark():
    counter = md.backend.MemoryCounter(_FakePool())
    a = counter.malloc(1000)            # rounded up to 1024, as the pool does
    b = counter.malloc(512)
    assert (counter.current, counter.peak) == (1536, 1536)
    counter.free(a)
    assert (counter.current, counter.peak) == (512, 1536)
    c = counter.malloc(100)
    assert (counter.current, counter.peak) == (1024, 1536)
    counter.reset_peak()
    assert counter.peak == 1024
    counter.free(b)
    counter.free(c)
    assert counter.current == 0 and not counter.live
    assert counter.malloc(0) == 0 and counter.malloc(0) == 0   # empty arrays: nothing counted
    counter.free(0)
    assert counter.current == 0 and not counter.live


@pytest.mark.gpu
def test_memory_counter_on_the_gpu(device):
    counter = md.backend.MemoryCounter().install()
    try:
        before = counter.current
        x = md.zeros((1024, 1024), device="cuda")
        assert counter.current - before >= 4 * 2 ** 20
        peak = counter.peak
        del x
        assert counter.current == before and counter.peak == peak
    finally:
        counter.uninstall()


def test_tf32_is_off_by_default_and_switchable(monkeypatch):
    assert md.backend.tf32_enabled() is False
    fake = fake_cuda(monkeypatch)
    linalg = fake._core._routines_linalg
    try:
        md.backend.set_tf32(True)
        assert md.backend.tf32_enabled() is True
        assert linalg.compute_types[np.dtype(np.float32)] == linalg.COMPUTE_TYPE_TF32
    finally:
        md.backend.set_tf32(False)
    assert md.backend.tf32_enabled() is False
    assert linalg.compute_types[np.dtype(np.float32)] == linalg.COMPUTE_TYPE_DEFAULT


@pytest.mark.gpu
def test_tf32_changes_float32_products_on_the_gpu(device):
    """TF32 rounds the inputs to 10 mantissa bits: a float32 product moves away from
    the float64 one by far more than float32 rounding, and back when switched off."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 256)), rng.standard_normal((256, 256))
    exact = a @ b
    errors = {}
    try:
        for tf32 in (True, False):
            md.backend.set_tf32(tf32)
            y = md.tensor(a.astype(np.float32), device="cuda") @ md.tensor(b.astype(np.float32), device="cuda")
            errors[tf32] = np.abs(y.numpy() - exact).max()
    finally:
        md.backend.set_tf32(False)
    assert errors[False] < 1e-3 < errors[True]


def test_timer_on_the_cpu():
    timer = md.backend.Timer("cpu")
    timer.start()
    assert 0 <= timer.stop() < 1000


def test_models_train_the_same_on_the_gpu(gpu):
    """One SGD step of a small DenseNet-BC and a ResNet in float64: the GPU's loss and
    updated weights are the CPU's (on the pretend GPU: the whole CuPy path, kernels
    compiled with g++, fused optimizer included)."""
    for name, kwargs in (("densenet_cifar", dict(depth=10, growth_rate=4, bottleneck=True, compression=0.5)),
                         ("resnet20", {})):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 3, 16, 16))   # the CIFAR models take any size divisible by 4
        y = rng.integers(0, 10, 2)
        results = []
        for dev in ("cpu", "cuda"):
            md.manual_seed(0)
            model = md.models.get(name, **kwargs).to(dev)
            for p in model.parameters():
                p.data = p.data.astype(np.float64)
            optimizer = md.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
            loss = md.cross_entropy(model(md.tensor(x, device=dev)), md.tensor(y, device=dev))
            loss.backward()
            optimizer.step()
            results.append((loss.item(), [p.numpy() for p in model.parameters()]))
        np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-10)
        for gpu_p, cpu_p in zip(results[1][1], results[0][1]):
            np.testing.assert_allclose(gpu_p, cpu_p, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("rows", [False, True])
def test_im2col_col2im_kernels_on_the_gpu(gpu, rows):
    from minidense.functions._utils import col2im, im2col
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 6))
    for kernel, stride, pad, value in (((3, 3), (1, 1), (1, 1), 0.0), ((3, 2), (2, 1), (1, 0), -np.inf)):
        expected = im2col(x, kernel, stride, pad, value, rows=rows)
        col = im2col(md.backend.to_device(x, "cuda"), kernel, stride, pad, value, rows=rows)
        np.testing.assert_array_equal(md.backend.to_numpy(col), expected)
        g = np.random.default_rng(1).standard_normal(expected.shape)
        layout = kernel if rows else False
        image = col2im(md.backend.to_device(g, "cuda"), x.shape, stride, pad, rows=layout)
        np.testing.assert_allclose(md.backend.to_numpy(image), col2im(g, x.shape, stride, pad, rows=layout),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_relu_is_relu_of_batch_norm(training):
    """The NumPy path of the fused op, in float64: the values and gradients of
    relu(batch_norm(x)), and the same running statistics."""
    rng = np.random.default_rng(0)
    x0, g0, b0 = rng.standard_normal((3, 4, 5, 2)), rng.uniform(0.5, 1.5, 4), rng.standard_normal(4)
    outputs = []
    for fused in (True, False):
        x, g, b = (md.tensor(a, requires_grad=True) for a in (x0, g0, b0))
        rm, rv = np.zeros(4), np.ones(4)
        if fused:
            y = md.batch_norm_relu(x, g, b, rm, rv, training)
        else:
            y = md.relu(md.batch_norm(x, g, b, rm, rv, training))
        (y * md.tensor(np.linspace(-1, 2, y.numel()).reshape(y.shape))).sum().backward()
        outputs.append([y.numpy(), x.grad.numpy(), g.grad.numpy(), b.grad.numpy(), rm, rv])
    assert (outputs[0][0] == 0).mean() > 0.2  # the ReLU clips something
    for ours, reference in zip(*outputs):
        np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-12)
    x, g, b = (md.tensor(a, requires_grad=True) for a in (x0, g0, b0))
    assert md.gradcheck(lambda x, g, b: md.batch_norm_relu(x, g, b, np.zeros(4), np.ones(4), training),
                        [x, g, b])


@pytest.mark.parametrize("shape", [(4, 3, 5, 3), (6, 3)], ids=["NCHW", "NC"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("op", ["batch_norm", "batch_norm_relu"])
def test_fused_batch_norm_kernels_match_numpy(gpu, op, training, shape):
    """The CuPy kernels of batch_norm and batch_norm_relu (forward, backward, running
    statistics) against the NumPy path, float64."""
    rng = np.random.default_rng(1)
    x0, g0, b0 = rng.standard_normal(shape), rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    upstream = rng.standard_normal(x0.shape)
    results = []
    for device in ("cpu", "cuda"):
        x, g, b = (md.tensor(a, device=device, requires_grad=True) for a in (x0, g0, b0))
        rm, rv = md.tensor(np.full(3, 0.1), device=device), md.tensor(np.full(3, 1.5), device=device)
        y = getattr(md, op)(x, g, b, rm, rv, training)
        (y * md.tensor(upstream, device=device)).sum().backward()
        results.append([t.numpy() for t in (y, x.grad, g.grad, b.grad, rm, rv)])
    for ours, reference in zip(results[1], results[0]):
        np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("augment", [True, False])
def test_loader_batches_on_the_gpu_are_the_cpu_ones(gpu, augment):
    """The fused augmentation kernel (crop, flip, transpose, normalise in one pass)
    gives the NumPy path's batches."""
    from minidense import data
    kwargs = dict(batch_size=4, shuffle=True, augment=augment, mean=[0.5, 0.4, 0.3],
                  std=[0.2, 0.25, 0.3], seed=3, prefetch=0)
    on_cpu = list(data.DataLoader(_small_dataset(), device="cpu", **kwargs).iterate(1))
    on_gpu = list(data.DataLoader(_small_dataset(), device="cuda", **kwargs).iterate(1))
    for (x1, y1), (x2, y2) in zip(on_gpu, on_cpu):
        assert x1.device == "cuda" and x1.dtype == np.float32 and x1.shape == x2.shape
        np.testing.assert_allclose(x1.numpy(), x2.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(y1.numpy(), y2.numpy())


@pytest.mark.parametrize("op", [
    lambda x, w: md.conv2d(x, w, stride=1, padding=1),
    lambda x, w: md.conv2d(x, w, stride=2, padding=0),
    lambda x, w: md.conv2d(x, w[:, :, :1, :1]),
    lambda x, w: md.max_pool2d(x, 3, 2, 1) * w.sum(),
    lambda x, w: md.max_pool2d(x, 2) * w.sum(),
    lambda x, w: md.avg_pool2d(x, 3, 2, 1) * w.sum(),
    lambda x, w: md.avg_pool2d(x, 2) * w.sum(),
], ids=["conv3x3", "conv-stride2", "conv1x1", "maxpool-padded", "maxpool-tiled", "avgpool-padded",
        "avgpool-tiled"])
def test_convolution_and_pooling_on_the_gpu_match_the_cpu(gpu, op):
    rng = np.random.default_rng(2)
    x0 = rng.permutation(2 * 3 * 8 * 8).reshape(2, 3, 8, 8) / 50.0   # distinct: no max-pool ties
    w0 = rng.standard_normal((4, 3, 3, 3))
    results = []
    for device in ("cpu", "cuda"):
        x, w = md.tensor(x0, device=device, requires_grad=True), md.tensor(w0, device=device, requires_grad=True)
        y = op(x, w)
        (y * md.tensor(np.linspace(-1, 1, y.numel()).reshape(y.shape), device=device)).sum().backward()
        results.append([y.numpy(), x.grad.numpy(), w.grad.numpy()])
    for ours, reference in zip(results[1], results[0]):
        np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-12)


def test_import_registers_every_kernel_beside_the_op_that_launches_it():
    import importlib
    from pathlib import Path
    names = set(backend.CUDA_KERNELS)
    assert {"im2col_i32", "col2im_i64", "bn_forward", "bn_backward", "sgd_update", "adam_update",
            "augment", "relu_masked_centred_dot"} <= names
    for name, spec in backend.CUDA_KERNELS.items():
        source = Path(importlib.import_module(spec.where).__file__).read_text()
        launched = name.rsplit("_i", 1)[0] if name.endswith(("_i32", "_i64")) else name
        assert f'"{launched}"' in source.replace(spec.body if isinstance(spec.body, str) else "", ""), name
        assert spec.where != "minidense.backend", name
        assert set(spec.dtypes) <= {"float16", "float32", "float64"} and spec.dtypes, name
        params = {p.split()[-1] for p in spec.in_params.split(",")}
        assert set(spec.scalars) <= params, (name, set(spec.scalars) - params)


# ---------------------------------------------------------------------------
# Dtypes: CuPy gives every T argument of a kernel one type, so the ops whose kernels
# take T refuse mixed dtypes on both backends alike (as PyTorch does), and the pretend
# GPU enforces CuPy's rule itself.
# ---------------------------------------------------------------------------
_MIXED = {
    "conv2d": (lambda x, w, g: md.conv2d(x, w, g), "input float64, weight float32, bias float32"),
    "linear": (lambda x, w, g: md.linear(x.reshape(2, -1)[:, :27], w.reshape(4, -1), g),
               "input float64, weight float32, bias float32"),
    "batch_norm": (lambda x, w, g: md.batch_norm(x, g[:3], g[1:]),
                   "input float64, gamma float32, beta float32"),
    "batch_norm_relu": (lambda x, w, g: md.batch_norm_relu(x, g[:3], g[1:]),
                        "input float64, gamma float32, beta float32"),
}
_NAMED = {"batch_norm_relu": "batch_norm"}   # the fused op's errors name batch norm


@pytest.mark.parametrize("op", list(_MIXED))
def test_mixed_dtypes_are_one_clear_error_on_both_backends(gpu, op):
    """A float64 input into float32 weights: the same TypeError, naming the op and
    every dtype, on the CPU (which used to promote to float64) and on the GPU (where
    CuPy's kernels would say "Type is mismatched")."""
    call, dtypes = _MIXED[op]
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 3, 4, 4))
    w0, g0 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32), np.ones(4, np.float32)
    messages = []
    for device in ("cpu", "cuda"):
        x, w, g = (md.tensor(a, device=device) for a in (x0, w0, g0))
        with pytest.raises(TypeError, match=f"^{_NAMED.get(op, op)}: expected one dtype for all inputs, got {dtypes}") as error:
            call(x, w, g)
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    # The same op with every array of one dtype runs, and element-wise arithmetic still
    # promotes, as in PyTorch.
    x, w, g = (md.tensor(a.astype(np.float32), device="cuda") for a in (x0, w0, g0))
    assert call(x, w, g).dtype == np.float32
    assert (md.tensor(x0, device="cuda") + w.sum()).dtype == np.float64


def test_the_pretend_gpu_enforces_cupys_type_rules(monkeypatch):
    """What CuPy's ElementwiseKernel and ReductionKernel do with argument dtypes
    (_decide_params_type): one dtype for T across arrays, typed parameters exact,
    scalars cast to their parameter's type."""
    fake = fake_cuda(monkeypatch)
    x = fake.asarray(np.ones((2, 3, 4)))
    per_channel = fake.asarray(np.zeros((1, 3, 1), dtype=np.float32))
    out = fake.empty_like(x)
    with pytest.raises(TypeError, match="Type is mismatched. mean float32 float64 T"):
        backend.cuda_kernel("bn_forward")(x, per_channel, per_channel, per_channel, False, out)
    with pytest.raises(TypeError, match="Type is mismatched. mean float32 float64 T"):
        backend.cuda_kernel("channel_squared_deviation")(x, per_channel, axis=(0, 2))
    images = fake.asarray(np.zeros((1, 2, 2, 3), dtype=np.float32))    # declared uint8
    out = fake.empty((1, 3, 2, 2), dtype=np.float32)
    with pytest.raises(TypeError, match="Type is mismatched. images float32 uint8"):
        backend.cuda_kernel("augment")(images, fake.zeros((1, 2), dtype=np.int64), fake.zeros(1, dtype=bool),
                                       fake.ones(3, dtype=np.float32), fake.zeros(3, dtype=np.float32),
                                       2, 2, 3, 0, False, out)
    # Python and NumPy scalars take T from the arrays, whatever their own type.
    p, grad = fake.asarray(np.ones(3, np.float32)), fake.asarray(np.ones(3, np.float32))
    backend.cuda_kernel("sgd_plain_update")(grad, np.float64(0.5), 0.0, p)
    assert p.dtype == np.float32 and p.tolist() == [0.5, 0.5, 0.5]

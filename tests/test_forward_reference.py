"""Forward results against independent implementations: naive loops written here,
and PyTorch (forward and gradients) where torch is importable."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minidense as md
from minidense.testing import arrays, conv2d_loops, conv_cases, pool_cases

from conftest import TEST_DEVICE


# conv2d's reference is minidense.testing's, as users get it.
naive_conv2d = conv2d_loops


def naive_pool(x, kernel, stride, padding, reduce, pad_value):
    n, c, h, w = x.shape
    (kh, kw), (sy, sx), (ph, pw) = kernel, stride, padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    oh, ow = (h + 2 * ph - kh) // sy + 1, (w + 2 * pw - kw) // sx + 1
    y = np.zeros((n, c, oh, ow))
    for r in range(oh):
        for q in range(ow):
            y[:, :, r, q] = reduce(xp[:, :, r * sy:r * sy + kh, q * sx:q * sx + kw], axis=(2, 3))
    return y


def dev(a):
    return md.tensor(a, device=TEST_DEVICE)


@given(case=conv_cases(max_side=8))
def test_conv2d_matches_naive_loops(case):
    y = md.conv2d(dev(case.x), dev(case.w), None if case.b is None else dev(case.b),
                  stride=case.stride, padding=case.padding)
    np.testing.assert_allclose(y.numpy(), naive_conv2d(case.x, case.w, case.b, case.stride, case.padding),
                               rtol=1e-10, atol=1e-10)


@given(case=pool_cases(distinct=False))
def test_pooling_matches_naive_loops(case):
    y_max = md.max_pool2d(dev(case.x), case.kernel, case.stride, case.padding)
    y_avg = md.avg_pool2d(dev(case.x), case.kernel, case.stride, case.padding)
    np.testing.assert_allclose(y_max.numpy(), naive_pool(case.x, case.kernel, case.stride,
                                                          case.padding, np.max, -np.inf))
    np.testing.assert_allclose(y_avg.numpy(), naive_pool(case.x, case.kernel, case.stride,
                                                          case.padding, np.mean, 0.0), rtol=1e-12)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = dev(np.array([[1000.0, 0.0, -1000.0], [0.0, 1000.0, 0.0]]))
    loss = md.cross_entropy(logits, md.tensor([0, 2], device=TEST_DEVICE))
    assert np.isfinite(loss.item())
    np.testing.assert_allclose(loss.item(), (0.0 + 1000.0) / 2)


def test_batch_norm_of_a_constant_channel_is_finite():
    x = md.tensor(np.ones((4, 2, 3, 3)), requires_grad=True, device=TEST_DEVICE)
    g = md.tensor(np.ones(2), requires_grad=True, device=TEST_DEVICE)
    b = md.tensor(np.zeros(2), requires_grad=True, device=TEST_DEVICE)
    y = md.batch_norm(x, g, b)
    (y * y).sum().backward()
    for t in (y, x.grad, g.grad, b.grad):
        assert np.all(np.isfinite(t.numpy()))


# -- against PyTorch ------------------------------------------------------------------


def _torch():
    return pytest.importorskip("torch")


def _compare(md_fn, torch_fn, arrays_, rtol=1e-9, atol=1e-10):
    """Forward and every input gradient of md_fn and torch_fn on the same float64 data."""
    torch = _torch()
    rng = np.random.default_rng(0)
    ours = [md.tensor(a, requires_grad=True, device=TEST_DEVICE) for a in arrays_]
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays_]
    y, yt = md_fn(*ours), torch_fn(*theirs)
    np.testing.assert_allclose(y.numpy(), yt.detach().numpy(), rtol=rtol, atol=atol)
    g = rng.standard_normal(y.shape)
    y.backward(g)
    yt.backward(torch.tensor(g))
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=rtol, atol=atol)


@given(case=conv_cases(max_side=8, bias=True))
def test_conv2d_against_torch(case):
    F = _torch().nn.functional
    _compare(lambda x, w, b: md.conv2d(x, w, b, case.stride, case.padding),
             lambda x, w, b: F.conv2d(x, w, b, case.stride, case.padding), [case.x, case.w, case.b])


@given(case=pool_cases())
def test_pooling_against_torch(case):
    F = _torch().nn.functional
    _compare(lambda x: md.max_pool2d(x, case.kernel, case.stride, case.padding),
             lambda x: F.max_pool2d(x, case.kernel, case.stride, case.padding), [case.x])
    _compare(lambda x: md.avg_pool2d(x, case.kernel, case.stride, case.padding),
             lambda x: F.avg_pool2d(x, case.kernel, case.stride, case.padding), [case.x])


@given(data=st.data(), training=st.booleans())
def test_batch_norm_against_torch(data, training):
    torch = _torch()
    F = torch.nn.functional
    shape = data.draw(st.sampled_from([(4, 3), (2, 3, 4, 5), (3, 2, 1, 2)]))
    c = shape[1]
    x, g, b = data.draw(arrays(shape)), data.draw(arrays((c,), 0.5, 2)), data.draw(arrays((c,)))
    rm, rv = data.draw(arrays((c,))), data.draw(arrays((c,), 0.5, 2))
    ours_rm, ours_rv = md.tensor(rm.copy(), device=TEST_DEVICE), md.tensor(rv.copy(), device=TEST_DEVICE)
    theirs_rm, theirs_rv = torch.tensor(rm.copy()), torch.tensor(rv.copy())
    _compare(lambda x, g, b: md.batch_norm(x, g, b, ours_rm, ours_rv, training, momentum=0.1),
             lambda x, g, b: F.batch_norm(x, theirs_rm, theirs_rv, g, b, training, momentum=0.1),
             [x, g, b])
    np.testing.assert_allclose(ours_rm.numpy(), theirs_rm.numpy(), rtol=1e-12)
    np.testing.assert_allclose(ours_rv.numpy(), theirs_rv.numpy(), rtol=1e-12)


@given(data=st.data())
def test_linear_cross_entropy_global_pool_against_torch(data):
    torch = _torch()
    F = torch.nn.functional
    n, c, k = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 4)), data.draw(st.integers(2, 5))
    x = data.draw(arrays((n, c, 3, 2)))
    w, b = data.draw(arrays((k, c))), data.draw(arrays((k,)))
    labels = data.draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    ours_labels, theirs_labels = md.tensor(labels, device=TEST_DEVICE), torch.tensor(labels)
    _compare(lambda x, w, b: md.cross_entropy(md.linear(md.global_avg_pool2d(x), w, b), ours_labels),
             lambda x, w, b: F.cross_entropy(F.linear(x.mean((2, 3)), w, b), theirs_labels),
             [x, w, b])


@given(data=st.data())
def test_concat_relu_against_torch(data):
    torch = _torch()
    a = data.draw(arrays((2, 3, 2, 2), margin=0.01))
    b = data.draw(arrays((2, 1, 2, 2), margin=0.01))
    _compare(lambda a, b: md.relu(md.cat([a, b], 1)),
             lambda a, b: torch.relu(torch.cat([a, b], dim=1)), [a, b])


# -- the CuPy im2col / col2im kernels, compiled as C++ and run on the CPU ---------------
def _emulated_cupy(patch):
    """Make the CuPy branches of minidense run on NumPy arrays with the kernels emulated."""
    from types import SimpleNamespace
    from minidense import backend
    from cuda_emulation import EmulatedKernel
    fake_cupy = SimpleNamespace(empty=np.empty, ascontiguousarray=np.ascontiguousarray,
                                matmul=np.matmul)
    patch.setattr(backend, "get_array_module", lambda array: fake_cupy)
    patch.setattr(backend, "cuda_kernel", EmulatedKernel)


@given(case=conv_cases(max_batch=2, max_channels=2, max_side=6), rows=st.booleans(),
       pad_value=st.sampled_from([0.0, -np.inf]))
def test_cuda_im2col_and_col2im_kernels_match_the_numpy_layout(case, rows, pad_value):
    """The CuPy branch of im2col and col2im, with CuPy swapped for NumPy and each kernel
    compiled with g++, gives NumPy's patches (both layouts) and their adjoint; this
    checks the index arithmetic and the argument order of the calls."""
    from minidense.functions._utils import col2im, im2col
    kernel = case.w.shape[2:]
    expected_col = im2col(case.x, kernel, case.stride, case.padding, pad_value, rows=rows)
    grad_col = np.random.default_rng(0).standard_normal(expected_col.shape)
    layout = kernel if rows else False
    expected_image = col2im(grad_col, case.x.shape, case.stride, case.padding, rows=layout)
    with pytest.MonkeyPatch.context() as patch:
        _emulated_cupy(patch)
        col = im2col(case.x, kernel, case.stride, case.padding, pad_value, rows=rows)
        image = col2im(grad_col, case.x.shape, case.stride, case.padding, rows=layout)
    np.testing.assert_array_equal(col, expected_col)
    np.testing.assert_allclose(image, expected_image, rtol=1e-12, atol=1e-12)


def test_cuda_conv2d_gather_path_with_emulated_kernels():
    """conv2d's CuPy path (2-D GEMMs on the (C*kh*kw, N*OH*OW) patch matrix), kernels
    emulated, against the naive loops and NumPy's own backward."""
    from minidense.functions.connection import Conv2d
    rng = np.random.default_rng(5)
    for x_shape, w_shape, stride, pad in (((2, 3, 6, 5), (4, 3, 3, 3), (2, 1), (1, 1)),
                                          ((3, 4, 4, 4), (2, 4, 1, 1), (1, 1), (0, 0))):
        x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
        gy = rng.standard_normal(naive_conv2d(x, w, None, stride, pad).shape)
        reference = Conv2d(stride, pad)
        reference.algorithm, reference.needs_input_grad, reference.saved = "phase_grid", (True, True), (x, w)
        expected_gx, expected_gw = reference.backward(gy)
        with pytest.MonkeyPatch.context() as patch:
            _emulated_cupy(patch)
            op = Conv2d(stride, pad)
            y = op.forward(x, w)
            op.needs_input_grad = (True, True)
            gx, gw = op.backward(gy)
        np.testing.assert_allclose(y, naive_conv2d(x, w, None, stride, pad), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(gx, expected_gx, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(gw, expected_gw, rtol=1e-10, atol=1e-12)


def _im2col_element(k, n, c, h, w, oh, ow, kh, kw, sy, sx, ph, pw):
    """Element k of the rows-layout patch matrix of an input whose element j is
    j % VIRTUAL_MODULUS, in Python integers (which do not overflow)."""
    from cuda_emulation import VIRTUAL_MODULUS
    k, ox = divmod(k, ow)
    k, oy = divmod(k, oh)
    k, image = divmod(k, n)
    k, kx = divmod(k, kw)
    channel, ky = divmod(k, kh)
    y, x_ = oy * sy - ph + ky, ox * sx - pw + kx
    if not (0 <= y < h and 0 <= x_ < w):
        return 0.0
    return float((((image * c + channel) * h + y) * w + x_) % VIRTUAL_MODULUS)


def test_cuda_im2col_indexes_past_2_31_elements():
    """A DenseNet-sized batch whose patch matrix has more than 2**31 elements: the
    kernel variant chosen for it computes the right element indices (the last ones,
    read from a virtual input), where 32-bit indices would wrap around."""
    from minidense import backend
    import cuda_emulation
    n, c, h, w, kh, kw = 512, 456, 32, 32, 3, 3     # x: 2.4e8 elements, col: 2.2e9
    geometry = (n, c, h, w, h, w, kh, kw, 1, 1, 1, 1)
    size = c * kh * kw * n * h * w
    assert size >= 2 ** 31
    chosen = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backend, "cuda_kernel", lambda name: chosen.setdefault("name", name))
        backend.index_kernel("im2col", n * c * h * w, size)
    assert chosen["name"] == "im2col_i64"
    start = size - 4096
    expected = np.array([_im2col_element(k, *geometry) for k in range(start, size)])
    out = np.empty(size - start)
    dilation = (1, 1)
    cuda_emulation.run(chosen["name"], (np.empty(1), *geometry, *dilation, True, 0.0, out), start=start, stop=size,
                       virtual_raw=True)
    np.testing.assert_array_equal(out, expected)
    cuda_emulation.run("im2col_i32", (np.empty(1), *geometry, *dilation, True, 0.0, out), start=start, stop=size,
                       virtual_raw=True)
    assert not np.array_equal(out, expected)  # what the test guards against


def test_cuda_col2im_indexes_past_2_31_elements():
    """The adjoint: the last pixels of a large batch gather the right patch entries."""
    from minidense import backend
    import cuda_emulation
    from cuda_emulation import VIRTUAL_MODULUS
    n, c, h, w, kh, kw = 512, 456, 32, 32, 3, 3
    geometry = (n, c, h, w, h, w, kh, kw, 1, 1, 1, 1)
    col_size = c * kh * kw * n * h * w
    image_size = n * c * h * w
    name = "col2im_i64"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backend, "cuda_kernel", lambda chosen: chosen)
        assert backend.index_kernel("col2im", image_size, col_size) == name
    start = image_size - 2048
    out = np.empty(image_size - start)
    dilation = (1, 1)
    cuda_emulation.run(name, (np.empty(1), *geometry, *dilation, True, out), start=start, stop=image_size,
                       virtual_raw=True)
    expected = []
    for k in range(start, image_size):
        rest, x_ = divmod(k, w)
        nc, y = divmod(rest, h)
        image, channel = divmod(nc, c)
        total = 0
        for ky in range(kh):
            for kx in range(kw):
                oy, ox = y + 1 - ky, x_ + 1 - kx
                if 0 <= oy < h and 0 <= ox < w:
                    index = ((((channel * kh + ky) * kw + kx) * n + image) * h + oy) * w + ox
                    total += index % VIRTUAL_MODULUS
        expected.append(float(total))
    np.testing.assert_array_equal(out, np.array(expected))


@pytest.mark.parametrize("kernel", [(2, 2), (3, 3), (2, 3)])
def test_pooling_windows_that_tile_the_image(kernel):
    """The reshape / strided-add fast path (kernel == stride, no padding, sizes divisible)."""
    x = np.random.default_rng(3).permutation(2 * 3 * 6 * 6).reshape(2, 3, 6, 6) * 0.1
    for md_pool, reduce, pad in ((md.max_pool2d, np.max, -np.inf), (md.avg_pool2d, np.mean, 0.0)):
        np.testing.assert_allclose(md_pool(dev(x), kernel).numpy(),
                                   naive_pool(x, kernel, kernel, (0, 0), reduce, pad), rtol=1e-12)
        t = md.tensor(x, requires_grad=True, device=TEST_DEVICE)
        assert md.gradcheck(lambda t: md_pool(t, kernel), [t])

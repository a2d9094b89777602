"""minidense.threads: the CPU ops' thread pool, and results that do not depend on it.

The pieces an op is cut into depend on the array's sizes alone, never on the thread
count, so every thread count gives bitwise the same result.  PIECE_BYTES is made tiny
here so that even these small arrays are cut into many pieces (piece edges inside the
convolution's shifted slices included), and the results are compared with the
one-piece result (bitwise) and with the naive loops and finite differences.
"""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import minidense as md
from minidense import threads

from minidense.testing import conv2d_loops, conv2d_loops_backward
from test_conv_speed_paths import CASES, CASE_IDS, PATHS, PATH_IDS, conv_on_path, make_inputs, pairs


@pytest.fixture
def restore_threads():
    before = md.get_num_threads()
    yield
    md.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -2, 1.5, "two", None, True])
def test_set_num_threads_rejects_what_is_not_a_count(bad, restore_threads):
    with pytest.raises(ValueError, match=r"set_num_threads: the number of threads must be a whole "
                                         r"number of at least 1, got"):
        md.set_num_threads(bad)


def test_the_thread_count_comes_from_the_environment_and_a_bad_one_is_an_error():
    code = "import minidense as md; print(md.get_num_threads())"
    run = lambda value: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], capture_output=True, text=True,
        env=dict(os.environ, MINIDENSE_NUM_THREADS=value))
    assert run("3").stdout.strip() == "3"
    bad = run("many")
    assert bad.returncode != 0
    assert "MINIDENSE_NUM_THREADS: the number of threads must be a whole number" in bad.stderr


def test_pieces_cover_the_range_in_order_and_depend_on_sizes_only(monkeypatch, restore_threads):
    monkeypatch.setattr(threads, "PIECE_BYTES", 100)
    for n in (1, 4):
        md.set_num_threads(n)
        got = threads.pieces(23, 16)                # 6 items of 16 bytes per piece
        assert [(p.start, p.stop) for p in got] == [(0, 6), (6, 12), (12, 18), (18, 23)]
        assert threads.pieces(3, 10 ** 6) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # an item at least
        assert threads.pieces(0, 4) == []


def test_split_gives_one_contiguous_slice_per_thread(restore_threads):
    md.set_num_threads(3)
    assert threads.split(10) == [slice(0, 3), slice(3, 6), slice(6, 10)]
    assert threads.split(2) == [slice(0, 1), slice(1, 2)]     # no empty slices
    md.set_num_threads(1)
    assert threads.split(10) == [slice(0, 10)]


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_map_pieces_returns_results_in_piece_order_on_any_thread_count(n, restore_threads):
    md.set_num_threads(n)
    seen = set()

    def work(i):
        seen.add(threading.get_ident())
        return i * i
    assert threads.map_pieces(work, range(20)) == [i * i for i in range(20)]
    # The calling thread and the pool took part (an idle worker may take two runs).
    assert len(seen) == 1 if n == 1 else 2 <= len(seen) <= n


def test_map_pieces_passes_errors_on_and_runs_nested_calls_on_the_worker(restore_threads):
    md.set_num_threads(2)

    def fails(i):
        if i == 7:
            raise KeyError("piece 7")
        return i
    with pytest.raises(KeyError, match="piece 7"):
        threads.map_pieces(fails, range(10))

    def nested(i):   # a piece that maps pieces again: run on its own thread, no deadlock
        return sum(threads.map_pieces(lambda j: i * j, range(4)))
    assert threads.map_pieces(nested, range(6)) == [6 * i for i in range(6)]


def _conv_results(case, path):
    x, w, b = make_inputs(case)
    inputs = [md.tensor(a, requires_grad=True) for a in (x, w) + ((b,) if b is not None else ())]
    y = conv_on_path(path, case[2], case[3])(*inputs)
    gy = np.random.default_rng(1).standard_normal(y.shape)
    y.backward(md.tensor(gy))
    return [y.numpy()] + [t.grad.numpy() for t in inputs], (x, w, b, gy)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_conv2d_on_several_threads_is_bitwise_the_one_thread_result(case, path, restore_threads):
    md.set_num_threads(1)                                  # one piece
    whole, (x, w, b, gy) = _conv_results(case, path)
    for n in (2, 3, 7):   # a slice of the grid columns or images per thread
        md.set_num_threads(n)
        got, _ = _conv_results(case, path)
        for g, want in zip(got, whole):
            np.testing.assert_array_equal(g, want)
    # ... and right: against the naive loops, forward and backward.
    stride, padding = pairs(case[2]), pairs(case[3])
    np.testing.assert_allclose(whole[0], conv2d_loops(x, w, b, stride, padding), rtol=1e-12, atol=1e-12)
    gx, gw = conv2d_loops_backward(x, w, gy, stride, padding)
    np.testing.assert_allclose(whole[1], gx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(whole[2], gw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [md.batch_norm, md.batch_norm_relu], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_is_bitwise_the_same_on_every_thread_count(fn, training, monkeypatch,
                                                                restore_threads):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 3, 5, 4)).astype(np.float32) * 3 + 10
    gy = rng.standard_normal(x.shape).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, 3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    monkeypatch.setattr(threads, "PIECE_BYTES", 1)   # one image per piece: 7 pieces

    def run():
        stats = np.array([9.0, 10.0, 11.0], np.float32), np.array([8.0, 9.0, 10.0], np.float32)
        inputs = [md.tensor(a, requires_grad=True) for a in (x, gamma, beta)]
        y = fn(*inputs, *stats, training=training)
        y.backward(md.tensor(gy))
        return [y.numpy(), *stats] + [t.grad.numpy() for t in inputs]
    results = []
    for n in (1, 2, 3):
        md.set_num_threads(n)
        results.append(run())
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("build", [
    lambda: md.models.resnet_cifar(8, shortcut="A"),
    lambda: md.models.densenet_cifar(10, 4, bottleneck=True, compression=0.5),
], ids=["resnet8", "densenet_bc10"])
def test_training_steps_are_bitwise_the_same_on_every_thread_count(build, restore_threads):
    """Resume stays exact whatever thread count the resumed run has."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((6, 3, 16, 16)).astype(np.float32)
    labels = rng.integers(0, 10, 6)
    finals = []
    for n in (1, 2, 3):
        md.set_num_threads(n)
        md.manual_seed(0)
        model = build()
        optimizer = md.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            loss = md.cross_entropy(model(md.tensor(images)), md.tensor(labels))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        finals.append({k: v.copy() for k, v in model.state_dict().items()})
    for other in finals[1:]:
        for key, want in finals[0].items():
            np.testing.assert_array_equal(other[key], want, err_msg=key)


def test_an_error_in_one_piece_is_raised_after_every_other_piece_is_done(restore_threads):
    md.set_num_threads(3)
    done = []

    def work(i):
        if i == 0:
            raise RuntimeError("piece 0")
        time.sleep(0.02)
        done.append(i)
    with pytest.raises(RuntimeError, match="piece 0"):
        threads.map_pieces(work, range(6))
    assert sorted(done) == [2, 3, 4, 5]   # the other runs finished; piece 1 shared piece 0's run


def test_share_cores_gives_each_rank_its_share_unless_the_user_chose(monkeypatch, restore_threads):
    monkeypatch.delenv("MINIDENSE_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_num_threads", None)
    threads.share_cores(2)
    cores = min(threads.available_cores(), (os.cpu_count() or 1) // 2)
    assert md.get_num_threads() == max(1, cores)
    md.set_num_threads(3)
    threads.share_cores(2)
    assert md.get_num_threads() == 3              # set by the user: kept
    monkeypatch.setattr(threads, "_num_threads", None)
    monkeypatch.setenv("MINIDENSE_NUM_THREADS", "5")
    threads.share_cores(2)
    assert md.get_num_threads() == 5              # from the environment: kept


def test_the_workspace_counts_and_frees_the_buffers_of_every_thread(restore_threads):
    md.set_num_threads(2)
    md.workspace.free()
    assert md.workspace.nbytes() == 0
    threads.map_pieces(lambda i: md.workspace.get(f"probe{i}", (1000,), np.float64, np.zeros(1)),
                       range(2))   # one buffer on this thread, one on a pool thread
    assert md.workspace.nbytes() == 2 * 8000
    md.workspace.free()
    assert md.workspace.nbytes() == 0


def test_batch_norm_statistics_keep_float32_precision_when_the_first_image_is_unusual():
    """The one-pass statistics shift by the first image's mean; an outlier image there
    must not cost the variance its float32 digits (a second pass then takes over)."""
    rng = np.random.default_rng(0)
    x = (1000 + rng.standard_normal((64, 3, 4, 4))).astype(np.float32)
    x[0] = 0
    want = x.astype(np.float64).var(axis=(0, 2, 3))
    running_var = np.zeros(3, np.float32)
    y = md.batch_norm(md.tensor(x), md.tensor(np.ones(3, np.float32)), md.tensor(np.zeros(3, np.float32)),
                      np.zeros(3, np.float32), running_var, training=True, momentum=1.0)
    n = x.size // 3
    np.testing.assert_allclose(running_var * (n - 1) / n, want, rtol=2e-6)
    x64 = x.astype(np.float64)
    want_y = (x64 - x64.mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(want.reshape(1, 3, 1, 1) + 1e-5)
    np.testing.assert_allclose(y.numpy(), want_y, rtol=1e-4, atol=1e-4)


def test_batch_norm_statistics_that_overflow_are_infinite_not_nan():
    x = np.full((4, 2, 3, 3), 1e19, np.float32)
    x[0] = -1e19
    running_var = np.ones(2, np.float32)
    with np.errstate(over="ignore"):
        y = md.batch_norm_relu(md.tensor(x), md.tensor(np.ones(2, np.float32)),
                               md.tensor(np.zeros(2, np.float32)), np.zeros(2, np.float32),
                               running_var, training=True)
    assert np.isinf(running_var).all()
    assert np.isfinite(y.numpy()).all()

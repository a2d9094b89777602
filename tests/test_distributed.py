"""Data-parallel training under ``mpiexec -n 2``, launched as subprocesses with a timeout
(pytest itself never imports mpi4py.MPI): real communication, SyncBN equal to one
process with the whole batch in float64, identical weights on every rank, exact resume,
an abort instead of a hang when one rank fails, and Ctrl-C to one rank stopping both.
The single-process communicator is tested in-process."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import minidense as md
from minidense import distributed
from minidense.training import reporting
from conftest import REPO_ROOT

MPIEXEC = (shutil.which("mpiexec", path=str(Path(sys.executable).parent))
           or shutil.which("mpiexec"))
HARNESS = REPO_ROOT / "tests" / "cli_harness.py"
TINY = ["--data", "digits", "--model", "densenet_cifar",
        "--model-args", "depth=10,growth_rate=4,bottleneck=true,compression=0.5",
        "--subset", "96", "--test-subset", "60", "--batch-size", "16", "--epochs", "2",
        "--lr", "0.05", "--no-plot"]

needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec is not installed: "
                                                      "pip install 'minidense[dist]'")


def launch(program, cwd, ranks=2, timeout=120, mpi4py_runner=False, wait=True):
    """``mpiexec -n ranks python [-m mpi4py] program...`` from ``cwd``, on one BLAS
    thread per rank (2 cores here)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MINIDENSE_DATA=str(cwd / "cache"),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", HARNESS_OUT=str(cwd))
    env.pop("MINIDENSE_CIFAR10", None)
    env.pop("MINIDENSE_NUM_THREADS", None)   # each rank's default share of the cores
    command = [MPIEXEC, "-n", str(ranks), sys.executable] + (["-m", "mpi4py"] if mpi4py_runner
                                                              else []) + [str(a) for a in program]
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def train_command(args, cwd, **kwargs):
    return launch(["-m", "minidense.train"] + list(args), cwd, **kwargs)


def exact(folder):
    return [{k: row[k] for k in reporting.EXACT_METRICS}
            for row in reporting.read_metrics(folder / "metrics.jsonl")]


# ---------------------------------------------------------------------------
# One process: the communicator whose operations change nothing
# ---------------------------------------------------------------------------
def test_without_a_launcher_init_gives_a_single_process(monkeypatch):
    for _, size in distributed.LAUNCHER_VARIABLES:
        monkeypatch.delenv(size, raising=False)
    monkeypatch.setattr(distributed, "_world", None)
    comm = distributed.init()
    assert isinstance(comm, distributed.SingleProcess)
    assert (comm.rank, comm.size, comm.local_rank, comm.is_main) == (0, 1, 0, True)
    x = np.arange(3.0)
    assert comm.allreduce(x) is x and comm.broadcast(x) is x
    assert comm.average_gradients([], flags=(True, 0.0)) == [1.0, 0.0]


def test_a_launcher_without_mpi4py_is_a_clear_error(monkeypatch):
    """Never N independent runs writing one folder."""
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setattr(distributed, "_world", None)
    monkeypatch.setitem(sys.modules, "mpi4py", None)   # import mpi4py fails
    with pytest.raises(distributed.DistributedError, match=r"rank 1 of 2.*minidense\[dist\]"):
        distributed.init()


def test_sync_batchnorm_keeps_the_state_dict_names():
    md.manual_seed(0)
    model = md.models.get("densenet_cifar", depth=10, growth_rate=4, bottleneck=True,
                          compression=0.5)
    names = list(model.state_dict())
    distributed.sync_batchnorm(model, distributed.SingleProcess())
    assert list(model.state_dict()) == names
    assert sum(isinstance(m, distributed.SyncBatchNorm2d) for m in model.modules()) == \
        sum(name.endswith("running_var") for name in names)


class TwoRanksWithTheSameBatch(distributed.Communicator):
    """Two ranks that both hold this batch: the global statistics are the local ones."""
    size = 2

    def allreduce(self, array):
        array *= 2
        return array


def test_sync_batchnorm_converts_the_fused_bn_relu_and_keeps_its_relu():
    md.manual_seed(0)
    model = md.models.get("resnet20")
    fused = [name for name, m in model.named_modules() if type(m) is md.nn.BatchNormReLU2d]
    assert fused   # the ResNet blocks' BN-ReLU
    distributed.sync_batchnorm(model, TwoRanksWithTheSameBatch())
    modules = dict(model.named_modules())
    assert all(type(modules[name]) is distributed.SyncBatchNormReLU2d for name in fused)
    bn = modules[fused[0]]
    x = md.randn(4, bn.num_features, 3, 3)
    y = bn(x)
    assert type(y.grad_fn) is distributed.SyncBatchNormReLUFunction
    want = md.relu(md.batch_norm(x, bn.weight, bn.bias))
    np.testing.assert_allclose(y.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    assert (y.numpy() == 0).any()


class _FakeWorld:
    """MPI.COMM_WORLD of ``size`` ranks run as threads of this process, as far as
    MPICommunicator uses it: its rank and size, the node split, and Bcast."""

    COMM_TYPE_SHARED = 1

    def __init__(self, rank, size, shared):
        self.rank, self.size, self.shared = rank, size, shared

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Split_type(self, kind, key):
        return type("Node", (), {"Get_rank": lambda _: self.rank, "Get_size": lambda _: self.size,
                                 "Free": lambda _: None})()

    def Bcast(self, buffer, root=0):
        if self.rank == root:
            self.shared["buffer"] = buffer.copy()
        self.shared["barrier"].wait(timeout=10)
        if self.rank != root:
            buffer[...] = self.shared["buffer"]
        self.shared["barrier"].wait(timeout=10)


def test_two_ranks_set_up_nccl_with_cupy_14s_bytes_unique_id(monkeypatch):
    """The set-up path of data-parallel training on GPUs, on a fake cupy.cuda.nccl with
    CuPy 14's signatures: rank 0's unique id (bytes) reaches rank 1 over MPI unchanged,
    each rank makes its communicator with (2, that id, its rank), and an allreduce of a
    device array passes NCCL its pointer, size, type, sum and stream."""
    import threading
    from fake_device import FakeNccl, fake_cuda
    fake = fake_cuda(monkeypatch)
    nccl = FakeNccl()
    monkeypatch.setattr(md.backend, "nccl_module", lambda: nccl)
    monkeypatch.setattr(distributed.threads, "share_cores", lambda processes: None)
    shared = {"barrier": threading.Barrier(2)}
    ranks = [distributed.MPICommunicator(_FakeWorld(rank, 2, shared), _FakeWorld) for rank in (0, 1)]
    arrays = [fake.asarray(np.full(5, rank + 1.0, dtype=np.float32)) for rank in (0, 1)]
    errors = []

    def rank_main(rank):
        try:
            ranks[rank].allreduce(arrays[rank])
            ranks[rank].broadcast(arrays[rank], root=0)
        except Exception as error:   # reported below, not lost in the thread
            errors.append((rank, error))
    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors, errors
    assert len(nccl.issued) == 1 and type(nccl.issued[0]) is bytes      # made on rank 0 only
    made = sorted(nccl.communicators, key=lambda c: c.rank)
    assert [(c.ndev, c.commId, c.rank) for c in made] == [(2, nccl.issued[0], 0), (2, nccl.issued[0], 1)]
    for communicator, array in zip(made, arrays):
        pointer = array.data.ptr
        assert communicator.calls == [("allReduce", pointer, pointer, 5, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, 0),
                                      ("broadcast", pointer, pointer, 5, nccl.NCCL_FLOAT32, 0, 0)]
    assert ranks[0].nccl() is ranks[0].nccl()                           # made once per rank


def test_an_nccl_unique_id_of_another_form_is_refused(monkeypatch):
    from fake_device import FakeNccl
    monkeypatch.setattr(md.backend, "nccl_module", lambda: FakeNccl())
    with pytest.raises(TypeError, match=r"NcclGroup: the unique id must be bytes of length 128 .* "
                                        r"got tuple of length 128"):
        md.backend.NcclGroup(2, 0, tuple(range(128)))
    group = md.backend.NcclGroup.single()
    assert group.comm.ndev == 1 and type(group.comm.commId) is bytes
    with pytest.raises(TypeError, match="Argument 'commId' has incorrect type"):   # the fake's check
        FakeNccl().NcclCommunicator(1, tuple(range(128)), 0)


def test_loader_shards_split_each_global_batch_in_order():
    dataset = md.data.ImageDataset(np.arange(40, dtype=np.uint8).reshape(10, 2, 2, 1).repeat(3, 3),
                                   np.arange(10) % 3, ["a", "b", "c"])
    whole = md.data.DataLoader(dataset, 4, shuffle=True, augment=True, seed=3, prefetch=0)
    parts = [md.data.DataLoader(dataset, 4, shuffle=True, augment=True, seed=3, prefetch=0,
                                shard=(rank, 2)) for rank in range(2)]
    for batch, half0, half1 in zip(whole.iterate(1), parts[0].iterate(1), parts[1].iterate(1)):
        joined = np.concatenate([half0[0].numpy(), half1[0].numpy()])
        np.testing.assert_array_equal(joined, batch[0].numpy())
        np.testing.assert_array_equal(np.concatenate([half0[1].numpy(), half1[1].numpy()]),
                                      batch[1].numpy())


# ---------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------
def read_results(folder, check):
    return [json.loads((folder / f"{check}-{rank}.json").read_text()) for rank in range(2)]


@needs_mpi
def test_communication_is_real(tmp_path):
    done = launch([REPO_ROOT / "tests" / "mpi_checks.py", "communication", tmp_path], tmp_path)
    assert done.returncode == 0, done.stderr
    results = read_results(tmp_path, "communication")
    assert [r["size"] for r in results] == [2, 2] and [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["allreduce"] == [3.0, 30.0]         # 1 + 2, 10 + 20
        assert r["broadcast"] == [8.0, 8.0, 8.0]     # rank 1's value
        assert r["flags"] == [1.0, 2.0]
        assert r["communicator"].startswith("MPICommunicator(")
        # The two ranks share this machine's cores: each rank's thread pool gets half.
        assert r["threads"] == max(1, r["cores"] // 2)


@needs_mpi
def test_sync_bn_on_two_ranks_equals_one_process_with_the_whole_batch(tmp_path):
    """float64, 5 SGD-Nesterov steps, batch 4 per rank against batch 8 in one process."""
    done = launch([REPO_ROOT / "tests" / "mpi_checks.py", "sync-bn", tmp_path], tmp_path)
    assert done.returncode == 0, done.stderr
    result = read_results(tmp_path, "sync-bn")[0]
    print(f"SyncBN, 2 ranks vs 1 process: max relative difference "
          f"{result['max_relative_difference']:.2e} over {result['arrays']} arrays")
    assert result["max_relative_difference"] <= 1e-12


@needs_mpi
def test_local_bn_leaves_identical_weights_on_every_rank(tmp_path):
    done = launch([REPO_ROOT / "tests" / "mpi_checks.py", "local-bn", tmp_path], tmp_path)
    assert done.returncode == 0, done.stderr
    result = read_results(tmp_path, "local-bn")[1]
    assert result["arrays"] > 10 and result["differing_from_rank_0"] == []


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """An uninterrupted tiny 2-epoch training command on 2 ranks."""
    if MPIEXEC is None:
        pytest.skip("mpiexec is not installed: pip install 'minidense[dist]'")
    folder = tmp_path_factory.mktemp("two-ranks")
    done = launch([HARNESS, "batch-sizes"] + TINY + ["--out", folder / "run"], folder)
    assert done.returncode == 0, done.stderr
    return folder


def test_each_rank_trains_on_half_of_every_global_batch(two_rank_run):
    for rank in range(2):
        sizes = json.loads((two_rank_run / f"batch-sizes-{rank}.json").read_text())
        assert sizes == [8] * 12     # 2 epochs of 6 global batches of 16
    assert [row["epoch"] for row in reporting.read_metrics(two_rank_run / "run" / "metrics.jsonl")] \
        == [1, 2]


@needs_mpi
def test_sync_bn_command_matches_one_process(tmp_path):
    """--sync-bn on 2 ranks ends with one process's weights (same seed, global batch)."""
    done = train_command(TINY + ["--sync-bn", "--out", tmp_path / "two"], tmp_path)
    assert done.returncode == 0, done.stderr
    from minidense import train
    assert train.main(TINY + ["--sync-bn", "--out", str(tmp_path / "one")]) == 0
    two, one = md.load(tmp_path / "two" / "last.npz"), md.load(tmp_path / "one" / "last.npz")
    worst = max(float(np.abs(two["model"][k] - v).max())
                for k, v in one["model"].items() if np.issubdtype(v.dtype, np.floating))
    print(f"--sync-bn, 2 ranks vs 1 process after 12 steps (float32): max absolute "
          f"difference {worst:.2e}")
    # float32 rounding, summed in another order: here within 0.4 of this tolerance,
    # while local BN (each rank its own statistics) misses it by a factor of 1,000.
    for name, value in one["model"].items():
        np.testing.assert_allclose(two["model"][name], value, rtol=1e-3, atol=1e-5, err_msg=name)
    for a, b in zip(exact(tmp_path / "two"), exact(tmp_path / "one")):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_acc"] == b["train_acc"] and a["test_acc"] == b["test_acc"]


@needs_mpi
def test_stop_and_resume_on_two_ranks_gives_the_uninterrupted_metrics(two_rank_run, tmp_path):
    done = train_command(TINY + ["--out", tmp_path / "run", "--stop-after", "1"], tmp_path)
    assert done.returncode == 0, done.stderr
    done = train_command(["--resume", "--out", tmp_path / "run"], tmp_path, mpi4py_runner=True)
    assert done.returncode == 0, done.stderr
    assert exact(tmp_path / "run") == exact(two_rank_run / "run")


@needs_mpi
def test_an_exception_in_one_rank_aborts_the_job(tmp_path):
    started = time.perf_counter()
    done = launch([HARNESS, "fail-rank-1"] + TINY + ["--out", tmp_path / "run"], tmp_path,
                  timeout=60)
    elapsed = time.perf_counter() - started
    print(f"one rank failed: the job ended with status {done.returncode} after {elapsed:.1f} s")
    assert done.returncode != 0
    assert "planted failure in rank 1" in done.stderr
    assert "aborting all 2 ranks" in done.stderr


@needs_mpi
def test_ctrl_c_to_one_rank_stops_both_and_resumes_exactly(two_rank_run, tmp_path):
    out = tmp_path / "run"
    done = launch([HARNESS, "ctrl-c-rank-1"] + TINY + ["--out", out], tmp_path)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    progress = md.load(out / "last.npz")["progress"]
    assert (progress["epoch"], progress["step"]) == (1, 3)   # both stopped after batch 3
    done = train_command(["--resume", "--out", out], tmp_path)
    assert done.returncode == 0, done.stderr
    assert exact(out) == exact(two_rank_run / "run")


@needs_mpi
def test_bad_option_under_mpiexec_is_one_line_from_rank_0(tmp_path):
    done = train_command(TINY + ["--batch-size", "15", "--out", tmp_path / "run"], tmp_path)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert errors == ["minidense-train: error: --batch-size 15 (the global batch) does not "
                      "divide evenly over the 2 processes"]
    assert "Traceback" not in done.stderr


@needs_mpi
def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Rank 1's weight turns NaN after batch 2 of epoch 2: both ranks stop at batch 3,
    rank 0 says so once, and the epoch-1 checkpoint stays."""
    out = tmp_path / "run"
    done = launch([HARNESS, "nan-weight"] + TINY + ["--out", out], tmp_path)
    assert done.returncode == 3, done.stderr
    messages = [line for line in done.stderr.splitlines() if "diverged" in line]
    assert len(messages) == 1
    assert "the run diverged at epoch 2, batch 3 of 6: the loss is not finite" in messages[0]
    assert md.load(out / "last.npz")["progress"]["epoch"] == 1


@needs_mpi
def test_sigterm_twice_on_every_rank_still_saves(tmp_path):
    out = tmp_path / "run"
    done = launch([HARNESS, "sigterm-twice"] + TINY + ["--out", out], tmp_path)
    assert done.returncode == 130, done.stderr
    progress = md.load(out / "last.npz")["progress"]
    assert (progress["epoch"], progress["step"]) == (1, 3)


@needs_mpi
@pytest.mark.parametrize("planted,message", [
    ("data-error-rank-1", "rank 1: data error: planted: rank 1 cannot read its copy"),
    ("gpu-on-rank-0", "the ranks disagree on the device: 1 of 2 can use a GPU"),
])
def test_an_error_of_one_rank_is_reported_and_ends_the_job(planted, message, tmp_path):
    done = launch([HARNESS, planted] + TINY + ["--out", tmp_path / "run"], tmp_path, timeout=60)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr

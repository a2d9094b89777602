"""benchmarks/gpu_run.py, the prepared GPU run, in its --smoke mode: every stage on the
CPU with tiny sizes, so that a typo cannot reach the GPU machine (whose time is short)."""
import json
import os
import resource
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import gpu_run  # noqa: E402


def test_gpu_run_smoke_mode_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_run.py"), "--out", str(out),
                           "--smoke"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and set(files) == set(gpu_run.OUTPUT_FILES), files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "passed" and summary["machine"]["cuda_available"] is False
    stages = summary["stages"]
    assert list(stages) == ["tests", "train_step", "train", "memory", "nccl"]
    for name in ("tests", "train_step", "train"):
        assert stages[name]["status"] == "passed", (name, stages[name])
    for name in ("memory", "nccl"):  # optional: absent features skip cleanly
        assert stages[name]["status"] in ("passed", "skipped"), (name, stages[name])
    # The tests stage ran pytest on the device-aware modules, gpu-marked tests first, and
    # stopped itself at its deadline with its report written.
    tests = json.loads((out / "tests.json").read_text())
    assert tests["stopped_at_deadline"] and tests["progress"] == "stopped at the deadline"
    assert tests["selected"] > tests["gpu_marked"] > 0 and sum(tests["counts"].values()) >= 1
    assert not tests["failures"] and not tests["collection_errors"]
    assert "<testsuite" in (out / "tests.xml").read_text()
    logs = (out / "logs.txt").read_text()
    assert "===== tests: rc 0" in logs and "SKIPPED" in logs and "===== nccl: rc 0" in logs
    train = json.loads((out / "train.json").read_text())
    assert train["epochs"] and 0 <= train["final_test_accuracy"] <= 1
    assert {"epoch", "test_accuracy", "train_loss"} <= set(train["epochs"][0])
    assert train["epochs"][0]["steps"] == train["first_epoch_steps"] == 1    # the short first epoch
    step = json.loads((out / "train_step.json").read_text())
    assert step["results"][0]["model"] == "resnet20"
    # At most 20 s: measured as CPU time (every stage process included), which other
    # programs on a shared machine do not inflate as they do the wall time.
    assert cpu <= 20, f"the smoke run took {cpu:.1f} s of CPU time ({wall:.1f} s wall); at most 20"


def test_summary_is_written_first_and_after_every_stage(tmp_path, monkeypatch):
    """A run cut short keeps every finished stage: summary.json exists before the first
    stage starts and holds each stage as soon as it ends; the seconds a stage leaves
    unspent go to the training run."""
    seen = []

    def run_stage(name, budget, optional, args, out, work):
        summary = json.loads((out / "summary.json").read_text())
        seen.append((name, round(budget), summary["status"], list(summary["stages"])))
        return {"status": "passed", "optional": optional, "seconds": 1.0}
    monkeypatch.setattr(gpu_run, "run_stage", run_stage)
    monkeypatch.setattr(gpu_run, "machine", lambda smoke: {"gpu": "pretend"})
    args = Namespace(out=str(tmp_path), smoke=False, data=None, only=None)
    assert gpu_run.run_stages(args) == 0
    budgets = dict((name, budget) for name, budget, _ in gpu_run.STAGES)
    assert sum(budgets.values()) <= 7 * 60 - 15 and budgets["tests"] >= 150
    assert [s[0] for s in seen] == ["tests", "train_step", "train", "memory", "nccl"]
    for i, (name, budget, status, finished) in enumerate(seen):
        assert status == "running" and finished == [s[0] for s in seen[:i]]
    # train gets its own budget and what tests and train_step left (almost all of theirs).
    assert seen[0][1] == budgets["tests"] and seen[1][1] == budgets["train_step"]
    assert seen[2][1] >= budgets["train"] + budgets["tests"] + budgets["train_step"] - 5
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "passed" and summary["machine"] == {"gpu": "pretend"}


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_stage_past_its_budget_is_killed_with_every_process_it_started(tmp_path):
    """The decoding workers of a timed-out training stage, say: the whole process group."""
    pid_file = tmp_path / "worker.pid"
    child = ("import subprocess, sys, time\n"
             "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
             f"open({str(pid_file)!r}, 'w').write(str(worker.pid))\n"
             "print('started', flush=True)\n"
             "time.sleep(60)\n")
    with open(tmp_path / "log.txt", "w") as log:
        rc, timed_out, seconds = gpu_run.run_group([sys.executable, "-c", child], 1.5, log, dict(os.environ))
    assert timed_out and rc is None and seconds < 10
    assert "started" in (tmp_path / "log.txt").read_text()
    worker = int(pid_file.read_text())
    deadline = time.time() + 5
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(worker), "the stage's worker process outlived the stage"


def test_the_train_stage_refuses_to_start_without_the_data(tmp_path, capsys):
    """Checked before anything runs (the GPU machine has no CIFAR-10 of its own); the
    other stages and --smoke do not need it."""
    for extra in ([], ["--data", str(tmp_path / "missing.zip")], ["--data", str(tmp_path)]):
        with pytest.raises(SystemExit) as exit_:
            gpu_run.main(["--out", str(tmp_path / "out"), "--only", "tests,train"] + extra)
        assert exit_.value.code == 2
        assert "the train stage needs --data naming the CIFAR-10 zip" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):   # on this machine: refused for want of a GPU, not of data
        gpu_run.main(["--out", str(tmp_path / "out"), "--only", "tests,train_step"])
    assert "no GPU" in capsys.readouterr().err


_PLUGIN_TESTS = {
    "test_a_device.py": """
import time
import pytest
TEST_DEVICE = "cpu"

def test_first_in_the_file():
    time.sleep(0.2)

def test_fails():
    assert 1 + 1 == 3, "planted"

@pytest.mark.gpu
def test_marked_gpu_runs_first():
    pass
""",
    "test_b_host_only.py": "def test_not_device_aware():\n    pass\n",
}


def _run_plugin(folder, *options):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "benchmarks"))
    return subprocess.run([sys.executable, "-m", "pytest", "-v", "--tb=short", "-p", "no:cacheprovider",
                           "-p", "device_tests", "--device-aware", "--continue-on-collection-errors",
                           "--progress-json=progress.json", "--junitxml=tests.xml", "-o",
                           "markers=gpu", *options], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=60)


def test_the_tests_stage_plugin_orders_reports_and_stops_at_its_deadline(tmp_path):
    for name, text in _PLUGIN_TESTS.items():
        (tmp_path / name).write_text(text)
    # No deadline: every device-aware test, the gpu-marked one first; the host-only
    # module's test deselected; the failure recorded with its short traceback.
    done = _run_plugin(tmp_path)
    assert done.returncode == 1, done.stdout
    order = [line.split("::")[1].split()[0] for line in done.stdout.splitlines()
             if line.startswith("test_a_device.py::")]
    assert order == ["test_marked_gpu_runs_first", "test_first_in_the_file", "test_fails"]
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["progress"] == "finished" and progress["selected"] == 3 and progress["gpu_marked"] == 1
    assert progress["counts"] == {"passed": 2, "failed": 1, "skipped": 0, "error": 0}
    assert progress["failures"][0]["nodeid"] == "test_a_device.py::test_fails"
    assert "planted" in progress["failures"][0]["longrepr"]
    # A deadline already past: the session stops itself after one test and writes its
    # XML (with nothing failed, it exits 0: the smoke run checks that); a module that does
    # not import goes on record and the others still run.
    (tmp_path / "test_c_broken.py").write_text("TEST_DEVICE = 'cpu'\nimport not_a_module_anywhere\n")
    done = _run_plugin(tmp_path, f"--deadline-at={time.time() - 1}")
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["stopped_at_deadline"] and progress["counts"]["passed"] == 1 and progress["not_run"] == 2
    assert progress["collection_errors"][0]["nodeid"] == "test_c_broken.py"
    assert "not_a_module_anywhere" in progress["collection_errors"][0]["longrepr"]
    assert done.returncode != 0    # the collection error
    xml = (tmp_path / "tests.xml").read_text()
    assert 'errors="1" failures="0" skipped="0" tests="2"' in xml and 'name="test_marked_gpu_runs_first"' in xml
    assert "Interrupted: the tests stage's deadline: stopped after 1 of 3 tests" in done.stdout


def test_gpu_run_training_stage_on_the_fake_gpu(tmp_path, monkeypatch):
    """The training stage's device path (fused augmentation, batch norm and optimizer
    kernels, losses kept on the device, evaluation) on the pretend GPU of
    tests/fake_device.py, in process: what the smoke run on the CPU cannot reach."""
    import minidense as md
    from fake_device import fake_cuda
    fake_cuda(monkeypatch)
    monkeypatch.setattr(md.backend, "_tf32", False)   # the stage turns it on; undone after the test
    gpu_run.stage_train(Namespace(smoke=True, device="cuda", out=str(tmp_path), work=str(tmp_path),
                                  budget=30, data=None))
    report = json.loads((tmp_path / "train.json").read_text())
    assert report["device"] == "cuda" and report["status"] == "passed" and report["tf32"] is True
    assert report["epochs"] and 0 <= report["final_test_accuracy"] <= 1
    assert report["epochs"][0] | {"seconds_since_start": 0, "images_per_s": 0} == {
        "epoch": 0, "complete": False, "steps": 1, "total_steps": 1, "seconds_since_start": 0,
        "images_per_s": 0, "train_loss": report["epochs"][0]["train_loss"],
        "test_accuracy": report["epochs"][0]["test_accuracy"]}


def test_train_step_cuda_path_on_the_fake_gpu(monkeypatch):
    """train_step.py's CUDA-only code (event timing, the separate peak-memory run with
    MemoryCounter installed and removed) on the pretend GPU, minidense alone."""
    import train_step
    import minidense as md
    from fake_device import fake_cuda
    fake = fake_cuda(monkeypatch)
    allocator = fake.cuda.get_allocator()
    result = train_step.run_model("resnet20", 2, "cuda", False, steps=1, warmup=0)
    assert result["minidense"]["median_ms"] > 0
    assert result["minidense"]["memory"]["max_bytes_allocated"] == 0   # fake arrays live on the host
    assert fake.cuda.get_allocator() is allocator                       # the counter was removed
    assert md.backend.device_of(md.zeros(2, device="cuda").data) == "cuda"

"""benchmarks/gpu_run.py, the prepared GPU run, in its --smoke mode: every stage on the
CPU with tiny sizes, so that a typo cannot reach the GPU machine (whose time is short)."""
import json
import resource
import subprocess
import sys
import time

from conftest import REPO_ROOT


def test_gpu_run_smoke_mode_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_run.py"), "--out", str(out),
                           "--smoke"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"summary.json", "logs.txt", "train_step.json", "train.json"} <= set(files)
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    assert list(stages) == ["tests", "train_step", "train", "memory", "nccl"]
    for name in ("tests", "train_step", "train"):
        assert stages[name]["status"] == "passed", (name, stages[name])
    for name in ("memory", "nccl"):  # optional: absent features skip cleanly
        assert stages[name]["status"] in ("passed", "skipped"), (name, stages[name])
    assert "-m gpu" in " ".join(stages["tests"]["result"]["command"])
    assert stages["tests"]["result"]["files_with_gpu_tests"]
    train = json.loads((out / "train.json").read_text())
    assert train["epochs"] and 0 <= train["final_test_accuracy"] <= 1
    assert {"epoch", "test_accuracy", "train_loss"} <= set(train["epochs"][0])
    step = json.loads((out / "train_step.json").read_text())
    assert step["results"][0]["model"] == "resnet20"
    # At most 20 s: measured as CPU time (every stage process included), which other
    # programs on a shared machine do not inflate as they do the wall time.
    assert cpu <= 20, f"the smoke run took {cpu:.1f} s of CPU time ({wall:.1f} s wall); at most 20"


def test_gpu_run_training_stage_on_the_fake_gpu(tmp_path, monkeypatch):
    """The training stage's device path (fused augmentation, batch norm and optimizer
    kernels, losses kept on the device, evaluation) on the pretend GPU of
    tests/fake_device.py, in process: what the smoke run on the CPU cannot reach."""
    from argparse import Namespace
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import gpu_run
    import minidense as md
    from fake_device import fake_cuda
    fake_cuda(monkeypatch)
    monkeypatch.setattr(md.backend, "_tf32", False)   # the stage turns it on; undone after the test
    gpu_run.stage_train(Namespace(smoke=True, device="cuda", work=str(tmp_path), budget=30, data=None))
    report = json.loads((tmp_path / "train.json").read_text())
    assert report["device"] == "cuda" and report["status"] == "passed" and report["tf32"] is True
    assert report["epochs"] and 0 <= report["final_test_accuracy"] <= 1


def test_train_step_cuda_path_on_the_fake_gpu(monkeypatch):
    """train_step.py's CUDA-only code (event timing, the separate peak-memory run with
    MemoryCounter installed and removed) on the pretend GPU, minidense alone."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
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

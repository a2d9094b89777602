"""The one prepared GPU run (issue 9): every GPU check, in one call, into one folder.

    python benchmarks/gpu_run.py --out OUT                    # on the GPU machine, about 7 minutes
    python benchmarks/gpu_run.py --out OUT --data cifar10-jpeg.zip
    python benchmarks/gpu_run.py --out OUT --only tests,train_step
    python benchmarks/gpu_run.py --out OUT --smoke            # every stage on the CPU, tiny, < 20 s

Stages, each in its own process with its own time budget (seconds), so that a slow or
hung stage is killed and cannot eat the next one's time:

1. ``tests`` (90): the tests marked gpu, with MINIDENSE_TEST_DEVICE=cuda (no MPI, no
   command-line tests), results as JUnit XML.
2. ``train_step`` (120): benchmarks/train_step.py --device cuda: DenseNet-BC-100 and
   ResNet-56 at batch 64 and 256 against PyTorch eager (cuDNN, same model, TF32 on both
   sides, cudnn.benchmark), CUDA-event timing, peak memory; DenseNet-40 and ResNet-110
   after them while the budget lasts.
3. ``train`` (170): DenseNet-BC-100 (k=12) on CIFAR-10 (``--data``, else
   $MINIDENSE_CIFAR10), batch 64, SGD with Nesterov momentum 0.9 and weight decay 1e-4,
   lr 0.1 on a cosine schedule over a fixed wall-clock budget that includes decoding
   the data, TF32 on; test accuracy after every epoch and at the end.
4. ``memory`` (20, optional): CUDA peak memory of one training step of the
   memory-efficient DenseNet against the plain one, when the model has that option.
5. ``nccl`` (20, optional): a 1-rank NCCL communicator (no mpiexec) and an allreduce.

An optional stage whose feature is absent (no NCCL in CuPy, no memory-efficient
DenseNet) records "skipped" with the reason.  At most 8 files come back from the GPU
machine, so OUT receives exactly five: ``summary.json`` (device, settings, every
stage's status, time and results), ``logs.txt`` (every stage's output),
``train_step.json``, ``train.json`` and ``tests.xml``.  ``--smoke`` runs every stage
on the CPU with tiny sizes (the tests stage only checks its command line: no pytest
inside pytest), so that the default test suite catches a typo before the GPU does.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# (stage, budget in seconds on the GPU, optional); the budgets total 7 minutes.
STAGES = [("tests", 90, False), ("train_step", 120, False), ("train", 170, False),
          ("memory", 20, True), ("nccl", 20, True)]
SMOKE_BUDGET = 30            # wall seconds per stage on the CPU (about 8 s of CPU time in all)
TRAIN_BUDGET_MARGIN = 25     # seconds of the train stage kept for the last evaluation and writing
OUTPUT_FILES = ("summary.json", "logs.txt", "train_step.json", "train.json", "tests.xml")


# ---------------------------------------------------------------------------
# The parent: one child process per stage, then the packing.
# ---------------------------------------------------------------------------
def run_stages(args):
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-run-"))
    wanted = [s.strip() for s in args.only.split(",")] if args.only else [s[0] for s in STAGES]
    unknown = set(wanted) - {s[0] for s in STAGES}
    if unknown:
        raise SystemExit(f"gpu_run: unknown stages {sorted(unknown)}; the stages are "
                         f"{', '.join(s[0] for s in STAGES)}")
    summary = {"smoke": args.smoke, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": machine(args.smoke), "stages": {}}
    logs = []
    stages = [(name, SMOKE_BUDGET if args.smoke else budget, optional)
              for name, budget, optional in STAGES if name in wanted]
    for name, budget, optional in stages:  # one after the other, each alone on the machine
        finish(launch(name, budget, optional, args, work), work, summary, logs)
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    summary["passed"] = all(s["status"] in ("passed", "skipped") or (s["optional"] and s["status"] != "failed")
                            for s in summary["stages"].values())
    pack(out, work, summary, logs)
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'all stages passed' if summary['passed'] else 'SOME STAGES FAILED'}; "
          f"{summary['wall_seconds']} s; wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return 0 if summary["passed"] else 1


def launch(name, budget, optional, args, work):
    command = stage_command(name, args, work, budget)
    print(f"== {name}: budget {budget} s: {' '.join(command)}", flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if name == "tests":
        env["MINIDENSE_TEST_DEVICE"] = "cuda"
    log = open(work / f"{name}.log", "w+")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    return {"name": name, "budget": budget, "optional": optional, "command": command,
            "process": process, "log": log, "start": time.perf_counter()}


def finish(stage, work, summary, logs):
    """Wait for a stage until its budget is spent (then kill it), and record it."""
    name, budget, process = stage["name"], stage["budget"], stage["process"]
    remaining = stage["start"] + budget - time.perf_counter()
    try:
        rc, timed_out = process.wait(timeout=max(remaining, 0.1)), False
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        rc, timed_out = None, True
    seconds = time.perf_counter() - stage["start"]
    stage["log"].seek(0)
    output = stage["log"].read()
    stage["log"].close()
    result = read_json(work / f"{name}.json")
    status = ("timed out" if timed_out else "failed" if rc != 0
              else result.get("status", "passed") if isinstance(result, dict) else "passed")
    summary["stages"][name] = {"status": status, "returncode": rc, "seconds": round(seconds, 1),
                               "budget_s": budget, "optional": stage["optional"], "result": result}
    logs.append(f"===== {name}: {status}, {seconds:.1f} s of {budget} s, rc {rc}\n"
                f"$ {' '.join(stage['command'])}\n{output}\n")
    print(output[-3000:], flush=True)
    print(f"== {name}: {status} in {seconds:.1f} s", flush=True)


def stage_command(name, args, work, budget):
    python = [sys.executable, "-u"]
    if name == "tests":
        pytest = python + ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           f"--junitxml={work / 'tests.xml'}", "tests"]
        if args.smoke:  # no pytest inside pytest: check that the command is runnable, only
            return python + [__file__, "--stage", "tests", "--work", str(work), "--smoke",
                             "--", *pytest]
        return pytest
    command = python + [__file__, "--stage", name, "--work", str(work), "--budget", str(budget)]
    if args.smoke:
        command.append("--smoke")
    if args.data:
        command += ["--data", str(args.data)]
    return command


def pack(out, work, summary, logs):
    """Everything into the five OUTPUT_FILES (the GPU machine returns at most 8 files)."""
    for stale in OUTPUT_FILES:
        (out / stale).unlink(missing_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (out / "logs.txt").write_text("".join(logs))
    for name in ("train_step.json", "train.json", "tests.xml"):
        if (work / name).is_file():
            shutil.copyfile(work / name, out / name)


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path, payload):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def machine(smoke):
    info = {"python": sys.version.split()[0]}
    try:
        import numpy
        info["numpy"] = numpy.__version__
        import minidense as md
        info["cuda_available"] = md.cuda_available()
        if md.cuda_available():
            cupy = md.backend.array_module("cuda")
            props = cupy.cuda.runtime.getDeviceProperties(0)
            info.update(gpu=props["name"].decode(), cupy=cupy.__version__,
                        gpu_memory_bytes=int(props["totalGlobalMem"]),
                        cuda_runtime=cupy.cuda.runtime.runtimeGetVersion())
    except Exception as error:  # the summary must be written whatever happens
        info["error"] = repr(error)
    return info


# ---------------------------------------------------------------------------
# The stages, each run in a child process.
# ---------------------------------------------------------------------------
def stage_tests(args):
    """Smoke mode only (on the GPU the parent runs pytest itself): check that the
    command would run, without starting pytest."""
    command = args.rest
    assert command[command.index("-m") + 1] == "pytest" and "gpu" in command
    tests = REPO / command[-1]
    marked = sorted(p.name for p in tests.glob("test_*.py") if "mark.gpu" in p.read_text())
    assert marked, "no test is marked gpu"
    import pytest  # noqa: F401  (the GPU machine must have it)
    write_json(Path(args.work) / "tests.json",
               {"status": "passed", "smoke": True, "command": command, "files_with_gpu_tests": marked})
    print(f"would run: {' '.join(command)} (gpu tests in {', '.join(marked)})")


def stage_train_step(args):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_step
    out = Path(args.work) / "train_step.json"
    if args.smoke:
        argv = ["--device", "cpu", "--interleaved", "--models", "resnet20", "--batch-sizes", "2", "--steps", "1",
                "--warmup", "0"]
    else:
        argv = ["--device", "cuda", "--models", "densenet_bc100_k12,resnet56,densenet40_k12,resnet110",
                "--batch-sizes", "64,256", "--steps", "10", "--warmup", "3"]
    # Stop starting cases with a fifth of the budget left (a DenseNet-BC-100 case at batch
    # 256 takes about that long).
    # train_step.py writes the JSON after every case: a stage killed for time keeps those.
    train_step.main(argv + ["--json", str(out), "--deadline", str(args.budget * 0.8)])


def stage_train(args):
    """DenseNet-BC-100 on CIFAR-10 for a fixed wall-clock budget, decoding included."""
    import numpy as np
    import minidense as md
    started = time.perf_counter()
    budget = args.budget - TRAIN_BUDGET_MARGIN
    out = Path(args.work) / "train.json"
    if args.smoke:
        device, budget = getattr(args, "device", None) or "cpu", 1.0   # tests pass a fake "cuda"
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (96, 32, 32, 3), dtype=np.uint8)
        train_set = md.data.ImageDataset(images[:64], np.arange(64) % 10, list("0123456789"))
        test_set = md.data.ImageDataset(images[64:], np.arange(32) % 10, list("0123456789"))
        model = md.models.get("densenet_cifar", depth=10, growth_rate=4, bottleneck=True,
                              compression=0.5)
        source = "random images (smoke)"
    else:
        device = "cuda"
        source = args.data or os.environ.get("MINIDENSE_CIFAR10")
        if not source or not Path(source).exists():
            raise SystemExit(f"train: no CIFAR-10 copy: pass --data or set MINIDENSE_CIFAR10 "
                             f"(got {source!r})")
        os.environ.setdefault("MINIDENSE_DATA", str(Path(args.work) / "cache"))
        train_set = md.data.ImageFolder(source, train=True)
        test_set = md.data.ImageFolder(source, train=False)
        model = md.models.get("densenet_bc100_k12")
    decoded = time.perf_counter() - started
    print(f"data: {len(train_set)} training and {len(test_set)} test images from {source}, "
          f"decoded in {decoded:.1f} s", flush=True)
    md.manual_seed(0)
    md.backend.set_tf32(True)   # as the training command does
    mean, std = md.data.channel_mean_std(train_set.images)
    batch_size = 64
    train_loader = md.data.DataLoader(train_set, batch_size, shuffle=True, drop_last=True, augment=True,
                                      mean=mean, std=std, device=device, seed=0)
    test_loader = md.data.DataLoader(test_set, 500 if not args.smoke else 16, mean=mean, std=std,
                                     device=device, prefetch=0)
    model = model.to(device)
    base_lr = 0.1
    optimizer = md.optim.SGD(model.parameters(), lr=base_lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    report = {"status": "running", "model": "densenet_bc100_k12" if not args.smoke else "densenet_cifar-10",
              "data": str(source), "device": device, "batch_size": batch_size, "optimizer":
              "SGD lr 0.1, Nesterov momentum 0.9, weight decay 1e-4, cosine over the time budget",
              "tf32": md.backend.tf32_enabled(), "augment": "4-pixel crops and flips",
              "budget_s": args.budget, "training_budget_s": budget, "decode_s": round(decoded, 1),
              "epochs": []}

    def evaluate():
        model.eval()
        correct = total = 0
        with md.no_grad():
            for images, labels in test_loader:
                predicted = model(images).argmax(1)
                correct += int((predicted == labels).sum().item())
                total += len(labels)
        model.train()
        return correct / total

    step = 0
    epoch = 0
    done = False
    train_start = time.perf_counter()
    while not done:
        losses = []
        for images, labels in train_loader.iterate(epoch):
            elapsed = time.perf_counter() - started
            if elapsed >= budget:
                done = True
                break
            # Cosine over the wall-clock budget (decoding included), as the issue asks.
            lr = 0.5 * base_lr * (1 + math.cos(math.pi * min(elapsed / budget, 1.0)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = md.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.data)   # stays on the device: no sync per step
            step += 1
        if not losses:
            break
        mean_loss = float(md.tensor(losses).mean().item())  # one host read per epoch
        accuracy = evaluate()
        seconds = time.perf_counter() - train_start
        entry = {"epoch": epoch, "complete": not done, "steps": len(losses), "total_steps": step,
                 "train_loss": round(mean_loss, 4), "test_accuracy": accuracy,
                 "seconds_since_start": round(time.perf_counter() - started, 1),
                 "images_per_s": round(step * batch_size / seconds, 1)}
        report["epochs"].append(entry)
        write_json(out, report)   # after every epoch: a killed stage still leaves its figures
        print(json.dumps(entry), flush=True)
        epoch += 1
    report.update(status="passed", steps=step, epochs_run=len(report["epochs"]),
                  final_test_accuracy=report["epochs"][-1]["test_accuracy"] if report["epochs"] else None,
                  seconds=round(time.perf_counter() - started, 1))
    write_json(out, report)
    print(f"final test accuracy {report['final_test_accuracy']} after {step} steps")


def stage_memory(args):
    """Peak CUDA memory of one DenseNet-BC-100 training step at batch 64, plain and
    memory-efficient (skipped when the model has no such option)."""
    import inspect
    import numpy as np
    import minidense as md
    from minidense.models import densenet
    out = Path(args.work) / "memory.json"
    options = inspect.signature(densenet.DenseNet.__init__).parameters if hasattr(densenet, "DenseNet") else {}
    option = next((name for name in ("memory_efficient", "efficient", "checkpoint") if name in options), None)
    if option is None:
        write_json(out, {"status": "skipped", "reason": "the DenseNet has no memory-efficient option yet"})
        print("skipped: the DenseNet has no memory-efficient option yet")
        return
    device = "cpu" if args.smoke else "cuda"
    counter = md.backend.MemoryCounter().install() if device == "cuda" else None
    name, batch = ("densenet_cifar", 2) if args.smoke else ("densenet_bc100_k12", 64)
    extra = dict(depth=10, growth_rate=4, bottleneck=True, compression=0.5) if args.smoke else {}
    rng = np.random.default_rng(0)
    images = md.tensor(rng.standard_normal((batch, 3, 32, 32), dtype=np.float32), device=device)
    labels = md.tensor(rng.integers(0, 10, batch), device=device)
    result = {"status": "passed", "option": option, "batch_size": batch}
    for efficient in (False, True):
        model = md.models.get(name, **extra, **{option: efficient}).to(device)
        if counter is not None:
            md.backend.synchronize("cuda")
            counter.reset_peak()
        before = counter.current if counter is not None else 0
        loss = md.cross_entropy(model(images), labels)
        loss.backward()
        if counter is not None:
            md.backend.synchronize("cuda")
        key = "memory_efficient" if efficient else "plain"
        result[key + "_peak_bytes"] = counter.peak - before if counter is not None else None
        del model, loss
    write_json(out, result)
    print(json.dumps(result))


def stage_nccl(args):
    """A real 1-rank NCCL communicator and an allreduce, without mpiexec."""
    out = Path(args.work) / "nccl.json"
    import minidense as md
    if args.smoke or not md.cuda_available():
        write_json(out, {"status": "skipped", "reason": "no GPU" + (" (smoke)" if args.smoke else "")})
        print("skipped: no GPU")
        return
    cupy = md.backend.array_module("cuda")
    try:
        from cupy.cuda import nccl
        if not getattr(nccl, "available", True):
            raise ImportError("CuPy was built without NCCL")
    except ImportError as error:
        write_json(out, {"status": "skipped", "reason": f"NCCL unavailable: {error}"})
        print(f"skipped: NCCL unavailable: {error}")
        return
    # minidense's own NCCL communicator (what md.distributed uses for CuPy arrays), 1 rank.
    group = md.backend.NcclGroup.single()
    x = cupy.arange(1024, dtype=cupy.float32)
    y = x.copy()
    group.allreduce(y)             # in place: a 1-rank sum leaves the data as it was
    group.broadcast(y, root=0)
    md.backend.synchronize("cuda")
    ok = bool((y == x).all())
    result = {"status": "passed" if ok else "failed", "ranks": group.comm.size(),
              "nccl_version": nccl.get_version(), "allreduce_equal": ok,
              "communicator": "minidense.backend.NcclGroup"}
    write_json(out, result)
    print(json.dumps(result))
    if not ok:
        raise SystemExit("nccl: the 1-rank allreduce changed the data")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="the output folder (created; five files are written there)")
    parser.add_argument("--data", default=None, help="CIFAR-10 zip or folder (default $MINIDENSE_CIFAR10)")
    parser.add_argument("--only", default=None, help="comma-separated stages to run (default all)")
    parser.add_argument("--smoke", action="store_true", help="every stage on the CPU, tiny, in seconds")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)   # the children
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=SMOKE_BUDGET, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        if args.stage == "train":   # trains as minidense's training command does
            from minidense import process
            process.start_command()
        {"tests": stage_tests, "train_step": stage_train_step, "train": stage_train,
         "memory": stage_memory, "nccl": stage_nccl}[args.stage](args)
        return 0
    if not args.out:
        parser.error("--out is required")
    if args.data:  # the stages run from the repository root
        args.data = str(Path(args.data).resolve())
    if not args.smoke:
        import minidense as md
        if not md.cuda_available():
            parser.error("no GPU (md.cuda_available() is False): use --smoke on the CPU")
    return run_stages(args)


if __name__ == "__main__":
    sys.exit(main())

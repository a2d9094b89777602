"""The one prepared GPU run (issues 9 and 22): every GPU check, in one call, into one folder.

    python3 benchmarks/gpu_run.py --out $OUT --data devcarry/cifar10-jpeg.zip   # the GPU machine
    python3 benchmarks/gpu_run.py --out OUT --only tests,train_step             # no --data needed
    python3 benchmarks/gpu_run.py --out OUT --smoke        # every stage on the CPU, tiny, < 20 s

Stages, one after the other, each in its own process group with its own time budget
(seconds), so that a slow or hung stage is killed with every process it started (the data
decoding workers, say) and cannot eat the next one's time.  The budgets total 400 s, and
time a stage leaves unspent goes to the training run, so that the whole call stays within
7 minutes:

1. ``tests`` (150): the device suite with MINIDENSE_TEST_DEVICE=cuda: the tests marked gpu
   first, then every device-aware test (gradient checks, forward references against
   PyTorch, the engine tests: benchmarks/device_tests.py selects them) until the budget.
   pytest prints each test's name and a short traceback, goes on past collection errors,
   and stops itself before the budget (``session.shouldstop``), so that its JUnit XML is
   always written.
2. ``train_step`` (100): benchmarks/train_step.py --device cuda: DenseNet-BC-100 and
   ResNet-56 at batch 64 and 256 against PyTorch eager (cuDNN, same model, TF32 on both
   sides, cudnn.benchmark), CUDA-event timing, peak memory; DenseNet-40 and ResNet-110
   after them while the budget lasts.
3. ``train`` (125 and what the others left): DenseNet-BC-100 (k=12) on CIFAR-10 (``--data``,
   required for this stage), batch 64, SGD with Nesterov momentum 0.9 and weight decay
   1e-4, lr 0.1 on a cosine schedule over the stage's wall-clock budget, decoding
   included, TF32 on.  The first epoch is short (FIRST_EPOCH_STEPS steps), so that a test
   accuracy is measured early; every epoch's metrics are written when it ends.
4. ``memory`` (15, optional): CUDA peak memory of one training step of the
   memory-efficient DenseNet against the plain one, when the model has that option.
5. ``nccl`` (10, optional): a 1-rank NCCL communicator (no mpiexec) and an allreduce.

An optional stage whose feature is absent (no NCCL in CuPy, no memory-efficient
DenseNet) records "skipped" with the reason.

What it measured is kept as it goes: at most 8 files come back from the GPU machine, and
a run cut short (a timeout, the machine taken back) keeps what is already in OUT.  OUT
holds six files, each written atomically: ``summary.json`` (device, settings, every
stage's status, time and results: written first, and again after every stage),
``logs.txt`` (every stage's output, appended as it comes), ``tests.xml`` (JUnit) and
``tests.json`` (counts and failures, after every test), ``train_step.json`` (after every
case) and ``train.json`` (after every epoch).  ``--smoke`` runs every stage on the CPU
with tiny sizes (the tests stage on the CPU, stopped by a deadline of a few seconds), so
that the default test suite catches a typo before the GPU does.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# (stage, budget in seconds on the GPU, optional); 400 s in all, and a few seconds for
# starting, so that one call takes at most 7 minutes.
STAGES = [("tests", 150, False), ("train_step", 100, False), ("train", 125, False),
          ("memory", 15, True), ("nccl", 10, True)]
SLACK_TO = "train"           # the stage that gets the seconds the earlier ones left
SMOKE_BUDGET = 30            # wall seconds per stage on the CPU (about 10 s of CPU time in all)
SMOKE_TESTS_SECONDS = 3      # the smoke run's tests stage stops itself after this
TESTS_MARGIN = 15            # seconds of the tests stage kept for finishing and writing
TRAIN_BUDGET_MARGIN = 20     # seconds of the train stage kept for the last evaluation and writing
FIRST_EPOCH_STEPS = 100      # the short first epoch (6,400 images): a first accuracy early
KILL_GRACE = 3               # seconds between SIGTERM and SIGKILL to a stage's process group
OUTPUT_FILES = ("summary.json", "logs.txt", "tests.xml", "tests.json", "train_step.json", "train.json")


def device_test_files():
    """The test modules the tests stage collects: those with tests marked gpu or tests
    that run on MINIDENSE_TEST_DEVICE (device_tests.py picks the tests inside them)."""
    device_aware = re.compile(r"mark\.gpu|TEST_DEVICE|def test_\w+\([^)]*\bdevice\b")
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if device_aware.search(p.read_text(encoding="utf-8")))


# ---------------------------------------------------------------------------
# The parent: one process group per stage; everything kept in OUT as it comes.
# ---------------------------------------------------------------------------
def run_stages(args):
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in OUTPUT_FILES:
        (out / stale).unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-run-"))
    wanted = [s.strip() for s in args.only.split(",")] if args.only else [s[0] for s in STAGES]
    stages = [(name, SMOKE_BUDGET if args.smoke else budget, optional)
              for name, budget, optional in STAGES if name in wanted]
    deadline = started + sum(budget for _, budget, _ in stages)
    summary = {"status": "running", "smoke": args.smoke, "data": args.data,
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": machine(args.smoke), "budgets_s": {n: b for n, b, _ in stages},
               "stages": {}}
    write_json(out / "summary.json", summary)          # first: the device, whatever follows
    for i, (name, budget, optional) in enumerate(stages):
        later = sum(b for _, b, _ in stages[i + 1:])
        left = deadline - time.perf_counter() - later
        budget = max(left, 0) if name == SLACK_TO and not args.smoke else min(budget, left)
        if budget < 5:
            summary["stages"][name] = {"status": "skipped", "optional": optional,
                                       "result": {"reason": f"only {budget:.0f} s left"}}
        else:
            summary["stages"][name] = run_stage(name, budget, optional, args, out, work)
        write_json(out / "summary.json", summary)      # after every stage
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    summary["passed"] = all(s["status"] in ("passed", "skipped") or (s["optional"] and s["status"] != "failed")
                            for s in summary["stages"].values())
    summary["status"] = "passed" if summary["passed"] else "failed"
    write_json(out / "summary.json", summary)
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'all stages passed' if summary['passed'] else 'SOME STAGES FAILED'}; "
          f"{summary['wall_seconds']} s; wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return 0 if summary["passed"] else 1


def run_stage(name, budget, optional, args, out, work):
    """One stage in its own process group, its output appended to OUT/logs.txt; killed,
    group and all, when its budget is spent.  Returns its entry of the summary."""
    command = stage_command(name, args, out, work, budget)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(REPO), str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if name == "tests":
        env["MINIDENSE_TEST_DEVICE"] = "cpu" if args.smoke else "cuda"
    print(f"== {name}: budget {budget:.0f} s: {' '.join(command)}", flush=True)
    with open(out / "logs.txt", "a") as log:
        log.write(f"===== {name}: budget {budget:.0f} s\n$ {' '.join(command)}\n")
        log.flush()
        offset = log.tell()
        rc, timed_out, seconds = run_group(command, budget, log, env)
        log.write(f"===== {name}: rc {rc}{', killed at its budget' if timed_out else ''}, "
                  f"{seconds:.1f} s\n\n")
    with open(out / "logs.txt") as log:
        log.seek(offset)
        print(log.read()[-2000:], flush=True)
    result = read_json(out / f"{name}.json") or read_json(work / f"{name}.json")
    if timed_out:
        status = "timed out"
    elif rc != 0:
        status = "failed"
    else:
        status = result.get("status", "passed") if isinstance(result, dict) else "passed"
    if name == "tests" and isinstance(result, dict):   # the short form; tests.json has the rest
        result = {k: v for k, v in result.items() if k not in ("failures", "collection_errors")} | {
            "failed": [f["nodeid"] for f in result.get("failures", [])],
            "collection_errors": [e["nodeid"] for e in result.get("collection_errors", [])]}
    print(f"== {name}: {status} in {seconds:.1f} s", flush=True)
    return {"status": status, "returncode": rc, "seconds": round(seconds, 1),
            "budget_s": round(budget, 1), "optional": optional, "command": command, "result": result}


def run_group(command, budget, log, env):
    """Run ``command`` as a new process group (session) with output to ``log``; at
    ``budget`` seconds SIGTERM the whole group, then SIGKILL.  Whatever the child left
    behind in its group (worker processes) is killed when it ends too.
    Returns (returncode or None, timed_out, seconds)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        rc, timed_out = process.wait(timeout=max(budget, 0.1)), False
    except subprocess.TimeoutExpired:
        rc, timed_out = None, True
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()
    return rc, timed_out, time.perf_counter() - start


def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):   # the group is already gone
        pass


def stage_command(name, args, out, work, budget):
    python = [sys.executable, "-u"]
    if name == "tests":
        # The stage stops itself TESTS_MARGIN s before its budget (SMOKE_TESTS_SECONDS in
        # smoke mode), so that pytest writes its report rather than being killed.
        stop = SMOKE_TESTS_SECONDS if args.smoke else budget - TESTS_MARGIN
        return python + ["-m", "pytest", "-v", "--tb=short", "-p", "no:cacheprovider", "-p", "device_tests",
                         "--device-aware", "--continue-on-collection-errors",
                         f"--deadline-at={time.time() + stop:.1f}",
                         f"--progress-json={out / 'tests.json'}", f"--junitxml={out / 'tests.xml'}",
                         *device_test_files()]
    command = python + [__file__, "--stage", name, "--out", str(out), "--work", str(work),
                        "--budget", f"{budget:.0f}"]
    if args.smoke:
        command.append("--smoke")
    if args.data:
        command += ["--data", str(args.data)]
    return command


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
                        compute_capability=f"{props['major']}.{props['minor']}",
                        cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                        cuda_driver=cupy.cuda.runtime.driverGetVersion(),
                        nvrtc=".".join(map(str, cupy.cuda.nvrtc.getVersion())))
    except Exception as error:  # the summary must be written whatever happens
        info["error"] = repr(error)
    return info


# ---------------------------------------------------------------------------
# The stages, each run in a child process.
# ---------------------------------------------------------------------------
def stage_train_step(args):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_step
    out = Path(args.out) / "train_step.json"
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
    out = Path(args.out) / "train.json"
    if args.smoke:
        device, budget = getattr(args, "device", None) or "cpu", 1.0   # tests pass a fake "cuda"
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (160, 32, 32, 3), dtype=np.uint8)
        train_set = md.data.ImageDataset(images[:128], np.arange(128) % 10, list("0123456789"))
        test_set = md.data.ImageDataset(images[128:], np.arange(32) % 10, list("0123456789"))
        model = md.models.get("densenet_cifar", depth=10, growth_rate=4, bottleneck=True,
                              compression=0.5)
        source = "random images (smoke)"
    else:
        device, source = "cuda", args.data
        if not source or not Path(source).is_file():   # main() refuses earlier; a direct call here
            raise SystemExit(f"train: --data must name the CIFAR-10 zip, got {source!r}")
        os.environ.setdefault("MINIDENSE_DATA", str(Path(args.work) / "cache"))
        train_set = md.data.ImageFolder(source, train=True)
        test_set = md.data.ImageFolder(source, train=False)
        model = md.models.get("densenet_bc100_k12")
    decoded = time.perf_counter() - started
    print(f"data: {len(train_set)} training and {len(test_set)} test images from {source}, "
          f"decoded in {decoded:.1f} s", flush=True)
    first_epoch_steps = 1 if args.smoke else FIRST_EPOCH_STEPS
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
              "first_epoch_steps": first_epoch_steps, "epochs": []}
    write_json(out, report)

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
        complete = True
        for images, labels in train_loader.iterate(epoch):
            elapsed = time.perf_counter() - started
            if elapsed >= budget and step:   # one step at least, however slow the start
                done, complete = True, False
                break
            if epoch == 0 and len(losses) == first_epoch_steps:   # the short first epoch
                complete = False
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
        entry = {"epoch": epoch, "complete": complete, "steps": len(losses), "total_steps": step,
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
    out = Path(args.work) / "memory.json"   # small: the parent puts it into summary.json
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
    out = Path(args.work) / "nccl.json"     # small: the parent puts it into summary.json
    import minidense as md
    if args.smoke or not md.cuda_available():
        write_json(out, {"status": "skipped", "reason": "no GPU" + (" (smoke)" if args.smoke else "")})
        print("skipped: no GPU")
        return
    cupy = md.backend.array_module("cuda")
    try:
        nccl = md.backend.nccl_module()
    except (ImportError, RuntimeError) as error:
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
    parser.add_argument("--out", help="the output folder (created; six files are written there)")
    parser.add_argument("--data", default=None,
                        help="the CIFAR-10 zip (cifar10-jpeg.zip): required by the train stage")
    parser.add_argument("--only", default=None, help="comma-separated stages to run (default all)")
    parser.add_argument("--smoke", action="store_true", help="every stage on the CPU, tiny, in seconds")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)   # the children
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=SMOKE_BUDGET, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        if args.stage == "train":   # trains as minidense's training command does
            from minidense import process
            process.start_command()
        {"train_step": stage_train_step, "train": stage_train, "memory": stage_memory,
         "nccl": stage_nccl}[args.stage](args)
        return 0
    if not args.out:
        parser.error("--out is required")
    wanted = [s.strip() for s in args.only.split(",")] if args.only else [s[0] for s in STAGES]
    unknown = set(wanted) - {s[0] for s in STAGES}
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; the stages are {', '.join(s[0] for s in STAGES)}")
    if args.data:  # the stages run from the repository root
        args.data = str(Path(args.data).resolve())
    if "train" in wanted and not args.smoke and not (args.data and Path(args.data).is_file()):
        # Refused before anything runs: the GPU machine has no CIFAR-10 of its own.
        parser.error(f"the train stage needs --data naming the CIFAR-10 zip (got {args.data!r}): on "
                     f"the GPU machine, copy it into devcarry/ and carry that folder (README, 'On a "
                     f"GPU'), or leave the stage out with --only")
    if not args.smoke:
        import minidense as md
        if not md.cuda_available():
            parser.error(f"no GPU ({md.backend._no_gpu_reason()}): use --smoke on the CPU")
    return run_stages(args)


if __name__ == "__main__":
    sys.exit(main())

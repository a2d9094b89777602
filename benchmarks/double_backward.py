"""Time a Hessian-vector product of a ResNet-20 against PyTorch, beside the first-order
training step of the same run.

    python benchmarks/double_backward.py                   # ResNet-20, batch 64, CPU
    python benchmarks/double_backward.py --batch-size 16 --steps 2 --rounds 1
    python benchmarks/double_backward.py --clock cpu       # one thread each, CPU time

A Hessian-vector product (HVP) is what PyHessian and sharpness studies repeat: the
gradient of the loss with respect to the parameters, computed with ``create_graph=True``,
then the gradient of its dot product with a fixed vector v (one per parameter)::

    g = md.grad(loss, params, create_graph=True)
    hv = md.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), params)

The first-order task is a plain training step's forward and backward (no update).  Each
framework runs each task in fresh processes of its own (as in train_step.py), ``--rounds``
times, the order of the frameworks swapped every round; the table gives the median step
time, each process's peak resident memory, and the ratios minidense / PyTorch.  The goal
(issue 20): the HVP's ratio at most 1.25x the first-order ratio measured in the same run.
Results go to ``benchmarks/results/double-backward-cpu.json`` unless ``--json`` says
otherwise, with the load average around the run.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCHMARKS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS_DIR))
from ops import RESULTS_DIR, blas_description, finish_run, machine_description, summary, torch  # noqa: E402

import minidense as md  # noqa: E402
from minidense import process  # noqa: E402

MODEL = "resnet20"
TASKS = ("first_order", "hvp")


def minidense_task(task, batch_size):
    rng = np.random.default_rng(0)
    md.manual_seed(0)
    model = md.models.get(MODEL).train()
    x = md.tensor(rng.standard_normal((batch_size, 3, 32, 32), dtype=np.float32))
    y = md.tensor(rng.integers(0, 10, batch_size))
    params = list(model.parameters())
    v = [md.tensor(rng.standard_normal(p.shape, dtype=np.float32)) for p in params]

    def first_order():
        model.zero_grad()
        md.cross_entropy(model(x), y).backward()

    def hvp():
        g = md.grad(md.cross_entropy(model(x), y), params, create_graph=True)
        dot = (g[0] * v[0]).sum()
        for gi, vi in zip(g[1:], v[1:]):
            dot = dot + (gi * vi).sum()
        return md.grad(dot, params)

    return first_order if task == "first_order" else hvp


def torch_task(task, batch_size, threads):
    import torch_twins
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    md.manual_seed(0)
    ours = md.models.get(MODEL)
    model = torch_twins.get(MODEL).train()
    model.load_state_dict({k: torch.from_numpy(a) for k, a in ours.state_dict().items()}, strict=False)
    del ours
    x = torch.tensor(rng.standard_normal((batch_size, 3, 32, 32), dtype=np.float32))
    y = torch.tensor(rng.integers(0, 10, batch_size))
    params = list(model.parameters())
    v = [torch.tensor(rng.standard_normal(tuple(p.shape), dtype=np.float32)) for p in params]
    F = torch.nn.functional

    def first_order():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    def hvp():
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        return torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), params)

    return first_order if task == "first_order" else hvp


def worker(framework, task, batch_size, steps, warmup, threads, clock, out):
    """One fresh process: one framework, one task; writes the step times and peak RSS."""
    run = (minidense_task(task, batch_size) if framework == "minidense"
           else torch_task(task, batch_size, threads))
    now = time.process_time if clock == "cpu" else time.perf_counter
    for _ in range(warmup):
        run()
    gc.collect()
    ms = []
    for _ in range(steps):
        start = now()
        run()
        ms.append((now() - start) * 1e3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    Path(out).write_text(json.dumps({"ms": ms, "peak_rss_mib": peak}))


def environment(clock):
    env = dict(os.environ, OPENBLAS_THREAD_TIMEOUT=os.environ.get("OPENBLAS_THREAD_TIMEOUT", "4"))
    if clock == "cpu":
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   MINIDENSE_NUM_THREADS="1")
    return env


def measure(task, args, frameworks, threads):
    runs = {fw: [] for fw in frameworks}
    for r in range(args.rounds):
        for fw in (frameworks if r % 2 == 0 else frameworks[::-1]):
            with tempfile.TemporaryDirectory() as folder:
                out = Path(folder) / "result.json"
                subprocess.run([sys.executable, __file__, "--worker", fw, "--task", task,
                                "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                                "--warmup", str(args.warmup), "--threads", str(threads),
                                "--clock", args.clock, "--json", str(out)],
                               check=True, env=environment(args.clock))
                runs[fw].append(json.loads(out.read_text()))
    result = {"task": task}
    for fw in frameworks:
        result[fw] = summary([t for run in runs[fw] for t in run["ms"]])
        result[fw]["peak_rss_mib"] = max(run["peak_rss_mib"] for run in runs[fw])
    if "torch" in frameworks:
        result["ratio"] = result["minidense"]["median_ms"] / result["torch"]["median_ms"]
    print(f"  {task}: " + ", ".join(f"{fw} {result[fw]['median_ms']:.0f} ms (peak RSS "
                                    f"{result[fw]['peak_rss_mib']:.0f} MiB)" for fw in frameworks),
          flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per framework and task")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: one thread per process and its CPU time (for busy machines)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", choices=("minidense", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--task", choices=TASKS, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    process.start_command()
    if args.worker:
        worker(args.worker, args.task, args.batch_size, args.steps, args.warmup, args.threads,
               args.clock, args.json)
        return
    blas = blas_description()
    threads = 1 if args.clock == "cpu" else (blas["threads"] or os.cpu_count() or 1)
    machine = machine_description("cpu", blas)
    frameworks = ["minidense", "torch"] if torch is not None else ["minidense"]
    print(f"{machine['cpu']}, {machine['cpu_count']} CPUs; {MODEL}, batch {args.batch_size}, float32, "
          f"train mode; {'CPU time, 1 thread' if args.clock == 'cpu' else f'wall clock, {threads} threads'}; "
          f"median of {args.steps} steps x {args.rounds} fresh processes per framework and task")
    load_before = os.getloadavg()
    results = [measure(task, args, frameworks, threads) for task in TASKS]
    print(f"\n{'task':<12} {'minidense ms':>13} {'torch ms':>9} {'ratio':>7} {'MiB ours':>9} {'MiB torch':>10}")
    for r in results:
        print(f"{r['task']:<12} {r['minidense']['median_ms']:13.0f} "
              + (f"{r['torch']['median_ms']:9.0f} {r['ratio']:6.2f}x " if "torch" in r else f"{'-':>9} {'-':>7} ")
              + f"{r['minidense']['peak_rss_mib']:9.0f} "
              + (f"{r['torch']['peak_rss_mib']:10.0f}" if "torch" in r else ""))
    settings = {"model": MODEL, "batch_size": args.batch_size, "steps": args.steps,
                "warmup": args.warmup, "rounds": args.rounds, "clock": args.clock, "threads": threads}
    if "torch" in frameworks:
        first, second = (r["ratio"] for r in results)
        settings["hvp_ratio_over_first_order_ratio"] = second / first
        print(f"\nHVP ratio / first-order ratio: {second / first:.2f} (goal: at most 1.25)")
    path = Path(args.json) if args.json else RESULTS_DIR / f"double-backward-{'cpu' if args.clock == 'wall' else 'cpu-time'}.json"
    finish_run("benchmarks/double_backward.py", machine, settings, load_before, results, path)


if __name__ == "__main__":
    main()

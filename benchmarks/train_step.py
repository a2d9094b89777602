"""Time a whole training step of the CIFAR models against PyTorch.

    python benchmarks/train_step.py                        # CPU: 5 models, batch 64 and 128
    python benchmarks/train_step.py --models mobilenet_v2_cifar --batch-sizes 64 --clock cpu
    python benchmarks/train_step.py --models resnet20 --batch-sizes 32 --steps 10
    python benchmarks/train_step.py --interleaved          # both frameworks in one process
    python benchmarks/train_step.py --device cuda          # minidense on CuPy, PyTorch on CUDA

Two modes.  ``--separate-processes`` (the default on the CPU): every framework runs each
model in a fresh process of its own, as users run them, so that neither's thread pools,
allocator or caches disturb the other; there are ``--rounds`` of them (default 2), the
order of the frameworks swapped every round, and the timed steps of all rounds are
pooled.  Each process also reports its peak resident memory.  ``--clock cpu`` (separate
processes only) gives each process one thread (BLAS, PyTorch) and times its CPU time
instead of the wall clock: a measure that other programs competing for the cores
disturb far less, for busy machines.  ``--interleaved`` (the
default on CUDA, and the only mode there): one process holds both, taking turns step by
step, as described below.

A step is what a training loop does for one batch: forward, cross-entropy,
zero_grad, backward and an SGD step with momentum 0.9, in float32 and training mode,
on random data of CIFAR's shape (3x32x32, 10 classes).  PyTorch runs the twin of each
model (benchmarks/torch_twins.py: the same architecture and module names) loaded with
minidense's initial weights, so both start from identical networks; the logits of one
batch are compared once before timing (with dropout off: MobileNetV2's masks differ
between the frameworks).  The two frameworks take turns step by step, so
that other programs on the machine slow both alike, and the median of the timed steps
after warm-up is reported with the ratio of the minimums beside it (see
benchmarks/ops.py).  PyTorch gets as many threads as minidense's BLAS uses.  The ratio
is minidense's step time over PyTorch's.

On CUDA both frameworks use the same settings, stated in the output and the JSON:
TF32 for matrix products and convolutions on both sides (``--no-tf32``: neither),
and cudnn.benchmark on for PyTorch.  Steps are timed with CUDA events after the
warm-up.  Peak memory is reported on CUDA only: the bytes handed to arrays at
their high-water mark, counted by ``md.backend.MemoryCounter`` in front of CuPy's
pool in a separate, untimed run of two steps, against torch.cuda.max_memory_allocated (and max_memory_reserved, with the
pool's total beside it).  On the CPU one process holds both frameworks, so its peak
resident size says nothing about either.  ``--deadline SECONDS`` starts no new case
after that long (the GPU run's budget), and the JSON holds the cases that ran.  Results also go to a JSON file
(``benchmarks/results/train-step-<device>.json`` unless ``--json`` says otherwise).
"""
from __future__ import annotations

import argparse
import contextlib
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
from ops import (RESULTS_DIR, blas_description, finish_run, machine_description, summary,  # noqa: E402
                 torch, write_json_atomically)

import minidense as md  # noqa: E402  (ops put the repository on the path)
from minidense import process  # noqa: E402

if torch is not None:
    import torch_twins

MODELS = ("resnet20", "resnet56", "densenet40_k12", "densenet_bc100_k12", "mobilenet_v2_cifar")
DEFAULT_BATCH_SIZES = {"cpu": "64,128", "cuda": "64,256"}
# Timed steps per framework unless --steps says otherwise: few for the DenseNets, whose
# CPU steps take seconds, so that the default CPU run stays within about 5 minutes.
DEFAULT_STEPS = {"cpu": {"resnet20": 5, "resnet56": 5, "densenet40_k12": 3, "densenet_bc100_k12": 3,
                         "mobilenet_v2_cifar": 3},
                 "cuda": {}}
DEFAULT_STEPS_ELSEWHERE = {"cpu": 3, "cuda": 20}
NUM_CLASSES = 10
LEARNING_RATE, MOMENTUM = 0.1, 0.9


# ---------------------------------------------------------------------------
# One framework each: a model, its optimizer, a batch on the device, and the step.
# ---------------------------------------------------------------------------
class MinidenseTrainer:
    name = "minidense"

    def __init__(self, model, device, images, labels):
        self.model = model.to(device)
        self.model.train()
        self.optimizer = md.optim.SGD(self.model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
        self.images = md.tensor(images, device=device)
        self.labels = md.tensor(labels, device=device)
        self.xp = md.backend.get_array_module(next(iter(self.model.parameters())).data)
        self.device = device
        self.peak_bytes = 0
        self.counted_peak = None   # set by measure_peak_memory

    def step(self):
        loss = md.cross_entropy(self.model(self.images), self.labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def logits(self):
        with md.no_grad(), dropout_off(self.model, md.nn.Dropout):
            return md.backend.to_numpy(self.model(self.images).data)

    def synchronize(self):
        if self.xp is not np:  # CuPy: kernels run asynchronously
            md.backend.synchronize("cuda")
            self.peak_bytes = max(self.peak_bytes, self.xp.get_default_memory_pool().total_bytes())

    def reset_memory(self):
        if self.xp is not np:
            self.xp.get_default_memory_pool().free_all_blocks()

    def memory(self):
        if self.xp is np:
            return None
        return {"max_bytes_allocated": self.counted_peak, "pool_total_bytes_peak": self.peak_bytes}

    def timer(self):
        return md.backend.Timer(self.device)


class TorchTrainer:
    name = "torch"

    def __init__(self, model_name, minidense_model, device, images, labels):
        twin = torch_twins.get(model_name)
        state = {k: torch.from_numpy(v) for k, v in minidense_model.state_dict().items()}
        missing, unexpected = twin.load_state_dict(state, strict=False)
        if unexpected or not all(k.endswith("num_batches_tracked") for k in missing):
            raise RuntimeError(f"the twin of {model_name} does not match: missing {missing}, "
                               f"unexpected {unexpected}")
        self.device = device
        self.model = twin.to(device).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
        self.images = torch.tensor(images, device=device)
        self.labels = torch.tensor(labels, device=device)

    def step(self):
        loss = torch.nn.functional.cross_entropy(self.model(self.images), self.labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def logits(self):
        with torch.no_grad(), dropout_off(self.model, torch.nn.Dropout):
            return self.model(self.images).cpu().numpy()

    def synchronize(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def reset_memory(self):
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def memory(self):
        if self.device != "cuda":
            return None
        return {"max_memory_allocated": torch.cuda.max_memory_allocated(),
                "max_memory_reserved": torch.cuda.max_memory_reserved()}

    def timer(self):
        return TorchTimer() if self.device == "cuda" else md.backend.Timer("cpu")


@contextlib.contextmanager
def dropout_off(model, dropout_class):
    """The model's dropout layers in eval mode inside the block (the rest as it is)."""
    dropouts = [m for m in model.modules() if isinstance(m, dropout_class) and m.training]
    for m in dropouts:
        m.eval()
    try:
        yield
    finally:
        for m in dropouts:
            m.train()


class TorchTimer:
    """CUDA events on PyTorch's current stream."""

    def start(self):
        self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.begin.record()

    def stop(self):
        self.end.record()
        self.end.synchronize()
        return self.begin.elapsed_time(self.end)


def measure_peak_memory(name, device, images, labels, steps=2):
    """Peak bytes held by arrays over ``steps`` training steps of a fresh copy of the
    model, counted by md.backend.MemoryCounter installed before the model reaches the
    GPU (so that weights, gradients and momentum count, as in
    torch.cuda.max_memory_allocated).  A separate run: the counting allocator is
    Python code on every allocation, which the timed steps must not pay."""
    counter = md.backend.MemoryCounter().install()
    try:
        trainer = MinidenseTrainer(md.models.get(name), device, images, labels)
        for _ in range(steps):
            trainer.step()
        md.backend.synchronize(device)
        peak = counter.peak
        del trainer
        gc.collect()
    finally:
        counter.uninstall()
    return peak


def time_steps(trainers, steps, warmup):
    """Milliseconds of each timed step, the frameworks taking turns step by step.  (A
    step takes far longer than the spin-wait of a library's threads that ops.py's
    double calls guard against, so each turn is one step.)"""
    for trainer in trainers:
        for _ in range(warmup):
            trainer.step()
            trainer.synchronize()
    times = [[] for _ in trainers]
    timers = [trainer.timer() for trainer in trainers]  # CUDA events on the GPU, else the wall clock
    for _ in range(steps):
        for trainer, timer, record in zip(trainers, timers, times):
            trainer.synchronize()
            timer.start()
            trainer.step()
            record.append(timer.stop())
            trainer.synchronize()
    return times


def run_model(name, batch_size, device, use_torch, steps, warmup):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size, 3, 32, 32), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, batch_size)
    model = md.models.get(name)
    trainers = [MinidenseTrainer(model, device, images, labels)]
    if use_torch:
        trainers.append(TorchTrainer(name, model, device, images, labels))
    result = {"model": name, "batch_size": batch_size, "parameters": model.num_parameters(),
              "steps": steps, "warmup": warmup}
    if use_torch:  # both start from the same weights: the same logits, up to float32 rounding
        ours, theirs = (t.logits() for t in trainers)
        difference = float(np.abs(ours - theirs).max())
        result["logits_max_abs_difference"] = difference
        result["logits_max_abs"] = float(np.abs(theirs).max())
        print(f"  {name}, batch {batch_size}: logits agree to {difference:.1e} "
              f"(largest logit {result['logits_max_abs']:.2f})", flush=True)
    gc.collect()  # the previous model's graph and buffers, so that the memory peaks are this model's
    for trainer in trainers:
        trainer.reset_memory()
    times = time_steps(trainers, steps, warmup)
    if device == "cuda":
        trainers[0].counted_peak = measure_peak_memory(name, device, images, labels)
    for trainer, ms in zip(trainers, times):
        result[trainer.name] = summary(ms)
        result[trainer.name]["images_per_s"] = batch_size / (result[trainer.name]["median_ms"] / 1e3)
        result[trainer.name]["memory"] = trainer.memory()
    if use_torch:
        mine, theirs = result["minidense"], result["torch"]
        result["ratio"] = mine["median_ms"] / theirs["median_ms"]
        result["ratio_of_minimums"] = mine["min_ms"] / theirs["min_ms"]
    return result


# ---------------------------------------------------------------------------
# --separate-processes: one fresh process per framework, model and round
# ---------------------------------------------------------------------------
class CpuTimer:
    """Milliseconds of this process's CPU time between ``start()`` and ``stop()``."""

    def start(self):
        self.t0 = time.process_time()

    def stop(self):
        return (time.process_time() - self.t0) * 1e3


def worker(framework, name, batch_size, steps, warmup, threads, out, clock="wall"):
    """The body of one fresh process: time one framework alone on one model and write
    {"ms": [...], "logits": [...], "peak_rss_mib": ...} to ``out``."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size, 3, 32, 32), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, batch_size)
    md.manual_seed(0)              # the same initial weights in every process,
    model = md.models.get(name)    # which the torch twin takes
    if framework == "torch":
        torch.set_num_threads(threads)
        trainer = TorchTrainer(name, model, "cpu", images, labels)
        del model
    else:
        trainer = MinidenseTrainer(model, "cpu", images, labels)
    logits = trainer.logits()
    if clock == "cpu":
        trainer.timer = CpuTimer
    gc.collect()
    (ms,) = time_steps([trainer], steps, warmup)
    # ru_maxrss is in KiB on Linux.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps({"ms": ms, "logits": logits.tolist(), "peak_rss_mib": peak}))


def worker_environment(clock):
    """The environment of a worker process, set before NumPy starts in it: OpenBLAS's
    short spin, as ``python -m minidense.train`` runs (``process.command_environment``;
    it changes nothing for PyTorch, whose CPU kernels are its own).  ``clock == "cpu"``:
    one thread for BLAS, OpenMP (PyTorch) and minidense's pool."""
    env = process.command_environment()
    if clock == "cpu":
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   MINIDENSE_NUM_THREADS="1")
    return env


def run_model_separately(name, batch_size, use_torch, steps, warmup, rounds, threads, clock="wall"):
    """``run_model``'s result, each framework timed in fresh processes (see the module's
    docstring)."""
    frameworks = ["minidense", "torch"] if use_torch else ["minidense"]
    runs = {fw: [] for fw in frameworks}
    for r in range(rounds):
        for fw in (frameworks if r % 2 == 0 else frameworks[::-1]):
            with tempfile.TemporaryDirectory() as folder:
                out = Path(folder) / "result.json"
                env = worker_environment(clock)
                subprocess.run([sys.executable, __file__, "--worker", fw, "--models", name,
                                "--batch-sizes", str(batch_size), "--steps", str(steps),
                                "--warmup", str(warmup), "--threads", str(threads),
                                "--clock", clock, "--json", str(out)], check=True, env=env)
                runs[fw].append(json.loads(out.read_text()))
    result = {"model": name, "batch_size": batch_size,
              "parameters": md.models.get(name).num_parameters(), "steps": steps * rounds,
              "warmup": warmup, "rounds": rounds, "mode": "separate processes"}
    for fw in frameworks:
        ms = [t for run in runs[fw] for t in run["ms"]]
        result[fw] = summary(ms)
        result[fw]["images_per_s"] = batch_size / (result[fw]["median_ms"] / 1e3)
        result[fw]["memory"] = None
        result[fw]["peak_rss_mib"] = max(run["peak_rss_mib"] for run in runs[fw])
    if use_torch:
        ours, theirs = (np.array(runs[fw][0]["logits"]) for fw in frameworks)
        result["logits_max_abs_difference"] = float(np.abs(ours - theirs).max())
        result["logits_max_abs"] = float(np.abs(theirs).max())
        mine, other = result["minidense"], result["torch"]
        result["ratio"] = mine["median_ms"] / other["median_ms"]
        result["ratio_of_minimums"] = mine["min_ms"] / other["min_ms"]
    print(f"  {name}, batch {batch_size}: " + ", ".join(
        f"{fw} {result[fw]['median_ms']:.0f} ms (peak RSS {result[fw]['peak_rss_mib']:.0f} MiB)"
        for fw in frameworks) + (f"; logits agree to {result['logits_max_abs_difference']:.1e}"
                                 if use_torch else ""), flush=True)
    return result


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------
def mebibytes(count):
    return f"{count / 2**20:.0f}"


def print_table(results, has_torch, device):
    memory = device == "cuda"
    header = (f"{'model':<19} {'batch':>5} {'steps':>5}   {'ms/step':>8} {'img/s':>7}   "
              f"{'torch ms':>8} {'img/s':>7}   {'ratio':>6} {'min':>6}")
    if memory:
        header += f"   {'MiB ours':>8} {'torch alloc':>11} {'mem ratio':>9}   {'pool':>6} {'reserved':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        mine = r["minidense"]
        line = (f"{r['model']:<19} {r['batch_size']:>5} {r['steps']:>5}   "
                f"{mine['median_ms']:8.0f} {mine['images_per_s']:7.1f}   ")
        if has_torch:
            theirs = r["torch"]
            line += (f"{theirs['median_ms']:8.0f} {theirs['images_per_s']:7.1f}   "
                     f"{r['ratio']:5.2f}x {r['ratio_of_minimums']:5.2f}x")
        else:
            line += f"{'-':>8} {'-':>7}   {'-':>6} {'-':>6}"
        if memory:
            ours = mine["memory"]
            line += f"   {mebibytes(ours['max_bytes_allocated']):>8}"
            if has_torch:
                theirs = r["torch"]["memory"]
                ratio = ours["max_bytes_allocated"] / max(theirs["max_memory_allocated"], 1)
                line += (f" {mebibytes(theirs['max_memory_allocated']):>11} {ratio:8.2f}x   "
                         f"{mebibytes(ours['pool_total_bytes_peak']):>6} "
                         f"{mebibytes(theirs['max_memory_reserved']):>8}")
        print(line)
    if not memory and not any("peak_rss_mib" in r["minidense"] for r in results):
        print("peak memory: n/a on the CPU (one process holds both frameworks)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated md.models names (default {','.join(MODELS)})")
    parser.add_argument("--batch-sizes", default=None,
                        help="comma-separated batch sizes (default 64,128 on cpu, 64,256 on cuda)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per framework (default on cpu: 5 for the ResNets, 3 for the "
                             "DenseNets; 20 on cuda)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 on cpu, 3 on cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", default=None,
                        help="where to write the results (default benchmarks/results/train-step-<device>.json)")
    parser.add_argument("--no-tf32", action="store_true",
                        help="on CUDA: no TF32 on either side (default: TF32 for both frameworks)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after which no new case starts (default: none)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--separate-processes", dest="separate", action="store_true", default=None,
                      help="each framework in fresh processes of its own (default on cpu)")
    mode.add_argument("--interleaved", dest="separate", action="store_false",
                      help="both frameworks in this process, taking turns (default on cuda)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="--separate-processes: fresh processes per framework and model (default 2)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: one thread per process and its CPU time (--separate-processes only)")
    parser.add_argument("--worker", choices=("minidense", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Every process of the benchmark, for both frameworks alike, runs as minidense's
    # commands do (minidense/process.py): OpenBLAS's short spin (this process may start
    # again to get it; a worker has it from worker_environment) and malloc keeping freed
    # memory, which PyTorch's CPU tensors share.
    process.start_command()
    if args.worker:   # one process of --separate-processes
        worker(args.worker, args.models, int(args.batch_sizes), args.steps, args.warmup,
               args.threads, args.json, args.clock)
        return
    separate = args.separate if args.separate is not None else args.device == "cpu"
    if separate and args.device != "cpu":
        parser.error("--separate-processes is for the CPU (on CUDA the run measures peak memory "
                     "and uses CUDA events in one process)")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.clock == "cpu" and not separate:
        parser.error("--clock cpu needs --separate-processes (one thread per process)")
    md.backend.check_device(args.device)
    started = time.perf_counter()
    model_names = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in model_names:
        if name not in md.models.names:
            parser.error(f"unknown model {name!r}; choose among {', '.join(md.models.names)}")
    batch_sizes = [int(b) for b in (args.batch_sizes or DEFAULT_BATCH_SIZES[args.device]).split(",")]
    warmup = args.warmup if args.warmup is not None else (1 if args.device == "cpu" else 3)

    blas = blas_description()
    use_torch = torch is not None and (args.device == "cpu" or torch.cuda.is_available())
    if use_torch:
        missing = [n for n in model_names if n not in torch_twins.CIFAR]
        if missing:
            parser.error(f"no PyTorch twin for {', '.join(missing)} (CIFAR models only)")
        torch.set_num_threads(blas["threads"])
    machine = machine_description(args.device, blas)
    settings = {"dtype": "float32", "optimizer": "SGD", "learning_rate": LEARNING_RATE,
                "momentum": MOMENTUM, "warmup": warmup,
                "mode": f"separate processes, {args.rounds} rounds" if separate else "interleaved",
                "input": "random normal 3x32x32, random labels of 10 classes"}
    if args.device == "cuda":
        tf32 = not args.no_tf32
        md.backend.set_tf32(tf32)
        settings.update(clock="CUDA events", minidense_tf32=tf32)
        if use_torch:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cudnn.benchmark = True
            settings.update(torch_matmul_tf32=tf32, torch_cudnn_tf32=tf32, torch_cudnn_benchmark=True)
    else:
        settings["clock"] = "process CPU time, 1 thread" if args.clock == "cpu" else "wall"
        settings["minidense_threads"] = 1 if args.clock == "cpu" else md.get_num_threads()
        settings["OPENBLAS_THREAD_TIMEOUT"] = worker_environment(args.clock)["OPENBLAS_THREAD_TIMEOUT"]
        settings["malloc_keeps_freed_memory"] = md.workspace.freed_memory_kept
    print(f"minidense on {'NumPy' if args.device == 'cpu' else 'CuPy'} vs "
          + (f"PyTorch {torch.__version__} on {args.device}" if use_torch
             else "no PyTorch (not importable)" if torch is None else f"no PyTorch (this torch has no {args.device})"))
    print(f"{machine['cpu']}, {machine['cpu_count']} CPUs; NumPy {np.__version__}, "
          f"BLAS {blas.get('name')} {blas.get('version')} with {blas['threads']} thread(s)"
          + ("; each process set to 1 thread" if args.clock == "cpu" else
             f"; minidense's pool {md.get_num_threads()} threads"
             + (f"; torch set to {torch.get_num_threads()} to match" if use_torch else ""))
          + (f"; GPU {machine['gpu']}, CuPy {machine['cupy']}" if args.device == "cuda" else ""))
    how = (f"each framework in {args.rounds} fresh processes of its own per model" if separate
           else "the frameworks taking turns in this process")
    if args.clock == "cpu":
        how += " (one thread each: BLAS and torch)"
    print(f"float32, training mode, SGD momentum {MOMENTUM}; {settings['clock']} time per step (forward, "
          f"cross-entropy, zero_grad, backward, update), median of the timed steps after "
          f"{warmup} warm-up, {how}; ratio = minidense / torch")
    if args.device == "cuda":
        print(f"TF32 {'on' if settings['minidense_tf32'] else 'off'} for both frameworks"
              + ("; torch cudnn.benchmark on" if use_torch else ""))
    print()

    load_before = os.getloadavg()
    json_path = args.json or RESULTS_DIR / f"train-step-{args.device}.json"
    results = []
    for name in model_names:
        for batch_size in batch_sizes:
            if args.deadline is not None and time.perf_counter() - started > args.deadline:
                print(f"  {name}, batch {batch_size}: skipped, past the {args.deadline:.0f} s deadline")
                continue
            steps = args.steps or DEFAULT_STEPS[args.device].get(name, DEFAULT_STEPS_ELSEWHERE[args.device])
            if separate:
                results.append(run_model_separately(name, batch_size, use_torch, steps, warmup,
                                                    args.rounds, 1 if args.clock == "cpu"
                                                    else blas["threads"], args.clock))
            else:
                results.append(run_model(name, batch_size, args.device, use_torch, steps, warmup))
            # After every case, so that a run killed for time keeps the cases it finished.
            write_json_atomically(json_path, {"benchmark": "benchmarks/train_step.py", "partial": True,
                                              "machine": machine, "settings": settings,
                                              "results": results})
    print()
    print_table(results, use_torch, args.device)
    finish_run("benchmarks/train_step.py", machine, settings, load_before, results, json_path)


if __name__ == "__main__":
    main()

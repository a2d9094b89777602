"""Peak memory of one DenseNet training step: ordinary against memory-efficient mode.

    python benchmarks/memory.py                      # DenseNet-BC k=12, depths 100, 160, 250, batch 64
    python benchmarks/memory.py --depths 100 --rounds 3      # step-time ratio from 3 alternating rounds
    python benchmarks/memory.py --extra-bc250-k24    # and DenseNet-BC-250 (k=24), memory-efficient only
    python benchmarks/memory.py --device cuda

Every configuration runs in a fresh process (``--child``), so that no allocator keeps
memory from an earlier one.  In the child:

* CPU: peak activation memory = the process's peak resident size (VmHWM) minus its
  resident size just before the model is built, so that buffers made when the model is
  built count (parameters, gradients and the optimizer's momentum count too: they are
  the same in both modes);
* CUDA: the peak of a counting allocator around CuPy's memory pool, or PyTorch's
  ``max_memory_allocated``, minus what was allocated before the build.

A step is forward, cross-entropy, zero_grad, backward and an SGD update (momentum 0.9),
float32, training mode, random 3x32x32 images and labels of 10 classes.  The step time
is the median of the steps after the first (``--steps``, default 2: one warm-up, one
timed) over all ``--rounds``; the configurations run in turns, round after round, so
that other programs on the machine slow them alike.

Configurations: minidense ordinary and ``memory_efficient=True``; with torch importable,
its DenseNet (benchmarks/torch_twins.py) ordinary and checkpointed as torchvision's
``memory_efficient`` does it: each layer's concat-BN-ReLU-Conv(1x1) under
``torch.utils.checkpoint(..., use_reentrant=False)``.  ``--max-minutes`` skips the
configurations still to run once the run has taken that long (noted in the JSON).
Results go to ``benchmarks/results/memory-<device>.json`` unless ``--json`` says otherwise.

Goals (issue 10): DenseNet-BC-100 at batch 64 on the CPU, memory-efficient at most 0.4x
the ordinary mode's peak and below PyTorch's checkpointed one; across depths 100, 160 and
250 the growth per added layer constant within 15% in memory-efficient mode; step time
at most 1.15x the ordinary mode's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
NUM_CLASSES, IMAGE_SHAPE = 10, (3, 32, 32)
LEARNING_RATE, MOMENTUM = 0.1, 0.9
MODES = {"minidense": ("ordinary", "memory_efficient"), "torch": ("ordinary", "checkpointed")}


# ---------------------------------------------------------------------------
# The child: one configuration in a fresh process; prints one JSON line.
# ---------------------------------------------------------------------------
def resident_kib():
    """(current, peak) resident set size of this process in KiB (Linux /proc)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


class CupyCountingAllocator:
    """CuPy's memory pool underneath, with the bytes handed out counted: ``peak`` is
    the most that was allocated at once (the pool's own total includes cached blocks)."""

    def __init__(self, cupy):
        self.pool, self.live, self.now, self.peak = cupy.cuda.MemoryPool(), {}, 0, 0
        cupy.cuda.set_allocator(cupy.cuda.PythonFunctionAllocator(self._malloc, self._free).malloc)

    def _malloc(self, size, device_id):
        memory = self.pool.malloc(size)
        self.live[memory.ptr] = (memory, size)   # holding the MemoryPointer keeps the block
        self.now += size
        self.peak = max(self.peak, self.now)
        return memory.ptr

    def _free(self, ptr, device_id):
        _, size = self.live.pop(ptr)   # dropping the MemoryPointer gives the block back to the pool
        self.now -= size


def torch_checkpointed(twin, torch):
    """Make every dense block of a torch_twins DenseNet-BC checkpoint its layers'
    concat-BN-ReLU-Conv(1x1) as torchvision's memory_efficient=True does."""
    from torch.utils.checkpoint import checkpoint

    def block_forward(block, x):
        features = [x]
        for layer in block.children():
            def segment(*inputs, layer=layer):
                return layer.conv1(layer.relu1(layer.norm1(torch.cat(inputs, 1))))
            h = checkpoint(segment, *features, use_reentrant=False)
            features.append(layer.conv2(layer.relu2(layer.norm2(h))))
        return torch.cat(features, 1)

    for name, module in twin.named_children():
        if name.startswith("block"):
            module.forward = block_forward.__get__(module)
    return twin


def child(config):
    sys.path.insert(0, str(REPO_ROOT))
    sys.path.insert(0, str(BENCHMARKS_DIR))
    if config["framework"] == "minidense":
        # As minidense's commands run (minidense/process.py): OpenBLAS's short spin (the
        # child starts again to get it) and malloc keeping freed memory.
        from minidense import process
        process.start_command()
    import numpy as np
    framework, device, batch = config["framework"], config["device"], config["batch_size"]
    if device == "cpu" and config.get("limit_gib"):
        # A clean MemoryError in this process rather than the kernel's OOM killer picking
        # some process on a shared machine.
        limit = int(config["limit_gib"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch,) + IMAGE_SHAPE).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, batch)
    counter = None
    if framework == "minidense":
        import minidense as md
        if device == "cuda":
            counter = CupyCountingAllocator(md.backend.array_module("cuda"))
        x, y = md.tensor(images, device=device), md.tensor(labels, device=device)
        before = resident_kib()[0]
        allocated_before = counter.now if counter else 0
        md.manual_seed(0)
        model = md.models.densenet_cifar(config["depth"], config["growth_rate"], bottleneck=True,
                                         compression=0.5,
                                         memory_efficient=config["mode"] == "memory_efficient")
        model.to(device).train()
        optimizer = md.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)

        def step():
            loss = md.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if device == "cuda":
                md.backend.array_module("cuda").cuda.Device().synchronize()
            return loss.item()
    else:
        import torch
        import torch_twins
        torch.set_num_threads(config["threads"])
        x = torch.tensor(images, device=device)
        y = torch.tensor(labels, device=device)
        before = resident_kib()[0]
        allocated_before = torch.cuda.memory_allocated() if device == "cuda" else 0
        torch.manual_seed(0)
        model = torch_twins.densenet_cifar(config["depth"], config["growth_rate"], bottleneck=True,
                                           compression=0.5)
        if config["mode"] == "checkpointed":
            model = torch_checkpointed(model, torch)
        model.to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)

        def step():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()
            return loss.item()

    times, cpu_times, losses = [], [], []
    for _ in range(config["steps"]):
        start, start_cpu = time.perf_counter(), time.process_time()
        losses.append(step())
        times.append((time.perf_counter() - start) * 1e3)
        cpu_times.append((time.process_time() - start_cpu) * 1e3)
    # CPU time (all threads) beside wall time: waiting for a core that another program
    # holds does not count in it, so on a busy machine it is the steadier figure.
    result = {"step_ms": times, "step_cpu_ms": cpu_times, "loss_first_step": losses[0]}
    if device == "cpu":
        now, peak = resident_kib()
        result.update(rss_before_build_mib=before / 1024, rss_peak_mib=peak / 1024,
                      peak_mib=(peak - before) / 1024)
        if config.get("tracemalloc") and framework == "minidense":
            # One more step under tracemalloc, which sees NumPy's allocations exactly (not
            # torch's): the most bytes allocated at once during the step, over those held
            # before it (parameters, momentum).  Free of the C allocator's fragmentation.
            import tracemalloc
            tracemalloc.start()
            held = tracemalloc.get_traced_memory()[0]
            step()
            result["traced_step_peak_mib"] = (tracemalloc.get_traced_memory()[1] - held) / 2**20
            tracemalloc.stop()
    elif framework == "minidense":
        result.update(peak_mib=(counter.peak - allocated_before) / 2**20)
    else:
        result.update(peak_mib=(torch.cuda.max_memory_allocated() - allocated_before) / 2**20)
    print(json.dumps(result))


# ---------------------------------------------------------------------------
# The parent: configurations in turns, a table, the JSON.
# ---------------------------------------------------------------------------
def run_child(config):
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(config)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["exit status %d" % done.returncode])[-1],
                "returncode": done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


def label(config):
    return (f"{config['framework']:<9} {config['mode']:<16} BC-{config['depth']:<3} "
            f"k={config['growth_rate']:<2} batch {config['batch_size']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--depths", default="100,160,250", help="DenseNet-BC depths (default 100,160,250)")
    parser.add_argument("--growth-rate", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="steps per process; the first is warm-up (default 2)")
    parser.add_argument("--rounds", type=int, default=1, help="processes per configuration, in turns (default 1)")
    parser.add_argument("--no-torch", action="store_true", help="minidense only")
    parser.add_argument("--extra-bc250-k24", action="store_true",
                        help="also DenseNet-BC-250 (k=24), memory-efficient mode, one round")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="skip what is left once the run has taken this long")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="minidense: one more step per process under tracemalloc, its peak traced bytes")
    parser.add_argument("--limit-gib", type=float, default=16,
                        help="address-space limit of each CPU process (default 16): a configuration "
                             "that needs more fails with MemoryError, noted in the JSON")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", default=None,
                        help="where to write the results (default benchmarks/results/memory-<device>.json)")
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(json.loads(args.child))

    sys.path.insert(0, str(BENCHMARKS_DIR))
    from ops import RESULTS_DIR, blas_description, finish_run, machine_description, torch
    blas = blas_description()
    use_torch = (torch is not None and not args.no_torch
                 and (args.device == "cpu" or torch.cuda.is_available()))
    machine = machine_description(args.device, blas)
    frameworks = ["minidense"] + (["torch"] if use_torch else [])
    base = {"device": args.device, "batch_size": args.batch_size, "growth_rate": args.growth_rate,
            "steps": args.steps, "threads": blas["threads"], "limit_gib": args.limit_gib,
            "tracemalloc": args.tracemalloc}
    configs = [dict(base, framework=f, mode=m, depth=d)
               for d in (int(d) for d in args.depths.split(",")) for f in frameworks for m in MODES[f]]
    extra = ([dict(base, framework="minidense", mode="memory_efficient", depth=250, growth_rate=24)]
             if args.extra_bc250_k24 else [])
    what = "peak RSS minus RSS before the model is built" if args.device == "cpu" else \
        "peak of a counting allocator (CuPy) / max_memory_allocated (torch) minus before the build"
    print(f"DenseNet-BC training step, float32, batch {args.batch_size}, {args.device}; {what}; "
          f"a fresh process per configuration; {blas['threads']} BLAS/torch thread(s); "
          f"{'PyTorch ' + torch.__version__ if use_torch else 'no PyTorch'}\n")

    load_before = os.getloadavg()
    started = time.monotonic()
    runs = {id(c): [] for c in configs + extra}
    skipped = []
    for round_ in range(args.rounds):
        for config in configs + (extra if round_ == 0 else []):
            if args.max_minutes is not None and time.monotonic() - started > 60 * args.max_minutes:
                skipped.append(dict(config, round=round_, reason=f"--max-minutes {args.max_minutes}"))
                continue
            result = run_child(config)
            runs[id(config)].append(result)
            shown = (f"{result['peak_mib']:8.0f} MiB  {statistics.median(result['step_ms'][1:] or result['step_ms']):8.0f} ms"
                     if "error" not in result else "failed: " + result["error"])
            print(f"round {round_ + 1}  {label(config)}  {shown}", flush=True)

    results = []
    for config in configs + extra:
        done = [r for r in runs[id(config)] if "error" not in r]
        entry = dict(config, processes=runs[id(config)])
        if done:
            timed = [t for r in done for t in (r["step_ms"][1:] or r["step_ms"])]
            timed_cpu = [t for r in done for t in (r["step_cpu_ms"][1:] or r["step_cpu_ms"])]
            entry.update(peak_mib=max(r["peak_mib"] for r in done),
                         step_ms_median=statistics.median(timed), step_ms_timed=timed,
                         step_cpu_ms_median=statistics.median(timed_cpu))
            if "traced_step_peak_mib" in done[0]:
                entry["traced_step_peak_mib"] = max(r["traced_step_peak_mib"] for r in done)
        results.append(entry)

    def find(framework, mode, depth, k=args.growth_rate):
        for r in results:
            if (r["framework"], r["mode"], r["depth"], r["growth_rate"]) == (framework, mode, depth, k) \
                    and "peak_mib" in r:
                return r

    print(f"\n{'model':<12} {'framework':<10} {'mode':<17} {'peak MiB':>9} {'x ordinary':>10} "
          f"{'ms/step':>8} {'x ordinary':>10} {'CPU ms':>8} {'x ordinary':>10}")
    for r in results:
        if "peak_mib" not in r:
            print(f"BC-{r['depth']} k={r['growth_rate']:<3} {r['framework']:<10} {r['mode']:<17} (failed or skipped)")
            continue
        ordinary = find(r["framework"], "ordinary", r["depth"], r["growth_rate"])
        memory_ratio = f"{r['peak_mib'] / ordinary['peak_mib']:.2f}" if ordinary else "-"
        time_ratio = f"{r['step_ms_median'] / ordinary['step_ms_median']:.2f}" if ordinary else "-"
        r["memory_ratio_to_ordinary"] = float(memory_ratio) if ordinary else None
        cpu_ratio = f"{r['step_cpu_ms_median'] / ordinary['step_cpu_ms_median']:.2f}" if ordinary else "-"
        r["time_ratio_to_ordinary"] = float(time_ratio) if ordinary else None
        r["cpu_time_ratio_to_ordinary"] = float(cpu_ratio) if ordinary else None
        print(f"BC-{r['depth']} k={r['growth_rate']:<3} {r['framework']:<10} {r['mode']:<17} "
              f"{r['peak_mib']:9.0f} {memory_ratio:>10} {r['step_ms_median']:8.0f} {time_ratio:>10} "
              f"{r['step_cpu_ms_median']:8.0f} {cpu_ratio:>10}"
              + (f"   traced {r['traced_step_peak_mib']:.0f} MiB" if "traced_step_peak_mib" in r else ""))

    # Growth per added layer (a depth step of 6 adds one bottleneck layer to each of the 3 blocks,
    # i.e. 3 layers): between consecutive depths, (peak difference) / (layers added).
    growth = {}
    depths = sorted({c["depth"] for c in configs})
    for framework in frameworks:
        for mode in MODES[framework]:
            for measure in ("peak_mib", "traced_step_peak_mib"):
                steps = []
                for a, b in zip(depths, depths[1:]):
                    ra, rb = find(framework, mode, a), find(framework, mode, b)
                    if ra and rb and measure in ra and measure in rb:
                        steps.append({"from": a, "to": b,
                                      "mib_per_layer": (rb[measure] - ra[measure]) / ((b - a) // 2)})
                if steps:
                    growth[f"{framework} {mode}" + (" (tracemalloc)" if measure != "peak_mib" else "")] = steps
    if any(growth.values()):
        print("\ngrowth of the peak per added dense layer (MiB; DenseNet-BC has (L - 4) / 2 layers):")
        for key, steps in growth.items():
            print(f"  {key:<42} " + ", ".join(f"{s['from']}->{s['to']}: {s['mib_per_layer']:.1f}" for s in steps))
    for s in skipped:
        print(f"skipped: {label(s)} round {s['round'] + 1} ({s['reason']})")

    finish_run("benchmarks/memory.py", machine,
               {"dtype": "float32", "batch_size": args.batch_size, "growth_rate": args.growth_rate,
                "steps_per_process": args.steps, "rounds": args.rounds,
                "measure": what, "optimizer": "SGD momentum 0.9",
                "input": "random normal 3x32x32, random labels of 10 classes"},
               load_before, {"configurations": results, "growth_per_layer_mib": growth,
                             "skipped": skipped},
               args.json or RESULTS_DIR / f"memory-{args.device}.json")


if __name__ == "__main__":
    main()

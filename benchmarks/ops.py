"""Time minidense's heavy ops against PyTorch, side by side in the same run.

    python benchmarks/ops.py                 # CPU, the shapes that dominate the models
    python benchmarks/ops.py --quick         # fewer repetitions
    python benchmarks/ops.py --device cuda   # minidense on CuPy, PyTorch on CUDA
    python benchmarks/ops.py --threads 1 --clock cpu   # one thread, CPU time

For each op and shape: forward alone (under no_grad) and forward + backward (leaf
inputs, a fixed upstream gradient; the leaves' .grad is cleared before each call),
float32.  The two frameworks take turns, so that noise from other programs on the
machine hits both alike (each turn times the second of two calls: see
``time_interleaved``), and the median of ``--repeats`` timed calls after warm-up is
reported, with the ratio of the minimums beside it.  PyTorch gets as many
threads as minidense's BLAS uses.  The ratio is minidense's time over PyTorch's.

On a shared machine, ``--threads 1 --clock cpu`` gives figures that other programs
disturb much less: CPU time leaves out the time spent waiting for a core, whereas a
two-thread BLAS or OpenMP call stalls whenever one of its cores is taken.

Goal (issue 2): conv2d forward + backward at most 3x PyTorch's time at every 32x32
shape and at most 2x at 8x8; the "goal" column says whether each conv meets it.
Without torch the PyTorch columns stay empty.  Results also go to a JSON file
(``benchmarks/results/ops-<device>[-<n>thread][-cputime].json`` unless ``--json`` says
otherwise), with the machine: CPU count, NumPy, BLAS and its threads, torch, and the
load average around the run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import minidense as md  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------
# The cases: (name, shape text, goal ratio or None, builder).  A builder gets the
# device and a seeded generator and returns the inputs as float32 NumPy arrays plus
# one function per framework that runs the op on that framework's tensors.
# ---------------------------------------------------------------------------
def conv_case(n, c, hw, o, k, stride, pad):
    goal = {32: 3.0, 8: 2.0}.get(hw)  # issue 2 sets goals at 32x32 and 8x8 inputs
    shape = f"{n}x{c}x{hw}x{hw}, {o} {k}x{k} filters, stride {stride}, pad {pad}"

    def build(rng):
        arrays = [rng.standard_normal((n, c, hw, hw), dtype=np.float32),
                  rng.standard_normal((o, c, k, k), dtype=np.float32) * np.float32((2 / (c * k * k)) ** 0.5)]
        return arrays, (lambda x, w: md.conv2d(x, w, stride=stride, padding=pad),
                        lambda x, w: F.conv2d(x, w, stride=stride, padding=pad))
    return "conv2d", shape, goal, build


def depthwise_conv_case(n, c, hw, stride):
    """A 3x3 depthwise convolution (groups = channels), as MobileNetV2's."""
    shape = f"{n}x{c}x{hw}x{hw}, 3x3 depthwise, stride {stride}, pad 1"

    def build(rng):
        arrays = [rng.standard_normal((n, c, hw, hw), dtype=np.float32),
                  rng.standard_normal((c, 1, 3, 3), dtype=np.float32) * np.float32((2 / 9) ** 0.5)]
        return arrays, (lambda x, w: md.conv2d(x, w, stride=stride, padding=1, groups=c),
                        lambda x, w: F.conv2d(x, w, stride=stride, padding=1, groups=c))
    return "depthwise_conv2d", shape, None, build


def batch_norm_case(n, c, hw):
    def build(rng):
        arrays = [rng.standard_normal((n, c, hw, hw), dtype=np.float32),
                  rng.uniform(0.5, 1.5, c).astype(np.float32), rng.standard_normal(c, dtype=np.float32)]

        def md_bn(x, gamma, beta):
            xp = md.backend.get_array_module(x.data)
            return md.batch_norm(x, gamma, beta, xp.zeros(c, np.float32), xp.ones(c, np.float32),
                                 training=True)

        def torch_bn(x, gamma, beta):
            return F.batch_norm(x, torch.zeros(c, device=x.device), torch.ones(c, device=x.device),
                                gamma, beta, training=True)
        return arrays, (md_bn, torch_bn)
    return "batch_norm", f"{n}x{c}x{hw}x{hw}, training", None, build


def concat_case(n, c, growth, hw):
    def build(rng):
        arrays = [rng.standard_normal((n, c, hw, hw), dtype=np.float32),
                  rng.standard_normal((n, growth, hw, hw), dtype=np.float32)]
        return arrays, (lambda a, b: md.cat([a, b], dim=1), lambda a, b: torch.cat([a, b], dim=1))
    return "concat", f"{n}x{c}x{hw}x{hw} + {n}x{growth}x{hw}x{hw}", None, build


def relu_case(n, c, hw):
    def build(rng):
        return [rng.standard_normal((n, c, hw, hw), dtype=np.float32)], (md.relu, F.relu)
    return "relu", f"{n}x{c}x{hw}x{hw}", None, build


def avg_pool_case(n, c, hw, k):
    def build(rng):
        return ([rng.standard_normal((n, c, hw, hw), dtype=np.float32)],
                (lambda x: md.avg_pool2d(x, k), lambda x: F.avg_pool2d(x, k)))
    return "avg_pool2d", f"{n}x{c}x{hw}x{hw}, {k}x{k}", None, build


CASES = [
    conv_case(64, 48, 32, 12, 3, 1, 1),    # DenseNet-BC growth-rate conv
    conv_case(64, 16, 32, 16, 3, 1, 1),    # ResNet-20, first stage
    conv_case(64, 64, 8, 64, 3, 1, 1),     # ResNet-20, last stage
    conv_case(64, 48, 32, 12, 3, 2, 1),
    conv_case(64, 16, 32, 16, 3, 2, 1),
    conv_case(64, 64, 8, 64, 3, 2, 1),
    conv_case(64, 200, 32, 48, 1, 1, 0),   # DenseNet-BC bottleneck
    conv_case(64, 16, 32, 32, 3, 2, 1),    # ResNet-20's own stride-2 convs
    conv_case(64, 32, 16, 64, 3, 2, 1),
    depthwise_conv_case(64, 144, 32, 1),   # MobileNetV2 (CIFAR): the widest map...
    depthwise_conv_case(64, 144, 32, 2),
    depthwise_conv_case(64, 192, 16, 1),
    depthwise_conv_case(64, 384, 8, 1),
    depthwise_conv_case(64, 960, 4, 1),    # ...and the last
    batch_norm_case(64, 48, 32),
    batch_norm_case(64, 64, 8),
    concat_case(64, 16, 12, 32),           # DenseNet dense connectivity, first layer...
    concat_case(64, 16 + 12 * 7, 12, 32),
    concat_case(64, 16 + 12 * 15, 12, 32), # ...and last layer of a 16-layer block
    relu_case(64, 48, 32),
    avg_pool_case(64, 48, 32, 2),          # DenseNet transition
]


# ---------------------------------------------------------------------------
# Frameworks: make tensors, run forward or forward + backward, wait for the device.
# ---------------------------------------------------------------------------
class Framework:
    def __init__(self, device):
        self.device = device

    def forward_backward(self, op, inputs, gy):
        for t in inputs:
            t.grad = None
        op(*inputs).backward(gy)


class Minidense(Framework):
    name = "minidense"

    def tensors(self, arrays):
        return [md.tensor(a, requires_grad=True, device=self.device) for a in arrays]

    def gradient(self, like):
        xp = md.backend.array_module(self.device)
        return xp.asarray(np.random.default_rng(1).standard_normal(like.shape, dtype=np.float32))

    def forward(self, op, inputs):
        with md.no_grad():
            return op(*inputs)

    def synchronize(self):
        if self.device == "cuda":
            md.backend.array_module("cuda").cuda.get_current_stream().synchronize()


class Torch(Framework):
    name = "torch"

    def tensors(self, arrays):
        return [torch.tensor(a, device=self.device, requires_grad=True) for a in arrays]

    def gradient(self, like):
        gy = np.random.default_rng(1).standard_normal(tuple(like.shape), dtype=np.float32)
        return torch.tensor(gy, device=self.device)

    def forward(self, op, inputs):
        with torch.no_grad():
            return op(*inputs)

    def synchronize(self):
        if self.device == "cuda":
            torch.cuda.synchronize()


def time_interleaved(calls, repeats, warmup, synchronize, clock=time.perf_counter):
    """Milliseconds of each call, the calls taking turns.

    Each turn runs its call twice and times the second: a multithreaded library's
    threads keep spinning for a while after a call (OpenMP's spin-wait), and would
    otherwise slow down whichever framework runs next.  Within a model, consecutive
    ops come from one framework, which is what the second call sees.
    """
    for call, sync in zip(calls, synchronize):
        for _ in range(warmup):
            call()
            sync()
    times = [[] for _ in calls]
    for _ in range(repeats):
        for call, sync, record in zip(calls, synchronize, times):
            call()
            sync()
            start = clock()
            call()
            sync()
            record.append((clock() - start) * 1e3)
    return times


def summary(ms):
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "all_ms": [round(t, 3) for t in ms]}


def run_case(case, frameworks, repeats, warmup, clock):
    family, shape, goal, build = case
    arrays, ops = build(np.random.default_rng(0))
    result = {"op": family, "shape": shape, "goal_ratio": goal}
    for mode in ("forward", "forward_backward"):
        calls = []
        for fw, op in zip(frameworks, ops):
            inputs = fw.tensors(arrays)
            if mode == "forward":
                calls.append(lambda fw=fw, op=op, inputs=inputs: fw.forward(op, inputs))
            else:
                gy = fw.gradient(fw.forward(op, inputs))
                calls.append(lambda fw=fw, op=op, inputs=inputs, gy=gy: fw.forward_backward(op, inputs, gy))
        times = time_interleaved(calls, repeats, warmup, [fw.synchronize for fw in frameworks], clock)
        for fw, ms in zip(frameworks, times):
            result.setdefault(fw.name, {})[mode] = summary(ms)
        if len(frameworks) == 2:
            mine, theirs = result["minidense"][mode], result["torch"][mode]
            result.setdefault("ratio", {})[mode] = mine["median_ms"] / theirs["median_ms"]
            result.setdefault("ratio_of_minimums", {})[mode] = mine["min_ms"] / theirs["min_ms"]
    return result


# ---------------------------------------------------------------------------
# Machine description and output
# ---------------------------------------------------------------------------
def blas_description():
    """BLAS library and the number of threads it runs (threadpoolctl when installed)."""
    info = {}
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info = {"name": blas.get("name"), "version": blas.get("version")}
    except Exception:  # older NumPy: no dict form
        pass
    threads = None
    try:
        from threadpoolctl import threadpool_info
        pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            threads = pools[0]["num_threads"]
            info["internal_api"] = pools[0].get("internal_api")
            info["architecture"] = pools[0].get("architecture")
    except ImportError:
        for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
            if os.environ.get(var):
                threads = int(os.environ[var])
                break
    info["threads"] = threads or os.cpu_count()
    return info


def set_blas_threads(threads):
    """Limit the BLAS that NumPy uses to ``threads`` threads (needs threadpoolctl, or the
    environment variable OPENBLAS_NUM_THREADS / MKL_NUM_THREADS set before starting)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        sys.exit("--threads needs threadpoolctl (pip install threadpoolctl); or set "
                 "OPENBLAS_NUM_THREADS / MKL_NUM_THREADS before running")
    threadpool_limits(limits=threads, user_api="blas")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device, blas):
    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "blas": blas, "device": device,
            "torch": torch.__version__ if torch is not None else None,
            "torch_threads": torch.get_num_threads() if torch is not None else None}
    if device == "cuda":
        cupy = md.backend.array_module("cuda")
        info["cupy"] = cupy.__version__
        info["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    return info


def print_table(results, has_torch):
    """Medians and their ratio, then the ratio of the minimums ("min"): on a busy machine
    the minimum is the better estimate of what each framework needs undisturbed."""
    header = (f"{'op':<11} {'shape':<48} {'fwd ms':>8} {'torch':>8} {'ratio':>6} {'min':>6}   "
              f"{'f+b ms':>8} {'torch':>8} {'ratio':>6} {'min':>6}  goal")
    print(header)
    print("-" * len(header))
    for r in results:
        cells = []
        for mode in ("forward", "forward_backward"):
            mine = r["minidense"][mode]
            if has_torch:
                theirs = r["torch"][mode]
                cells.append(f"{mine['median_ms']:8.2f} {theirs['median_ms']:8.2f} "
                             f"{r['ratio'][mode]:5.2f}x {r['ratio_of_minimums'][mode]:5.2f}x")
            else:
                cells.append(f"{mine['median_ms']:8.2f} {'-':>8} {'-':>6} {'-':>6}")
        goal = ""
        if r["goal_ratio"] and has_torch:
            met = r["ratio"]["forward_backward"] <= r["goal_ratio"]
            goal = f"<={r['goal_ratio']:.0f}x " + ("met" if met else "MISSED")
        print(f"{r['op']:<11} {r['shape']:<48} {cells[0]}   {cells[1]}  {goal}")


def write_json_atomically(path, payload):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with md.files.atomic_write(path, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")


def finish_run(benchmark, machine, settings, load_before, results, path):
    """The closing lines of every benchmark: the load average around the run, then the
    JSON (machine, settings, load, results), written atomically."""
    load_after = os.getloadavg()
    print(f"\nload average (1 min) {load_before[0]:.2f} before the run, {load_after[0]:.2f} after, on "
          f"{os.cpu_count()} CPUs (a load before the run near the CPU count means other programs "
          f"competed for the cores: rerun when quiet)")
    payload = {"benchmark": benchmark,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine, "settings": settings,
               "load_average_1min": {"before": load_before[0], "after": load_after[0]},
               "results": results}
    write_json_atomically(path, payload)
    print(f"\nwrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per framework (default 15, 5 with --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", default=None, help="where to write the results (default benchmarks/results/ops-<device>.json)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--only", default=None, help="run only the ops whose name contains this text")
    parser.add_argument("--threads", type=int, default=None,
                        help="BLAS threads (and as many for torch); default: what the BLAS uses now")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: process CPU time, with --threads 1 a measure that ignores time spent "
                             "waiting for a core that other programs hold (CPU only)")
    parser.add_argument("--conv-algorithm", choices=md.CONV_ALGORITHMS, default=None,
                        help="minidense's conv2d algorithm (default: the device's, "
                             "md.functions.connection.default_conv_algorithm)")
    args = parser.parse_args(argv)
    # Both frameworks in this process, run as minidense's commands run (minidense/process.py):
    # OpenBLAS's short spin (the process may start again to get it), malloc keeping freed memory.
    md.process.start_command()
    repeats = args.repeats or (5 if args.quick else 15)
    warmup = 1 if args.quick else 2
    md.backend.check_device(args.device)

    if args.threads is not None:
        set_blas_threads(args.threads)
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        parser.error("--clock cpu needs --device cpu and --threads 1 (CPU time adds up the threads)")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    blas = blas_description()
    frameworks = [Minidense(args.device)]
    use_torch = torch is not None and (args.device == "cpu" or torch.cuda.is_available())
    if use_torch:
        torch.set_num_threads(blas["threads"])
        frameworks.append(Torch(args.device))
    machine = machine_description(args.device, blas)
    print(f"minidense on {'NumPy' if args.device == 'cpu' else 'CuPy'} vs "
          + (f"PyTorch {torch.__version__} on {args.device}" if use_torch
             else "no PyTorch (not importable)" if torch is None else f"no PyTorch (this torch has no {args.device})"))
    print(f"{machine['cpu']}, {machine['cpu_count']} CPUs; NumPy {np.__version__}, "
          f"BLAS {blas.get('name')} {blas.get('version')} with {blas['threads']} thread(s)"
          + (f"; torch set to {torch.get_num_threads()} to match" if use_torch else ""))
    print(f"float32; {'CPU' if args.clock == 'cpu' else 'wall'} time, median of {repeats} interleaved calls "
          f"after {warmup} warm-up; ratio = minidense / torch\n")

    cases = [c for c in CASES if args.only is None or args.only in c[0]]
    load_before = os.getloadavg()
    results = []
    with md.conv_algorithm(args.conv_algorithm):
        for case in cases:
            results.append(run_case(case, frameworks, repeats, warmup, clock))
    print_table(results, use_torch)
    name = f"ops-{args.device}" + (f"-{args.threads}thread" if args.threads else "") + (
        "-cputime" if args.clock == "cpu" else "") + (
        f"-{args.conv_algorithm}" if args.conv_algorithm else "")
    finish_run("benchmarks/ops.py", machine,
               {"repeats": repeats, "warmup": warmup, "dtype": "float32", "clock": args.clock,
                "conv_algorithm": args.conv_algorithm},
               load_before, results, args.json or RESULTS_DIR / f"{name}.json")


if __name__ == "__main__":
    main()

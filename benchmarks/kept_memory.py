"""What a training step keeps for backward, minidense against PyTorch, and the step's peak.

    python benchmarks/kept_memory.py                          # MobileNetV2 (CIFAR), batch 64
    python benchmarks/kept_memory.py --model resnet20 --batch-size 128

Each framework runs in a fresh process of its own (``--child``), float32, training mode,
random 3x32x32 images, SGD with momentum 0.9:

* kept for backward, after one forward (the loss's graph alive): minidense's arrays that
  the ops passed to ``save_for_backward``, PyTorch's tensors that autograd saved
  (``torch.autograd.graph.saved_tensors_hooks``); each allocation counted once (the
  output of a ReLU6 that the next convolution keeps as its input is one array);
  minidense's by op, and its depthwise convolutions' own (x and W, no patch matrix);
* the peak of two whole steps: the process's peak resident size over its resident size
  before the model was built (VmHWM - VmRSS, as benchmarks/memory.py), and for
  minidense the peak of NumPy's allocations during one more step under tracemalloc
  (which does not see PyTorch's).

Results also go to ``benchmarks/results/kept-memory-cpu.json`` unless ``--json`` says
otherwise, with the machine and the load average around the run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS_DIR.parent))
sys.path.insert(0, str(BENCHMARKS_DIR))
from memory import resident_kib  # noqa: E402

MIB = 2 ** 20


def minidense_kept(model, x, y, md):
    """(bytes kept, bytes by op, bytes the depthwise convolutions keep, of which also
    kept by another op) after one forward, each allocation once."""
    from minidense.viz import _walk   # the graph's nodes, as md.to_dot draws them
    nodes = _walk(md.cross_entropy(model(x), y).grad_fn)[0]
    owners = {}   # allocation id -> (nbytes, {op names})
    depthwise = set()
    for node in nodes:
        name = type(node).__name__
        if getattr(node, "algorithm", None) == "depthwise":
            name = "Conv2d (depthwise)"
        for array in node.saved:
            if md.backend.is_array(array):
                base = md.backend._allocation(array)
                owners.setdefault(id(base), [base.nbytes, set()])[1].add(name)
                if name == "Conv2d (depthwise)":
                    depthwise.add(id(base))
    by_op = Counter()
    for nbytes, names in owners.values():
        for name in names:
            by_op[name] += nbytes / len(names)   # shared allocations split between their ops
    shared = sum(owners[k][0] for k in depthwise if len(owners[k][1]) > 1)
    return (sum(n for n, _ in owners.values()), dict(by_op),
            sum(owners[k][0] for k in depthwise), shared)


def torch_kept(model, x, y, torch):
    """Bytes of the storages autograd saved during one forward, each storage once."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    del loss
    return sum(storages.values())


def child(framework, name, batch_size, threads):
    import numpy as np
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size, 3, 32, 32), dtype=np.float32)
    labels = rng.integers(0, 10, batch_size)
    import minidense as md
    md.set_num_threads(threads)
    before = resident_kib()[0]
    md.manual_seed(0)
    model = md.models.get(name)
    result = {"framework": framework}
    if framework == "minidense":
        x, y = md.tensor(images), md.tensor(labels)
        optimizer = md.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def step():
            loss = md.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    else:
        import torch
        import torch_twins
        torch.set_num_threads(threads)
        twin = torch_twins.get(name)
        twin.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()}, strict=False)
        del model
        model = twin.train()
        x, y = torch.tensor(images), torch.tensor(labels)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def step():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for _ in range(2):
        step()
    result["step_peak_mib"] = (resident_kib()[1] - before) / 1024
    if framework == "minidense":
        import tracemalloc
        tracemalloc.start()
        held = tracemalloc.get_traced_memory()[0]
        step()
        result["traced_step_peak_mib"] = (tracemalloc.get_traced_memory()[1] - held) / MIB
        tracemalloc.stop()
        kept, by_op, depthwise, shared = minidense_kept(model, x, y, md)
        result.update(kept_mib=kept / MIB, kept_by_op_mib={k: v / MIB for k, v in by_op.items()},
                      depthwise_kept_mib=depthwise / MIB, depthwise_shared_mib=shared / MIB)
    else:
        result["kept_mib"] = torch_kept(model, x, y, torch) / MIB
    print(json.dumps(result))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenet_v2_cifar")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="threads of each process (default 1)")
    parser.add_argument("--json", default=None,
                        help="where to write the results (default benchmarks/results/kept-memory-cpu.json)")
    parser.add_argument("--child", choices=("minidense", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.model, args.batch_size, args.threads)
        return
    from ops import RESULTS_DIR, blas_description, finish_run, machine_description
    load_before = os.getloadavg()
    results = {}
    for framework in ("minidense", "torch"):
        done = subprocess.run([sys.executable, __file__, "--child", framework, "--model", args.model,
                               "--batch-size", str(args.batch_size), "--threads", str(args.threads)],
                              capture_output=True, text=True, check=True)
        results[framework] = json.loads(done.stdout.strip().splitlines()[-1])
    ours, theirs = results["minidense"], results["torch"]
    print(f"{args.model}, batch {args.batch_size}, float32, one training step")
    print(f"kept for backward: minidense {ours['kept_mib']:.1f} MiB, PyTorch {theirs['kept_mib']:.1f} MiB "
          f"({ours['kept_mib'] / theirs['kept_mib']:.2f}x)")
    for op, mib in sorted(ours["kept_by_op_mib"].items(), key=lambda kv: -kv[1]):
        print(f"    {op:<22}{mib:8.1f} MiB")
    print(f"  the depthwise convolutions keep {ours['depthwise_kept_mib']:.1f} MiB (x and W), of which "
          f"{ours['depthwise_shared_mib']:.1f} MiB are arrays another op keeps too")
    print(f"peak over resident before the model (2 steps): minidense {ours['step_peak_mib']:.0f} MiB, "
          f"PyTorch {theirs['step_peak_mib']:.0f} MiB; minidense's NumPy allocations at their peak "
          f"during a step (tracemalloc): {ours['traced_step_peak_mib']:.0f} MiB")
    finish_run("benchmarks/kept_memory.py", machine_description("cpu", blas_description()),
               {"model": args.model, "batch_size": args.batch_size, "threads": args.threads,
                "dtype": "float32"}, load_before, results,
               args.json or RESULTS_DIR / "kept-memory-cpu.json")


if __name__ == "__main__":
    main()

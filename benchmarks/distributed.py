"""Data-parallel throughput on the CPU: 1 process with 2 BLAS threads against 2 ranks
with 1 thread each, at the same global batch, for minidense (mpiexec, MPI allreduce) and
PyTorch (DistributedDataParallel over gloo) side by side.

    python benchmarks/distributed.py                       # ResNet-20 and DenseNet-BC-100
    python benchmarks/distributed.py --models resnet20 --steps 3

Every configuration runs in fresh processes (minidense's 2 ranks under ``mpiexec -n 2``,
PyTorch's as 2 processes joined by gloo over loopback) on random CIFAR-shaped data: a
step is forward, cross-entropy, backward, the gradient average, and SGD with momentum.
Reported: images/s (global batch over the median step time of rank 0, after one
warm-up step) of 1 process with 2 threads, 1 process with 1 thread, and 2 ranks with 1
thread each; the speed-up of 2 ranks over each single process; and for 2 ranks the
fraction of the step spent in the gradient allreduce, waiting for the other rank
included.  The 1-thread single process is the steadier baseline on a busy machine,
where a BLAS thread that spins waiting for its partner loses the most.

On a 2-core machine this measures whether 2 single-threaded ranks use the cores better
than one 2-threaded process (NumPy's element-wise work runs on one thread, so ranks can
win), plus the cost of the allreduce through shared memory.  It says nothing about a
network between machines, nor about NCCL on GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO = BENCHMARKS_DIR.parent
sys.path.insert(0, str(BENCHMARKS_DIR))
from ops import RESULTS_DIR, blas_description, finish_run, machine_description  # noqa: E402

MODELS = ("resnet20", "densenet_bc100_k12")


# ---------------------------------------------------------------------------
# Workers: one per process
# ---------------------------------------------------------------------------
def batches(batch, rank, size, steps):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((steps, batch, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, (steps, batch))
    part = slice(rank * batch // size, (rank + 1) * batch // size)
    return images[:, part], labels[:, part]


def minidense_worker(model_name, batch, steps, out):
    import minidense as md
    from minidense import distributed
    comm = distributed.init()
    md.manual_seed(0)
    model = md.models.get(model_name)
    optimizer = md.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    parameters, buffers = list(model.parameters()), [b for _, b in model.named_buffers()]
    images, labels = batches(batch, comm.rank, comm.size, steps + 1)
    model.train()
    times, comm_times = [], []
    for step in range(steps + 1):
        comm.barrier()
        start = time.perf_counter()
        loss = md.cross_entropy(model(md.tensor(images[step])), md.tensor(labels[step]))
        optimizer.zero_grad()
        loss.backward()
        before = time.perf_counter()
        comm.average_gradients(parameters, buffers)
        after = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
        comm_times.append(after - before)
    if comm.is_main:
        Path(out).write_text(json.dumps({"step_s": times[1:], "allreduce_s": comm_times[1:]}))


def torch_worker(model_name, batch, steps, out, rank, size, port):
    import torch
    import torch_twins
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if size > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=size)
    torch.manual_seed(0)
    model = torch_twins.get(model_name)
    model.train()
    if size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = batches(batch, rank, size, steps + 1)
    times = []
    for step in range(steps + 1):
        if size > 1:
            dist.barrier()
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(images[step])),
                                                 torch.from_numpy(labels[step]))
        optimizer.zero_grad()
        loss.backward()   # DDP averages the gradients during the backward pass
        optimizer.step()
        times.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps({"step_s": times[1:]}))
    if size > 1:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------
# The parent: one fresh set of processes per configuration
# ---------------------------------------------------------------------------
def environment(threads):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(BENCHMARKS_DIR)]))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(framework, model, batch, steps, ranks, threads, mpiexec, timeout):
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        worker = [sys.executable, str(Path(__file__).resolve()), "--worker", framework,
                  "--models", model, "--batch", str(batch), "--steps", str(steps),
                  "--out", str(out)]
        if framework == "minidense":
            command = ([mpiexec, "-n", str(ranks)] if ranks > 1 else []) + worker
            subprocess.run(command, env=environment(threads), check=True, timeout=timeout,
                           capture_output=True)
        else:
            port = free_port()
            processes = [subprocess.Popen(worker + ["--rank", str(r), "--size", str(ranks),
                                                    "--port", str(port)],
                                          env=environment(threads), stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE)
                         for r in range(ranks)]
            failures = [p.stderr.read().decode()[-2000:] for p in processes
                        if p.wait(timeout=timeout) != 0]
            # gloo sometimes aborts while tearing the group down, after rank 0 has written
            # its result ("terminate called without an active exception"): only a missing
            # result is a failure.
            if failures and not out.exists():
                raise RuntimeError(f"torch worker failed: {failures[0]}")
        return json.loads(out.read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=64, help="the global batch (default 64)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after 1 warm-up")
    parser.add_argument("--json", default=str(RESULTS_DIR / "distributed-cpu.json"))
    parser.add_argument("--no-torch", action="store_true", help="minidense only")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--worker", choices=("minidense", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch % 2:
        parser.error("--batch must be even (it is split over 2 ranks)")
    # Every process (parent, ranks, both frameworks' workers) runs as minidense's commands
    # do (minidense/process.py): OpenBLAS's short spin, inherited by the workers from the
    # parent (which may start again to get it), and malloc keeping freed memory.
    from minidense import process
    process.start_command()
    if args.worker == "minidense":
        return minidense_worker(args.models, args.batch, args.steps, args.out)
    if args.worker == "torch":
        return torch_worker(args.models, args.batch, args.steps, args.out, args.rank,
                            args.size, args.port)

    mpiexec = (shutil.which("mpiexec", path=str(Path(sys.executable).parent))
               or shutil.which("mpiexec"))
    if mpiexec is None:
        parser.error("mpiexec not found: pip install 'minidense[dist]'")
    frameworks = ["minidense"]
    if not args.no_torch:
        try:
            import torch  # noqa: F401
            frameworks.append("torch")
        except ImportError:
            print("torch is not importable: minidense only")
    load_before = os.getloadavg()
    results = []
    print(f"global batch {args.batch}, {args.steps} timed steps after 1 warm-up; images/s of "
          f"1 process x 2 threads, 1 process x 1 thread, 2 ranks x 1 thread\n")
    print(f"{'model':<20} {'framework':<10} {'1x2 img/s':>10} {'1x1 img/s':>10} "
          f"{'2x1 img/s':>10} {'2x1 / 1x2':>10} {'2x1 / 1x1':>10} {'allreduce':>10} {'load':>5}")
    configurations = {"1x2": (1, 2), "1x1": (1, 1), "2x1": (2, 1)}   # ranks x threads
    for model in args.models.split(","):
        for framework in frameworks:
            row = {"model": model, "framework": framework}
            for name, (ranks, threads) in configurations.items():
                load = os.getloadavg()[0]
                measured = run_config(framework, model, args.batch, args.steps, ranks, threads,
                                      mpiexec, args.timeout)
                step = float(np.median(measured["step_s"]))
                row[name] = {"ranks": ranks, "threads": threads, "median_step_s": step,
                             "images_per_s": args.batch / step, "load_before": load, **measured}
                if "allreduce_s" in measured and ranks == 2:
                    row["allreduce_fraction"] = float(np.median(measured["allreduce_s"]) / step)
            row["speedup_over_1x2"] = row["2x1"]["images_per_s"] / row["1x2"]["images_per_s"]
            row["speedup_over_1x1"] = row["2x1"]["images_per_s"] / row["1x1"]["images_per_s"]
            results.append(row)
            fraction = row.get("allreduce_fraction")
            print(f"{model:<20} {framework:<10} {row['1x2']['images_per_s']:>10.1f} "
                  f"{row['1x1']['images_per_s']:>10.1f} {row['2x1']['images_per_s']:>10.1f} "
                  f"{row['speedup_over_1x2']:>9.2f}x {row['speedup_over_1x1']:>9.2f}x "
                  f"{'' if fraction is None else f'{100 * fraction:.1f}%':>10} "
                  f"{row['2x1']['load_before']:>5.2f}", flush=True)
    finish_run("distributed", machine_description("cpu", blas_description()), vars(args) | {"mpiexec": mpiexec},
               load_before, results, Path(args.json))


if __name__ == "__main__":
    main()

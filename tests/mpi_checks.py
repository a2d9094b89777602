"""Checks that need several processes, for tests/test_distributed.py:

    mpiexec -n 2 python tests/mpi_checks.py CHECK OUT_FOLDER

Each rank writes OUT_FOLDER/<CHECK>-<rank>.json with what it measured; the test reads
them.  (pytest itself never imports mpi4py.MPI.)

  communication   the size, an allreduce of values that differ per rank, a broadcast,
                  each rank's thread count
  sync-bn         float64: 2 ranks with SyncBN and batch b each, 5 SGD-Nesterov steps,
                  against 1 process with batch 2b (computed on rank 0 too)
  local-bn        float32: 5 steps with each rank's own BN; are the parameters and
                  buffers then bitwise equal on every rank?
"""
import json
import sys
from pathlib import Path

import numpy as np

import minidense as md
from minidense import distributed

check, out = sys.argv[1], Path(sys.argv[2])
comm = distributed.init()
result = {"rank": comm.rank, "size": comm.size, "communicator": repr(comm)}
TINY = dict(depth=10, growth_rate=4, bottleneck=True, compression=0.5, drop_rate=0.0)


def model_and_optimizer(dtype, sync_comm=None):
    md.manual_seed(0)
    model = md.models.get("densenet_cifar", **TINY)
    model = model.double() if dtype == np.float64 else model
    if sync_comm is not None:
        distributed.sync_batchnorm(model, sync_comm)
    optimizer = md.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                             weight_decay=1e-4)
    return model, optimizer


def train(model, optimizer, images, labels, comm_, steps=5):
    model.train()
    parameters, buffers = list(model.parameters()), [b for _, b in model.named_buffers()]
    for step in range(steps):
        loss = md.cross_entropy(model(md.tensor(images[step])), md.tensor(labels[step]))
        optimizer.zero_grad()
        loss.backward()
        comm_.average_gradients(parameters, buffers)
        optimizer.step()
    return model.state_dict()


def batches(dtype, batch):
    rng = np.random.default_rng(1)
    images = rng.standard_normal((5, batch, 3, 32, 32)).astype(dtype)
    labels = rng.integers(0, 10, (5, batch))
    return images, labels


if check == "communication":
    values = np.array([comm.rank + 1.0, 10.0 * (comm.rank + 1)])
    result["allreduce"] = comm.allreduce(values.copy()).tolist()
    shared = np.full(3, float(comm.rank + 7))
    result["broadcast"] = comm.broadcast(shared, root=1).tolist()
    result["flags"] = comm.average_gradients([], flags=(comm.rank == 1, 1.0))
    result["threads"], result["cores"] = md.get_num_threads(), md.threads.available_cores()

elif check == "sync-bn":
    b = 4
    images, labels = batches(np.float64, 2 * b)
    mine = slice(comm.rank * b, (comm.rank + 1) * b)
    model, optimizer = model_and_optimizer(np.float64, comm)
    state = train(model, optimizer, images[:, mine], labels[:, mine], comm)
    if comm.rank == 0:
        reference, ref_optimizer = model_and_optimizer(np.float64)
        expected = train(reference, ref_optimizer, images, labels, distributed.SingleProcess())
        worst = 0.0
        for name, value in expected.items():
            if np.issubdtype(value.dtype, np.floating):
                scale = max(np.abs(value).max(), 1e-300)
                worst = max(worst, float(np.abs(state[name] - value).max() / scale))
        result["max_relative_difference"] = worst
        result["arrays"] = len(expected)

elif check == "local-bn":
    images, labels = batches(np.float32, 8)
    mine = slice(comm.rank * 4, (comm.rank + 1) * 4)
    model, optimizer = model_and_optimizer(np.float32)
    state = train(model, optimizer, images[:, mine], labels[:, mine], comm)
    differing = []
    for name, value in state.items():
        theirs = comm.broadcast(value.copy(order="C"), root=0)  # a 0-d count stays 0-d
        if not np.array_equal(theirs, value):
            differing.append(name)
    result["differing_from_rank_0"] = differing
    result["arrays"] = len(state)

else:
    raise SystemExit(f"mpi_checks: unknown check {check!r}")

(out / f"{check}-{comm.rank}.json").write_text(json.dumps(result))

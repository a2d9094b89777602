"""Data-parallel training on several processes, over MPI (mpi4py), with NCCL for CuPy.

    mpiexec -n 4 python -m minidense.train --batch-size 256 ...

Every process (a *rank*) holds a whole copy of the model and trains on its share of
every global batch.  After the backward pass the gradients are summed over the ranks
and divided by their number (one allreduce of one flat buffer), so every rank applies
the same update and the weights stay identical, as PyTorch's DistributedDataParallel
and ChainerMN do.  Nothing wraps the model: its state dict is that of a single-process
run.

* ``init()`` returns the communicator: an ``MPICommunicator`` when an MPI launcher
  started this process (its environment says so), else ``SingleProcess``, whose
  operations change nothing, so that the ordinary code path is the same code.
* Arrays travel over MPI when they are NumPy arrays and over NCCL when they are CuPy
  arrays (``backend.NcclGroup``, its unique id broadcast over MPI): the choice is made
  per array in ``MPICommunicator.allreduce`` and ``broadcast``.
* ``SyncBatchNorm2d`` (``sync_batchnorm(model, comm)`` converts a model in place) takes
  the batch statistics over every rank in the forward pass and the matching sums in the
  backward pass, so that N ranks with batch b compute what one process with batch N*b
  computes.

The one module that imports ``mpi4py``, and only inside ``init()`` when a launcher
started the process: importing minidense never starts MPI.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from . import backend, threads
from .functions.normalization import BatchNorm
from .nn.layers import BatchNorm2d, BatchNormReLU2d
from .nn import fusion

# (rank, size) variables that MPI launchers set: Open MPI, MPICH/Hydra and Intel MPI
# (PMI), PMIx, MVAPICH.  They are read before MPI starts, so that a bad option is
# reported by rank 0 alone with no communication.
LAUNCHER_VARIABLES = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                      ("PMI_RANK", "PMI_SIZE"),
                      ("PMIX_RANK", "PMIX_SIZE"),
                      ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"))


class DistributedError(RuntimeError):
    """MPI cannot be used as the launcher asked; the message says why and what to do."""


def launcher_rank_and_size():
    """(rank, size) as the MPI launcher's environment gives them, or None when no
    launcher started this process."""
    for rank, size in LAUNCHER_VARIABLES:
        if os.environ.get(size):
            return int(os.environ.get(rank, 0)), int(os.environ[size])
    return None


def is_main_process() -> bool:
    """Rank 0, or a process no launcher started: the one that prints and writes files.
    Known before MPI starts."""
    launched = launcher_rank_and_size()
    return launched is None or launched[0] == 0


# ---------------------------------------------------------------------------
# Communicators
# ---------------------------------------------------------------------------
class Communicator:
    """What data-parallel training needs from its processes: ``rank``, ``size``,
    ``local_rank`` (the rank among the processes of this machine, which picks its GPU),
    sums and broadcasts of arrays in place, a barrier and an abort; and, built on them,
    averaging gradients and broadcasting or averaging a model's arrays."""

    rank, size, local_rank = 0, 1, 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- the primitives (overridden by MPICommunicator) ---------------------------
    def allreduce(self, array):
        """Sum ``array`` over the ranks, in place; returns it."""
        return array

    def broadcast(self, array, root: int = 0):
        """Overwrite ``array`` with rank ``root``'s, in place; returns it."""
        return array

    def barrier(self) -> None:
        """Wait until every rank is here."""

    def abort(self, status: int = 1):
        """End every rank of the job now with ``status`` (no clean-up)."""
        os._exit(status)

    # -- built on them -----------------------------------------------------------
    def average_gradients(self, parameters, buffers=(), flags=()):
        """Replace every parameter's gradient, and every tensor of ``buffers`` (such as
        BN running statistics), by its mean over the ranks, with one allreduce of one
        flat buffer per dtype.  ``flags`` (numbers or 0-d device arrays, such as "stop"
        or "diverged" marks) ride along in the first buffer; their sums over the ranks
        come back as floats, so that every rank decides the same thing at the same step.
        With one process nothing moves and the flags come back as they are."""
        if self.size == 1:
            return [float(f) for f in flags]
        entries = [(p.grad, "data") for p in parameters if p.grad is not None]
        entries += [(b, "data") for b in buffers
                    if np.issubdtype(np.dtype(b.data.dtype), np.floating)]
        groups = {}
        for holder, attr in entries:
            groups.setdefault(np.dtype(getattr(holder, attr).dtype), []).append(holder)
        if not groups:
            groups[np.dtype(np.float64)] = []
        sums = []
        for i, (dtype, holders) in enumerate(groups.items()):
            xp = backend.get_array_module(holders[0].data) if holders else np
            carried = [xp.asarray(f, dtype=dtype).reshape(1) for f in flags] if i == 0 else []
            flat = xp.concatenate([h.data.ravel() for h in holders] + carried)
            self.allreduce(flat)
            total = flat.size - len(carried)
            flat[:total] /= self.size   # the mean, in place; the flags stay sums
            offset = 0
            for h in holders:   # each array becomes a view of its part of the buffer
                n = h.data.size
                h.data = flat[offset:offset + n].reshape(h.data.shape)
                offset += n
            if carried:
                sums = [float(v) for v in backend.to_numpy(flat[total:])]
        return sums

    def broadcast_module(self, module, root: int = 0) -> None:
        """Make every parameter and buffer equal to rank ``root``'s."""
        for _, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            tensor.data = self.broadcast(_contiguous(tensor.data), root)

    def sum_numbers(self, *values):
        """The sums over the ranks of a few numbers (float64)."""
        if self.size == 1:
            return [float(v) for v in values]
        return [float(v) for v in self.allreduce(np.asarray(values, dtype=np.float64))]


class SingleProcess(Communicator):
    """The communicator of a run no launcher started: rank 0 of 1."""

    def __repr__(self):
        return "SingleProcess()"


class MPICommunicator(Communicator):
    """The ranks of ``MPI.COMM_WORLD``: NumPy arrays over MPI, CuPy arrays over NCCL."""

    def __init__(self, comm, mpi):
        self.comm, self.MPI = comm, mpi
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(mpi.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self._nccl = None
        # The ranks of one machine share its cores: each rank's thread pool its share.
        threads.share_cores(self.local_size)

    def __repr__(self):
        return (f"MPICommunicator(rank={self.rank}, size={self.size}, "
                f"local_rank={self.local_rank})")

    def nccl(self) -> "backend.NcclGroup":
        """The NCCL communicator of these ranks, made at first use: rank 0 makes the
        unique id (bytes) and MPI broadcasts it as a uint8 buffer (never pickled)."""
        if self._nccl is None:
            unique_id = np.zeros(backend.NcclGroup.ID_BYTES, dtype=np.uint8)
            if self.rank == 0:
                unique_id[:] = np.frombuffer(backend.NcclGroup.unique_id(), dtype=np.uint8)
            self.comm.Bcast(unique_id, root=0)
            self._nccl = backend.NcclGroup(self.size, self.rank, unique_id.tobytes())
        return self._nccl

    def allreduce(self, array):
        if backend.device_of(array) == "cuda":
            return self.nccl().allreduce(array)
        self.comm.Allreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)
        return array

    def broadcast(self, array, root: int = 0):
        if backend.device_of(array) == "cuda":
            return self.nccl().broadcast(array, root)
        self.comm.Bcast(array, root=root)
        return array

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, status: int = 1):
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(status)


def _contiguous(array):
    # asarray(order="C"), not ascontiguousarray, which turns a 0-d array (BatchNorm's
    # num_batches_tracked) into shape (1,)
    return backend.get_array_module(array).asarray(array, order="C")


_world = None


def init() -> Communicator:
    """The communicator of this job, made once per process.

    Started by ``mpiexec`` (or another MPI launcher): an ``MPICommunicator`` over
    ``MPI.COMM_WORLD``.  Started without one: ``SingleProcess``.  A launcher with no
    working mpi4py, or an mpi4py built for another MPI than the launcher's (each process
    would see itself alone), is a ``DistributedError``: never N independent runs writing
    one folder."""
    global _world
    if _world is not None:
        return _world
    launched = launcher_rank_and_size()
    if launched is None:
        _world = SingleProcess()
        return _world
    rank, size = launched
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as error:
        raise DistributedError(
            f"an MPI launcher started this process (rank {rank} of {size}), but mpi4py cannot "
            f"be used ({error}); install it with an MPI library: pip install "
            f"'minidense[dist]' (mpi4py and mpich)") from None
    world = MPI.COMM_WORLD
    if world.Get_size() != size:
        raise DistributedError(
            f"the launcher started {size} processes, but mpi4py's MPI sees {world.Get_size()}: "
            f"mpi4py was built for another MPI library than this mpiexec's (use the mpiexec "
            f"that comes with it: python -m mpi4py --mpi-library shows it)")
    _world = MPICommunicator(world, MPI)
    return _world


# ---------------------------------------------------------------------------
# Synchronised batch normalisation
# ---------------------------------------------------------------------------
class SyncBatchNormFunction(BatchNorm):
    """Batch normalisation whose training statistics are those of the global batch:
    the per-channel sums (``sum_over_batch``: the values' sum, then the squared deviations
    about the global mean) are added up over the ranks; every rank's batch has the same
    size.  In the
    backward pass the two sums of the batch-statistics term are added up too; the
    parameter gradients stay local, since ``average_gradients`` averages them."""

    # Its statistics are sums over the processes (allreduce), which the ops that a
    # differentiable backward is made of cannot express: differentiable once only.
    differentiable = False

    def __init__(self, comm, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.comm = comm

    def values_per_channel(self, x):
        # Every rank's batch has the same size (the global batch divides evenly), so the
        # count is known on the host: no wait for the device.
        return x.size // x.shape[1] * self.comm.size

    def sum_over_batch(self, sums):
        return self.comm.allreduce(_contiguous(sums))

    def statistics_gradient_sums(self, gbeta, ggamma):
        xp = backend.get_array_module(gbeta)
        both = self.comm.allreduce(xp.concatenate([gbeta, ggamma]))
        c = gbeta.shape[0]
        return both[:c], both[c:]


class SyncBatchNormReLUFunction(SyncBatchNormFunction):
    """relu(SyncBatchNormFunction(x)) in the same passes, as BatchNormReLU is BatchNorm's."""

    relu = True


class SyncBatchNorm2d(BatchNorm2d):
    """``BatchNorm2d`` with the statistics of the global batch in training mode; the
    same parameters and buffers under the same names.  ``comm``: the communicator."""

    function = SyncBatchNormFunction

    def __init__(self, num_features, eps=1e-5, momentum=0.1, comm=None):
        super().__init__(num_features, eps, momentum)
        self.comm = comm or SingleProcess()

    def forward(self, x):
        if not self.training or self.comm.size == 1:
            return super().forward(x)
        args = self.batch_norm_arguments(x)
        running = [t.data if t is not None else None for t in (args["running_mean"], args["running_var"])]
        return self.function(self.comm, *running, True, args["momentum"], self.eps)(
            x, args["weight"], args["bias"])


class SyncBatchNormReLU2d(SyncBatchNorm2d, BatchNormReLU2d):
    """``BatchNormReLU2d`` (the models' fused BN-ReLU) with global-batch statistics."""

    function = SyncBatchNormReLUFunction


_SYNCED = {BatchNorm2d: SyncBatchNorm2d, BatchNormReLU2d: SyncBatchNormReLU2d}
fusion._FUSED[SyncBatchNorm2d] = SyncBatchNormReLU2d   # nn.fuse_bn_relu of a synced BN


def sync_batchnorm(module, comm: Communicator):
    """Turn every ``BatchNorm2d`` (fused with a ReLU or not) of ``module`` into a
    ``SyncBatchNorm2d`` over ``comm``, in place (the names of parameters and buffers do not
    change); returns ``module``."""
    for sub in module.modules():
        if type(sub) in _SYNCED:
            sub.__class__ = _SYNCED[type(sub)]
            sub.comm = comm
    return module


__all__ = ["init", "Communicator", "SingleProcess", "MPICommunicator",
           "DistributedError", "launcher_rank_and_size", "is_main_process", "SyncBatchNorm2d",
           "SyncBatchNormReLU2d",
           "sync_batchnorm"]

"""Runs ``minidense.train``'s command with one planted event, for tests/test_cli.py.

    python tests/cli_harness.py MODE [training options...]

MODE:
  plain             nothing planted
  nan-weight        after the 2nd update of epoch 2, a weight becomes NaN (the next loss is NaN);
                    under mpiexec on the last rank only
  inf-statistic     after the last update of epoch 2, a BN running variance becomes infinite
                    (the loss stays finite: only the check before saving sees it)
  ctrl-c-twice      Ctrl-C after batch 2 of epoch 2, and again while that checkpoint is
                    being written
  ctrl-c-rank-1     under mpiexec: Ctrl-C to rank 1 alone, after batch 2 of epoch 2
  sigterm-twice     SIGTERM twice (as a job's SIGTERM forwarded by mpiexec arrives) after
                    batch 2 of epoch 2, on every rank
  data-error-rank-1 under mpiexec: rank 1 alone cannot read its data
  gpu-on-rank-0     under mpiexec: rank 0 alone finds a GPU
  fail-rank-1       under mpiexec: rank 1 raises an exception in its 3rd update
  batch-sizes       writes the sizes of this rank's training batches to
                    $HARNESS_OUT/batch-sizes-<rank>.json at the end

The events are planted through the command's own seams (the optimizer's step, the
per-step seed, the atomic writer), so the command itself runs unchanged.
"""
import contextlib
import os
import signal
import sys

import numpy as np

import minidense as md
from minidense import distributed, train
from minidense.training import trainer

mode, argv = sys.argv[1], sys.argv[2:]
steps = {"n": 0}

if mode in ("nan-weight", "inf-statistic"):
    step = md.optim.SGD.step
    # 6 batches per epoch in the tests' runs: update 8 is batch 2 of epoch 2, 12 its last.
    target = 8 if mode == "nan-weight" else 12

    def planted_step(self):
        step(self)
        steps["n"] += 1
        rank, size = distributed.launcher_rank_and_size() or (0, 1)
        if steps["n"] == target and rank == size - 1:
            model = planted_step.model
            if mode == "nan-weight":
                next(iter(model.parameters())).data[...] = np.nan
            else:
                buffer = next(b for name, b in model.named_buffers() if "running_var" in name)
                buffer.data[...] = np.inf

    md.optim.SGD.step = planted_step
    build_model = trainer.build_model

    def remember_model(*args, **kwargs):
        planted_step.model = build_model(*args, **kwargs)
        return planted_step.model

    trainer.build_model = remember_model

elif mode == "ctrl-c-twice":
    step_seed = trainer.step_seed

    def seed_and_press(seed, epoch, step, rank=0):
        if (epoch, step) == (1, 2):   # before batch 3 of epoch 2: after batch 2's update
            os.kill(os.getpid(), signal.SIGINT)
        return step_seed(seed, epoch, step, rank)

    trainer.step_seed = seed_and_press
    atomic_write = md.io.atomic_write
    saves = {"n": 0}

    class HalfWritten:
        """A checkpoint file that gets Ctrl-C in the middle of its first write."""

        def __init__(self, file):
            self.file = file

        def write(self, data):
            self.file.write(bytes(data)[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGINT)   # the handler raises KeyboardInterrupt here
            return len(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

    @contextlib.contextmanager
    def press_while_writing(path, mode="wb"):
        """The second write of last.npz (the Ctrl-C save) is interrupted half way."""
        with atomic_write(path, mode) as file:
            if os.path.basename(path) == "last.npz":
                saves["n"] += 1
                if saves["n"] == 2:
                    file = HalfWritten(file)
            yield file

    md.io.atomic_write = press_while_writing

elif mode == "ctrl-c-rank-1":
    step_seed = trainer.step_seed

    def seed_and_press_on_rank_1(seed, epoch, step, rank=0):
        if (epoch, step, rank) == (1, 2, 1):
            os.kill(os.getpid(), signal.SIGINT)
        return step_seed(seed, epoch, step, rank)

    trainer.step_seed = seed_and_press_on_rank_1

elif mode == "sigterm-twice":
    step_seed = trainer.step_seed

    def seed_and_terminate(seed, epoch, step, rank=0):
        if (epoch, step) == (1, 2):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return step_seed(seed, epoch, step, rank)

    trainer.step_seed = seed_and_terminate

elif mode == "data-error-rank-1":
    open_datasets = md.data.open_datasets

    def failing_open(*args, **kwargs):
        if distributed.launcher_rank_and_size()[0] == 1:
            raise md.data.DataError("planted: rank 1 cannot read its copy of the data")
        return open_datasets(*args, **kwargs)

    md.data.open_datasets = failing_open

elif mode == "gpu-on-rank-0":
    trainer.choose_device = lambda name, log=print: (
        "cuda" if distributed.launcher_rank_and_size()[0] == 0 else "cpu")

elif mode == "fail-rank-1":
    step = md.optim.SGD.step

    def failing_step(self):
        steps["n"] += 1
        if steps["n"] == 3 and distributed.launcher_rank_and_size()[0] == 1:
            raise RuntimeError("planted failure in rank 1")
        step(self)

    md.optim.SGD.step = failing_step

elif mode == "batch-sizes":
    import atexit
    import json
    make_batch = md.data.DataLoader.make_batch
    sizes = []

    def recording_make_batch(self, plan, index):
        images, labels = make_batch(self, plan, index)
        if self.drop_last:   # the training loader
            sizes.append(int(images.shape[0]))
        return images, labels

    md.data.DataLoader.make_batch = recording_make_batch
    rank = (distributed.launcher_rank_and_size() or (0, 1))[0]
    atexit.register(lambda: open(os.path.join(os.environ["HARNESS_OUT"],
                                              f"batch-sizes-{rank}.json"), "w").write(
        json.dumps(sizes)))

elif mode != "plain":
    raise SystemExit(f"cli_harness: unknown mode {mode!r}")

sys.exit(train.main(argv))

"""The trainer: one run's data, model, optimizer and schedule, the training loop, the
checkpoint state and the Ctrl-C handling.

Exact resuming: the data order, every crop and flip (``md.data.DataLoader``) and the
dropout masks (``md.manual_seed`` before every step) are functions of (seed, epoch,
step) alone, and a checkpoint holds the model, the optimizer, the scheduler, the
position in the run and the running sums of the current epoch.  So a run that is
stopped (after an epoch, or by Ctrl-C in the middle of one) and resumed produces the
same numbers as one that never stopped.

Data-parallel (``mpiexec -n N``, ``minidense.distributed``): every rank trains on its
part of each global batch (the same order, crops and flips as one process), the
gradients and the BN running statistics are averaged over the ranks in one allreduce per
step, which also carries the "stop" (Ctrl-C, SIGTERM) and "diverged" marks, so that
every rank stops at the same step.  Rank 0 alone prints and writes files.

A diverged run (a non-finite loss, parameter or BN statistic) stops with ``Diverged``
and never writes its weights over the last good checkpoint.  On the CPU the loss is
checked after every step (a host scalar, free); on a GPU only where the loop already
waits for the device (the progress display); the whole model before every save.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from pathlib import Path

import numpy as np

import minidense as md
from minidense import backend, data, distributed

from .recipes import (SettingsError, build_model, build_optimizer, build_scheduler,
                      choose_device, run_epochs)
from .reporting import (EpochProgress, RunningSums, evaluate_model, format_duration,
                        peak_memory_mb, summarize, write_atomic, write_metrics)

class Diverged(RuntimeError):
    """The run produced a non-finite loss, parameter or BN statistic; nothing non-finite
    was saved.  The message names the epoch, the batch and the last finite loss."""


def non_finite_entries(state: dict) -> list:
    """The names of the floating-point arrays of a (host) state dict that hold a NaN or
    an infinity."""
    return [name for name, value in state.items()
            if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.isfinite(value).all()]


class InterruptRequest:
    """Ctrl-C (or SIGTERM, as a cluster's scheduler sends before it kills) asks the run
    to stop after the current batch and save a checkpoint (a KeyboardInterrupt in the
    middle of an update would leave the weights half updated); a second Ctrl-C stops at
    once.  A repeated SIGTERM does not: under mpiexec a job's SIGTERM reaches each rank
    twice (directly and forwarded by mpiexec), and the save must still happen.

    The handler only sets flags: printing from a signal handler can interrupt a print
    of the main thread (Python raises on the reentrant write), so ``announce`` prints
    from the loop."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log):
        self.requested, self.log, self.previous = False, log, {}
        self.unannounced = None   # the name of a signal not yet reported

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested = True
            self.unannounced = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name

    def announce(self):
        if self.unannounced:
            self.log(f"\n{self.unannounced}: stopping after this batch and saving a checkpoint "
                     f"(press Ctrl-C again to quit without saving)")
            self.unannounced = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        return False


def read_checkpoint(path, option: str, needed) -> dict:
    """The checkpoint of minidense.train at ``path``, or ``SettingsError`` (naming
    ``option``) when it is missing, damaged, or lacks one of the ``needed`` entries."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"{option}: there is no checkpoint at {path}: no such file")
    try:
        checkpoint = md.load(path)
    except (OSError, ValueError) as error:
        raise SettingsError(f"{option}: {error}") from None
    missing = [key for key in needed if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise SettingsError(f"{option}: {path} is not a checkpoint of minidense.train (it lacks "
                            f"{', '.join(missing)})")
    return checkpoint


def step_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """The dropout seed of one training step of one rank, a function of (seed, epoch,
    step, rank) only."""
    return int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1)[0])

def default_out(settings: dict, data_name: str) -> Path:
    """runs/<model>-<data>, or with -2, -3, ... when that folder already holds a run."""
    base = Path("runs") / f"{settings['model']}-{data_name}"
    candidate, n = base, 1
    while (candidate / "last.npz").exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def data_name_of(dataset) -> str:
    return dataset.name.split("/")[0].replace("imagefolder-", "")


class TrainingRun:
    """One run: its data, model, optimizer, schedule and output folder, its history,
    and (after ``restore``) the point it continues from."""

    def __init__(self, settings: dict, log=print, normalization=None, comm=None):
        self.settings = settings = dict(settings)
        self.comm = comm = comm or distributed.SingleProcess()
        self.log = log = log if comm.is_main else (lambda *args, **kwargs: None)
        self.device = choose_device(settings["device"], log)
        if comm.size > 1:
            # Every rank must take the same path (NCCL or MPI, and the default epochs).
            on_gpu = int(comm.sum_numbers(self.device == "cuda")[0])
            if 0 < on_gpu < comm.size:
                raise SettingsError(f"the ranks disagree on the device: {on_gpu} of {comm.size} "
                                    f"can use a GPU; pass --device cpu, or give every rank one")
            if settings["batch_size"] % comm.size:
                raise SettingsError(f"--batch-size {settings['batch_size']} (the global batch) "
                                    f"does not divide evenly over the {comm.size} ranks")
        if self.device == "cuda":
            if comm.size > 1:
                backend.use_gpu(comm.local_rank)
            # TF32 tensor cores for float32 GEMMs, as PyTorch allows for convolutions by
            # default; the library's default stays off so that tests keep their tolerances.
            backend.set_tf32(True)
        settings["world_size"] = comm.size
        # Rank 0 decodes (and caches) the images first; the others then read its cache.
        if not comm.is_main:
            comm.barrier()
        train_set, test_set = data.open_datasets(settings["data"], log=log,
                                                 workers=settings["workers"] or None)
        if comm.is_main and comm.size > 1:
            comm.barrier()
        settings["data_used"] = train_set.source
        settings["epochs"] = run_epochs(settings, train_set.name.startswith("digits"), self.device)
        if settings["subset"]:
            train_set = train_set.subset(settings["subset"])
        if settings["test_subset"]:
            test_set = test_set.subset(settings["test_subset"])
        if len(train_set) < settings["batch_size"]:
            raise SettingsError(f"the training set has {len(train_set)} images, fewer than one "
                                f"batch (--batch-size {settings['batch_size']}): no training step")
        self.train_set, self.test_set = train_set, test_set
        self.data_name = data_name_of(train_set)
        self.mean, self.std = normalization or data.channel_mean_std(train_set.images)

        self.seed = settings["seed"]
        md.manual_seed(self.seed)
        self.model = build_model(settings, train_set.num_classes).to(self.device)
        if settings.get("sync_bn"):
            distributed.sync_batchnorm(self.model, comm)
        self.optimizer = build_optimizer(settings, self.model.parameters())
        # Each rank gets its part of every global batch (shard=None: all of it).
        shard = (comm.rank, comm.size) if comm.size > 1 else None
        self.train_loader = data.DataLoader(
            train_set, settings["batch_size"], shuffle=True, drop_last=True,
            augment=settings["augment"], mean=self.mean, std=self.std, device=self.device,
            seed=self.seed, shard=shard)
        self.test_loader = data.DataLoader(test_set, max(settings["batch_size"], 256),
                                           mean=self.mean, std=self.std, device=self.device,
                                           shard=shard)
        self.steps_per_epoch = len(self.train_loader)
        self.scheduler = build_scheduler(settings, self.optimizer, self.steps_per_epoch)
        self.epochs = settings["epochs"]
        self.out = Path(settings["out"]) if settings["out"] else default_out(settings, self.data_name)
        if comm.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        settings["out"] = str(self.out)

        self.history, self.best_acc, self.best_epoch = [], -1.0, 0
        # Where the run continues: epoch, batch, and the epoch's sums so far.
        self.start_epoch, self.start_step = 0, 0
        self.partial = dict(loss_sum=0.0, correct=0, seen=0, train_time=0.0)
        self.last_finite_loss = math.nan   # for the message of a diverged run
        self.stopping = False   # a stop that every rank has agreed on
        # --profile N: the first N steps of this session, recorded by one profiler.
        self.profile_steps = settings.get("profile") or 0
        self.profiler = md.profiler() if self.profile_steps else None
        self.profiled_steps = 0

    # -- checkpoints -----------------------------------------------------------
    def state(self, epoch, step, sums=None, train_time=0.0) -> dict:
        """Everything needed to continue from batch ``step`` of epoch ``epoch``.  Every
        rank calls it (the epoch's sums so far are added up over the ranks)."""
        loss_sum, correct, seen = (self.comm.sum_numbers(float(sums.loss_sum),
                                                         int(sums.correct), sums.seen)
                                   if sums is not None else (0.0, 0, 0))
        correct, seen = int(correct), int(seen)
        keys = list(self.history[0]) if self.history else []
        return {
            "model": dict(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            # The generators of the data order, augmentation and dropout are seeded
            # from (seed, epoch, step): the position is their whole state.
            "progress": {"epoch": epoch, "step": step, "seed": self.seed, "loss_sum": loss_sum,
                         "correct": correct, "seen": seen, "train_time": train_time},
            "best_acc": self.best_acc, "best_epoch": self.best_epoch,
            "history": {k: np.array([np.nan if row[k] is None else row[k] for row in self.history],
                                    dtype=np.float64) for k in keys},
            "normalization": {"mean": np.asarray(self.mean, np.float64),
                              "std": np.asarray(self.std, np.float64)},
            "settings": dict(self.settings),
            "classes": list(self.train_set.classes),
        }

    def restore(self, checkpoint: dict) -> None:
        if checkpoint["classes"] != self.train_set.classes:
            raise SettingsError(f"--resume: the checkpoint was trained on classes "
                                f"{checkpoint['classes']}, the data has {self.train_set.classes}")
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        progress = checkpoint["progress"]
        self.start_epoch, self.start_step = int(progress["epoch"]), int(progress["step"])
        self.partial = {k: progress[k] for k in ("loss_sum", "correct", "seen", "train_time")}
        if not self.comm.is_main:   # the epoch's sums so far are the whole job's: count them once
            self.partial.update(loss_sum=0.0, correct=0, seen=0)
        self.best_acc, self.best_epoch = float(checkpoint["best_acc"]), int(checkpoint["best_epoch"])
        saved = checkpoint["history"]
        count = len(next(iter(saved.values()))) if saved else 0
        self.history = [{k: _history_value(k, saved[k][i]) for k in saved} for i in range(count)]
        if self.comm.is_main:
            write_metrics(self.out, self.history)
        self.log(f"resuming {self.out} at epoch {self.start_epoch + 1}, batch "
                 f"{self.start_step + 1} of {self.steps_per_epoch}")

    def save(self, state: dict, best: bool = False) -> None:
        """Write last.npz (and best.npz) atomically, after checking that every weight
        and statistic is finite: a diverged run never overwrites a good checkpoint."""
        bad = non_finite_entries(state["model"])
        if bad:
            progress = state["progress"]
            self.diverged(progress["epoch"] - (progress["step"] == 0), progress["step"] or
                          self.steps_per_epoch, f"non-finite values in {', '.join(bad[:3])}"
                          f"{', ...' if len(bad) > 3 else ''} ({len(bad)} of the model's arrays)")
        if not self.comm.is_main:
            return
        md.save(state, self.out / "last.npz")
        if best:
            md.save(state, self.out / "best.npz")

    def diverged(self, epoch, step, what):
        """Stop the run: raise ``Diverged`` naming the epoch and batch (``epoch`` counts
        from 0, ``step`` from 1) and saying what the last checkpoint holds."""
        last = self.out / "last.npz"
        kept = (f"{last} still holds the last good checkpoint" if last.is_file() else
                "no checkpoint was written")
        raise Diverged(f"the run diverged at epoch {epoch + 1}, batch {step} of "
                       f"{self.steps_per_epoch}: {what}; the last finite training loss was "
                       f"{self.last_finite_loss:.4g}. Nothing non-finite was saved ({kept}). "
                       f"Try a lower --lr (this run: {self.settings['lr']:g}).")

    # -- training --------------------------------------------------------------
    def train_epoch(self, epoch, interrupt, on_step=None):
        """Train one epoch (from ``start_step`` when resuming into it).  Returns the
        running sums and the training time, or None when Ctrl-C stopped it (after
        saving a checkpoint)."""
        resumed = epoch == self.start_epoch and (self.start_step or self.partial["seen"])
        first_step = self.start_step if resumed else 0
        xp = backend.array_module(self.device)
        sums = RunningSums(xp, **{k: self.partial[k] for k in ("loss_sum", "correct", "seen")}) \
            if resumed else RunningSums(xp)
        time_before = float(self.partial["train_time"]) if resumed else 0.0
        model, optimizer, scheduler, comm = self.model, self.optimizer, self.scheduler, self.comm
        parameters, buffers = list(model.parameters()), [b for _, b in model.named_buffers()]
        bar = EpochProgress(epoch, self.epochs, self.steps_per_epoch, first_step) \
            if comm.is_main else None
        model.train()
        start, last_shown, seen_here, step = time.perf_counter(), 0.0, 0, first_step
        # On the CPU the loss is a host scalar: checking it every step costs nothing.  On
        # a GPU that would wait for the device every step: one process checks it where
        # the progress display waits anyway (below); several check it every step, as a
        # device flag in the allreduce that waits for the device in any case.
        check_on_host = self.device == "cpu"
        with contextlib.closing(self.train_loader.iterate(epoch, first_step)) as batches:
            for images, labels in batches:
                with self.profiled_step(epoch, step):
                    md.manual_seed(step_seed(self.seed, epoch, step, comm.rank))   # dropout masks
                    logits = model(images)
                    loss = md.cross_entropy(logits, labels)
                    if check_on_host:
                        value = float(loss.data)
                        bad = 0.0 if math.isfinite(value) else 1.0
                    else:
                        bad = (~xp.isfinite(loss.data)).astype(xp.float32) if comm.size > 1 else 0.0
                    optimizer.zero_grad()
                    loss.backward()
                    # One allreduce: the gradients and BN statistics averaged over the ranks,
                    # and the marks summed, so that every rank stops at the same step.
                    stop, bad = comm.average_gradients(parameters, buffers,
                                                       flags=(float(interrupt.requested), bad))
                    self.stopping = self.stopping or stop > 0
                    interrupt.announce()
                    if bad:
                        self.diverged(epoch, step + 1, "the loss is not finite" if comm.size > 1
                                      else f"the loss is {value}")
                    if check_on_host:
                        self.last_finite_loss = value
                    optimizer.step()
                    scheduler.step()
                sums.add(loss, logits, labels)
                del logits, loss
                step += 1
                seen_here += labels.shape[0]
                if on_step is not None:
                    on_step(epoch, step)
                now = time.perf_counter()
                if bar is not None and (now - last_shown > 0.5 or step == self.steps_per_epoch):
                    last_shown = now
                    stats = sums.values()   # waits for the device
                    if comm.size == 1 and not math.isfinite(stats[0]):
                        self.diverged(epoch, step, f"the running training loss is {stats[0]}")
                    if not check_on_host:
                        self.last_finite_loss = stats[0]
                    bar.update(step, stats, seen_here * comm.size / (now - start))
                if self.should_stop(interrupt) and step < self.steps_per_epoch:
                    interrupt.announce()
                    if bar is not None:
                        bar.close()
                    self.save(self.state(epoch, step, sums, time_before + now - start))
                    self.log(f"checkpoint saved: {self.out / 'last.npz'} (epoch {epoch + 1}, "
                             f"batch {step}); continue with: python -m minidense.train --resume "
                             f"--out {self.out}")
                    return None
        if bar is not None:
            bar.close()
        return sums, time_before + time.perf_counter() - start

    @contextlib.contextmanager
    def profiled_step(self, epoch, step):
        """The body of one training step, recorded while --profile wants more steps;
        the table and the trace are written once it has them all (or the run ends)."""
        if self.profiler is None or self.profiled_steps >= self.profile_steps:
            yield
            return
        with self.profiler, self.profiler.region(f"epoch {epoch + 1} step {step + 1}", "step"):
            yield
        self.profiled_steps += 1
        if self.profiled_steps == self.profile_steps:
            self.write_profile()

    def write_profile(self) -> None:
        """profile.txt (the table) and profile-trace.json (for Perfetto or
        chrome://tracing) in the output folder; rank 0's steps under mpiexec."""
        if self.profiler is None or not self.profiled_steps or not self.comm.is_main:
            return
        table = self.profiler.table()
        write_atomic(self.out / "profile.txt", (
            f"{self.settings['model']}, batch {self.settings['batch_size']} on {self.device}, "
            f"{self.profiled_steps} training steps\n{table}\n").encode())
        self.profiler.export_chrome_trace(self.out / "profile-trace.json")
        self.log(f"profile of {self.profiled_steps} steps: {self.out / 'profile.txt'} and "
                 f"{self.out / 'profile-trace.json'} (open it in https://ui.perfetto.dev)")
        self.profiler = None   # written once

    def should_stop(self, interrupt, at_epoch_end=False) -> bool:
        """Ctrl-C or SIGTERM: with several ranks only once every rank knows (through the
        step's allreduce, or at an epoch's end one more sum), so that they all stop at
        the same step."""
        if self.comm.size == 1:
            return self.stopping or interrupt.requested
        if at_epoch_end and not self.stopping:   # a signal during evaluation or the save
            self.stopping = self.comm.sum_numbers(float(interrupt.requested))[0] > 0
        return self.stopping

    def finish_epoch(self, epoch, sums, train_time) -> dict:
        """Test (when due), record the epoch's metrics, save the checkpoints and files."""
        train_loss, train_acc, seen = sums.values(self.comm)
        test_loss = test_acc = None
        eval_start = time.perf_counter()
        if epoch + 1 == self.epochs or (epoch + 1) % self.settings["eval_every"] == 0:
            test_loss, test_acc, _ = evaluate_model(self.model, self.test_loader, comm=self.comm)
            if test_acc > self.best_acc:
                self.best_acc, self.best_epoch = test_acc, epoch + 1
        eval_time = time.perf_counter() - eval_start
        elapsed = (self.history[-1]["elapsed_s"] if self.history else 0.0) + train_time + eval_time
        row = {
            "epoch": epoch + 1, "step": (epoch + 1) * self.steps_per_epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": train_loss, "train_acc": train_acc,
            "test_loss": test_loss, "test_acc": test_acc, "best_acc": self.best_acc,
            "train_time_s": train_time, "eval_time_s": eval_time, "elapsed_s": elapsed,
            "images_per_s": seen / train_time, "peak_memory_mb": peak_memory_mb(),
        }
        self.history.append(row)
        self.save(self.state(epoch + 1, 0), best=self.best_epoch == epoch + 1)
        if self.comm.is_main:
            write_metrics(self.out, self.history)
        return row

    def run(self, on_step=None) -> dict:
        """Train from where the run stands to its last epoch, or until --stop-after or
        Ctrl-C.  Returns {"status": "done" | "stopped" | "interrupted", "history", "out"}."""
        s = self.settings
        self.log(f"model: {s['model']} ({self.model.num_parameters():,} parameters) on "
                 f"{self.device}; data: {self.train_set.name} ({len(self.train_set)} images) / "
                 f"{self.test_set.name} ({len(self.test_set)}); {self.epochs} epochs of "
                 f"{self.steps_per_epoch} batches of {s['batch_size']}; {s['optimizer']} lr "
                 f"{s['lr']} ({s['schedule']}"
                 f"{', warm-up %g epochs' % s['warmup'] if s['warmup'] else ''}), wd {s['wd']}; "
                 f"output: {self.out}")
        if self.comm.size > 1:   # built from one seed, or loaded from one file: make sure
            self.comm.broadcast_module(self.model)
        session_start = time.perf_counter()
        resume_hint = f"continue with: python -m minidense.train --resume --out {self.out}"
        # NumPy's overflow warnings would bury the one message of a diverged run, which
        # the checks below give instead.
        with InterruptRequest(self.log) as interrupt, np.errstate(over="ignore", invalid="ignore"):
            for epoch in range(self.start_epoch, self.epochs):
                trained = self.train_epoch(epoch, interrupt, on_step)
                if trained is None:
                    return self.result("interrupted")
                row = self.finish_epoch(epoch, *trained)
                left = ((time.perf_counter() - session_start) / (epoch + 1 - self.start_epoch)
                        * (self.epochs - epoch - 1))
                self.log(self.epoch_line(row) + (f", about {format_duration(left)} left"
                                                 if epoch + 1 < self.epochs else ""))
                if epoch + 1 == self.epochs:
                    break
                if self.should_stop(interrupt, at_epoch_end=True):
                    interrupt.announce()
                    self.log(f"checkpoint saved: {self.out / 'last.npz'} (after epoch "
                             f"{epoch + 1}); {resume_hint}")
                    return self.result("interrupted")
                if s["stop_after"] and epoch + 1 >= s["stop_after"]:
                    self.log(f"stopped after epoch {epoch + 1} (--stop-after); {resume_hint}")
                    return self.result("stopped")
        if self.comm.is_main:
            summarize(self.history, self.out, s, self.data_name, self.best_epoch, self.log)
        return self.result("done")

    def epoch_line(self, row) -> str:
        tested = (f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.2f}% "
                  f"(best {self.best_acc:.2f}%)" if row["test_acc"] is not None else "not tested")
        return (f"epoch {row['epoch']}/{self.epochs}: train loss {row['train_loss']:.4f} acc "
                f"{row['train_acc']:.2f}% | {tested} | lr {row['lr']:.4g} | "
                f"{row['images_per_s']:.0f} img/s | "
                f"{format_duration(row['train_time_s'] + row['eval_time_s'])}")

    def result(self, status) -> dict:
        self.write_profile()   # a run shorter than --profile steps: what it has
        return {"status": status, "history": self.history, "out": self.out}


def train(settings: dict, checkpoint: dict | None = None, log=print, on_step=None,
          comm=None) -> dict:
    """Train (or, with ``checkpoint``, resume) the run described by ``settings`` (see
    ``resolve_args``).  ``on_step(epoch, step)`` is called after every training step;
    ``comm``: the ranks to train on (``minidense.distributed.init()``; default one process).
    Returns {"status": "done" | "stopped" | "interrupted", "history": [...], "out": Path}."""
    if checkpoint is None:
        return TrainingRun(settings, log, comm=comm).run(on_step)
    settings = dict(settings)
    if settings["data"] is None:
        settings["data"] = settings.get("data_used")   # the source the run started on
    normalization = checkpoint["normalization"]
    run = TrainingRun(dict(settings, epochs_given=True), log,
                      (np.asarray(normalization["mean"]), np.asarray(normalization["std"])), comm)
    run.restore(checkpoint)
    return run.run(on_step)


def _history_value(key, value):
    """A history value read back from a checkpoint: epoch and step as ints, NaN as None
    ("not measured"), so resumed metrics files match uninterrupted ones."""
    value = float(value)
    if math.isnan(value):
        return None
    return int(value) if key in ("epoch", "step") else value

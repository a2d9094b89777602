"""Learning-rate schedules, with PyTorch's names and values.

A scheduler sets ``group["lr"]`` of every parameter group from the group's initial
learning rate and a step count.  Each schedule here is a closed form of the step
count, so a scheduler's whole state is that count: ``state_dict()`` is tiny and a
resumed run continues exactly.  Whether a "step" is an iteration or an epoch is up
to the caller (call ``step()`` once per iteration, or once per epoch, and give
``milestones``/``T_max``/``total_iters`` in the same unit); ``minidense.train`` steps
per iteration.

As in PyTorch, building a scheduler applies its step-0 learning rate (or, with
``last_epoch=k``, resumes at step k + 1 from each group's ``initial_lr``), and
``step()`` is called after ``optimizer.step()``.
"""
from __future__ import annotations

import bisect
import math

import numpy as np


class LRScheduler:
    """Base class: subclasses give ``factor(step)``, the multiplier of the initial
    learning rate after ``step`` calls to ``step()``."""

    def __init__(self, optimizer, last_epoch=-1):
        self.optimizer = optimizer
        for i, group in enumerate(optimizer.param_groups):
            if last_epoch == -1:
                group.setdefault("initial_lr", group["lr"])
            elif "initial_lr" not in group:
                raise KeyError(f"{type(self).__name__}: param 'initial_lr' is not specified in "
                               f"param_groups[{i}] when resuming (last_epoch={last_epoch})")
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch   # PyTorch's name for the step count
        self.step()

    def factor(self, step: int) -> float:
        raise NotImplementedError

    def lrs_at(self, step: int):
        return [base * self.factor(step) for base in self.base_lrs]

    def _apply(self):
        for group, lr in zip(self.optimizer.param_groups, self.lrs_at(self.last_epoch)):
            group["lr"] = lr

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": int(self.last_epoch),
                "base_lrs": np.asarray(self.base_lrs, dtype=np.float64)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch = int(state_dict["last_epoch"])
        self.base_lrs = [float(v) for v in np.asarray(state_dict["base_lrs"])]
        self._apply()


class ConstantLR(LRScheduler):
    """lr * factor for the first ``total_iters`` steps, then lr (PyTorch's default: a
    third for 5 steps).  ``factor=1.0`` keeps the learning rate throughout."""

    def __init__(self, optimizer, factor: float = 1.0 / 3, total_iters: int = 5, last_epoch=-1):
        if not 0 <= factor <= 1:
            raise ValueError(f"ConstantLR: factor must be in [0, 1], got {factor}")
        self.constant_factor, self.total_iters = factor, total_iters
        super().__init__(optimizer, last_epoch)

    def factor(self, step):
        return self.constant_factor if step < self.total_iters else 1.0


class StepLR(LRScheduler):
    """lr * gamma^(step // step_size)."""

    def __init__(self, optimizer, step_size: int, gamma: float = 0.1, last_epoch=-1):
        self.step_size, self.gamma = int(step_size), gamma
        super().__init__(optimizer, last_epoch)

    def factor(self, step):
        return self.gamma ** (step // self.step_size)


class ExponentialLR(LRScheduler):
    """lr * gamma^step."""

    def __init__(self, optimizer, gamma: float, last_epoch=-1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def factor(self, step):
        return self.gamma ** step


class LambdaLR(LRScheduler):
    """lr * lr_lambda(step), with one function for all groups or one per group.  (Its
    state dict holds the step count only, not the functions.)"""

    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        groups = len(optimizer.param_groups)
        self.lr_lambdas = list(lr_lambda) if isinstance(lr_lambda, (list, tuple)) else [lr_lambda] * groups
        if len(self.lr_lambdas) != groups:
            raise ValueError(f"LambdaLR: expected {groups} lr_lambdas, one per parameter group, "
                             f"got {len(self.lr_lambdas)}")
        super().__init__(optimizer, last_epoch)

    def lrs_at(self, step):
        return [base * fn(step) for base, fn in zip(self.base_lrs, self.lr_lambdas)]


class MultiStepLR(LRScheduler):
    """lr * gamma^(number of milestones passed): the DenseNet and ResNet papers' /10
    drops (gamma 0.1)."""

    def __init__(self, optimizer, milestones, gamma: float = 0.1, last_epoch=-1):
        self.milestones, self.gamma = sorted(int(m) for m in milestones), gamma
        super().__init__(optimizer, last_epoch)

    def factor(self, step):
        return self.gamma ** bisect.bisect_right(self.milestones, step)


class CosineAnnealingLR(LRScheduler):
    """eta_min + (lr - eta_min) * (1 + cos(pi * step / T_max)) / 2 (Loshchilov and
    Hutter, 2017, without restarts)."""

    def __init__(self, optimizer, T_max: int, eta_min: float = 0.0, last_epoch=-1):
        if T_max < 1:
            raise ValueError(f"CosineAnnealingLR: T_max must be at least 1, got {T_max}")
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer, last_epoch)

    def lrs_at(self, step):
        cosine = (1 + math.cos(math.pi * step / self.T_max)) / 2
        return [self.eta_min + (base - self.eta_min) * cosine for base in self.base_lrs]


class LinearLR(LRScheduler):
    """The multiplier moves linearly from ``start_factor`` to ``end_factor`` over
    ``total_iters`` steps, then stays: a linear warm-up (Goyal et al., 2017)."""

    def __init__(self, optimizer, start_factor: float = 1.0 / 3, end_factor: float = 1.0,
                 total_iters: int = 5, last_epoch=-1):
        if not 0 < start_factor <= 1 or not 0 <= end_factor <= 1:
            raise ValueError(f"LinearLR: start_factor must be in (0, 1] and end_factor in [0, 1], got start_factor="
                             f"{start_factor}, end_factor={end_factor}")
        self.start_factor, self.end_factor, self.total_iters = start_factor, end_factor, total_iters
        super().__init__(optimizer, last_epoch)

    def factor(self, step):
        progress = min(step, self.total_iters) / self.total_iters if self.total_iters else 1.0
        return self.start_factor + (self.end_factor - self.start_factor) * progress


class SequentialLR(LRScheduler):
    """One schedule after another: ``schedulers[i]`` runs from its own step 0 once
    ``milestones[i - 1]`` steps have passed (PyTorch's SequentialLR), e.g. a linear
    warm-up followed by a cosine decay."""

    def __init__(self, optimizer, schedulers, milestones, last_epoch=-1):
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(f"SequentialLR: {len(schedulers)} schedulers need "
                             f"{len(schedulers) - 1} milestones, got {len(milestones)}")
        if any(s.optimizer is not optimizer for s in schedulers):
            raise ValueError("SequentialLR: every scheduler must drive the same optimizer")
        self.schedulers, self.milestones = list(schedulers), [int(m) for m in milestones]
        super().__init__(optimizer, last_epoch)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for scheduler in self.schedulers:  # the rates come from the inner schedules
            scheduler.base_lrs = list(self.base_lrs)

    def lrs_at(self, step):
        stage = bisect.bisect_right(self.milestones, step)
        start = self.milestones[stage - 1] if stage else 0
        return self.schedulers[stage].lrs_at(step - start)


def warmup_then(optimizer, scheduler, warmup_steps: int):
    """``scheduler`` preceded by ``warmup_steps`` steps of linear warm-up from
    lr / warmup_steps; ``scheduler`` starts its own count when the warm-up ends."""
    if warmup_steps <= 0:
        return scheduler
    warmup = LinearLR(optimizer, start_factor=1.0 / warmup_steps, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, scheduler], [warmup_steps])

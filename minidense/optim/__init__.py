"""Optimizers and learning-rate schedules, with PyTorch's names, update rules and values.

    opt = md.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    sched = md.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    loss.backward(); opt.step(); sched.step(); opt.zero_grad()
"""
from . import lr_scheduler
from .lr_scheduler import (ConstantLR, CosineAnnealingLR, ExponentialLR, LambdaLR, LinearLR,
                           LRScheduler, MultiStepLR, SequentialLR, StepLR, warmup_then)
from .optimizer import SGD, Adam, AdamW, Optimizer

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "lr_scheduler", "LRScheduler", "ConstantLR",
           "StepLR", "ExponentialLR", "LambdaLR", "MultiStepLR", "CosineAnnealingLR", "LinearLR",
           "SequentialLR", "warmup_then"]

"""Training a model on an image data set: what ``python -m minidense.train`` runs.

* ``recipes``: the papers' settings, the defaults, and the builders of the model, the
  optimizer, the learning-rate schedule and the device;
* ``trainer``: ``TrainingRun`` (data, model, loop, checkpoints, Ctrl-C) and ``train``;
* ``reporting``: running sums, evaluation, the progress bar, metrics files and plots.

The command line itself (options, their checks, resuming) is ``minidense.train``.
"""
from .recipes import (CPU_EPOCHS, DEFAULTS, DEMO_EPOCHS, RECIPES, build_model, build_optimizer,
                      build_scheduler, choose_device, parse_model_args)
from .reporting import EXACT_METRICS, evaluate_model, read_metrics, write_metrics
from .trainer import TrainingRun, train

__all__ = ["RECIPES", "DEFAULTS", "DEMO_EPOCHS", "CPU_EPOCHS", "build_model", "build_optimizer",
           "build_scheduler", "choose_device", "parse_model_args", "EXACT_METRICS",
           "evaluate_model", "read_metrics", "write_metrics", "TrainingRun", "train"]

"""Training by stage: ``setup`` builds a run, ``loop`` runs it a step and an epoch at a time, ``fit`` is a
run's life from start (or resume) to end. The names a caller needs are here."""

from .fit import FitResult, fit
from .loop import Callbacks, NonFiniteLossError, StepProgress, epoch_seed, evaluate, train_one_epoch, train_step
from .setup import (
    TrainingRun,
    WarmupSchedule,
    build_loaders,
    build_model,
    build_optimizer,
    build_training_run,
    training_precision,
)

__all__ = [
    "Callbacks",
    "FitResult",
    "NonFiniteLossError",
    "StepProgress",
    "TrainingRun",
    "WarmupSchedule",
    "build_loaders",
    "build_model",
    "build_optimizer",
    "build_training_run",
    "epoch_seed",
    "evaluate",
    "fit",
    "train_one_epoch",
    "train_step",
    "training_precision",
]

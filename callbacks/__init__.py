"""Callbacks any config can switch on: data selection during training (curriculum, active learning)
and its cost, the sparsity temperature schedule, measurements (FLOPs per token, throughput), a training budget in seconds, and how
a run shows itself (progress bar, model summary) and continues after a resume."""

from callbacks.active_learning import ActiveLearning
from callbacks.continued_run import ContinuedRun
from callbacks.curriculum import Curriculum
from callbacks.first_screen import ModelSummaryWithoutFlops, RichStepProgressBar, TQDMStepProgressBar
from callbacks.flops import FlopsPerToken
from callbacks.sparsity_temperature import SparsityTemperature
from callbacks.throughput import Throughput
from callbacks.time_budget import TrainTimeBudget

__all__ = [
    "ActiveLearning",
    "ContinuedRun",
    "Curriculum",
    "FlopsPerToken",
    "ModelSummaryWithoutFlops",
    "RichStepProgressBar",
    "SparsityTemperature",
    "TQDMStepProgressBar",
    "Throughput",
    "TrainTimeBudget",
]

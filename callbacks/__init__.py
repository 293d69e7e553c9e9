"""Callbacks: data selection during training (curriculum, active learning) and its cost; how a run
shows itself (progress bar, model summary) and continues after a resume."""

from callbacks.active_learning import ActiveLearning
from callbacks.continued_run import ContinuedRun
from callbacks.curriculum import Curriculum
from callbacks.first_screen import ModelSummaryWithoutFlops, RichStepProgressBar, TQDMStepProgressBar

__all__ = ["ActiveLearning", "ContinuedRun", "Curriculum", "ModelSummaryWithoutFlops", "RichStepProgressBar",
           "TQDMStepProgressBar"]

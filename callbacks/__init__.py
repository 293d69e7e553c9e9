"""Callbacks: data selection during training (curriculum, active learning) and its cost."""

from callbacks.active_learning import ActiveLearning
from callbacks.curriculum import Curriculum

__all__ = ["ActiveLearning", "Curriculum"]

"""Callbacks: data selection during training (curriculum, active learning) and its cost; training throughput."""

from callbacks.active_learning import ActiveLearning
from callbacks.curriculum import Curriculum
from callbacks.throughput import Throughput

__all__ = ["ActiveLearning", "Curriculum", "Throughput"]

"""Callbacks any config can switch on: data selection during training (curriculum, active learning)
and its cost, the sparsity temperature schedule, and measurements (FLOPs per token, tokens/s)."""

from callbacks.active_learning import ActiveLearning
from callbacks.curriculum import Curriculum
from callbacks.flops import FlopsPerToken
from callbacks.sparsity_temperature import SparsityTemperature
from callbacks.throughput import Throughput
from callbacks.tokens_per_second import TokensPerSecond

__all__ = ["ActiveLearning", "Curriculum", "FlopsPerToken", "SparsityTemperature", "Throughput", "TokensPerSecond"]

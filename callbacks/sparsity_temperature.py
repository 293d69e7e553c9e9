"""The Gumbel-sigmoid temperature of learned sparsity (resnet_bk.layers.sparsity), annealed.

The temperature tau anneals geometrically from `start` to `end` over `anneal_steps` optimizer
steps, then stays at `end`. It shapes the straight-through gradient only: the hard masks' keep
probability is sigmoid(logit) at any temperature. tau is a function of the global step, so a
resumed run anneals exactly as an uninterrupted one. Logged: train/tau.

    trainer:
      callbacks:
        - class_path: callbacks.SparsityTemperature
          init_args: {start: 1.0, end: 0.2, anneal_steps: 2000}
"""

from __future__ import annotations

from typing import Any

import lightning as L

from resnet_bk.layers.sparsity import set_temperature, sparse_layers


def annealed_tau(step: int, tau_start: float, tau_end: float, anneal_steps: int) -> float:
    """Geometric interpolation tau_start -> tau_end over anneal_steps, then constant."""
    frac = min(1.0, step / anneal_steps) if anneal_steps > 0 else 1.0
    return tau_start * (tau_end / tau_start) ** frac


class SparsityTemperature(L.Callback):
    """Sets the temperature of every SparseBKLayer of `pl_module.model` before each training batch.

    Args:
        start, end: the temperatures at step 0 and from step anneal_steps on (both > 0).
        anneal_steps: length of the geometric anneal in optimizer steps; None: the whole run
            (trainer.max_steps), so a shorter run anneals fully too.
    """

    def __init__(self, start: float = 1.0, end: float = 0.2, anneal_steps: int | None = None):
        if start <= 0 or end <= 0:
            raise ValueError(f"SparsityTemperature: temperatures must be > 0, got start={start}, end={end}.")
        if anneal_steps is not None and anneal_steps < 0:
            raise ValueError(f"SparsityTemperature: anneal_steps must be >= 0 or None, got {anneal_steps}.")
        self.start, self.end, self.anneal_steps = start, end, anneal_steps

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not sparse_layers(pl_module.model):
            raise ValueError(
                f"SparsityTemperature: {type(pl_module.model).__name__} has no learned-sparsity layer; "
                "remove callbacks.SparsityTemperature from trainer.callbacks"
            )
        if self.anneal_steps is None:
            if trainer.max_steps is None or trainer.max_steps < 0:
                raise ValueError(
                    "SparsityTemperature: anneal_steps None anneals over trainer.max_steps, which is not set; "
                    "set trainer.max_steps or the callback's anneal_steps"
                )
            self.anneal_steps = trainer.max_steps

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        tau = annealed_tau(trainer.global_step, self.start, self.end, self.anneal_steps)
        set_temperature(pl_module.model, tau)
        pl_module.log("train/tau", tau, batch_size=1)

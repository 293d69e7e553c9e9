"""Train for a fixed number of seconds instead of a fixed number of steps (equal wall-clock studies).

    lightning fit --config configs/resnet_bk.yaml --trainer.max_steps 1000000 \
        --trainer.callbacks+='{"class_path": "callbacks.TrainTimeBudget", "init_args": {"seconds": 300}}'

The clock counts training only. It starts before training batch `start_after_steps` (counted from 0, so
compilation, autotuning and the allocator's first steps are not charged; the GPU is synchronised
there), pauses from the start of each validation to the start of the next training batch (synchronised
again), and the fit stops
at the first batch end past `seconds` (the GPU is synchronised once more there, so the work queued
by the host is charged too). Between those two points the host clock is read without a sync: it
runs ahead of the GPU by the few steps in flight, which the final sync accounts for.

The learning rate follows the module's warmup + cosine schedule with the cosine's progress measured
in budget time, elapsed / seconds, instead of steps (the warmup stays in steps): every model decays
fully within its own budget, however fast its steps are. This replaces the LambdaLR's multiplier of
a LanguageModel (anything with `warmup_steps` and `min_lr_ratio`); trainer.max_steps then only needs
to be large enough not to stop the run first. The elapsed time is saved in checkpoints, so a resumed
run continues the same budget.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch

from lightning_modules.language_model import warmup_cosine


class TrainTimeBudget(L.Callback):
    """See the module docstring.

    Args:
        seconds: training time of the run (> 0), warm-up batches excluded.
        start_after_steps: training batches run before the clock starts (>= 0).
    """

    def __init__(self, seconds: float, start_after_steps: int = 20) -> None:
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"TrainTimeBudget: seconds must be > 0, got {seconds}")
        if start_after_steps < 0:
            raise ValueError(f"TrainTimeBudget: start_after_steps must be >= 0, got {start_after_steps}")
        self.seconds, self.start_after_steps = float(seconds), start_after_steps
        self.elapsed = 0.0  # budget seconds spent before the current stretch
        self._since: float | None = None  # perf_counter at the start of the running stretch
        self._batches = 0
        self._warmup_steps, self._min_lr_ratio = 0, 0.0

    def progress(self) -> float:
        """Share of the budget spent, 0..1 (host clock)."""
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return min(1.0, (self.elapsed + running) / self.seconds)

    def lr_factor(self, step: int) -> float:
        """The LR multiplier: linear warmup over the module's warmup_steps, then cosine over budget time."""
        return warmup_cosine(step, self._warmup_steps, math.inf, self._min_lr_ratio, progress=self.progress())

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name in ("warmup_steps", "min_lr_ratio"):
            if not hasattr(pl_module, name):
                raise ValueError(
                    f"TrainTimeBudget: {type(pl_module).__name__} has no {name}; the time budget drives the "
                    "LanguageModel's warmup + cosine schedule."
                )
        self._warmup_steps, self._min_lr_ratio = pl_module.warmup_steps, pl_module.min_lr_ratio
        for config in trainer.lr_scheduler_configs:
            if not isinstance(config.scheduler, torch.optim.lr_scheduler.LambdaLR):
                raise ValueError("TrainTimeBudget: the module's LR scheduler must be a LambdaLR.")
            config.scheduler.lr_lambdas = [self.lr_factor] * len(config.scheduler.lr_lambdas)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._since is None and self._batches >= self.start_after_steps:
            self._sync(pl_module)  # warm-up or validation work still queued is not charged
            self._since = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: Any, batch_idx: int
    ) -> None:
        self._batches += 1
        if self._since is not None and self.progress() >= 1.0:
            self._sync(pl_module)
            self._pause()
            trainer.should_stop = True

    def _pause(self) -> None:
        if self._since is not None:
            self.elapsed += time.perf_counter() - self._since
            self._since = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self._since is not None:
            self._sync(pl_module)
            self._pause()

    def state_dict(self) -> dict[str, Any]:
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return {"elapsed": self.elapsed + running, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.elapsed = float(state_dict["elapsed"])

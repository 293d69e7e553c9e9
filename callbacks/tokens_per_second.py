"""Wall-clock throughput: train/tokens_per_s and val/tokens_per_s (input tokens per second).

train/tokens_per_s: the tokens of a training batch over the time since the previous training
batch ended (so data loading and the optimizer step count; the first batch after start-up or a
validation pause is not timed). val/tokens_per_s: the tokens of a validation epoch over its wall
clock, CUDA synchronised at both ends (extra work of other callbacks in that loop, e.g.
FlopsPerToken's counted pass, is included).

    lightning fit --config configs/resnet_bk.yaml --trainer.callbacks+=callbacks.TokensPerSecond
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


class TokensPerSecond(L.Callback):
    """Logs train/tokens_per_s (every training batch) and val/tokens_per_s (every validation epoch)."""

    def __init__(self) -> None:
        self._last_batch_end: float | None = None
        self._val_start: float | None = None
        self._val_tokens = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last_batch_end is not None:
            tokens = batch["input_ids"].numel()
            pl_module.log("train/tokens_per_s", tokens / max(now - self._last_batch_end, 1e-9), batch_size=1)
        self._last_batch_end = now

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module)
        self._val_start, self._val_tokens = time.perf_counter(), 0

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._val_tokens += batch["input_ids"].numel()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module)
        if self._val_start is not None and self._val_tokens and not trainer.sanity_checking:
            pl_module.log("val/tokens_per_s", self._val_tokens / (time.perf_counter() - self._val_start))
        self._last_batch_end = None  # the validation pause is not a training step


def _sync(pl_module: L.LightningModule) -> None:
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)

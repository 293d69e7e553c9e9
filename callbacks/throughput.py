"""Training and validation throughput, step time, peak memory and GPU busy, without a host sync per step.

    trainer:
      callbacks:
        - class_path: callbacks.Throughput
          init_args: {warmup_steps: 20}
    lightning fit --config configs/resnet_bk.yaml --trainer.callbacks+=callbacks.Throughput

Per training batch the callback records two timestamps: CUDA events on a GPU (recorded on the
stream, read later), `time.perf_counter()` on a CPU (where the work is synchronous). A batch's
interval starts at the previous batch's end when nothing ran in between (so data loading and the
optimizer step count), else at its own start (after validation, at an epoch's start). The events
are read, which waits for the GPU once, only at logging steps (trainer.log_every_n_steps), before
validation and at the end of training. The first `warmup_steps` batches (compilation, allocator,
cuDNN/Triton autotuning) are left out of the timed figures but not out of `tokens`. A validation
loop is timed with the same marks from its start to its end, read once at its end (extra work of
other callbacks in that loop, e.g. FlopsPerToken's counted pass, is included); sanity checks are not.

Logged to the trainer's loggers (e.g. TensorBoard), against trainer.global_step:
    train/tokens_per_s, train/step_ms   over the timed batches since the last logging step
    train/peak_mem_gb                   torch.cuda.max_memory_allocated() (CUDA only)
    train/gpu_busy                      NVML utilisation 0..1, sampled (where `torch.cuda.utilization()` works)
    val/tokens_per_s                    after every validation loop
Tokens are input_ids elements; under DDP every rank's batch counts (this rank's times the world
size). `summary()` gives the figures of the whole run:
    tokens          training tokens seen (warm-up included)
    timed_tokens    tokens of the timed batches
    train_seconds   time of every training batch (warm-up included; validation excluded)
    timed_seconds   time of the timed batches
    train_tokens_per_s = timed_tokens / timed_seconds;   step_ms = mean time of a timed batch
    val_tokens_per_s   of the last validation loop (None before one)
    peak_mem_gb     torch.cuda.max_memory_allocated() since fit start (None on a CPU)
    gpu_busy        mean of the NVML samples (None where unavailable)
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


def batch_tokens(batch: Any) -> int:
    """Number of input tokens in a batch: a dict with "input_ids", or a tuple/list whose first item is them."""
    ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
    return ids.numel()


class Throughput(L.Callback):
    """See the module docstring.

    Args:
        warmup_steps: leading training batches left out of the timed figures.
        log_every_n_steps: log (and read the timers) this often; None: trainer.log_every_n_steps.
    """

    def __init__(self, warmup_steps: int = 10, log_every_n_steps: int | None = None) -> None:
        if warmup_steps < 0:
            raise ValueError(f"Throughput: warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self.log_every_n_steps = log_every_n_steps
        self._cuda = False
        self._pending: list[tuple[Any, Any, int, bool]] = []  # (start, end, tokens, timed) not yet read
        self._last_end = None  # end mark of the previous batch while nothing else ran since
        self._start = None
        self._batches = 0
        self._busy: list[float] = []
        self._nvml = True
        self._val_start = None
        self._val_tokens = 0
        self.tokens = self.timed_tokens = self.timed_batches = 0
        self.train_seconds = self.timed_seconds = 0.0
        self.val_tokens_per_s: float | None = None
        self.peak_mem_gb: float | None = None

    # ------------------------------------------------------------------------------- marks
    def _mark(self):
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _elapsed(self, start, end) -> float:
        return start.elapsed_time(end) / 1000.0 if self._cuda else end - start

    def _read(self) -> tuple[int, float, int]:
        """Fold the pending marks into the totals; (timed tokens, timed seconds, timed batches) read now."""
        if not self._pending:
            return 0, 0.0, 0
        if self._cuda:
            self._pending[-1][1].synchronize()  # the last end: every earlier event has completed too
        tokens, seconds, batches = 0, 0.0, 0
        for start, end, n, timed in self._pending:
            dt = self._elapsed(start, end)
            self.train_seconds += dt
            if timed:
                tokens, seconds, batches = tokens + n, seconds + dt, batches + 1
        self._pending.clear()
        self.timed_tokens += tokens
        self.timed_seconds += seconds
        self.timed_batches += batches
        return tokens, seconds, batches

    # ------------------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._cuda = pl_module.device.type == "cuda"
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = self._last_end if self._last_end is not None else self._mark()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: Any, batch_idx: int
    ) -> None:
        end = self._mark()
        n = batch_tokens(batch) * trainer.world_size  # every rank's batch (DDP ranks take equal batches)
        self.tokens += n
        self._pending.append((self._start, end, n, self._batches >= self.warmup_steps))
        self._batches += 1
        self._last_end = end
        every = self.log_every_n_steps or trainer.log_every_n_steps or 50
        if self._batches % every == 0:
            self._log(trainer, pl_module, *self._read())

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read()
        self._last_end = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._cuda = pl_module.device.type == "cuda"  # also for trainer.validate(), which skips on_fit_start
        self._val_start, self._val_tokens = self._mark(), 0

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._val_tokens += batch_tokens(batch) * trainer.world_size

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._val_tokens:
            return
        end = self._mark()
        if self._cuda:
            end.synchronize()  # once per validation loop, not per step
        seconds = self._elapsed(self._val_start, end)
        if seconds > 0:
            self.val_tokens_per_s = self._val_tokens / seconds
            for logger in trainer.loggers:
                logger.log_metrics({"val/tokens_per_s": self.val_tokens_per_s}, step=trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read()
        if self._cuda:
            self.peak_mem_gb = torch.cuda.max_memory_allocated(pl_module.device) / 2**30

    # ----------------------------------------------------------------------------- reports
    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, tokens: int, seconds: float, batches: int) -> None:
        logs = {}
        if batches and seconds > 0:
            logs["train/tokens_per_s"] = tokens / seconds
            logs["train/step_ms"] = 1000.0 * seconds / batches
        if self._cuda:
            logs["train/peak_mem_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            busy = self._sample_busy(pl_module.device)
            if busy is not None:
                logs["train/gpu_busy"] = busy
        for logger in trainer.loggers if logs else ():
            logger.log_metrics(logs, step=trainer.global_step)

    def _sample_busy(self, device: torch.device) -> float | None:
        if not self._nvml:
            return None
        try:
            busy = torch.cuda.utilization(device) / 100.0  # NVML: share of the last sample period with a kernel running
        except Exception:  # noqa: BLE001 - no pynvml / no NVML on this machine: not measured
            self._nvml = False
            return None
        self._busy.append(busy)
        return busy

    def summary(self) -> dict[str, float | int | None]:
        """The whole run's figures (see the module docstring); reads the pending marks first."""
        self._read()
        timed = self.timed_batches > 0 and self.timed_seconds > 0
        return {
            "tokens": self.tokens,
            "timed_tokens": self.timed_tokens,
            "train_seconds": self.train_seconds,
            "timed_seconds": self.timed_seconds,
            "train_tokens_per_s": self.timed_tokens / self.timed_seconds if timed else None,
            "step_ms": 1000.0 * self.timed_seconds / self.timed_batches if timed else None,
            "val_tokens_per_s": self.val_tokens_per_s,
            "peak_mem_gb": self.peak_mem_gb,
            "gpu_busy": sum(self._busy) / len(self._busy) if self._busy else None,
        }

"""ContinuedRun: a run resumed from a checkpoint says where it resumes, and logs every scalar under
the step at which an uninterrupted run logs it; it also counts the training batches this process
ran (`batches_trained`), by which the CLI tells a failed start from a run that trained.

The line, printed once when training starts:

    resuming runs/quickstart/version_0 at step 200 of 250; the LR schedule was planned for 200
    steps, so steps 201-250 run at its final rate 4.0e-04

(the second half only when max_steps now differs from the plan that LanguageModel keeps, see
LanguageModel.configure_optimizers).

The step axis: Lightning logs what happens in training batch k+1 (its loss, the LR it uses, the
validation after it) under step k = the optimizer steps before it, a counter
(fit_loop.epoch_loop._batches_that_stepped) that equals trainer.global_step at the start of every
batch of an uninterrupted run. Lightning saves that counter in the checkpoint before its last
increment, and on restart adds the 1 back only for checkpoints saved at the end of a training
batch; a checkpoint saved after validation (ModelCheckpoint's default, and the CLI's) restarts one
short, so every resumed scalar would land one step early. At the first training batch of a resumed
run, before any callback logs, the counter is set to global_step. The callback must come first in
trainer.callbacks (the CLI puts it there) so that LearningRateMonitor logs after it.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class ContinuedRun(L.Callback):
    """See the module docstring."""

    def __init__(self) -> None:
        self._align_step = False
        self.batches_trained = 0  # training batches run by this process (0 after a failed start)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._align_step = trainer.ckpt_path is not None and pl_module.automatic_optimization
        if trainer.ckpt_path is not None:
            rank_zero_info(resume_line(trainer, pl_module))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._align_step:
            self._align_step = False
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.batches_trained += 1


def resume_line(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    """ "resuming <run> at step N of M" and, if M is not the LR schedule's length, what that means."""
    run = trainer.log_dir if trainer.loggers else str(trainer.ckpt_path)
    step, total = trainer.global_step, trainer.estimated_stepping_batches
    line = f"resuming {run} at step {step} of {total}"
    planned = getattr(pl_module, "schedule_total_steps", None)
    if planned is None or planned == total:
        return line
    final_lr = pl_module.lr * pl_module.min_lr_ratio
    if total > planned:
        first = max(planned, step) + 1
        return (
            f"{line}; the LR schedule was planned for {planned} steps, so steps {first}-{total} run at its "
            f"final rate {final_lr:.1e}"
        )
    return f"{line}; the LR schedule was planned for {planned} steps and ends early, at step {total}"

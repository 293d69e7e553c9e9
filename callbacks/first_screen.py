"""What a training run shows on the terminal: a progress bar with real step and epoch counts, and
a model summary without a FLOPs column.

Lightning's default bars count batches within an epoch and write the last epoch index
(`Epoch 0/-2` when only max_steps is set) and the logger's version (`v_num`). Here a step-limited
run (trainer.max_steps > 0) gets one bar over its optimizer steps (`Epoch 1/2 ... 150/200`, which
goes on across epoch boundaries and starts at the resumed step), an epoch-limited run one bar per
epoch (`Epoch 3/20`), epochs counted from 1, and no `v_num`. `step_progress_bar(default)` gives the
counterpart of whichever default bar Lightning chose (Rich or tqdm).

Lightning's model summary has a FLOPs column filled only when the module defines
example_input_array (else every entry and the total are 0). `ModelSummaryWithoutFlops` prints the
same table without it; the executed FLOPs per token are logged by
lightning_modules.flops.FlopCountingLanguageModel where a config asks for them.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class _StepsAndEpochs:
    """Mixin for a Lightning progress bar: the counts described in the module docstring."""

    trainer: L.Trainer

    def _step_limited(self) -> bool:
        return self.trainer.max_steps is not None and self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        if self._step_limited():
            return self.trainer.max_steps
        return super().total_train_batches  # type: ignore[misc]

    def _planned_epochs(self) -> int | None:
        trainer = self.trainer
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        if not self._step_limited():
            return max_epochs
        batches = trainer.num_training_batches
        if not math.isfinite(batches) or batches <= 0:
            return max_epochs
        steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        epochs = max(trainer.current_epoch + 1, math.ceil(trainer.max_steps / steps_per_epoch))
        return min(epochs, max_epochs) if max_epochs else epochs

    def _epoch_text(self, epoch: int) -> str:
        planned = self._planned_epochs()
        return f"Epoch {epoch + 1}/{planned}" if planned else f"Epoch {epoch + 1}"

    def _train_position(self, trainer: L.Trainer, batch_idx: int) -> int:
        """Where the bar stands after a training batch: optimizer steps so far, or batches this epoch."""
        return trainer.global_step if self._step_limited() else batch_idx + 1

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        items.pop("v_num", None)
        return items


class RichStepProgressBar(_StepsAndEpochs, RichProgressBar):
    """Lightning's Rich bar with the counts of the module docstring."""

    def _get_train_description(self, current_epoch: int) -> str:
        return self._epoch_text(current_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self._step_limited():
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, self._train_position(trainer, batch_idx) - 1)


class TQDMStepProgressBar(_StepsAndEpochs, TQDMProgressBar):
    """Lightning's tqdm bar with the counts of the module docstring."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        bar.set_description(self._epoch_text(trainer.current_epoch))
        if self._step_limited():
            bar.n = bar.last_print_n = trainer.global_step
            bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, self._train_position(trainer, batch_idx) - 1)


def step_progress_bar(default: ProgressBar) -> ProgressBar:
    """The bar of this module that stands in for Lightning's `default` bar (same refresh rate); a bar
    of another class (chosen in a config) is returned unchanged."""
    if type(default) is RichProgressBar:
        return RichStepProgressBar(refresh_rate=default.refresh_rate, leave=default._leave, theme=default.theme)
    if type(default) is TQDMProgressBar:
        return TQDMStepProgressBar(refresh_rate=default.refresh_rate, leave=default._leave)
    return default


class ModelSummaryWithoutFlops(ModelSummary):
    """Lightning's model summary table (name, type, parameters, train/eval mode) without FLOPs."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        columns = [(name, [str(v) for v in values]) for name, values in summary_data if name != "FLOPs"]
        widths = [max([len(name), *map(len, values)]) for name, values in columns]
        rows = [" | ".join(name.ljust(w) for (name, _), w in zip(columns, widths))]
        rows.append("-" * len(rows[0]))
        for i in range(len(columns[0][1]) if columns else 0):
            rows.append(" | ".join(values[i].ljust(w) for (_, values), w in zip(columns, widths)))
        rows.append("-" * len(rows[0]))
        totals = [
            (get_human_readable_count(trainable_parameters), "Trainable params"),
            (get_human_readable_count(total_parameters - trainable_parameters), "Non-trainable params"),
            (get_formatted_model_size(model_size), "Total estimated model params size (MB)"),
        ]
        rows += [f"{value:<10}{label}" for value, label in totals]
        rank_zero_info("\n" + "\n".join(rows))

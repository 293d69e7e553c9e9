"""EarlyExitLanguageModel: trains the intermediate heads, calibrates the exit threshold, and
measures what exiting costs.

Training (the network runs all layers): loss = CE(final) + aux + exit_loss_weight * mean over
layers l = 1..L-1 of CE(head(x_l)), the intermediate heads being the shared, tied LM head. The
same forward pass also records, for a grid of thresholds, how often the early prediction would
differ from the final one (resnet_bk.layers.early_exit.exit_outcomes): no extra compute.

Calibration (CALM): at the start of each validation the threshold becomes the lowest grid value
whose disagreement rate on the training batches seen since the last calibration is at most
max_disagreement, and is set in the network (set_exit_threshold; its buffers keep it in a
checkpoint). No training batches seen (e.g. `lightning validate` from a checkpoint): the stored
threshold is used. The calibration data are training batches, never the split being evaluated.

Validation / test run the network WITH exits (that is the model being evaluated: "val/ppl"), and,
with measure_full_depth, a second time through all layers ("val/ppl_all_layers"); the perplexity
cost of exiting is "val/ppl_exit_cost" = ppl / ppl_all_layers. The exit statistics are logged as
"val/stats/exit_layer_mean" and "val/stats/ffn_rows_fraction" (and, when the network has a static-shape
capacity, "val/stats/capacity_overflow"). With a capacity the threshold enters the network's exit path
as a tensor, so a compiled evaluation (compile: true) keeps one graph across recalibrations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.aggregation import MeanMetric

from lightning_modules.language_model import IGNORE_INDEX, LanguageModel, LossOutput
from resnet_bk.layers.early_exit import calibrate_threshold, confidence, exit_outcomes


class EarlyExitLanguageModel(LanguageModel):
    """LanguageModel for resnet_bk.models.early_exit_lm.EarlyExitLM.

    Args (besides LanguageModel's):
        exit_loss_weight: weight of the mean intermediate-head cross-entropy.
        max_disagreement: calibration target, the largest fraction of positions whose early
            prediction (argmax) may differ from the full model's; None: never calibrate (the
            network's own exit_threshold is used).
        measure_full_depth: also evaluate every val/test batch through all layers, to log the
            perplexity cost of exiting (doubles the evaluation time).
        calibration_grid: number of candidate thresholds, 0, 1/grid, ..., 1 - 1/grid (0: every
            position exits at min_exit_layer).
    """

    def __init__(
        self,
        *args,
        exit_loss_weight: float = 0.3,
        max_disagreement: float | None = 0.1,
        measure_full_depth: bool = True,
        calibration_grid: int = 100,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if max_disagreement is not None and not 0.0 <= max_disagreement <= 1.0:
            raise ValueError(
                f"EarlyExitLanguageModel: max_disagreement must be in [0, 1] or None, got {max_disagreement}."
            )
        self.exit_loss_weight = exit_loss_weight
        self.max_disagreement = max_disagreement
        self.measure_full_depth = measure_full_depth
        self.register_buffer("thresholds", torch.arange(calibration_grid) / calibration_grid, persistent=False)
        self._reset_calibration()
        self.val_nll_all = MeanMetric()
        self.test_nll_all = MeanMetric()
        self._last_output = None
        self._predicted: dict[str, torch.Tensor] = {}

    def forward(self, input_ids: torch.Tensor, exits: bool | None = None):
        self._last_output = self.model(input_ids, exits=exits)
        return self._last_output

    # ----------------------------------------------------------------------------------- loss
    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str) -> LossOutput:
        result = super().compute_loss(batch, stage)
        out, self._last_output = self._last_output, None
        if not getattr(out, "layer_hidden", None):  # evaluated with exits, or a network whose early exit is off
            if stage in ("val", "test") and self.measure_full_depth and getattr(self.model, "early_exit", True):
                with torch.no_grad():
                    full = self.model(batch["input_ids"], exits=False)
                nll_sum = F.cross_entropy(
                    full.logits.flatten(0, 1).float(),
                    batch["targets"].flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                metric = self.val_nll_all if stage == "val" else self.test_nll_all
                metric.update(nll_sum / result.n_tokens.clamp_min(1), weight=result.n_tokens)
            return result

        targets = batch["targets"].flatten()
        scored = targets != IGNORE_INDEX
        final_pred = out.logits.detach().flatten(0, 1).argmax(-1)
        ces, confs, agrees = [], [], []
        for x in out.layer_hidden:
            logits = self.model.head(x).flatten(0, 1)
            ces.append(F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX))
            with torch.no_grad():
                confs.append(confidence(logits[scored], self.model.confidence))
                agrees.append(logits[scored].argmax(-1) == final_pred[scored])
        exit_ce = torch.stack(ces).mean()
        logs = dict(result.logs)
        logs["aux/exit_ce"] = exit_ce.detach()
        for i, ce in enumerate(ces):
            logs[f"exit/ce_layer{i + 1}"] = ce.detach()
        if stage == "train":
            disagree, exit_layer_sum = exit_outcomes(torch.stack(confs), torch.stack(agrees), self.thresholds)
            self._calib_disagree = self._calib_disagree.to(disagree.device) + disagree
            self._calib_exit_layer = self._calib_exit_layer.to(disagree.device) + exit_layer_sum
            self._calib_positions = self._calib_positions + scored.sum()  # a tensor: no host sync per step
        return result._replace(loss=result.loss + self.exit_loss_weight * exit_ce, logs=logs)

    # ---------------------------------------------------------------------------- calibration
    def _reset_calibration(self) -> None:
        self._calib_disagree = torch.zeros(len(self.thresholds), dtype=torch.long, device=self.thresholds.device)
        self._calib_exit_layer = torch.zeros_like(self._calib_disagree)
        self._calib_positions = 0

    def calibrate(self) -> float | None:
        """Set the network's exit_threshold from the training batches seen since the last call.

        Returns the threshold (inf: never exit), or None when nothing was calibrated.
        """
        n_positions = int(self._calib_positions)
        if self.max_disagreement is None or n_positions == 0:
            return None
        threshold = calibrate_threshold(self._calib_disagree, n_positions, self.thresholds, self.max_disagreement)
        self.model.set_exit_threshold(threshold)
        k = int((self.thresholds >= threshold).nonzero()[0, 0]) if math.isfinite(threshold) else None
        if k is not None:
            self._predicted = {
                "exit/predicted_disagreement": self._calib_disagree[k].double() / n_positions,
                "exit/predicted_exit_layer": self._calib_exit_layer[k].double() / n_positions,
            }
        else:
            self._predicted = {}
        self._reset_calibration()
        return threshold

    def on_validation_epoch_start(self) -> None:
        self._on_eval_start()

    def on_test_epoch_start(self) -> None:
        self._on_eval_start()

    def _on_eval_start(self) -> None:
        self._predicted = {}
        self.calibrate()

    def _log_perplexity(self, stage: str, nll: MeanMetric) -> None:
        ppl = nll.compute().exp() if nll.update_called else None  # before super() resets it
        super()._log_perplexity(stage, nll)
        threshold = self.model.get_exit_threshold()
        self.log(f"{stage}/exit/threshold", 1.0 if threshold is None else threshold)  # 1.0: no exits
        for k, v in self._predicted.items():
            self.log(f"{stage}/{k}", v.float())
        full = self.val_nll_all if stage == "val" else self.test_nll_all
        if full.update_called:
            mean_nll = full.compute()
            full.reset()
            self.log(f"{stage}/ppl_all_layers", mean_nll.exp())
            if ppl is not None:
                self.log(f"{stage}/ppl_exit_cost", ppl / mean_nll.exp())

"""SparseLanguageModel: trains the learned-sparsity networks (resnet_bk.models.sparse_lm:
SparseResNetBKLM, MultiScaleSparseLM).

Loss = CE + load_balance_weight * load_balance + sparsity_weight * sparsity, where sparsity is the
network's mean over layers of (expected skipped fraction - target)^2. The Gumbel-sigmoid
temperature anneals geometrically from tau_start to tau_end over tau_anneal_steps optimizer steps
(it shapes the straight-through gradient; the hard masks' keep probability is sigmoid(logit) at
any temperature).

Logged besides LanguageModel's metrics: {train,val}/stats/sparsity (achieved: the fraction of
positions actually skipped; in eval by the calibrated per-position threshold),
.../stats/expected_sparsity, .../stats/ffn_rows_frac, .../stats/threshold, .../aux/sparsity,
train/tau, train/tokens_per_s (wall clock between consecutive training batches), val/tokens_per_s
(wall clock of the validation loop, synchronised), and val/flops_per_token(_body) (FlopCounterMode,
executed FLOPs: the skipped rows' matrix products are absent from the count).
"""

from __future__ import annotations

import time

import torch

from lightning_modules.flops import FlopCountingLanguageModel
from resnet_bk.layers.sparsity import set_temperature


def annealed_tau(step: int, tau_start: float, tau_end: float, anneal_steps: int) -> float:
    """Geometric interpolation tau_start -> tau_end over anneal_steps, then constant."""
    frac = min(1.0, step / anneal_steps) if anneal_steps > 0 else 1.0
    return tau_start * (tau_end / tau_start) ** frac


class SparseLanguageModel(FlopCountingLanguageModel):
    """LanguageModel for learned-sparsity networks.

    Args (besides LanguageModel's and count_flops):
        sparsity_weight: weight of the sparsity aux loss (squared distance to the target).
        tau_start, tau_end, tau_anneal_steps: the Gumbel-sigmoid temperature schedule.
    """

    def __init__(self, *args, sparsity_weight: float = 10.0, tau_start: float = 1.0, tau_end: float = 0.2,
                 tau_anneal_steps: int = 2000, **kwargs):
        super().__init__(*args, **kwargs)
        if sparsity_weight < 0:
            raise ValueError(f"SparseLanguageModel: sparsity_weight must be >= 0, got {sparsity_weight}.")
        if tau_start <= 0 or tau_end <= 0:
            raise ValueError(f"SparseLanguageModel: temperatures must be > 0, got {tau_start}, {tau_end}.")
        self.aux_loss_weights["sparsity"] = sparsity_weight
        self.tau_start, self.tau_end, self.tau_anneal_steps = tau_start, tau_end, tau_anneal_steps
        self._last_batch_end = None
        self._val_start, self._val_tokens = None, 0

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)  # the per-step RNG seeding of exact resume
        tau = annealed_tau(self.global_step, self.tau_start, self.tau_end, self.tau_anneal_steps)
        set_temperature(self.model, tau)
        self.log("train/tau", tau, batch_size=1)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_batch_end is not None:
            tokens = batch["input_ids"].numel()
            self.log("train/tokens_per_s", tokens / max(now - self._last_batch_end, 1e-9), batch_size=1)
        self._last_batch_end = now

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_validation_epoch_start(self) -> None:
        self._sync()
        self._val_start, self._val_tokens = time.perf_counter(), 0

    def validation_step(self, batch, batch_idx: int) -> None:
        self._val_tokens += batch["input_ids"].numel()
        super().validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._sync()
        if self._val_start is not None and self._val_tokens:
            # includes the one extra FLOP-counting forward pass of FlopCountingLanguageModel
            self.log("val/tokens_per_s", self._val_tokens / (time.perf_counter() - self._val_start))
        self._last_batch_end = None  # the validation pause is not a training step

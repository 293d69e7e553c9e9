"""Per-example scores of training windows under the current model, and what scoring them costs.

Shared by the curriculum (callbacks/curriculum.py: difficulty = loss) and active learning
(callbacks/active_learning.py: uncertainty = predictive entropy, or loss). Scoring is part of the
cost of training with these methods, so every call returns its cost: wall-clock seconds (CUDA
synchronised) and forward FLOPs, counted with torch.utils.flop_counter.FlopCounterMode on the first
batch (what actually executed, docs/design.md section 4) and scaled by the number of examples scored.
FlopCounterMode counts matrix-class operators only (mm, bmm, attention, ...); elementwise work and
the BK-core's O(N) scan are not in the count.

`DataSelectionCallback` is the base of both callbacks: it finds the data module, keeps the
cumulative cost (saved in checkpoints) and logs it as budget/scoring_seconds, budget/scoring_flops.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode

IGNORE_INDEX = -100
SCORES = ("loss", "entropy")


@dataclass
class ScoringCost:
    """Cost of one scoring pass (summed over ranks for flops and examples; this rank's seconds)."""

    seconds: float = 0.0
    flops: float = 0.0
    examples: int = 0


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def window_scores(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """(B,) mean over scored positions (targets != -100) of the per-token NLL ("loss") or of the
    predictive entropy H(softmax(logits)) ("entropy", which does not look at the targets)."""
    logits = logits.float()
    mask = targets != IGNORE_INDEX
    if kind == "loss":
        per_token = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view_as(targets)
    elif kind == "entropy":
        logp = logits.log_softmax(-1)
        per_token = -(logp.exp() * logp).sum(-1)
    else:
        raise ValueError(f"score must be one of {SCORES}, got {kind!r}")
    per_token = per_token.masked_fill(~mask, 0.0)
    return per_token.sum(1) / mask.sum(1).clamp_min(1)


@torch.no_grad()
def score_examples(
    model: torch.nn.Module,
    dataset,
    ids: torch.Tensor,
    kind: str = "loss",
    batch_size: int = 64,
    device: Optional[torch.device] = None,
    autocast=None,
) -> tuple[torch.Tensor, ScoringCost]:
    """Scores of dataset[i] for i in ids, batched, in eval mode under no_grad; returns
    (float64 CPU tensor (len(ids),), cost). `model(input_ids)` returns logits or an LMOutput.
    `autocast`: a context-manager factory for the forward (e.g. the trainer's precision context)."""
    if kind not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {kind!r}")
    ids = torch.as_tensor(ids, dtype=torch.long)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = torch.empty(len(ids), dtype=torch.float64)
    flops_per_example = 0.0
    _sync(device)
    start = time.perf_counter()
    try:
        for lo in range(0, len(ids), batch_size):
            items = [dataset[int(i)] for i in ids[lo : lo + batch_size]]
            inputs = torch.stack([it["input_ids"] for it in items]).to(device, non_blocking=True)
            targets = torch.stack([it["targets"] for it in items]).to(device, non_blocking=True)
            with autocast() if autocast is not None else contextlib.nullcontext():
                if lo == 0:  # count this batch's executed forward FLOPs
                    with FlopCounterMode(display=False) as counter:
                        logits = _logits(model(inputs))
                    flops_per_example = counter.get_total_flops() / len(items)
                else:
                    logits = _logits(model(inputs))
            scores[lo : lo + len(items)] = window_scores(logits, targets, kind).double().cpu()
        _sync(device)
    finally:
        model.train(was_training)
    cost = ScoringCost(time.perf_counter() - start, flops_per_example * len(ids), len(ids))
    return scores, cost


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class DataSelectionCallback(Callback):
    """Base of the curriculum and active-learning callbacks: data module lookup, distributed
    scoring, cumulative cost (budget/scoring_seconds, budget/scoring_flops; in checkpoints)."""

    def __init__(self, score_batch_size: int = 64) -> None:
        if score_batch_size < 1:
            raise ValueError(f"score_batch_size must be >= 1, got {score_batch_size}")
        self.score_batch_size = score_batch_size
        self.scoring_seconds = 0.0
        self.scoring_flops = 0.0
        self.scored_examples = 0

    # ---- data module --------------------------------------------------------------------
    @staticmethod
    def datamodule(trainer: L.Trainer):
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "set_train_subset"):
            raise ValueError(
                "the curriculum / active-learning callbacks need a data module with training subsets "
                f"(datamodules.WikiTextDataModule), got {type(dm).__name__}"
            )
        return dm

    # ---- scoring ------------------------------------------------------------------------
    def score(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        ids: torch.Tensor,
        kind: str,
        model: Optional[torch.nn.Module] = None,
    ) -> torch.Tensor:
        """Scores of training windows `ids` (all ranks get all scores; each rank scores its 1/W
        share), with the cost added to the running totals."""
        dm = self.datamodule(trainer)
        model = model if model is not None else pl_module
        world, rank = trainer.world_size, trainer.global_rank
        mine = ids[rank::world]
        precision = getattr(trainer, "precision_plugin", None)
        autocast = precision.forward_context if precision is not None else None
        scores, cost = score_examples(
            model, dm.train_dataset, mine, kind, self.score_batch_size, device=pl_module.device, autocast=autocast
        )
        if world > 1:
            width = math.ceil(len(ids) / world)
            padded = torch.zeros(width, dtype=torch.float64, device=pl_module.device)
            padded[: len(mine)] = scores.to(pl_module.device)
            gathered = trainer.strategy.all_gather(padded).cpu()  # (W, width)
            scores = torch.empty(len(ids), dtype=torch.float64)
            for r in range(world):
                n_r = len(ids[r::world])
                scores[r::world] = gathered[r, :n_r]
            cost.flops = cost.flops / max(len(mine), 1) * len(ids)
            cost.examples = len(ids)
        self.charge(cost)
        return scores

    def charge(self, cost: ScoringCost) -> None:
        self.scoring_seconds += cost.seconds
        self.scoring_flops += cost.flops
        self.scored_examples += cost.examples

    @staticmethod
    def should_log(trainer: L.Trainer) -> bool:
        """True on the steps whose logs the trainer writes (every log_every_n_steps). Logging a Python
        number creates a device tensor, a host-device sync on CUDA: the callbacks log only then."""
        connector = getattr(trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def log_budget(self, pl_module: L.LightningModule) -> None:
        pl_module.log_dict(
            {"budget/scoring_seconds": float(self.scoring_seconds), "budget/scoring_flops": float(self.scoring_flops)},
            on_step=True,
            on_epoch=False,
            batch_size=1,
        )

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "scoring_seconds": self.scoring_seconds,
            "scoring_flops": self.scoring_flops,
            "scored_examples": self.scored_examples,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.scoring_seconds = float(state_dict.get("scoring_seconds", 0.0))
        self.scoring_flops = float(state_dict.get("scoring_flops", 0.0))
        self.scored_examples = int(state_dict.get("scored_examples", 0))

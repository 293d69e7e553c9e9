"""Active learning: every K steps, train on the windows the current model is most uncertain about.

A round, at optimizer steps start_step, start_step + K, start_step + 2K, ...:
  1. candidates: `pool_size` training windows drawn at random (all windows if None), the draw a
     function of the seed and the round;
  2. score them with the current model, batched, in eval mode, under torch.no_grad: the mean
     predictive entropy H(softmax(logits)) over positions ("entropy"), or the mean loss ("loss");
  3. keep k = ceil(keep_fraction * pool) of them: the (1 - random_fraction) k highest-scoring, plus
     random_fraction k drawn at random from the rest of the pool, so that outliers (noise, markup,
     rare-word lists, which a language model is always uncertain about) cannot take the subset over;
  4. hand the k windows to the data module, which draws from them from the next batch on.
Before the first round, every window is drawn (plain shuffled sampling).

Unlike the seed sketch (seed document 002), the cost of scoring is not left out: each round's
wall-clock and forward FLOPs (FlopCounterMode on the first batch, scaled by the windows scored; see
callbacks/scoring.py) are added to budget/scoring_seconds and budget/scoring_flops, cumulative and
logged every log_every_n_steps, and also run inside the trainer's wall-clock (trainer.max_time counts them).

Logged (on the trainer's log_every_n_steps): active/fraction (kept / all windows), active/pool_score,
active/kept_score (mean scores), active/round, budget/scoring_seconds, budget/scoring_flops.

    lightning fit --config configs/active_learning.yaml
    lightning fit --config configs/quickstart.yaml --trainer.callbacks+=callbacks.ActiveLearning \\
        --trainer.callbacks.init_args.every_n_steps 50
"""

from __future__ import annotations

import math
import os
from typing import Optional

import lightning as L
import numpy as np
import torch

from callbacks.scoring import SCORES, DataSelectionCallback


def select(
    scores: torch.Tensor,
    pool: torch.Tensor,
    keep_fraction: float,
    random_fraction: float,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Ids kept from `pool` (scores[i] belongs to pool[i]): the top (1 - random_fraction) * k by
    score (ties by position in the pool), then random_fraction * k drawn uniformly from the rest;
    k = ceil(keep_fraction * len(pool)), at least 1."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if not 0.0 <= random_fraction <= 1.0:
        raise ValueError(f"random_fraction must be in [0, 1], got {random_fraction}")
    m = len(pool)
    k = max(1, min(m, math.ceil(keep_fraction * m - 1e-9)))
    n_random = min(k, int(round(random_fraction * k)))
    n_top = k - n_random
    ranked = torch.sort(-scores.double(), stable=True).indices  # highest first
    top, rest = ranked[:n_top], ranked[n_top:]
    extra = rest[torch.randperm(len(rest), generator=generator)[:n_random]]
    return pool[torch.cat([top, extra])]


class ActiveLearning(DataSelectionCallback):
    """Uncertainty-selected training subsets, refreshed every `every_n_steps` (module docstring).

    Args:
        every_n_steps: K, optimizer steps between rounds.
        start_step: step of the first round (default K: the first K steps see all windows; 0
            scores with the untrained model).
        pool_size: candidates per round (None: all training windows).
        keep_fraction: share of the pool kept.
        random_fraction: share of the kept windows drawn at random from the rest of the pool.
        score: "entropy" or "loss".
        within: draw the kept windows uniformly ("shuffle") or by score, highest first ("ordered").
        score_batch_size: windows per forward pass when scoring.
        seed: seeds the pools and the random share; None: the run's seed (PL_GLOBAL_SEED) or 0.
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        start_step: Optional[int] = None,
        pool_size: Optional[int] = 4096,
        keep_fraction: float = 0.5,
        random_fraction: float = 0.2,
        score: str = "entropy",
        within: str = "shuffle",
        score_batch_size: int = 64,
        seed: Optional[int] = None,
    ) -> None:
        super().__init__(score_batch_size)
        if every_n_steps < 1:
            raise ValueError(f"ActiveLearning: every_n_steps must be >= 1, got {every_n_steps}")
        if start_step is not None and start_step < 0:
            raise ValueError(f"ActiveLearning: start_step must be >= 0, got {start_step}")
        if pool_size is not None and pool_size < 1:
            raise ValueError(f"ActiveLearning: pool_size must be >= 1 or None, got {pool_size}")
        if score not in SCORES:
            raise ValueError(f"ActiveLearning: score must be one of {SCORES}, got {score!r}")
        if within not in ("shuffle", "ordered"):
            raise ValueError(f"ActiveLearning: within must be 'shuffle' or 'ordered', got {within!r}")
        select(torch.zeros(1), torch.zeros(1, dtype=torch.long), keep_fraction, random_fraction)  # validates
        self.every_n_steps = every_n_steps
        self.start_step = every_n_steps if start_step is None else start_step
        self.pool_size, self.keep_fraction, self.random_fraction = pool_size, keep_fraction, random_fraction
        self.score_kind, self.within, self.seed = score, within, seed
        self.rounds = 0
        self.last_round_step: Optional[int] = None
        self._round_logs: dict = {}

    def _due(self, step: int, max_steps: int = -1) -> bool:
        """A round at `step` (the index of the next optimizer step); none once max_steps is reached."""
        return (
            step >= self.start_step
            and (step - self.start_step) % self.every_n_steps == 0
            and step != self.last_round_step
            and (max_steps < 0 or step < max_steps)
        )

    def _generator(self, round_: int) -> torch.Generator:
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        mixed = np.random.SeedSequence([seed % 2**63, 7_919, round_]).generate_state(1, np.uint64)[0] >> 1
        return torch.Generator().manual_seed(int(mixed))

    def run_round(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Tensor:
        """Score a pool, select, hand the subset to the data module; returns the kept ids."""
        dm = self.datamodule(trainer)
        n = dm.num_train_examples
        g = self._generator(self.rounds)
        if self.pool_size is None or self.pool_size >= n:
            pool = torch.arange(n)
        else:
            pool = torch.randperm(n, generator=g)[: self.pool_size]
        scores = self.score(trainer, pl_module, pool, self.score_kind)
        kept = select(scores, pool, self.keep_fraction, self.random_fraction, generator=g)
        if self.within == "shuffle":
            kept = kept.sort().values  # order is irrelevant when shuffled; sorted is canonical
        dm.set_train_subset(kept, mode=self.within)
        position = {int(i): j for j, i in enumerate(pool.tolist())}
        kept_scores = scores[[position[int(i)] for i in kept]]
        self.rounds += 1
        self.last_round_step = trainer.global_step
        # logged with the next batch (self.log is not allowed per step in on_train_start)
        self._round_logs = {
            "active/pool_score": float(scores.mean()),
            "active/kept_score": float(kept_scores.mean()),
            "active/round": float(self.rounds),
        }
        return kept

    # ---- hooks --------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.datamodule(trainer)  # fail early without a subset-capable data module
        step = trainer.global_step
        if step == 0 and self.last_round_step is None and self._due(step, trainer.max_steps):
            self.run_round(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dm = self.datamodule(trainer)
        if self.should_log(trainer):
            active = dm.train_subset
            n = dm.num_train_examples
            logs = {"active/fraction": (n if active is None else len(active)) / n}
            logs.update(self._round_logs)
            pl_module.log_dict(logs, on_step=True, on_epoch=False, batch_size=1)
            self.log_budget(pl_module)
        if self._due(trainer.global_step, trainer.max_steps):  # global_step: the next step's index
            self.run_round(trainer, pl_module)

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(rounds=self.rounds, last_round_step=self.last_round_step)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.rounds = int(state_dict.get("rounds", 0))
        self.last_round_step = state_dict.get("last_round_step")

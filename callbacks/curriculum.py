"""Curriculum learning: train on the easiest windows first and grow the set to all of them.

    difficulty   a score per training window (lower = easier), from one of
                 "unigram"   mean unigram surprisal -log p(w) of the window's targets, p from the
                             training split's counts (add-one smoothed): no model, nearly free;
                 "reference" a reference model's per-window loss: a .ckpt of the same network
                             (its "model.*" weights) or a file of precomputed scores (.pt / .npy);
                 "current"   the model being trained, its per-window loss rescored on all windows
                             every `refresh_every` steps ("dynamic difficulty"); until the first
                             rescoring the `warm_start` proxy ("unigram") orders the windows, or,
                             with warm_start=None, the untrained model scores them at step 0.
    pacing       the active fraction c(t) of windows at optimizer step t, from start_fraction c0
                 to 1 at step T (full_at_step, or full_at_fraction * trainer max steps):
                 "linear" c0 + (1 - c0) t/T;  "root" sqrt(c0^2 + (1 - c0^2) t/T) (Platanios et al.
                 2019, competence-based curriculum); "step" c0 + (1 - c0) floor(S t/T)/S, S stages.
    subset       the ceil(c(t) n) easiest windows (ties by id), handed to the data module at every
                 step where it changes, so it grows at step granularity; within it windows are drawn
                 uniformly ("shuffle") or easiest first ("ordered").

Unlike the seed sketch (seed document 002), the first step already trains on c0 of the data, not on
the single easiest example, and difficulty need not come from a model trained beforehand.

Logged (on the trainer's log_every_n_steps): curriculum/active_fraction, curriculum/batch_difficulty
(mean difficulty of the windows in the batch just trained on), curriculum/subset_difficulty, and
the scoring cost in the training budget: budget/scoring_seconds, budget/scoring_flops (cumulative;
forward FLOPs counted with FlopCounterMode, callbacks/scoring.py).

    lightning fit --config configs/curriculum.yaml
    lightning fit --config configs/quickstart.yaml --trainer.callbacks+=callbacks.Curriculum \\
        --trainer.callbacks.init_args.pacing root
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch

from callbacks.scoring import DataSelectionCallback, ScoringCost

DIFFICULTIES = ("unigram", "reference", "current")
PACINGS = ("linear", "root", "step")
WITHIN = ("shuffle", "ordered")


def competence(step: int, full_at: int, start_fraction: float, pacing: str = "linear", num_stages: int = 4) -> float:
    """Active fraction c(step) in [start_fraction, 1]; 1 from step `full_at` on."""
    if pacing not in PACINGS:
        raise ValueError(f"pacing must be one of {PACINGS}, got {pacing!r}")
    t = 1.0 if full_at <= 0 else min(1.0, max(0.0, step / full_at))
    c0 = start_fraction
    if pacing == "linear":
        c = c0 + (1.0 - c0) * t
    elif pacing == "root":
        c = math.sqrt(c0 * c0 + (1.0 - c0 * c0) * t)
    else:
        c = c0 + (1.0 - c0) * math.floor(t * num_stages + 1e-9) / num_stages
    return min(1.0, c)


def subset_size(
    step: int, n: int, full_at: int, start_fraction: float, pacing: str = "linear", num_stages: int = 4
) -> int:
    """Number of windows active at `step`: ceil(c(step) * n), at least 1."""
    c = competence(step, full_at, start_fraction, pacing, num_stages)
    return max(1, min(n, math.ceil(c * n - 1e-9)))


def easiest_first(difficulty: torch.Tensor) -> torch.Tensor:
    """Window ids sorted by difficulty, easiest first; ties by id (stable)."""
    return torch.sort(difficulty, stable=True).indices


def unigram_surprisal(
    stream: torch.Tensor, seq_len: int, n_windows: int, vocab_size: Optional[int] = None
) -> torch.Tensor:
    """Mean -log p(w) over each window's targets stream[i*L+1 : i*L+L+1], p = (count + 1) / (N + V)
    with counts from `stream` itself (the training split)."""
    vocab = int(stream.max()) + 1 if vocab_size is None else max(vocab_size, int(stream.max()) + 1)
    counts = torch.bincount(stream, minlength=vocab).double()
    surprisal = -torch.log((counts + 1.0) / (counts.sum() + vocab))
    targets = stream[1 : n_windows * seq_len + 1].view(n_windows, seq_len)
    return surprisal[targets].mean(1)


class Curriculum(DataSelectionCallback):
    """Grow the training subset from the easiest windows to all of them (see the module docstring).

    Args:
        difficulty: "unigram", "reference" or "current".
        pacing: "linear", "root" or "step".
        start_fraction: c0, the active fraction at step 0 (0 < c0 <= 1).
        full_at_step: the step from which all windows are active; None: full_at_fraction of the
            trainer's total optimizer steps.
        full_at_fraction: used when full_at_step is None.
        num_stages: number of increments of the "step" pacing.
        within: draw the active windows uniformly ("shuffle") or easiest first ("ordered").
        reference: for difficulty "reference": a checkpoint (.ckpt) of the same network, or a
            file (.pt / .npy) holding one score per training window.
        refresh_every: for difficulty "current": rescore every this many steps.
        warm_start: for difficulty "current": the proxy used before the first rescoring
            ("unigram"), or None to score with the (untrained) model at step 0.
        score_batch_size: windows per forward pass when scoring with a model.
    """

    def __init__(
        self,
        difficulty: str = "unigram",
        pacing: str = "linear",
        start_fraction: float = 0.2,
        full_at_step: Optional[int] = None,
        full_at_fraction: float = 0.5,
        num_stages: int = 4,
        within: str = "shuffle",
        reference: Optional[str] = None,
        refresh_every: int = 500,
        warm_start: Optional[str] = "unigram",
        score_batch_size: int = 64,
    ) -> None:
        super().__init__(score_batch_size)
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"Curriculum: difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
        if pacing not in PACINGS:
            raise ValueError(f"Curriculum: pacing must be one of {PACINGS}, got {pacing!r}")
        if within not in WITHIN:
            raise ValueError(f"Curriculum: within must be one of {WITHIN}, got {within!r}")
        if not 0.0 < start_fraction <= 1.0:
            raise ValueError(f"Curriculum: start_fraction must be in (0, 1], got {start_fraction}")
        if full_at_step is not None and full_at_step < 0:
            raise ValueError(f"Curriculum: full_at_step must be >= 0, got {full_at_step}")
        if not 0.0 <= full_at_fraction <= 1.0:
            raise ValueError(f"Curriculum: full_at_fraction must be in [0, 1], got {full_at_fraction}")
        if num_stages < 1 or refresh_every < 1:
            raise ValueError("Curriculum: num_stages and refresh_every must be >= 1")
        if difficulty == "reference" and not reference:
            raise ValueError("Curriculum: difficulty 'reference' needs reference=<checkpoint or scores file>")
        if warm_start not in (None, "unigram"):
            raise ValueError(f"Curriculum: warm_start must be 'unigram' or None, got {warm_start!r}")
        self.difficulty, self.pacing, self.start_fraction = difficulty, pacing, start_fraction
        self.full_at_step, self.full_at_fraction, self.num_stages = full_at_step, full_at_fraction, num_stages
        self.within, self.reference = within, reference
        self.refresh_every, self.warm_start = refresh_every, warm_start
        self.scores: Optional[torch.Tensor] = None  # (n,) float64, lower = easier
        self.order: Optional[torch.Tensor] = None  # ids, easiest first
        self.last_refresh: Optional[int] = None
        self._full_at = 0
        self._scores_on: Optional[torch.Tensor] = None

    # ---- schedule -----------------------------------------------------------------------
    def full_at(self, trainer: L.Trainer) -> int:
        if self.full_at_step is not None:
            return self.full_at_step
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("Curriculum: set full_at_step, or a finite trainer.max_steps / max_epochs")
        return int(round(self.full_at_fraction * total))

    def size_at(self, step: int, n: int) -> int:
        return subset_size(step, n, self._full_at, self.start_fraction, self.pacing, self.num_stages)

    # ---- difficulty ---------------------------------------------------------------------
    def _unigram(self, dm) -> torch.Tensor:
        start = time.perf_counter()
        ds = dm.train_dataset
        scores = unigram_surprisal(ds.stream, ds.seq_len, len(ds), getattr(dm, "vocab_size", None))
        self.charge(ScoringCost(time.perf_counter() - start, 0.0, len(ds)))
        return scores

    def _reference(self, trainer: L.Trainer, pl_module: L.LightningModule, n: int) -> torch.Tensor:
        path = Path(self.reference).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Curriculum: reference {str(path)!r} not found")
        if path.suffix == ".npy":
            scores = torch.from_numpy(np.load(path)).double().flatten()
        else:
            obj = torch.load(path, map_location="cpu", weights_only=False)
            if torch.is_tensor(obj):
                scores = obj.double().flatten()
            else:  # a Lightning checkpoint: score with its network
                network = getattr(pl_module, "model", None)
                if not isinstance(network, torch.nn.Module):
                    raise ValueError("Curriculum: a reference .ckpt needs a LanguageModel-like module with .model")
                weights = {k[len("model.") :]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
                ref = copy.deepcopy(network)
                ref.load_state_dict(weights)
                scores = self.score(trainer, pl_module, torch.arange(n), "loss", model=ref)
                del ref
        if scores.numel() != n:
            raise ValueError(f"Curriculum: reference has {scores.numel()} scores, the training set {n} windows")
        return scores

    def _set_scores(self, scores: torch.Tensor) -> None:
        self.scores = scores.double().cpu()
        self.order = easiest_first(self.scores)
        self._scores_on = None  # the copy on the batches' device, made when first needed

    # ---- hooks --------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = self.datamodule(trainer)
        n = dm.num_train_examples
        self._full_at = self.full_at(trainer)
        if self.scores is not None and self.scores.numel() != n:
            raise ValueError(f"Curriculum: restored scores are for {self.scores.numel()} windows, the data has {n}")
        if self.scores is None:  # a fresh run (a resumed one restored its scores)
            if self.difficulty == "unigram" or (self.difficulty == "current" and self.warm_start == "unigram"):
                self._set_scores(self._unigram(dm))
            elif self.difficulty == "reference":
                self._set_scores(self._reference(trainer, pl_module, n))
            else:
                self._set_scores(self.score(trainer, pl_module, torch.arange(n), "loss"))
                self.last_refresh = trainer.global_step
        self._apply(dm, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dm = self.datamodule(trainer)
        n = dm.num_train_examples
        if self.should_log(trainer):
            active = dm.train_subset
            subset_scores = self.scores if active is None else self.scores[active]
            logs = {
                "curriculum/active_fraction": (n if active is None else len(active)) / n,
                "curriculum/subset_difficulty": float(subset_scores.mean()),
            }
            pl_module.log_dict(logs, on_step=True, on_epoch=False, batch_size=1)
            if isinstance(batch, dict) and "index" in batch:  # the batch's mean difficulty, computed where the batch is
                if self._scores_on is None or self._scores_on.device != batch["index"].device:
                    self._scores_on = self.scores.float().to(batch["index"].device)
                pl_module.log(
                    "curriculum/batch_difficulty",
                    self._scores_on[batch["index"]].mean(),
                    on_step=True,
                    on_epoch=False,
                    batch_size=1,
                )
            self.log_budget(pl_module)
        step = trainer.global_step  # the next step's index
        more = trainer.max_steps < 0 or step < trainer.max_steps  # no rescoring after the last step
        if self.difficulty == "current" and step % self.refresh_every == 0 and step != self.last_refresh and more:
            self._set_scores(self.score(trainer, pl_module, torch.arange(n), "loss"))
            self.last_refresh = step
        self._apply(dm, step)

    def _apply(self, dm, step: int) -> None:
        n = dm.num_train_examples
        k = self.size_at(step, n)
        if k >= n and self.within == "shuffle":
            dm.set_train_subset(None)  # all windows: plain shuffled sampling
        else:
            dm.set_train_subset(self.order[:k], mode=self.within)

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(scores=self.scores, last_refresh=self.last_refresh)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("scores") is not None:
            self._set_scores(state_dict["scores"])
        self.last_refresh = state_dict.get("last_refresh")

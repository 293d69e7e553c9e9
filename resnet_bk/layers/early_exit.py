"""Early-exit decisions: the confidence of an intermediate prediction and the calibration of its threshold.

References:
1) Schuster et al. 2022, "Confident Adaptive Language Modeling" (CALM): per-token exits from a
   shared LM head, softmax-based confidence, and a threshold calibrated so that the early
   predictions agree with the full model's on all but a chosen fraction of tokens.
2) Xin et al. 2020, "DeeBERT" / Teerapittayanon et al. 2016, "BranchyNet": intermediate heads
   trained with a weighted auxiliary loss; exit when the entropy of a head is low.

Confidence is a number in [0, 1], higher = more confident, and a position exits after layer l
when its confidence there reaches the threshold:
    "max_prob": max_v softmax(logits)_v
    "entropy":  1 - H(softmax(logits)) / log V
Both read one position's logits only, so the exit decision is causal (docs/design.md section 3).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Confidence = Literal["max_prob", "entropy"]


def read_exit_enabled(module: torch.nn.Module, incompatible_keys) -> None:
    """load_state_dict post-hook of a model with an `exit_enabled` buffer: keeps its host copy
    `exit_enabled_host` (read by forward without a host sync) in step with the loaded buffer."""
    module.exit_enabled_host = bool(module.exit_enabled)


def head_on_slots(head, state: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, logits):
    """The head on gathered slots, static shapes: state (B, N, D), index and valid (B*slots,) from
    resnet_bk.layers.act.capacity_rows, logits None or a (B*N + 1, V) buffer -> (the buffer with the
    valid slots' rows written in place (padding slots: row B*N), the slots' logits (B*slots, V))."""
    b, n, d = state.shape
    rows = head(state.reshape(b * n, d).index_select(0, index))
    if logits is None:
        logits = rows.new_zeros(b * n + 1, rows.shape[-1])
    logits.index_copy_(0, torch.where(valid, index, b * n), rows.to(logits.dtype))  # in place: no copy
    return logits, rows


def confidence(logits: torch.Tensor, kind: Confidence = "max_prob") -> torch.Tensor:
    """(..., V) logits -> (...,) float32 confidence in [0, 1] (see the module docstring)."""
    if kind == "max_prob":
        # 1 / sum_v exp(l_v - max l): one V-wide temporary in the logits' dtype, summed in float32,
        # instead of a float32 log-softmax (the head's V-wide tensors dominate the exit's cost).
        top = logits.amax(-1, keepdim=True)
        return (logits - top).exp().sum(-1, dtype=torch.float32).reciprocal()
    if kind == "entropy":
        logp = F.log_softmax(logits.float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return 1.0 - entropy / math.log(logits.shape[-1]) if logits.shape[-1] > 1 else torch.ones_like(entropy)
    raise ValueError(f"confidence: kind must be 'max_prob' or 'entropy', got {kind!r}.")


def exit_outcomes(conf: torch.Tensor, agree: torch.Tensor, thresholds: torch.Tensor):
    """What exiting at each threshold would do, from a run through all layers.

    Args:
        conf: (L-1, T) confidence of the intermediate head after layers 1..L-1 at T positions.
        agree: (L-1, T) bool, the intermediate argmax equals the final layer's argmax.
        thresholds: (K,) candidate thresholds.
    Returns:
        disagree (K,): number of positions whose exit prediction differs from the final one;
        exit_layer_sum (K,): sum over positions of the (1-based) exit layer, L where none exits.
    Positions are treated independently (the run used full states everywhere); the cost of the
    copied-forward states of exited neighbours is measured separately, as the ppl with exits.
    """
    n_inter, _ = conf.shape
    hit = conf.unsqueeze(0) >= thresholds.view(-1, 1, 1)  # (K, L-1, T)
    exits = hit.any(1)  # (K, T)
    first = hit.to(torch.int8).argmax(1)  # (K, T) first layer index that fires (0 where none)
    agree_at_first = agree.unsqueeze(0).expand_as(hit).gather(1, first.unsqueeze(1)).squeeze(1)
    disagree = (exits & ~agree_at_first).sum(-1)
    exit_layer = torch.where(exits, first + 1, torch.full_like(first, n_inter + 1))
    return disagree, exit_layer.sum(-1)


def calibrate_threshold(
    disagree: torch.Tensor, n_positions: int, thresholds: torch.Tensor, max_disagreement: float
) -> float:
    """The lowest threshold (most exits) at and above which every candidate's disagreement rate is
    <= max_disagreement (the rate need not fall monotonically with the threshold).

    disagree (K,) counts from exit_outcomes over n_positions positions, thresholds (K,) ascending.
    Returns +inf (never exit) when the highest candidate already fails.
    """
    rate = disagree.double() / max(n_positions, 1)
    ok = (rate <= max_disagreement).to(torch.int8)
    ok_from_here_up = ok.flip(0).cummin(0).values.flip(0).bool()
    first = ok_from_here_up.nonzero()
    return float(thresholds[first[0, 0]]) if len(first) else math.inf

"""Executed FLOPs per token, counted (not estimated) with torch.utils.flop_counter.FlopCounterMode.

FlopCounterMode intercepts every operator that runs and adds the FLOPs of the matrix-class ones
(mm, addmm, bmm, convolutions, attention): 2 * m * n * k per product. So work that a variant
skips (rows not gathered, layers not entered) is simply not counted, and the count is of what
executed on this batch. Elementwise work (activations, LayerNorm, the BK-core's O(N) resolvent
scan, gathers) is not counted; for these models it is a small, width-independent share.

`flops_per_token(model, input_ids)` is the function; `FlopCountingLanguageModel` logs it on the
first batch of every validation epoch (one extra forward pass, in eval mode) as
"val/flops_per_token" (everything) and "val/flops_per_token_body" (without the LM head, whose
2 * D * V per token is the same for every variant and dominates small models).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_modules.language_model import LanguageModel


def flops_per_token(model: nn.Module, input_ids: torch.Tensor, exclude: tuple[str, ...] = ()) -> float:
    """FLOPs one forward pass of `model` executes on `input_ids` (B, N), divided by B * N.

    Runs under no_grad in the model's current mode (call .eval() first for inference FLOPs).
    exclude: names of direct submodules whose FLOPs are left out, e.g. ("lm_head",) for the body.
    """
    return flop_breakdown(model, input_ids, exclude)["total" if not exclude else "kept"]


def flop_breakdown(model: nn.Module, input_ids: torch.Tensor, exclude: tuple[str, ...] = ("lm_head",)) -> dict:
    """One counted forward pass -> {"total": FLOPs per token, "kept": without the `exclude`d
    direct submodules (missing names count 0)}."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids)
    total = counter.get_total_flops()
    counts = counter.get_flop_counts()
    root = type(model).__name__
    left_out = sum(sum(counts.get(f"{root}.{name}", {}).values()) for name in exclude)
    n = max(input_ids.numel(), 1)
    return {"total": total / n, "kept": (total - left_out) / n}


class FlopCountingLanguageModel(LanguageModel):
    """LanguageModel that also logs "val/flops_per_token" and "val/flops_per_token_body" (see the
    module docstring), counted on the first validation batch of each validation epoch.

    Args (besides LanguageModel's):
        count_flops: False turns the extra counted forward pass off.
    """

    def __init__(self, *args, count_flops: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.count_flops = count_flops

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if self.count_flops and batch_idx == 0:
            flops = flop_breakdown(self.model, batch["input_ids"], exclude=("lm_head",))
            for key, name in (("total", "flops_per_token"), ("kept", "flops_per_token_body")):
                self.log(f"val/{name}", flops[key], on_step=False, on_epoch=True, batch_size=1, sync_dist=True)

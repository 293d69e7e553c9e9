"""Executed FLOPs per token, counted (not estimated) with torch.utils.flop_counter.FlopCounterMode.

FlopCounterMode intercepts every operator that runs and adds the FLOPs of the matrix-class ones
(mm, addmm, bmm, convolutions, attention): 2 * m * n * k per product. So work that a variant
skips (rows not gathered, layers not entered) is simply not counted, and the count is of what
executed on this batch. Elementwise work (activations, LayerNorm, the BK-core's O(N) resolvent
scan, gathers) is not counted; for these models it is a small, width-independent share.

`flops_per_token(model, input_ids)` and `flop_breakdown` are the functions; the `FlopsPerToken`
callback logs them on the first batch of every validation epoch (one extra forward pass of the
network, in eval mode) as "val/flops_per_token" (everything) and "val/flops_per_token_body"
(without the LM head, whose 2 * D * V per token is the same for every variant and dominates small
models). Any config switches it on:

    trainer:
      callbacks:
        - class_path: callbacks.FlopsPerToken
    lightning fit --config configs/resnet_bk.yaml --trainer.callbacks+=callbacks.FlopsPerToken
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


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


class FlopsPerToken(L.Callback):
    """Logs "val/flops_per_token" and "val/flops_per_token_body" of the module's network
    (`pl_module.model`), counted on the first validation batch of each validation epoch."""

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0:
            return
        flops = flop_breakdown(pl_module.model, batch["input_ids"], exclude=("lm_head",))
        for key, name in (("total", "flops_per_token"), ("kept", "flops_per_token_body")):
            pl_module.log(f"val/{name}", flops[key], on_step=False, on_epoch=True, batch_size=1, sync_dist=True)

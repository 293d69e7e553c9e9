"""ACT over multi-scale blocks: the model behind configs/act_multiscale.yaml.

A MultiScaleLM whose blocks are the steps of Graves' ACT (resnet_bk.layers.act.AdaptiveDepth):
each position decides after each multi-scale block whether to stop. For a halted position,
  - its state is frozen (and still enters the later blocks' pooling and BK-core chains),
  - its full-resolution refinement feed-forward is skipped (gathered rows),
  - a coarse token's feed-forward is skipped once both positions it pools have halted (the rule
    reads positions 2j, 2j+1 only, and the token feeds positions >= 2j+1: causal),
and the block loop ends once every position of the batch has halted. The BK-core mixes and the
O(D) pooling/upsampling still run over every position (see resnet_bk.layers.act).
With `capacity` the blocks after the first gather fixed numbers of rows (ceil(capacity N) per
sequence at full resolution, at most that many at a coarse one) and the loop runs every block:
static shapes, no host sync (resnet_bk.layers.act, resnet_bk.layers.multiscale).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from resnet_bk.layers.act import AdaptiveDepth
from resnet_bk.layers.multiscale import Refine
from resnet_bk.models.config import BKConfig
from resnet_bk.models.multiscale_lm import MultiScaleLM, work_stats
from resnet_bk.models.output import LMOutput


class ACTMultiScaleLM(MultiScaleLM):
    """input_ids (B, N) -> LMOutput(logits, aux_losses, stats).

    Args: those of MultiScaleLM (vocab_size, config, ...), and act_threshold, halt_bias_init as for
    resnet_bk.models.act_lm.ACTResNetBKLM (here a step is a whole multi-scale block, so there are
    config.n_layers / 2 steps, or / 4 when hierarchical), and capacity (None, a fraction in
    (0, 1] or one per block after the first: resnet_bk.layers.act.AdaptiveDepth's static-shape capacity).

    aux_losses: "ponder" (mean N + R, unweighted), "load_balance".
    stats: those of MultiScaleLM (now counting only the feed-forward rows that ran) and of
        AdaptiveDepth: "layers_executed" (mean multi-scale blocks taken per position),
        "layers_run", "halt_frac/<l>" (the histogram of executed depth); with a capacity
        "capacity_overflow".
    """

    def __init__(
        self,
        vocab_size: int,
        config: BKConfig = BKConfig(),
        hierarchical: bool = False,
        refine: Refine = "bk",
        refine_d_ff: Optional[int] = None,
        act_threshold: float = 0.99,
        halt_bias_init: float = 1.0,
        capacity: Optional[Union[float, list[float]]] = None,
    ):
        config = BKConfig.of(config)
        super().__init__(vocab_size, config, hierarchical, refine, refine_d_ff)
        # after the base init; one ACT step per multi-scale block
        self.act = AdaptiveDepth(config.d_model, len(self.blocks), act_threshold, halt_bias_init, capacity)

    def forward(self, input_ids: torch.Tensor) -> LMOutput:
        x = self.embed(input_ids)
        y, aux_losses, stats, work = self.act(x, list(self.blocks))
        stats.update(work_stats(work, input_ids.numel()))
        logits = self.head(y)
        return LMOutput(logits=logits, aux_losses=aux_losses, stats=stats)

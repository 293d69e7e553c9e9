"""ResNet-BK language model with adaptive computation time over its layers, per position.

The plain ResNetBKLM (same embeddings, blocks, tied head, init), with Graves' ACT deciding per
position how many blocks to take (resnet_bk.layers.act.AdaptiveDepth): a position whose cumulative
halting probability reaches the threshold stops, its feed-forward/MoE rows are no longer computed,
its state is frozen (and still feeds the later blocks' causal BK-core chain), and the layer loop
ends once every position of the batch has halted. The LM head reads the ACT-weighted state.
With `capacity` the layers after the first gather a fixed ceil(capacity N) rows per sequence and
the loop runs every layer (static shapes, no host sync; see resnet_bk.layers.act).

References:
1) Graves 2016, "Adaptive Computation Time for Recurrent Neural Networks".
2) Dehghani et al. 2019, "Universal Transformers": ACT over depth, per position.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from resnet_bk.layers.act import AdaptiveDepth, run_bk_block
from resnet_bk.models.config import BKConfig
from resnet_bk.models.output import LMOutput
from resnet_bk.models.resnet_bk_lm import ResNetBKLM


class ACTResNetBKLM(ResNetBKLM):
    """input_ids (B, N) -> LMOutput(logits (B, N, V), aux_losses, stats).

    Args:
        vocab_size, config: as for ResNetBKLM.
        act_threshold: a position halts once its cumulative halting probability reaches this.
        halt_bias_init: initial bias of the halting units (1.0: every position takes 2 layers at
            initialisation, as in Universal Transformers; negative: all layers at first).
        capacity: None (exact gather of the running rows, host syncs), a fraction in (0, 1] or a
            list of n_layers - 1 of them (one per layer after the first): static shapes,
            resnet_bk.layers.act.AdaptiveDepth's capacity.

    aux_losses: "ponder" (mean N + R over positions, unweighted) and "load_balance" (mean over the
        layers that ran; absent when num_experts = 1).
    stats: "layers_executed" (mean over positions of the layers taken), "layers_run" (layers the
        batch entered), "halt_frac/<l>" (fraction of positions halting at layer l: the histogram
        of executed depth), "ffn_rows_frac" (feed-forward rows run / (positions * n_layers),
        padding slots included), "g_abs_mean", expert loads; with a capacity "capacity_overflow".
    """

    def __init__(
        self,
        vocab_size: int,
        config: BKConfig = BKConfig(),
        act_threshold: float = 0.99,
        halt_bias_init: float = 1.0,
        capacity: Optional[Union[float, list[float]]] = None,
    ):
        config = BKConfig.of(config)
        super().__init__(vocab_size, config)
        self.act = AdaptiveDepth(config.d_model, config.n_layers, act_threshold, halt_bias_init, capacity)

    def forward(self, input_ids: torch.Tensor) -> LMOutput:
        b, n = input_ids.shape
        x = self.embed(input_ids)  # (B, N, D)

        def step(block):
            def run(x, running, slots=None):
                x, aux, stats, rows = run_bk_block(block, x, running, slots)
                return x, aux, stats, {"ffn_rows": rows}

            return run

        y, aux_losses, stats, work = self.act(x, [step(block) for block in self.blocks])
        stats["ffn_rows_frac"] = work.get("ffn_rows", 0) / (b * n * len(self.blocks))
        logits = self.head(y)
        return LMOutput(logits=logits, aux_losses=aux_losses, stats=stats)

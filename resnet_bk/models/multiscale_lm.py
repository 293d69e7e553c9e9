"""Multi-scale ResNet-BK language model: a stack of multi-scale blocks (resnet_bk.layers.multiscale).

Each block pools position pairs causally, runs ResNet-BK blocks at N/2 (and N/4 when
hierarchical), upsamples with a one-position shift so that no position sees a coarse token that
pooled its future, and refines at full resolution. Embeddings, final LayerNorm, tied head and init
are those of ResNetBKLM.

References:
1) The ResNet-BK seed documents 000 and 002: the simple N -> N/2 -> N and hierarchical
   N -> N/2 -> N/4 -> N/2 -> N layouts; their symmetric convolutions and fixed n_seq are replaced
   by causal per-channel pooling/upsampling that works for any N.
2) Nawrot et al. 2022, "Hierarchical Transformers Are More Efficient Language Models"
   (Hourglass): shortening by pooling, and the shift before upsampling that keeps it causal.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from resnet_bk.layers.bk_layer import ResNetBKBlock
from resnet_bk.layers.multiscale import MLPRefine, MultiScaleBlock, Refine
from resnet_bk.models.base import TiedEmbeddingLM
from resnet_bk.models.config import BKConfig
from resnet_bk.models.output import LMOutput

RESOLUTIONS = (1, 2, 4)


class MultiScaleLM(TiedEmbeddingLM):
    """input_ids (B, N) long -> LMOutput(logits (B, N, V), aux_losses, stats).

    Args:
        vocab_size: V (first positional argument: the CLI injects it from the data).
        config: as for ResNetBKLM (resnet_bk.models.BKConfig); every ResNet-BK block at any
            resolution has its own MoE feed-forward. config.n_layers counts residual blocks, as
            in a ResNetBKLM of that many layers: a simple multi-scale block holds 2 (a ResNet-BK
            block at N/2, the refinement at N), a hierarchical one 4 (N/2, N/4, N/2, N), so there
            are n_layers / 2 or n_layers / 4 multi-scale blocks (n_layers must divide evenly).
        hierarchical: False: N -> N/2 -> N blocks; True: N -> N/2 -> N/4 -> N/2 -> N.
        refine: "bk" (a ResNet-BK block at full resolution) or "mlp" (position-wise MLP).
        refine_d_ff: hidden width of the "mlp" refinement (None: that of the experts, config.ffn_width).

    aux_losses: {"load_balance": mean over BK blocks} (empty when num_experts = 1), unweighted.
    stats: "ffn_rows/res<r>" and "mix_tokens/res<r>" (r = 1, 2, 4: full, half, quarter
        resolution): feed-forward rows and BK-core positions processed at that resolution, summed
        over blocks, per input position; "g_abs_mean" and expert loads (means over BK blocks).
    """

    def __init__(
        self,
        vocab_size: int,
        config: BKConfig = BKConfig(),
        hierarchical: bool = False,
        refine: Refine = "bk",
        refine_d_ff: Optional[int] = None,
    ):
        config = BKConfig.of(config)
        super().__init__(vocab_size, config)
        c = config
        self.causal = c.causal
        n_blocks = multiscale_blocks(type(self).__name__, c.n_layers, hierarchical)
        bk_args = (c.d_model, c.ffn_width, c.num_experts, c.top_k, c.resolvent, c.causal, c.dropout)
        self.blocks = nn.ModuleList(
            MultiScaleBlock(*bk_args, hierarchical, refine, refine_d_ff) for _ in range(n_blocks)
        )
        # Residual blocks at every resolution count, as in a plain stack of that many blocks.
        self.init_weights(n_residual=sum(isinstance(m, (ResNetBKBlock, MLPRefine)) for m in self.modules()))

    def forward(self, input_ids: torch.Tensor) -> LMOutput:
        x = self.embed(input_ids)
        aux_sums: dict[str, list] = {}
        stat_sums: dict[str, list] = {}
        work: dict[str, int] = {}
        for block in self.blocks:
            x, aux, stats, counts = block(x)
            for k, v in aux.items():
                aux_sums.setdefault(k, []).append(v)
            for k, v in stats.items():
                stat_sums.setdefault(k, []).append(v)
            for k, v in counts.items():
                work[k] = work.get(k, 0) + v
        logits = self.head(x)
        aux_losses = {k: sum(v) / len(v) for k, v in aux_sums.items()}
        stats = {k: sum(v) / len(v) for k, v in stat_sums.items()}
        stats.update(work_stats(work, input_ids.numel()))
        return LMOutput(logits=logits, aux_losses=aux_losses, stats=stats)


def multiscale_blocks(model: str, n_layers: int, hierarchical: bool) -> int:
    """The number of multi-scale blocks that hold n_layers residual blocks: 2 per simple block, 4 per
    hierarchical one; a ValueError naming `model` if they do not divide evenly."""
    per_block = 4 if hierarchical else 2
    if n_layers % per_block:
        kind = "hierarchical" if hierarchical else "simple"
        raise ValueError(
            f"{model}: config.n_layers must be a multiple of {per_block} (the residual blocks of one {kind} "
            f"multi-scale block), got {n_layers}."
        )
    return n_layers // per_block


def work_stats(work: dict[str, int], n_positions: int) -> dict[str, float]:
    """Work counts -> per-input-position floats, with every resolution's keys present (0 if unused)."""
    keys = [f"{kind}/res{r}" for kind in ("ffn_rows", "mix_tokens") for r in RESOLUTIONS]
    return {k: work.get(k, 0) / max(n_positions, 1) for k in keys}

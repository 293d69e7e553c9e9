"""ResNet-BK language model: token + position embeddings, a stack of ResNet-BK blocks, a tied head.

Each block mixes positions through the diagonal of a tridiagonal resolvent instead of attention,
so a layer costs O(N) in the sequence length. See docs/design.md sections 1-3.

References:
1) nanoGPT (Karpathy), model.py: the layout of this file, the init and the tied LM head.
2) Switch Transformers (Fedus et al. 2021): the MoE feed-forward and its load-balancing loss.
3) The ResNet-BK seed documents: H0 = discrete Laplacian, z = i; their core is replaced by
   resnet_bk.bk_core (stable recurrences, exact gradient, causal g_i).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from resnet_bk.layers.bk_layer import ResNetBKBlock
from resnet_bk.models.base import TiedEmbeddingLM
from resnet_bk.models.config import BKConfig
from resnet_bk.models.output import LMOutput


def bk_block(config: BKConfig) -> ResNetBKBlock:
    """One ResNet-BK block (B, N, D) -> (B, N, D) of the width, experts, resolvent and dropout of `config`."""
    c = config
    return ResNetBKBlock(c.d_model, c.ffn_width, c.num_experts, c.top_k, c.resolvent, c.causal, c.dropout)


class ResNetBKLM(TiedEmbeddingLM):
    """input_ids (B, N) long -> LMOutput(logits (B, N, V), aux_losses, stats).

    Args:
        vocab_size: V (first positional argument: the CLI injects it from the data).
        config: width, depth, feed-forward width, experts and routing, max length, dropout,
            causality and the resolvent mixing of every layer (resnet_bk.models.BKConfig); n_layers
            ResNet-BK blocks.

    aux_losses: {"load_balance": mean over layers} (empty when num_experts=1), unweighted.
    stats: detached means over layers: "g_abs_mean" (mean |g|, bounded by 1 / min Im z), expert loads,
        and with a per-channel z "z_imag_min", "z_imag_mean", "z_imag_max", "z_real_mean".
    """

    def __init__(self, vocab_size: int, config: BKConfig = BKConfig()):
        config = BKConfig.of(config)
        super().__init__(vocab_size, config)
        self.causal = config.causal
        self.blocks = nn.ModuleList(bk_block(config) for _ in range(config.n_layers))
        self.init_weights(n_residual=config.n_layers)

    def forward(self, input_ids: torch.Tensor) -> LMOutput:
        x = self.embed(input_ids)  # (B, N, D)
        aux_sums: dict[str, torch.Tensor] = {}
        stat_sums: dict[str, torch.Tensor] = {}
        for block in self.blocks:
            x, aux, stats = block(x)
            for k, v in aux.items():
                aux_sums[k] = aux_sums.get(k, 0.0) + v
            for k, v in stats.items():
                stat_sums[k] = stat_sums.get(k, 0.0) + v
        logits = self.head(x)  # (B, N, V)

        n_layers = max(len(self.blocks), 1)
        aux_losses = {k: v / n_layers for k, v in aux_sums.items()}
        stats = {k: v / n_layers for k, v in stat_sums.items()}
        return LMOutput(logits=logits, aux_losses=aux_losses, stats=stats)

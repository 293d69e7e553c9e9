"""ResNet-BK language model whose MoE feed-forward lets each token choose how many experts it uses.

The model is ResNetBKLM with every block's MoEFeedForward replaced by a ConditionalMoEFeedForward
(resnet_bk.layers.conditional_moe: top-p routing between min_experts and max_experts). Everything
else (embeddings, causal BK-core mixing, tied head, the per-layer averaging of aux losses and
stats) is ResNetBKLM's.

aux_losses: {"load_balance", "compute"}, means over layers, unweighted.
stats: means over layers of "experts_per_token", "expert_load/<e>", "expert_load_max", "g_abs_mean".
"""

from __future__ import annotations

import math

import torch.nn as nn

from resnet_bk.layers.conditional_moe import ConditionalMoEFeedForward
from resnet_bk.layers.resolvent import ResolventConfig
from resnet_bk.models.base import init_weights
from resnet_bk.models.resnet_bk_lm import ResNetBKLM


class ConditionalMoELM(ResNetBKLM):
    """input_ids (B, N) -> LMOutput; ResNetBKLM with top-p routed experts (see the module docstring).

    Args (besides ResNetBKLM's, except top_k):
        top_p: a token takes its most probable experts until their router probabilities sum to
            top_p ...
        min_experts, max_experts: ... but at least min_experts and at most max_experts (default
            num_experts) of them.
    With d_ff = 4 * d_model (default), a token that takes k experts costs k dense MLPs.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_layers: int = 4,
        d_ff: int | None = None,
        num_experts: int = 4,
        top_p: float = 0.5,
        min_experts: int = 1,
        max_experts: int | None = None,
        max_seq_len: int = 1024,
        resolvent: ResolventConfig = ResolventConfig(),
        dropout: float = 0.0,
        causal: bool = True,
    ):
        # Build the plain model with one expert per layer (cheap), then swap in the routed MoE.
        super().__init__(vocab_size, d_model, n_layers, d_ff, 1, 1, max_seq_len, resolvent, dropout, causal)
        d_ff = 4 * d_model if d_ff is None else d_ff
        for block in self.blocks:
            moe = ConditionalMoEFeedForward(d_model, d_ff, num_experts, top_p, min_experts, max_experts, dropout)
            moe.apply(init_weights)
            # as in ResNetBKLM: 1/sqrt(2 n_layers)
            nn.init.normal_(moe.experts.c_proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))
            block.bk.moe = moe

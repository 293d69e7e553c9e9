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
from dataclasses import replace

import torch.nn as nn

from resnet_bk.layers.conditional_moe import ConditionalMoEFeedForward
from resnet_bk.models.base import init_weights
from resnet_bk.models.config import BKConfig
from resnet_bk.models.resnet_bk_lm import ResNetBKLM


class ConditionalMoELM(ResNetBKLM):
    """input_ids (B, N) -> LMOutput; ResNetBKLM with top-p routed experts (see the module docstring).

    Args:
        vocab_size, config: as for ResNetBKLM; config.top_k stays 1 (routing is by top_p).
        top_p: a token takes its most probable experts until their router probabilities sum to
            top_p ...
        min_experts, max_experts: ... but at least min_experts and at most max_experts (default
            config.num_experts) of them.
    With d_ff = 4 * d_model (default), a token that takes k experts costs k dense MLPs.
    """

    def __init__(
        self,
        vocab_size: int,
        config: BKConfig = BKConfig(),
        top_p: float = 0.5,
        min_experts: int = 1,
        max_experts: int | None = None,
    ):
        config = BKConfig.of(config)
        if config.top_k != 1:
            raise ValueError(
                f"ConditionalMoELM: experts are chosen by top_p, min_experts and max_experts; leave config.top_k "
                f"at 1, got {config.top_k}."
            )
        # Build the plain model with one expert per layer (cheap), then swap in the routed MoE.
        super().__init__(vocab_size, replace(config, num_experts=1))
        self.config = config  # what was asked for, not the one-expert stand-in
        c = config
        for block in self.blocks:
            moe = ConditionalMoEFeedForward(
                c.d_model, c.ffn_width, c.num_experts, top_p, min_experts, max_experts, c.dropout
            )
            moe.apply(init_weights)
            # as in ResNetBKLM: 1/sqrt(2 n_layers)
            nn.init.normal_(moe.experts.c_proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layers))
            block.bk.moe = moe

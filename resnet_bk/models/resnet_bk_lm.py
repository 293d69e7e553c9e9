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
from resnet_bk.layers.resolvent import ResolventConfig
from resnet_bk.models.base import TiedEmbeddingLM
from resnet_bk.models.output import LMOutput


class ResNetBKLM(TiedEmbeddingLM):
    """input_ids (B, N) long -> LMOutput(logits (B, N, V), aux_losses, stats).

    Args:
        vocab_size: V (first positional argument: the CLI injects it from the data).
        d_model: width D.
        n_layers: number of ResNet-BK blocks.
        d_ff: hidden width of EACH expert; default 4 * d_model, the Switch convention: at top_k=1 a
            token costs the FLOPs of a dense nanoGPT MLP, while the parameters grow with num_experts.
            For equal-parameter comparisons use resnet_bk.models.count_parameters.
        num_experts, top_k: MoE routing; num_experts=1 is a plain MLP.
        max_seq_len: size of the learned position embedding; longer inputs raise ValueError.
        resolvent: the resolvent mixing of every layer (resnet_bk.layers.ResolventConfig): channels,
            the shift z (fixed, spread or learned), Laplacian or input-dependent couplings, output
            gate, bk_scale. The default is the seeds' layer (one chain, Laplacian, z = i).
        dropout: dropout on embeddings, expert outputs and resolvent features.
        causal: True (default) uses the causal core g_i, so logits at position t depend on tokens
            0..t only. False uses the full resolvent diagonal G_ii, which depends on EVERY position:
            it leaks the future and is only for non-autoregressive use; never report its perplexity.

    aux_losses: {"load_balance": mean over layers} (empty when num_experts=1), unweighted.
    stats: detached means over layers: "g_abs_mean" (mean |g|, bounded by 1 / min Im z), expert loads,
        and with a per-channel z "z_imag_min", "z_imag_mean", "z_imag_max", "z_real_mean".
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_layers: int = 4,
        d_ff: int | None = None,
        num_experts: int = 4,
        top_k: int = 1,
        max_seq_len: int = 1024,
        resolvent: ResolventConfig = ResolventConfig(),
        dropout: float = 0.0,
        causal: bool = True,
    ):
        super().__init__(vocab_size, d_model, max_seq_len, dropout)
        d_ff = 4 * d_model if d_ff is None else d_ff
        self.causal = causal
        self.blocks = nn.ModuleList(
            ResNetBKBlock(d_model, d_ff, num_experts, top_k, resolvent, causal, dropout) for _ in range(n_layers)
        )
        self.init_weights(n_residual=n_layers)

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

"""Causal pre-norm Transformer language model: the O(N^2) baseline ResNet-BK is measured against.

References:
1) nanoGPT (Karpathy), model.py: this file is its GPT with the same init and tied head, returning
   the shared LMOutput.
2) "Attention Is All You Need" (Vaswani et al. 2017); attention runs through
   F.scaled_dot_product_attention (FlashAttention where available, Dao et al. 2022).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from resnet_bk.models.base import TiedEmbeddingLM
from resnet_bk.models.config import ModelConfig
from resnet_bk.models.output import LMOutput


class CausalSelfAttention(nn.Module):
    """(B, N, D) -> (B, N, D); position t attends to positions 0..t."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"CausalSelfAttention: d_model {d_model} is not divisible by n_heads {n_heads}.")
        self.n_heads, self.dropout = n_heads, dropout
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (t.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, N, hd)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, n, d)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    """(B, N, D) -> (B, N, D): D -> d_ff -> D with GELU."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.c_fc = nn.Linear(d_model, d_ff)
        self.c_proj = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerLM(TiedEmbeddingLM):
    """input_ids (B, N) long -> LMOutput(logits (B, N, V), aux_losses={}, stats={}).

    Args:
        vocab_size: V (first positional argument: the CLI injects it from the data).
        config: width, depth (n_layers Transformer blocks), MLP hidden width (d_ff, default
            4 * d_model), max length and dropout (on embeddings, attention weights and residual
            branches): resnet_bk.models.ModelConfig.
        n_heads: attention heads (d_model % n_heads == 0).
    """

    def __init__(self, vocab_size: int, config: ModelConfig = ModelConfig(), n_heads: int = 4):
        config = ModelConfig.of(config)
        super().__init__(vocab_size, config)
        self.blocks = nn.ModuleList(
            Block(config.d_model, n_heads, config.ffn_width, config.dropout) for _ in range(config.n_layers)
        )
        self.init_weights(n_residual=config.n_layers)

    def forward(self, input_ids: torch.Tensor) -> LMOutput:
        x = self.embed(input_ids)  # (B, N, D)
        for block in self.blocks:
            x = block(x)
        return LMOutput(logits=self.head(x))

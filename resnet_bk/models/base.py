"""What every language model here shares: embeddings in, a tied head out, nanoGPT's init.

A model subclasses TiedEmbeddingLM, passes its config (resnet_bk.models.config) to it, builds its
stack between the two ends, and in forward writes

    x = self.embed(input_ids)      # (B, N, D), with the max_seq_len check
    ...                            # its own blocks
    logits = self.head(x)          # (B, N, V)

and calls self.init_weights(n_residual) once its modules exist.

References:
1) nanoGPT (Karpathy), model.py: the init, the residual-projection scaling and the tied LM head.
2) Press & Wolf 2017, Using the Output Embedding to Improve Language Models: weight tying.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from resnet_bk.layers.moe import GroupedLinear
from resnet_bk.models.config import ModelConfig


def init_weights(module: nn.Module) -> None:
    """nanoGPT init: N(0, 0.02) weights, zero biases (LayerNorm keeps ones and zeros)."""
    if isinstance(module, (nn.Linear, GroupedLinear)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


class TiedEmbeddingLM(nn.Module):
    """Token + learned position embedding with dropout, final LayerNorm, LM head tied to the tokens.

    Holds config (the model's ModelConfig, as built), tok_emb (V, D), pos_emb (max_seq_len, D),
    drop, ln_f and lm_head (lm_head.weight IS tok_emb.weight). Inputs longer than max_seq_len raise
    ValueError.
    """

    def __init__(self, vocab_size: int, config: ModelConfig):
        super().__init__()
        d = config.d_model
        self.config = config
        self.max_seq_len = config.max_seq_len
        self.tok_emb = nn.Embedding(vocab_size, d)
        self.pos_emb = nn.Embedding(config.max_seq_len, d)
        self.drop = nn.Dropout(config.dropout)
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, N) long -> dropout(token + position embedding) (B, N, D)."""
        n = input_ids.shape[1]
        if n > self.max_seq_len:
            raise ValueError(
                f"{type(self).__name__}: input length {n} exceeds max_seq_len {self.max_seq_len}; "
                "raise max_seq_len or lower seq_len."
            )
        return self.drop(self.tok_emb(input_ids) + self.pos_emb(torch.arange(n, device=input_ids.device)))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> logits (..., V) through the final LayerNorm and the tied head."""
        return self.lm_head(self.ln_f(x))

    def init_weights(self, n_residual: int) -> None:
        """nanoGPT init of every submodule, then std 0.02 / sqrt(2 * n_residual) for the projections
        that write into the residual stream (named c_proj), n_residual = residual blocks in the stack."""
        self.apply(init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * max(n_residual, 1)))

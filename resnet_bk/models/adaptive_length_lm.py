"""ResNet-BK language model with a learned sequence length (causal dynamic token pooling).

    x  = tok_emb + pos_emb                                   (B, N, D)
    x  = pre blocks (full resolution)
    b  = BoundaryPredictor(x)                                (B, N)  segment closes at t; from x_t only
    z  = segment_pool(x, b)                                  (B, K, D)  K = closed segments, K <= N
    y  = inner blocks (z)                                    the shortened sequence: the saving
    x  = x + causal_upsample(y, b)                           segment j reaches positions >= its close
    x  = post blocks (full resolution)
    logits = tied head(LN(x))                                every position is scored

The inner length K is learned per input: the boundary predictor decides it, and the training
module pays for it with a length penalty (aux "length" = K / N, the seed's) or a binomial prior
on the boundary rate (aux "boundary_prior", DTP's). With rate_target set, aux "rate_constraint" holds
the thresholded rate (the one evaluation runs at) at the target by pushing the batch's top
rate_target fraction of boundary logits above 0.5 and the rest below. Without it, the prior holds
the sampled training rate while every p_t stays near the prior rate, under 0.5, so that
evaluation closes no segment at all. See resnet_bk.layers.adaptive_length for the
causality argument and for why the seed's pool-truncate-pad version cannot be used for LM.

References: Nawrot et al. 2023 (Dynamic Token Pooling), Nawrot et al. 2022 (Hourglass), nanoGPT.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from resnet_bk.layers.act import check_capacity
from resnet_bk.layers.adaptive_length import (
    BoundaryPredictor,
    boundary_prior_nll,
    boundary_rate_constraint,
    causal_upsample,
    segment_close_positions,
    segment_pool,
    segment_slots,
)
from resnet_bk.layers.dropout import consume_dropout
from resnet_bk.models.base import TiedEmbeddingLM
from resnet_bk.models.config import BKConfig
from resnet_bk.models.output import LMOutput
from resnet_bk.models.resnet_bk_lm import bk_block


class AdaptiveLengthLM(TiedEmbeddingLM):
    """input_ids (B, N) long -> LMOutput(logits (B, N, V), aux_losses, stats).

    Args:
        vocab_size, config: as ResNetBKLM (resnet_bk.models.BKConfig); config.n_layers ResNet-BK
            blocks in all: n_pre, then n_layers - n_pre - n_post inner, then n_post.
        n_pre, n_post: ResNet-BK blocks before the pooling (full resolution) and after the
            upsampling (full resolution); the others run on the shortened sequence. n_pre >= 1, so
            the boundary predictor reads contextual (causal) states, not bare embeddings.
        boundary_temperature: Gumbel-sigmoid temperature of the boundary predictor.
        init_boundary_rate: boundary rate at initialisation (the inner length starts near rate * N).
        prior_rate: None: aux "length" = mean over rows of K / N (straight-through, so it trains the
            predictor). A rate in (0, 1): aux "boundary_prior" = binomial NLL of K around prior_rate * N.
        length_multiple: pad the inner length up to a multiple of this (the seed's length bins).
        eval_sampling: in eval mode, sample the boundaries as in training instead of thresholding
            the boundary probability at 0.5 (see BoundaryPredictor).
        rate_target: None, or a rate in (0, 1): the fraction of positions with p_t > 0.5 (boundaries
            per token at evaluation) that aux "rate_constraint" holds (boundary_rate_constraint).
        capacity: None (the inner length is the batch's most closed segments: one host sync) or a
            fraction c in (0, 1]: static shapes, ceil(c N) segment slots per row; a row's segments
            beyond them are not pooled (resnet_bk.layers.adaptive_length.segment_pool), counted in
            the stat "capacity_overflow". capacity=1.0 never overflows and gives the values of None.

    aux_losses: "load_balance" (mean over all blocks; with num_experts > 1), "length" or
        "boundary_prior", and "rate_constraint" with rate_target; unweighted.
    stats: "compression_ratio" (B * N / closed segments), "inner_length_fraction" (executed inner
        length K_pad / N), "boundary_rate" (boundaries the forward ran with, per position),
        "boundary_prob_mean", "g_abs_mean", expert loads; with rate_target, "thresholded_rate"
        (fraction of p_t > 0.5, in any mode); with a capacity, "capacity_overflow" (segments not
        pooled / segments closed).
    """

    def __init__(
        self,
        vocab_size: int,
        config: BKConfig = BKConfig(),
        n_pre: int = 1,
        n_post: int = 1,
        boundary_temperature: float = 1.0,
        init_boundary_rate: float = 0.25,
        prior_rate: float | None = None,
        length_multiple: int = 1,
        eval_sampling: bool = False,
        rate_target: float | None = None,
        capacity: float | None = None,
    ):
        config = BKConfig.of(config)
        super().__init__(vocab_size, config)
        n_inner = config.n_layers - n_pre - n_post
        if n_pre < 1 or n_post < 0 or n_inner < 0:
            raise ValueError(
                f"AdaptiveLengthLM: need n_pre >= 1, n_post >= 0 and n_pre + n_post <= config.n_layers, got n_pre "
                f"{n_pre}, n_post {n_post}, n_layers {config.n_layers}."
            )
        if prior_rate is not None and not 0.0 < prior_rate < 1.0:
            raise ValueError(f"AdaptiveLengthLM: prior_rate must be in (0, 1) or None, got {prior_rate}.")
        if rate_target is not None and not 0.0 < rate_target < 1.0:
            raise ValueError(f"AdaptiveLengthLM: rate_target must be in (0, 1) or None, got {rate_target}.")
        if length_multiple < 1:
            raise ValueError(f"AdaptiveLengthLM: length_multiple must be >= 1, got {length_multiple}.")
        check_capacity("AdaptiveLengthLM", capacity)
        self.capacity = capacity
        self.causal = config.causal
        self.prior_rate, self.length_multiple = prior_rate, length_multiple
        self.rate_target = rate_target

        def blocks(n: int) -> nn.ModuleList:
            return nn.ModuleList(bk_block(config) for _ in range(n))

        self.pre_blocks, self.inner_blocks, self.post_blocks = blocks(n_pre), blocks(n_inner), blocks(n_post)
        self.boundary = BoundaryPredictor(config.d_model, boundary_temperature, init_boundary_rate, eval_sampling)
        self.null = nn.Parameter(torch.zeros(config.d_model))  # what a position sees before any segment closes
        self.init_weights(n_residual=config.n_layers)
        self.boundary.reset_bias()

    def forward(self, input_ids: torch.Tensor) -> LMOutput:
        bsz, n = input_ids.shape
        x = self.embed(input_ids)
        sums: tuple[dict, dict] = ({}, {})
        n_run = 0

        def run(blocks: nn.ModuleList, h: torch.Tensor, gathered=None) -> torch.Tensor:
            nonlocal n_run
            for block in blocks:
                h, aux, stats = block(h, gathered)
                n_run += 1
                for target, values in zip(sums, (aux, stats)):
                    for k, v in values.items():
                        target[k] = target.get(k, 0.0) + v
            return h

        x = run(self.pre_blocks, x)
        b, p = self.boundary(x)
        z, closed, k_pad = segment_pool(x, b, self.length_multiple, segment_slots(self.capacity, n))
        if k_pad > 0:  # dropout in the inner blocks is drawn per closing position, on the (B, N) grid
            y = run(self.inner_blocks, z, (segment_close_positions(b, k_pad), bsz * n))
        else:  # nothing to run; the random stream after this does not depend on it
            y = z
            consume_dropout(self.inner_blocks, bsz * n, x.shape[-1], x)
        x = x + causal_upsample(y, b, self.null)
        x = run(self.post_blocks, x)
        logits = self.head(x)

        n_run = max(n_run, 1)
        aux_losses = {k: v / n_run for k, v in sums[0].items()}
        stats = {k: v / n_run for k, v in sums[1].items()}
        if self.prior_rate is None:
            aux_losses["length"] = (b.sum(1) / max(n, 1)).mean()
        else:
            aux_losses["boundary_prior"] = boundary_prior_nll(b, self.prior_rate)
        if self.rate_target is not None:
            aux_losses["rate_constraint"], stats["thresholded_rate"] = boundary_rate_constraint(p, self.rate_target)
        hard = b.detach() > 0.5
        stats["compression_ratio"] = (bsz * n) / closed.sum().clamp_min(1)
        stats["inner_length_fraction"] = torch.full((), k_pad / max(n, 1), device=x.device)
        stats["boundary_rate"] = hard.float().mean()
        stats["boundary_prob_mean"] = p.detach().mean()
        if self.capacity is not None:
            stats["capacity_overflow"] = 1 - closed.sum() / hard.sum().clamp_min(1)
        return LMOutput(logits=logits, aux_losses=aux_losses, stats=stats)

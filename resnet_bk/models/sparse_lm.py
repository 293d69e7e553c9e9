"""Language models with learned sparsity in the BK layers (resnet_bk.layers.sparsity):

  SparseResNetBKLM:    ResNetBKLM whose blocks skip the feed-forward, potential and resolvent
                       read-out at the positions their causal importance predictor drops;
  MultiScaleSparseLM:  MultiScaleLM (simple blocks N -> N/2 -> N) with that sparsity at both
                       resolutions (the seeds' combined layer, 001_*).

Embeddings, final LayerNorm, tied head and the nanoGPT init are those of ResNetBKLM / MultiScaleLM;
after the model-wide init the predictors and interpolators get their own (keep-probability
1 - target_sparsity at the start, interpolation = zero-order hold).

Stats (detached, every forward): "sparsity" (fraction of positions skipped, mean over sparse
layers), "sparsity/<l>" per layer (SparseResNetBKLM), "ffn_rows_frac" (rows that entered a
feed-forward / (layers x positions)), "expected_sparsity", "threshold" (the calibrated eval
threshold). aux_losses: "sparsity" (mean over layers of (expected sparsity - target)^2) and
"load_balance".
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from resnet_bk.layers.bk_layer import ResNetBKBlock
from resnet_bk.layers.multiscale import MLPRefine
from resnet_bk.layers.sparsity import Core, MultiScaleSparseBlock, SparseResNetBKBlock, set_temperature, sparse_layers
from resnet_bk.models.base import init_weights
from resnet_bk.models.config import BKConfig
from resnet_bk.models.multiscale_lm import MultiScaleLM
from resnet_bk.models.output import LMOutput
from resnet_bk.models.resnet_bk_lm import ResNetBKLM


def causal_config(model: str, config: BKConfig) -> BKConfig:
    """BKConfig.of(config) (a BKConfig, a mapping or None), which must be causal: the sparse layers
    exist for next-token models only."""
    config = BKConfig.of(config)
    if not config.causal:
        raise ValueError(f"{model}: the sparse layers are causal only; set config.causal to true.")
    return config


def _reinit(model: nn.Module, blocks: nn.Module) -> None:
    """nanoGPT init of the new blocks, residual projections scaled by the number of residual blocks,
    then each sparse layer's own init."""
    blocks.apply(init_weights)
    n_residual = sum(isinstance(m, (ResNetBKBlock, MLPRefine)) for m in model.modules())
    for name, p in blocks.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_residual))
    for layer in sparse_layers(blocks):
        layer.reset_sparsity_parameters()


class SparseResNetBKLM(ResNetBKLM):
    """input_ids (B, N) -> LMOutput; ResNetBKLM with SparseResNetBKBlocks.

    Args:
        vocab_size, config: as for ResNetBKLM; config.causal must be True.
        target_sparsity: fraction of positions each layer skips, in [0, 1); 0 is the dense model.
        core: "reduced" (resolvent at length K) or "full" (length N); the same values.
        predictor_kernel, interp_kernel: widths of the causal convolutions.
        capacity: None (every layer gathers exactly its kept positions: two host reads a layer) or a
            fraction in (0, 1]: static shapes, ceil(capacity N) slots a row, no host sync (see
            resnet_bk.layers.sparsity.SparseBKLayer).
    """

    def __init__(
        self,
        vocab_size: int,
        config: BKConfig = BKConfig(),
        target_sparsity: float = 0.5,
        core: Core = "reduced",
        predictor_kernel: int = 3,
        interp_kernel: int = 3,
        capacity: Optional[float] = None,
    ):
        config = causal_config(type(self).__name__, config)
        super().__init__(vocab_size, config)
        c = config
        self.target_sparsity = target_sparsity
        self.blocks = nn.ModuleList(
            SparseResNetBKBlock(
                c.d_model,
                c.ffn_width,
                c.num_experts,
                c.top_k,
                c.resolvent,
                True,
                c.dropout,
                target_sparsity,
                core,
                predictor_kernel,
                interp_kernel,
                capacity,
            )
            for _ in range(c.n_layers)
        )
        _reinit(self, self.blocks)

    def set_temperature(self, tau: float) -> None:
        set_temperature(self, tau)

    def forward(self, input_ids: torch.Tensor) -> LMOutput:
        b, n = input_ids.shape
        x = self.embed(input_ids)
        aux_all: dict[str, list] = {}
        stat_all: dict[str, list] = {}
        per_layer, rows = {}, 0
        for l, block in enumerate(self.blocks):
            x, aux, stats = block(x)
            for k, v in aux.items():
                aux_all.setdefault(k, []).append(v)
            for k, v in stats.items():
                stat_all.setdefault(k, []).append(v)
            per_layer[f"sparsity/{l}"] = stats["sparsity"]
            rows += block.bk.last_rows
        logits = self.head(x)
        aux_losses = {k: sum(v) / len(v) for k, v in aux_all.items()}
        stats = {k: sum(v) / len(v) for k, v in stat_all.items()}
        stats.update(per_layer)
        stats["ffn_rows_frac"] = rows / max(len(self.blocks) * b * n, 1)
        return LMOutput(logits=logits, aux_losses=aux_losses, stats=stats)


class MultiScaleSparseLM(MultiScaleLM):
    """input_ids (B, N) -> LMOutput; MultiScaleLM (simple blocks, BK refinement) whose coarse and
    refinement blocks are SparseResNetBKBlocks. Args: MultiScaleLM's vocab_size and config
    (config.causal must be True; hierarchical and refine are fixed: False, "bk") and
    target_sparsity, core, predictor_kernel, interp_kernel, capacity as SparseResNetBKLM. Stats add "ffn_rows/res<r>", "mix_tokens/res<r>" per input position."""

    def __init__(
        self,
        vocab_size: int,
        config: BKConfig = BKConfig(),
        target_sparsity: float = 0.5,
        core: Core = "reduced",
        predictor_kernel: int = 3,
        interp_kernel: int = 3,
        capacity: Optional[float] = None,
    ):
        config = causal_config(type(self).__name__, config)
        super().__init__(vocab_size, config, hierarchical=False, refine="bk")
        c = config
        self.target_sparsity = target_sparsity
        self.blocks = nn.ModuleList(
            MultiScaleSparseBlock(
                c.d_model,
                c.ffn_width,
                c.num_experts,
                c.top_k,
                c.resolvent,
                c.dropout,
                target_sparsity,
                core,
                predictor_kernel,
                interp_kernel,
                capacity,
            )
            for _ in range(len(self.blocks))
        )
        _reinit(self, self.blocks)

    def set_temperature(self, tau: float) -> None:
        set_temperature(self, tau)

    def forward(self, input_ids: torch.Tensor) -> LMOutput:
        out = super().forward(input_ids)
        layers = sparse_layers(self)
        rows = sum(layer.last_rows for layer in layers)
        positions = sum(layer.last_keep.numel() if layer.last_keep is not None else layer.last_rows for layer in layers)
        out.stats["ffn_rows_frac"] = rows / max(positions, 1)
        return out

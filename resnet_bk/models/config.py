"""The hyperparameters the language models share, as one typed, validated object.

    ModelConfig   what every model has: width, depth, feed-forward width, max length, dropout
    BKConfig      ModelConfig plus what every ResNet-BK model has: experts, routing, causality and
                  the resolvent mixing (resnet_bk.layers.ResolventConfig)

A model takes `(vocab_size, config, <its own variant arguments>)`; in a YAML config the block is
`network: {class_path: ..., init_args: {config: {d_model: 256, ..., resolvent: {...}}, ...}}`.
Both are frozen: a model's config is what it was built with. `.of(value)` builds one from the
dataclass, a mapping (e.g. a YAML block read without the CLI) or None (the defaults).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

from resnet_bk.config_of import config_of
from resnet_bk.layers.resolvent import ResolventConfig


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters every language model here has.

    Attributes:
        d_model: width D of the residual stream and the embeddings.
        n_layers: depth, counted in residual blocks (a ResNet-BK block, a Transformer block, a
            multi-scale model's refinement MLP), so that one config gives models of comparable
            size: a multi-scale model groups them into multi-scale blocks of 2 (simple) or 4
            (hierarchical), a learned-length model splits them into its pre, inner and post blocks.
        d_ff: hidden width of each feed-forward, of EACH expert in a mixture; None: 4 * d_model, the
            Switch convention: at top_k = 1 a token costs the FLOPs of a dense nanoGPT MLP, while
            the parameters grow with num_experts. For equal-parameter comparisons use
            resnet_bk.models.count_parameters.
        max_seq_len: size of the learned position embedding; longer inputs raise ValueError.
        dropout: dropout probability on embeddings and residual branches (and a ResNet-BK model's
            resolvent features), in [0, 1).
    """

    d_model: int = 128
    n_layers: int = 4
    d_ff: Optional[int] = None
    max_seq_len: int = 1024
    dropout: float = 0.0

    def __post_init__(self):
        name = type(self).__name__
        for field, low in (("d_model", 1), ("n_layers", 1), ("max_seq_len", 1)):
            value = getattr(self, field)
            if not (_is_int(value) and value >= low):
                raise ValueError(f"{name}: {field} must be an integer >= {low}, got {value!r}.")
        if self.d_ff is not None and not (_is_int(self.d_ff) and self.d_ff >= 1):
            raise ValueError(f"{name}: d_ff must be an integer >= 1 or None (4 * d_model), got {self.d_ff!r}.")
        if not (isinstance(self.dropout, (int, float)) and math.isfinite(self.dropout) and 0 <= self.dropout < 1):
            raise ValueError(f"{name}: dropout must be in [0, 1), got {self.dropout!r}.")

    @classmethod
    def of(cls, value: Union[ModelConfig, Mapping[str, Any], None]) -> ModelConfig:
        """The config itself, the defaults for None, or one built from a mapping (unknown keys: a
        one-line ValueError that lists the valid ones)."""
        return config_of(cls, value)

    @property
    def ffn_width(self) -> int:
        """The feed-forward hidden width in use: d_ff, or 4 * d_model when d_ff is None."""
        return 4 * self.d_model if self.d_ff is None else self.d_ff


@dataclass(frozen=True)
class BKConfig(ModelConfig):
    """Hyperparameters every ResNet-BK language model has: ModelConfig's, and

    Attributes:
        num_experts: experts of each MoE feed-forward; 1 is a plain MLP (no router).
        top_k: experts each token is routed to, 1 <= top_k <= num_experts.
        causal: True uses the causal core g_i, so logits at position t depend on tokens 0..t only.
            False uses the full resolvent diagonal G_ii, which depends on EVERY position: it leaks
            the future and is only for non-autoregressive use; never report its perplexity.
        resolvent: the resolvent mixing of every layer (resnet_bk.layers.ResolventConfig): channels,
            the shift z (fixed, spread or learned), Laplacian or input-dependent couplings, output
            gate, bk_scale. The default is the seeds' layer (one chain, Laplacian, z = i).
    """

    num_experts: int = 4
    top_k: int = 1
    causal: bool = True
    resolvent: ResolventConfig = ResolventConfig()

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if not (_is_int(self.num_experts) and self.num_experts >= 1):
            raise ValueError(f"{name}: num_experts must be an integer >= 1, got {self.num_experts!r}.")
        if not (_is_int(self.top_k) and 1 <= self.top_k <= self.num_experts):
            raise ValueError(
                f"{name}: top_k must be an integer in 1..num_experts={self.num_experts}, got {self.top_k!r}."
            )
        if not isinstance(self.causal, bool):
            raise ValueError(f"{name}: causal must be true or false, got {self.causal!r}.")
        object.__setattr__(self, "resolvent", ResolventConfig.of(self.resolvent))  # a mapping from YAML, too

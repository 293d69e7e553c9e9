"""The one output type every language model in resnet_bk returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import torch


@dataclass
class LMOutput:
    """What a language model's forward returns.

    logits: (B, N, V) next-token logits; position t has seen tokens 0..t only.
    aux_losses: unweighted scalar losses to add to the LM loss (e.g. "load_balance"); may be empty.
        The training module chooses the weights.
    stats: detached scalars for logging (e.g. "g_abs_mean"); never part of the loss.
    """

    logits: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, Union[torch.Tensor, float]] = field(default_factory=dict)

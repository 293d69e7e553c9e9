"""Language models with one interface: Model(vocab_size, config, <variant arguments>), where config
is a ModelConfig (BKConfig for the ResNet-BK models), and forward(input_ids (B, N)) -> LMOutput."""

import torch.nn as nn

from resnet_bk.models.config import BKConfig, ModelConfig
from resnet_bk.models.output import LMOutput
from resnet_bk.models.resnet_bk_lm import ResNetBKLM
from resnet_bk.models.transformer_lm import TransformerLM


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters, each shared (tied) tensor counted once, for equal-parameter comparisons."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["BKConfig", "LMOutput", "ModelConfig", "ResNetBKLM", "TransformerLM", "count_parameters"]

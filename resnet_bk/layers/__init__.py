"""Layers: the MoE feed-forward and the ResNet-BK layer/block (pure PyTorch)."""

from resnet_bk.layers.bk_layer import BKLayer, ResNetBKBlock
from resnet_bk.layers.moe import Expert, MoEFeedForward

__all__ = ["BKLayer", "Expert", "MoEFeedForward", "ResNetBKBlock"]

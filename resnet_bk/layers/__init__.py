"""Layers: the MoE feed-forward, the resolvent mixing and the ResNet-BK layer/block (pure PyTorch)."""

from resnet_bk.layers.bk_layer import BKLayer, ResNetBKBlock
from resnet_bk.layers.moe import Expert, MoEFeedForward
from resnet_bk.layers.resolvent import ResolventConfig, resolvent_features

__all__ = ["BKLayer", "Expert", "MoEFeedForward", "ResNetBKBlock", "ResolventConfig", "resolvent_features"]

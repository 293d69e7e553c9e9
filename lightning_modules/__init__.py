"""LightningModules: the training loop around resnet_bk models (one base, one small subclass per variant)."""

from lightning_modules.language_model import LanguageModel

__all__ = ["LanguageModel"]

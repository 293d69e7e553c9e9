"""Data modules: WikiText windows and the tokenizers behind them."""

from datamodules.tokenization import HFTokenizer, WordTokenizer, build_tokenizer
from datamodules.wikitext import WikiTextDataModule

__all__ = ["HFTokenizer", "WikiTextDataModule", "WordTokenizer", "build_tokenizer"]

"""Data: tokenizer (and, later, datasets and image transforms)."""

from mplug_fast.data.tokenizer import TokenizedBatch, Tokenizer

__all__ = ["TokenizedBatch", "Tokenizer"]

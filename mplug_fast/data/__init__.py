"""Data: tokenizer, image loading and transforms (fidelity §7), and a synthetic world for smoke runs."""

from mplug_fast.data.grounding_transform import GroundingTransform
from mplug_fast.data.synthetic import SyntheticWorld
from mplug_fast.data.tokenizer import TokenizedBatch, Tokenizer
from mplug_fast.data.transforms import load_image, test_transform

__all__ = [
    "TokenizedBatch",
    "Tokenizer",
    "GroundingTransform",
    "SyntheticWorld",
    "load_image",
    "test_transform",
]

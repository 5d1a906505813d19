"""A synthetic world of coloured shapes with captions, VQA, retrieval and grounding data (no files needed)."""

from mplug_fast.data.synthetic.datasets import (
    CaptionDataset,
    GroundingDataset,
    PretrainDataset,
    RetrievalDataset,
    VQADataset,
    box_to_bins,
    majority_baseline,
    world_majority_baseline,
)
from mplug_fast.data.synthetic.world import COLORS, NUMBER_WORDS, QA, QA_TYPES, SHAPES, SyntheticWorld

__all__ = [
    "COLORS",
    "NUMBER_WORDS",
    "QA",
    "QA_TYPES",
    "SHAPES",
    "CaptionDataset",
    "GroundingDataset",
    "PretrainDataset",
    "RetrievalDataset",
    "SyntheticWorld",
    "VQADataset",
    "box_to_bins",
    "majority_baseline",
    "world_majority_baseline",
]

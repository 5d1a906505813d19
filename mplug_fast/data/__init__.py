"""Data: tokenizer, image loading and transforms (fidelity §7), and a synthetic world for smoke runs."""

from mplug_fast.data.annotations import AnnotationError
from mplug_fast.data.grounding_transform import GroundingTransform
from mplug_fast.data.official import (
    KarpathyCaptionDataset,
    PretrainJsonDataset,
    VQAJsonDataset,
    pre_caption,
    pre_question,
)
from mplug_fast.data.official_grounding import RefCocoDataset
from mplug_fast.data.official_retrieval import RetrievalJsonDataset
from mplug_fast.data.synthetic import SyntheticWorld
from mplug_fast.data.tokenizer import TokenizedBatch, Tokenizer
from mplug_fast.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    RandomAugment,
    TestTransform,
    TrainTransform,
    load_image,
    preprocess,
    test_transform,
    train_transform,
)

__all__ = [
    "AnnotationError",
    "KarpathyCaptionDataset",
    "PretrainJsonDataset",
    "RefCocoDataset",
    "RetrievalJsonDataset",
    "VQAJsonDataset",
    "pre_caption",
    "pre_question",
    "TokenizedBatch",
    "Tokenizer",
    "CLIP_MEAN",
    "CLIP_STD",
    "GroundingTransform",
    "RandomAugment",
    "SyntheticWorld",
    "TestTransform",
    "TrainTransform",
    "load_image",
    "preprocess",
    "test_transform",
    "train_transform",
]

"""mplug_fast: a fast, faithful PyTorch implementation of mPLUG (Li et al., EMNLP 2022)."""

from mplug_fast.config import MPlugConfig, get_config
from mplug_fast.modeling import (
    MPlug,
    MPlugForCaption,
    MPlugForGrounding,
    MPlugForPretraining,
    MPlugForRetrieval,
    MPlugForVQA,
    build_model,
)

__version__ = "0.1.0"

__all__ = [
    "MPlug",
    "MPlugConfig",
    "MPlugForCaption",
    "MPlugForGrounding",
    "MPlugForPretraining",
    "MPlugForRetrieval",
    "MPlugForVQA",
    "__version__",
    "build_model",
    "get_config",
    "pipeline",
]


def __getattr__(name: str):
    """Lazy exports: `mplug_fast.pipeline` imports the inference stack (PIL, tokenizers) on first use."""
    if name == "pipeline":
        from mplug_fast.inference.pipeline import pipeline

        return pipeline
    raise AttributeError(f"module 'mplug_fast' has no attribute {name!r}")

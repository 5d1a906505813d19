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
]

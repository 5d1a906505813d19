"""nn.Modules only: no I/O, no training logic."""

from mplug_fast.modeling.mplug import (
    TASK_MODELS,
    MPlug,
    MPlugForCaption,
    MPlugForGrounding,
    MPlugForPretraining,
    MPlugForRetrieval,
    MPlugForVQA,
    build_model,
)

__all__ = [
    "TASK_MODELS",
    "MPlug",
    "MPlugForCaption",
    "MPlugForGrounding",
    "MPlugForPretraining",
    "MPlugForRetrieval",
    "MPlugForVQA",
    "build_model",
]

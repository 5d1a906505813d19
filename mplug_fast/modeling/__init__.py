"""nn.Modules only: no I/O, no training logic, no task registry (the task layer picks the model class)."""

from mplug_fast.modeling.mplug import (
    MomentumView,
    MPlug,
    MPlugForCaption,
    MPlugForGrounding,
    MPlugForPretraining,
    MPlugForRetrieval,
    MPlugForVQA,
)
from mplug_fast.modeling.pairs import MPlugForNLVR, MPlugForVE

__all__ = [
    "MPlug",
    "MPlugForCaption",
    "MPlugForGrounding",
    "MPlugForNLVR",
    "MPlugForPretraining",
    "MPlugForRetrieval",
    "MPlugForVE",
    "MPlugForVQA",
    "MomentumView",
]

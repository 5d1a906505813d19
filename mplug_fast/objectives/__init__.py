"""Training objectives: pretraining (ITC, ITM, MLM, PrefixLM) and the downstream task losses.

Each objective is an `nn.Module` holding its model: `forward(batch) -> {"loss": ..., parts...}` and
`after_optimizer_step()` (the momentum EMA). Build one with `build_objective(task, model, tokenizer)`.
"""

from mplug_fast.objectives.itc import FeatureQueue, ITCLoss, clamp_temperature
from mplug_fast.objectives.itm import itm_loss, multinomial_sampler, negative_weights, sample_negatives
from mplug_fast.objectives.losses import lm_loss
from mplug_fast.objectives.mlm import mask_tokens, mlm_loss
from mplug_fast.objectives.momentum import momentum_update, parameter_pairs
from mplug_fast.objectives.prefix_lm import continuation_table, prefix_lm_loss, split_prefix
from mplug_fast.objectives.pretrain import PretrainObjective
from mplug_fast.objectives.tasks import (
    OBJECTIVES,
    CaptionObjective,
    GroundingObjective,
    RetrievalObjective,
    VQAObjective,
    build_objective,
)

__all__ = [
    "OBJECTIVES",
    "CaptionObjective",
    "FeatureQueue",
    "GroundingObjective",
    "ITCLoss",
    "PretrainObjective",
    "RetrievalObjective",
    "VQAObjective",
    "build_objective",
    "clamp_temperature",
    "continuation_table",
    "itm_loss",
    "lm_loss",
    "mask_tokens",
    "mlm_loss",
    "momentum_update",
    "multinomial_sampler",
    "negative_weights",
    "parameter_pairs",
    "prefix_lm_loss",
    "sample_negatives",
    "split_prefix",
]

"""Training losses the tasks compose: ITC (momentum queue), ITM (hard negatives), MLM, PrefixLM, the LM loss,
the momentum (EMA) update, and the `Objective` base class the trainer trains. Task-specific objectives live
with their task (``mplug_fast/tasks/<name>.py``)."""

from mplug_fast.modeling.momentum import momentum_update, parameter_pairs
from mplug_fast.objectives.base import Objective
from mplug_fast.objectives.itc import FeatureQueue, ITCLoss, clamp_temperature
from mplug_fast.objectives.itm import itm_loss, multinomial_sampler, negative_weights, sample_negatives
from mplug_fast.objectives.losses import lm_loss
from mplug_fast.objectives.mlm import mask_tokens, mlm_loss
from mplug_fast.objectives.prefix_lm import continuation_table, prefix_lm_loss, split_prefix
from mplug_fast.objectives.pretrain import PretrainObjective

__all__ = [
    "FeatureQueue",
    "ITCLoss",
    "Objective",
    "PretrainObjective",
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

"""Training engine: run config, AdamW groups, schedule, precision, distribution, checkpoints, the loop.

Heavy pieces import lazily: ``from mplug_fast.train.trainer import Trainer``.
"""

from mplug_fast.train.config import ConfigError, RunConfig, load_config
from mplug_fast.train.optim import build_optimizer, param_groups
from mplug_fast.train.schedule import WarmupCosine, lr_at

__all__ = [
    "ConfigError",
    "RunConfig",
    "WarmupCosine",
    "build_optimizer",
    "load_config",
    "lr_at",
    "param_groups",
]

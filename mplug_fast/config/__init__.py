"""Configuration: the model's dataclasses and presets (`model`) and the one coercion engine (`coerce`) that
every config of the package (model, run, task options) is built with."""

from mplug_fast.config.coerce import ConfigError, apply_overrides, coerce, from_mapping, load_yaml, to_mapping
from mplug_fast.config.model import (
    PRESETS,
    DecoderConfig,
    FusionConfig,
    MPlugConfig,
    TextConfig,
    VisionConfig,
    base,
    check_overrides,
    get_config,
    huge,
    large,
    load_bert_config,
    micro,
    tiny,
)

__all__ = [
    "PRESETS",
    "ConfigError",
    "DecoderConfig",
    "FusionConfig",
    "MPlugConfig",
    "TextConfig",
    "VisionConfig",
    "apply_overrides",
    "base",
    "check_overrides",
    "coerce",
    "from_mapping",
    "get_config",
    "huge",
    "large",
    "load_bert_config",
    "load_yaml",
    "micro",
    "tiny",
    "to_mapping",
]

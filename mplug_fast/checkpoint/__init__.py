"""Weights I/O: official mPLUG checkpoints, OpenAI CLIP / Hugging Face BERT initialisation, our format."""

from mplug_fast.checkpoint.init import (
    init_from_public_weights,
    load_bert_weights,
    load_clip_visual,
    vision_config_from_clip,
)
from mplug_fast.checkpoint.io import CheckpointError, load_pretrained, read_checkpoint, save_pretrained
from mplug_fast.checkpoint.keymap import ConversionReport
from mplug_fast.checkpoint.official import (
    infer_official_config,
    load_official,
    official_queue_state,
    to_official_state_dict,
)
from mplug_fast.checkpoint.resolve import CheckpointSource, resolve_checkpoint

__all__ = [
    "CheckpointError",
    "CheckpointSource",
    "ConversionReport",
    "infer_official_config",
    "load_pretrained",
    "official_queue_state",
    "init_from_public_weights",
    "load_bert_weights",
    "load_clip_visual",
    "load_official",
    "read_checkpoint",
    "resolve_checkpoint",
    "save_pretrained",
    "to_official_state_dict",
    "vision_config_from_clip",
]

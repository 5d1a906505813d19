"""Task tests run single-threaded (the CI machine's 2 cores are shared) on micro models."""

from __future__ import annotations

from typing import Any

import pytest
import torch

IMAGE_SIZE = 16
WORLD = {"image_size": IMAGE_SIZE, "num_scenes": 64, "eval_scenes": 6, "max_objects": 2}


def micro_overrides() -> dict[str, Any]:
    """A model far below the tiny preset (D=32, one layer per stack, 16 px, 5 image tokens)."""
    return {
        "vision.width": 32,
        "vision.layers": 1,
        "vision.heads": 2,
        "vision.patch_size": 8,
        "vision.image_size": IMAGE_SIZE,
        "vision.attention_dropout": 0.0,
        "text.hidden_size": 32,
        "text.heads": 2,
        "text.intermediate_size": 64,
        "text.encoder_layers": 1,
        "text.max_position_embeddings": 64,
        "text.hidden_dropout": 0.0,
        "text.attention_dropout": 0.0,
        "fusion.layers": 1,
        "decoder.layers": 1,
        "embed_dim": 16,
    }


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    from mplug_fast.data import Tokenizer

    return Tokenizer()


def micro_model(task: str, seed: int = 0):
    from mplug_fast.config import get_config
    from mplug_fast.modeling import build_model

    torch.manual_seed(seed)
    return build_model(get_config("tiny", **micro_overrides()), task).eval()

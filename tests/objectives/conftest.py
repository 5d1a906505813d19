"""Shared helpers for the objective tests: a single-thread section for the model-running tests (the CPU is
shared; two OpenMP threads under load are several times slower than one), a tiny dropout-free config and a
grounding batch."""

from __future__ import annotations

import pytest
import torch

from mplug_fast.config import MPlugConfig, tiny
from mplug_fast.data import Tokenizer


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(dropout: bool = False) -> MPlugConfig:
    """The tiny preset with 2 layers per stack (and no dropout unless asked): fast exact comparisons."""
    overrides = {
        "vision.layers": 2,
        "text.encoder_layers": 2,
        "fusion.layers": 2,
        "fusion.stride": 1,
        "decoder.layers": 2,
    }
    if not dropout:
        overrides |= {
            "vision.attention_dropout": 0.0,
            "text.hidden_dropout": 0.0,
            "text.attention_dropout": 0.0,
            "adapter_dropout": 0.0,
        }
    return tiny().replace(**overrides)


def grounding_batch(tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """Two referring expressions over random 64 px images with their boxes (cx, cy, w, h), one at the edge."""
    enc = tokenizer(["the red circle", "a triangle"], padding="longest")
    return {
        "images": torch.randn(2, 3, 64, 64),
        "text_ids": enc["input_ids"],
        "text_mask": enc["attention_mask"].bool(),
        "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.99, 0.05, 0.5, 0.3]]),
    }

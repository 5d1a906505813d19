"""Shared helpers for the objective tests: a single-thread section for the model-running tests (the CPU is
shared; two OpenMP threads under load are several times slower than one) and a tiny dropout-free config."""

from __future__ import annotations

import pytest
import torch

from mplug_fast.config import MPlugConfig, tiny


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

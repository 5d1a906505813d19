"""Tiny random task models shared by the inference tests (built once per session, eval mode).

The decoders get peaked, context-dependent next-token distributions (word embeddings scaled up, as in
tests/test_generation.py) so that greedy / beam choices are not decided by rounding noise, and a
cross-attention strong enough that different images give different outputs.
"""

from __future__ import annotations

import pytest
import torch

import mplug_fast
from mplug_fast.data import Tokenizer
from mplug_fast.tasks import build_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes run fastest on one thread (and do not stall on a busy machine); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(task: str, seed: int):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(mplug_fast.get_config("tiny"), task)
        with torch.no_grad():
            if model.decoder is not None:
                model.decoder.embeddings.word.weight.mul_(10.0)
                for layer in model.decoder.layers:  # make the memory matter for the next token
                    layer.cross.kv_proj.weight.mul_(10.0)
                    layer.cross.out_proj.weight.mul_(10.0)
            if model.text_encoder is not None:
                model.text_encoder.embeddings.word.weight.mul_(10.0)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="session")
def models() -> dict:
    """task -> tiny model (vqa, caption, grounding, retrieval)."""
    return {
        task: _build(task, seed) for seed, task in enumerate(("vqa", "caption", "grounding", "retrieval"))
    }

"""Task tests run single-threaded (the CI machine's 2 cores are shared) on micro models."""

from __future__ import annotations

import pytest
import torch

from tests.train.helpers import IMAGE_SIZE, micro_overrides

WORLD = {"image_size": IMAGE_SIZE, "num_scenes": 64, "eval_scenes": 6, "max_objects": 2}


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
    from mplug_fast.tasks import build_model

    torch.manual_seed(seed)
    return build_model(get_config("micro", **micro_overrides()), task).eval()

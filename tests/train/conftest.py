"""The trainer tests run single-threaded: the CI machine's 2 cores are shared, and oversubscribed OpenMP
threads make these tiny models 10x slower."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

"""Test setup shared by the whole suite.

The environment variables are set at import, before any test module imports triton kernels or transformers:
``TRITON_INTERPRET=1`` (set only when CUDA is unavailable) lets ``@triton.jit`` kernels run on the CPU
interpreter (it must be set before the
kernels are defined), ``HF_HUB_OFFLINE=1`` keeps the transformers oracles from reaching for the hub,
``MPLUG_FAST_CPU_DTYPE=float32`` makes the machine-chosen inference dtype the same on every CPU.
"""

import os
import signal

import torch

# On a CUDA machine the kernels are compiled for the GPU (the `gpu` tests); elsewhere they run interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `dtype="auto"` picks bf16 on CPUs with native bf16: the suite pins fp32, so results do not depend on the CPU
os.environ["MPLUG_FAST_CPU_DTYPE"] = "float32"

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same torch RNG state."""
    torch.manual_seed(0)


@pytest.fixture
def default_sigint():
    """Ctrl-C tests start from Python's default SIGINT handler whatever the suite was started with (a
    background job or ``nohup`` runs it with SIGINT ignored), and leave the handler as they found it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Collects the tests marked ``long`` first (``make test``'s two workers take test files in this order,
    so the learning runs start early instead of ending the run on one worker) and skips tests marked ``gpu``
    when CUDA is unavailable (they only run where ``-m gpu`` selects them)."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: otherwise collection order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)

"""The native CPU ops split their work over torch's threads (a `_C` built without OpenMP runs every
at::parallel_for on one thread), and each output is the same whatever the thread count."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from mplug_fast.ops import native


@pytest.fixture
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_ops_use_torch_threads(threads: int, restore_threads: None) -> None:
    torch.set_num_threads(threads)
    assert native.cpu_threads() == threads == torch.ops.mplug_fast.parallel_threads()


def test_small_linear_same_result_for_any_thread_count(restore_threads: None) -> None:
    """N = 770: 192 four-row blocks split between the threads, plus the 2-row tail."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 300, generator=g), torch.randn(770, 300, generator=g)
    b = torch.randn(770, generator=g)
    torch.set_num_threads(1)
    one = torch.ops.mplug_fast.small_linear(x, w, b)
    torch.set_num_threads(2)
    assert native.cpu_threads() == 2
    two = torch.ops.mplug_fast.small_linear(x, w, b)
    assert torch.equal(one, two)
    torch.testing.assert_close(one, (x.double() @ w.double().T + b.double()).float(), rtol=1e-5, atol=1e-4)

"""The native small-row linear (`mplug_fast::small_linear`) against `F.linear`; when the modules use it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mplug_fast.ops import small_linear as sl


@pytest.mark.parametrize(
    ("M", "N", "K"),
    [(1, 7, 13), (2, 4, 8), (3, 9, 24), (5, 3072, 96), (10, 130, 768), (11, 61, 40), (32, 33, 17)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_equals_f_linear(M: int, N: int, K: int, bias: bool) -> None:
    """Every row-tile remainder (M mod 3), weight-tile remainder (N mod 4) and lane tail (K mod 8)."""
    x, w = torch.randn(M, K), torch.randn(N, K)
    b = torch.randn(N) if bias else None
    out = torch.ops.mplug_fast.small_linear(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double()).float()
    assert out.shape == (M, N)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * K**0.5)


def test_non_contiguous_inputs_and_leading_dims() -> None:
    x = torch.randn(4, 3, 40)[:, 1]  # [4, 40], rows strided
    w = torch.randn(40, 24).t()  # [24, 40], transposed view
    torch.testing.assert_close(torch.ops.mplug_fast.small_linear(x, w, None), F.linear(x, w))
    h = torch.randn(2, 5, 40)
    torch.testing.assert_close(sl.small_linear(h, w, None), F.linear(h, w))


def test_meta_shape_and_input_errors() -> None:
    meta = torch.ops.mplug_fast.small_linear(
        torch.empty(3, 8, device="meta"), torch.empty(5, 8, device="meta"), None
    )
    assert meta.shape == (3, 5)
    with pytest.raises(RuntimeError, match="x has K=8, weight K=9"):
        torch.ops.mplug_fast.small_linear(torch.randn(3, 8), torch.randn(5, 9), None)
    with pytest.raises(RuntimeError, match="float32 only"):
        torch.ops.mplug_fast.small_linear(torch.randn(3, 8).double(), torch.randn(5, 8).double(), None)
    with pytest.raises(RuntimeError, match="bias must be float32"):
        torch.ops.mplug_fast.small_linear(torch.randn(3, 8), torch.randn(5, 8), torch.randn(4))


def test_linear_uses_the_kernel_only_for_few_rows_without_autograd(monkeypatch) -> None:
    monkeypatch.setattr(sl, "enabled", lambda: True)  # the default depends on the CPU
    calls = []
    native = sl.small_linear
    monkeypatch.setattr(sl, "small_linear", lambda *a: calls.append(a[0].shape) or native(*a))
    layer = nn.Linear(16, 8)
    with torch.no_grad():
        few = sl.linear(layer, torch.randn(2, 5, 16))  # 10 rows
        many = sl.linear(layer, torch.randn(sl.MAX_ROWS + 1, 16))
        half = sl.linear(layer.double(), torch.randn(3, 16).double())
    assert calls == [torch.Size([2, 5, 16])]
    assert few.shape == (2, 5, 8) and many.shape == (sl.MAX_ROWS + 1, 8) and half.dtype == torch.float64
    y = sl.linear(layer.float(), torch.randn(3, 16, requires_grad=True))  # autograd on: nn.Linear
    y.sum().backward()
    assert len(calls) == 1 and layer.weight.grad is not None


def test_the_switch(monkeypatch) -> None:
    for value, expected in (("1", True), ("0", False)):
        monkeypatch.setenv(sl.ENV, value)
        sl.enabled.cache_clear()
        assert sl.enabled() is expected
    monkeypatch.setenv(sl.ENV, "yes")
    sl.enabled.cache_clear()
    with pytest.raises(ValueError, match="MPLUG_FAST_SMALL_LINEAR='yes'"):
        sl.enabled()
    monkeypatch.delenv(sl.ENV)
    sl.enabled.cache_clear()
    assert sl.enabled() is (torch.backends.cpu.get_cpu_capability() == "AVX2")
    layer = nn.Linear(8, 4)
    monkeypatch.setattr(sl, "enabled", lambda: False)
    monkeypatch.setattr(sl, "small_linear", lambda *a: pytest.fail("the kernel ran while switched off"))
    with torch.no_grad():
        assert sl.linear(layer, torch.randn(2, 8)).shape == (2, 4)

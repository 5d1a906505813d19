"""oneDNN's linear (`mplug_fast.ops.onednn_linear`) against `F.linear` in float64, with and without
autograd; when the model's layers take it (`mplug_fast.ops.linear`); its switch and probe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mplug_fast.modeling.layers import MLP, SelfAttention
from mplug_fast.ops import linear as lin
from mplug_fast.ops import onednn_linear as od

needs_onednn = pytest.mark.skipif(od.probe_error() is not None, reason=f"{od.probe_error()}")


@pytest.fixture
def switched_on(monkeypatch):
    """oneDNN's linear on whatever the CPU (its default depends on the CPU); the calls are recorded."""
    monkeypatch.setattr(od, "enabled", lambda: True)
    calls: list[tuple[int, ...]] = []
    native = od._pointwise
    monkeypatch.setattr(od, "_pointwise", lambda x, w, b: calls.append(tuple(x.shape)) or native(x, w, b))
    return calls


@needs_onednn
@pytest.mark.parametrize(("shape", "N"), [((128, 64), 48), ((130, 40), 17), ((3, 100, 96), 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_f_linear(switched_on, shape: tuple[int, ...], N: int, bias: bool) -> None:
    x, w = torch.randn(*shape), torch.randn(N, shape[-1])
    b = torch.randn(N) if bias else None
    out = od.linear(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double()).float()
    assert out.shape == (*shape[:-1], N) and switched_on  # it ran through oneDNN
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * shape[-1] ** 0.5)


@needs_onednn
def test_gradients_equal_f_linear(switched_on) -> None:
    x = torch.randn(2, 80, 24, dtype=torch.float64).float().requires_grad_()
    layer = nn.Linear(24, 12)
    y = od.linear(x, layer.weight, layer.bias)
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "_OneDnnLinearBackward"  # (under the view)
    grad = torch.randn_like(y)
    y.backward(grad)
    got = (x.grad, layer.weight.grad, layer.bias.grad)
    x64 = x.detach().double().requires_grad_()
    w64, b64 = (p.detach().double().requires_grad_() for p in (layer.weight, layer.bias))
    F.linear(x64, w64, b64).backward(grad.double())
    for a, b in zip(got, (x64.grad, w64.grad, b64.grad)):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-4)
    frozen = nn.Linear(24, 12).requires_grad_(False)  # only the input tracked: no weight gradient made
    od.linear(x, frozen.weight, frozen.bias).sum().backward()
    assert frozen.weight.grad is None and frozen.bias.grad is None


@needs_onednn
def test_which_gemm_the_layers_take(switched_on) -> None:
    layer = nn.Linear(16, 8)
    with torch.no_grad():
        lin.linear(layer, torch.randn(od.MIN_ROWS, 16))  # enough rows: oneDNN
        lin.linear(layer, torch.randn(od.MIN_ROWS - 1, 16))  # too few
        lin.linear(layer.double(), torch.randn(200, 16, dtype=torch.float64))  # not fp32
    transposed = nn.Linear(16, 8)
    transposed.weight = nn.Parameter(torch.randn(16, 8).t())  # not contiguous
    lin.linear(transposed, torch.randn(200, 16))
    lin.linear(nn.Identity(), torch.randn(200, 16))  # not an nn.Linear: runs as itself
    assert switched_on == [(od.MIN_ROWS, 16)]


@needs_onednn
def test_model_blocks_match_the_blas_path(switched_on, monkeypatch) -> None:
    """A ViT attention + MLP block on [2, 100, 32] (200 rows) equals the same block through `F.linear`,
    forward and backward."""
    torch.manual_seed(0)
    attn, mlp = SelfAttention(32, 4), MLP(32, 64, activation="quick_gelu")
    x = torch.randn(2, 100, 32)

    def run() -> tuple[torch.Tensor, ...]:
        h = x.clone().requires_grad_()
        y = mlp(attn(h, None)).sum()
        grads = torch.autograd.grad(y, (h, attn.qkv.weight, mlp.fc2.weight))
        return (y.detach(), *grads)

    fast = run()
    assert len(switched_on) == 4  # qkv, out_proj, fc1, fc2
    monkeypatch.setattr(od, "enabled", lambda: False)
    for a, b in zip(fast, run()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert len(switched_on) == 4


def test_the_switch(monkeypatch) -> None:
    for value, expected in (("1", od.probe_error() is None), ("0", False)):
        monkeypatch.setenv(od.ENV, value)
        od.enabled.cache_clear()
        assert od.enabled() is expected
    monkeypatch.setenv(od.ENV, "yes")
    od.enabled.cache_clear()
    with pytest.raises(ValueError, match="MPLUG_FAST_ONEDNN_LINEAR='yes'"):
        od.enabled()
    monkeypatch.delenv(od.ENV)
    od.enabled.cache_clear()
    amd_avx2 = torch.backends.cpu.get_cpu_capability() == "AVX2" and od._cpu_vendor() == "AuthenticAMD"
    assert od.enabled() is (amd_avx2 and od.probe_error() is None)
    od.enabled.cache_clear()


def test_a_failing_op_turns_it_off(monkeypatch) -> None:
    def broken(*args):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(od, "_pointwise", broken)
    monkeypatch.setenv(od.ENV, "1")
    od.probe_error.cache_clear()
    od.enabled.cache_clear()
    try:
        assert "oneDNN's linear failed: no kernel" in (od.probe_error() or "")
        assert od.enabled() is False
        with torch.no_grad():  # and the layers run F.linear
            assert lin.linear(nn.Linear(8, 4), torch.randn(200, 8)).shape == (200, 4)
    finally:
        od.probe_error.cache_clear()
        od.enabled.cache_clear()

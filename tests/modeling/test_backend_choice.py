"""The modules resolve their backends once per (device, dtype, needs grad, mask kind), not per call.

The attention modules keep what `resolve_attention` returned in `module.backends`, the modules with fused
epilogues what `resolve_fused` returned in `module.fused_backends`; `MPLUG_FAST_ATTENTION` is read when a
module resolves, and `clear_backend_caches` makes them resolve again.
"""

from __future__ import annotations

import torch

import mplug_fast.modeling.layers as layers
from mplug_fast.modeling.layers import SelfAttention, TransformerLayer, clear_backend_caches
from mplug_fast.ops.attention import ENV_VAR, resolve_attention
from mplug_fast.ops.fused import resolve_fused


def counting(monkeypatch, name: str, real) -> list:
    calls = []

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(layers, name, spy)
    return calls


def test_a_layer_resolves_once_per_static_key(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    attention_calls = counting(monkeypatch, "resolve_attention", resolve_attention)
    fused_calls = counting(monkeypatch, "resolve_fused", resolve_fused)
    layer = TransformerLayer(32, 2, 64, dropout=0.0, attn_dropout=0.0).eval()
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    with torch.no_grad():
        for _ in range(4):
            layer(x)
        assert len(attention_calls) == 1 and attention_calls[0][:4] == ("cpu", torch.float32, 16, "none")
        assert len(fused_calls) == 2  # the residual LayerNorms (width 32) and the MLP (fc1 input width 32)
        for _ in range(3):
            layer(x, mask)  # a new mask kind: one more resolution
        assert len(attention_calls) == 2 and attention_calls[1][3] == "key_padding"
    layer(x.requires_grad_())  # needs grad: a new key
    assert len(attention_calls) == 3 and attention_calls[2][5] is True
    names = layer.attn.backends.names
    assert {names[key] for key in names if key[-1]} == {"sdpa"}  # with grad
    assert set(names.values()) <= {"sdpa", "short_query"}  # short_query: fp32 inference on AVX2 CPUs


def test_the_environment_is_read_at_resolution_and_kept_until_cleared(monkeypatch):
    attn = SelfAttention(32, 2).eval()
    x = torch.randn(1, 3, 32)
    monkeypatch.setenv(ENV_VAR, "reference")
    with torch.no_grad():
        attn(x)
        monkeypatch.setenv(ENV_VAR, "sdpa")
        attn(x)
        assert set(attn.backends.names.values()) == {"reference"}
        clear_backend_caches(attn)
        attn(x)
        assert set(attn.backends.names.values()) == {"sdpa"}


def test_the_config_backend_is_below_the_environment(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    attn = SelfAttention(32, 2, backend="reference").eval()
    with torch.no_grad():
        attn(torch.randn(1, 3, 32))
    assert set(attn.backends.names.values()) == {"reference"}
    monkeypatch.setenv(ENV_VAR, "sdpa")
    clear_backend_caches(attn)
    with torch.no_grad():
        attn(torch.randn(1, 3, 32))
    assert set(attn.backends.names.values()) == {"sdpa"}

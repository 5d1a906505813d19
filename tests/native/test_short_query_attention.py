"""The native short-query attention (`mplug_fast::short_query_attention`) against fp64 SDPA; the `short_query`
backend's choice and fallbacks; a decoder's generation through it equals the one through `sdpa`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mplug_fast
from mplug_fast.generation import beam_search
from mplug_fast.modeling.decoder import TextDecoder
from mplug_fast.modeling.layers import clear_backend_caches, init_bert_weights
from mplug_fast.ops import attention as attention_module
from mplug_fast.ops.attention import ATTENTION, select_backend
from mplug_fast.ops.reference import attention_ref
from mplug_fast.ops.short_query import MAX_QUERIES, ShortQueryBackend


def op(q, k, v, scale, mask=None):
    """The op (looked up at call time: `mplug_fast._C` is loaded by the package's conftest fixture)."""
    return torch.ops.mplug_fast.short_query_attention(q, k, v, mask, scale)


def reference(q, k, v, scale, mask=None):
    """fp64 attention; mask bool [B, M] (True = attend), a row with no key gives 0."""
    if mask is None:
        return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale).float()
    return attention_ref(q.double(), k.double(), v.double(), key_padding_mask=mask, scale=scale).float()


def fused_kv(B: int, M: int, H: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as views of one fused projection [B, M, 2, H, D] (strided rows), as the decoder has them."""
    k, v = torch.randn(B, M, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    return k, v


@pytest.mark.parametrize(
    ("B", "H", "G", "M", "D"),
    [(1, 12, 5, 577, 64), (2, 3, 10, 65, 64), (1, 2, 1, 1, 8), (3, 2, 7, 33, 24), (1, 1, 64, 130, 16),
     (2, 1, 4, 3, 40), (1, 2, 3, 64, 8), (1, 2, 2, 129, 32)],
)  # fmt: skip
def test_equals_sdpa(B: int, H: int, G: int, M: int, D: int) -> None:
    """Every row tile and tail (G mod 5), key tail (M mod 2), key block (64) and head-dim tail (D mod 16)."""
    k, v = fused_kv(B, M, H, D)
    q = 3 * torch.randn(B, H, G, D)
    out = op(q, k, v, D**-0.5)
    assert out.shape == (B, H, G, D) and out.is_contiguous()
    torch.testing.assert_close(out, reference(q, k, v, D**-0.5), rtol=1e-5, atol=1e-5)
    contiguous = op(q, k.contiguous(), v.contiguous(), D**-0.5)
    assert torch.equal(out, contiguous)  # the layout changes the reads, not the arithmetic


@pytest.mark.parametrize(("G", "M"), [(5, 577), (3, 70), (1, 9)])
def test_key_mask_and_rows_without_keys(G: int, M: int) -> None:
    q, (k, v) = torch.randn(3, 4, G, 32), fused_kv(3, M, 4, 32)
    mask = torch.rand(3, M) > 0.3
    mask[1] = False  # no key: the output row is 0
    mask[2, :] = False
    mask[2, -1] = True  # one key: its value row
    out = op(q, k, v, 32**-0.5, mask)
    torch.testing.assert_close(out, reference(q, k, v, 32**-0.5, mask), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[2], v[2, :, -1:].expand(4, G, 32))


def test_large_scores_underflow_to_zero_weights_not_nan() -> None:
    q, (k, v) = torch.randn(1, 2, 5, 16) * 60, fused_kv(1, 50, 2, 16)
    out = op(q, k, v, 1.0)  # score spreads of thousands: most exp() underflow
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(q, k, v, 1.0), rtol=1e-5, atol=1e-5)


def test_same_result_for_any_thread_count() -> None:
    q, (k, v) = torch.randn(2, 6, 5, 64), fused_kv(2, 200, 6, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(q, k, v, 0.125)
        torch.set_num_threads(2)
        assert torch.ops.mplug_fast.parallel_threads() == 2  # the heads really are split
        two = op(q, k, v, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_meta_shape_and_input_errors() -> None:
    meta = op(torch.empty(2, 3, 5, 8, device="meta"), *(torch.empty(2, 3, 9, 8, device="meta"),) * 2, 1.0)
    assert meta.shape == (2, 3, 5, 8)
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 7, 16)
    with pytest.raises(RuntimeError, match="float32 only"):
        op(q.double(), k.double(), k.double(), 1.0)
    with pytest.raises(RuntimeError, match="head dim 12 is not a multiple of 8"):
        op(torch.randn(1, 2, 3, 12), torch.randn(1, 2, 7, 12), torch.randn(1, 2, 7, 12), 1.0)
    with pytest.raises(RuntimeError, match="head dim of q, k and v must be contiguous"):
        op(q, k, torch.randn(1, 2, 16, 7).transpose(-1, -2), 1.0)
    with pytest.raises(RuntimeError, match="does not match k"):
        op(q, torch.randn(1, 3, 7, 16), torch.randn(1, 3, 7, 16), 1.0)
    with pytest.raises(RuntimeError, match="no keys"):
        op(q, torch.randn(1, 2, 0, 16), torch.randn(1, 2, 0, 16), 1.0)


def test_backend_runs_the_kernel_for_few_queries_and_sdpa_beyond(monkeypatch) -> None:
    calls = []

    def counted(*args):  # the op's own argument order: q, k, v, key_mask, scale
        calls.append(args[0].shape)
        return torch.ops.mplug_fast.short_query_attention(*args)

    monkeypatch.setattr("mplug_fast.ops.short_query.native_op", lambda *a: counted)
    run = ShortQueryBackend.run
    kw = dict(key_padding_mask=None, causal=False, dropout_p=0.0, scale=None)
    k, v = fused_kv(2, 40, 2, 16)
    few, many = torch.randn(2, 2, 5, 16), torch.randn(2, 2, MAX_QUERIES + 1, 16)
    torch.testing.assert_close(run(few, k, v, kv_index=None, **kw), reference(few, k, v, 0.25))
    assert torch.equal(run(many, k, v, kv_index=None, **kw), F.scaled_dot_product_attention(many, k, v))
    index = torch.tensor([1, 1, 0])  # K/V rows per query row
    q = torch.randn(3, 2, 1, 16)
    torch.testing.assert_close(run(q, k, v, kv_index=index, **kw), reference(q, k[index], v[index], 0.25))
    mask = torch.rand(2, 40) > 0.5
    mask[0] = False  # a row with no key: 0 through both paths
    masked = dict(kw, key_padding_mask=mask)
    torch.testing.assert_close(
        run(q, k, v, kv_index=index, **masked), reference(q, k[index], v[index], 0.25, mask[index])
    )
    torch.testing.assert_close(run(many, k, v, kv_index=None, **masked), reference(many, k, v, 0.25, mask))
    assert calls == [few.shape, q.shape, q.shape]
    with pytest.raises(ValueError, match="without a causal mask"):
        run(few, k, v, kv_index=None, **dict(kw, causal=True))


def test_automatic_choice_on_cpu(monkeypatch) -> None:
    """First on AVX2 CPUs for fp32 inference without a causal mask; sdpa for causal masks, autograd, other
    dtypes and other CPUs."""
    monkeypatch.delenv(attention_module.ENV_VAR, raising=False)
    q, (k, v) = torch.randn(1, 2, 5, 16), fused_kv(1, 9, 2, 16)
    mask = torch.ones(1, 9, dtype=torch.bool)
    for capability, expected in (("AVX2", "short_query"), ("AVX512", "sdpa"), ("DEFAULT", "sdpa")):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert select_backend(q, k, v) == expected
        assert select_backend(q, k, v, key_padding_mask=mask) == expected
        assert select_backend(q, k, v, causal=True) == "sdpa"
        assert select_backend(q.requires_grad_(), k, v) == "sdpa"
        q = q.detach()
        assert select_backend(q.double(), k.double(), v.double()) == "sdpa"
    assert ATTENTION.priority("cuda", torch.float32, False)[-1] == "short_query"


def test_generation_through_short_query_equals_sdpa(monkeypatch) -> None:
    """Beam search (the memory K/V shared by the beams, the self-attention cache): same ids, close scores."""
    config = mplug_fast.get_config("tiny")
    decoder = TextDecoder(config)
    decoder.apply(init_bert_weights)
    decoder.eval()
    memory = torch.randn(2, 17, config.text.hidden_size)
    start = torch.full((2, 1), 101)
    out = {}
    for backend in ("sdpa", "short_query"):
        monkeypatch.setenv(attention_module.ENV_VAR, backend)
        clear_backend_caches(decoder)
        with torch.no_grad():
            out[backend] = beam_search(decoder, memory, None, start, beam_size=3, max_length=8, num_return=3)
        used = {n for m in decoder.modules() if hasattr(m, "backends") for n in m.backends.names.values()}
        assert used == {backend}
    assert torch.equal(out["sdpa"].ids, out["short_query"].ids)
    torch.testing.assert_close(out["sdpa"].scores, out["short_query"].scores, rtol=1e-5, atol=1e-5)

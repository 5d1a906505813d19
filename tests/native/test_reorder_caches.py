"""The native reorder_caches op against index_select, and the KV cache that uses it."""

from __future__ import annotations

import pytest
import torch

from mplug_fast.modeling.kv_cache import KVCache


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [6, 4, 9])  # same row count (swap buffers), fewer, more
def test_reorder_caches_equals_index_select(dtype, rows, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator().manual_seed(rows)
    src = [
        torch.randn(3, 6, 2, 10, 4, generator=g).to(device, dtype) for _ in range(2)
    ]  # [P, N, H, Lmax, Dh]
    index = torch.randint(0, 6, (rows,), generator=g).to(device)
    dst = [torch.full((3, rows, 2, 10, 4), float("nan"), dtype=dtype, device=device) for _ in range(2)]
    torch.ops.mplug_fast.reorder_caches(src, dst, index, 7)
    for s, d in zip(src, dst):
        assert torch.equal(d[..., :7, :], s.index_select(1, index)[..., :7, :])
        assert d[..., 7:, :].isnan().all()  # positions >= length are not copied


def test_reorder_caches_rejects_bad_shapes():
    src = [torch.zeros(2, 4, 1, 5, 3)]
    with pytest.raises(RuntimeError, match="target 0"):
        torch.ops.mplug_fast.reorder_caches(src, [torch.zeros(2, 3, 1, 5, 3)], torch.tensor([0, 1]), 2)
    with pytest.raises(RuntimeError, match="length"):
        torch.ops.mplug_fast.reorder_caches(src, [torch.zeros(2, 2, 1, 5, 3)], torch.tensor([0, 1]), 6)


def test_kv_cache_reorder_native_equals_python(monkeypatch):
    """KVCache.reorder with the native op equals the index_select path on the valid positions."""
    import mplug_fast.modeling.kv_cache as kv_cache

    caches = []
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setattr(kv_cache, "native_op", lambda name, device_type: None)
        g = torch.Generator().manual_seed(0)
        cache = KVCache(num_layers=2, max_length=6)
        cache.append_mask(None, 3, 2, torch.device("cpu"))
        for layer in range(2):
            cache.update(layer, torch.randn(3, 2, 2, 4, generator=g), torch.randn(3, 2, 2, 4, generator=g))
        cache.advance(2)
        cache.reorder(torch.tensor([2, 2, 0]))  # same row count
        cache.reorder(torch.tensor([1, 0, 0, 2]))  # new row count
        caches.append(cache)
    a, b = caches
    assert torch.equal(a.k[..., :2, :], b.k[..., :2, :]) and torch.equal(a.v[..., :2, :], b.v[..., :2, :])
    assert torch.equal(a.mask, b.mask)

"""The native decoder layers of a cached CPU decoding step (`mplug_fast::decode_layers`) equal the Python
layers bit for bit (logits, cache, beam search), are taken exactly when the Python layers would run the same
kernels, and reject malformed inputs."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

import mplug_fast
from mplug_fast.generation import beam_search
from mplug_fast.inference.layout import pack_decoder
from mplug_fast.modeling import native_decode
from mplug_fast.modeling.decoder import TextDecoder
from mplug_fast.modeling.layers import clear_backend_caches, init_bert_weights
from mplug_fast.modeling.packed_linear import PackedLinear
from tests import test_generation

decoder_closing = test_generation.decoder  # a tiny decoder whose samples close at different steps


@pytest.fixture(scope="module")
def decoder() -> TextDecoder:
    torch.manual_seed(0)
    dec = TextDecoder(mplug_fast.get_config("tiny"))
    dec.apply(init_bert_weights)
    return dec.eval()


@pytest.fixture
def native_layers(monkeypatch) -> Iterator[list[int]]:
    """Counts the calls of the native path (runs it unchanged); the switch is re-read before and after."""
    calls = []
    real = native_decode.run

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(native_decode, "run", counted)
    native_decode.enabled.cache_clear()
    yield calls
    native_decode.enabled.cache_clear()


def set_native(monkeypatch, on: bool) -> None:
    monkeypatch.setenv(native_decode.ENV, "1" if on else "0")
    native_decode.enabled.cache_clear()


def decode(decoder, monkeypatch, on: bool, prompt, prompt_mask, memory, memory_mask, index, steps=4):
    """Prompt, then `steps` single-token steps; returns (logits of every call, the cache's k / v)."""
    set_native(monkeypatch, on)
    g = torch.Generator().manual_seed(1)
    N = prompt.shape[0]
    cache = decoder.new_cache(prompt.shape[1] + steps)
    with torch.no_grad():
        kv = decoder.project_memory(memory)
        logits = [decoder.step(prompt, cache, kv, memory_mask, index, mask=prompt_mask)]
        for _ in range(steps):
            ids = torch.randint(1000, 2000, (N, 1), generator=g)
            logits.append(decoder.step(ids, cache, kv, memory_mask, index))
    return logits, cache.k, cache.v


@pytest.mark.parametrize(
    ("B", "G", "prompt_len", "padded", "grouped"),
    [(2, 5, 1, False, True), (1, 3, 3, True, True), (3, 1, 2, False, False), (2, 4, 3, True, False)],
)
def test_equals_python_layers(decoder, monkeypatch, native_layers, B, G, prompt_len, padded, grouped):
    g = torch.Generator().manual_seed(B * 10 + G)
    N, M = B * G, 37
    prompt = torch.randint(1000, 2000, (N, prompt_len), generator=g)
    prompt_mask = None
    if padded:  # left-padded prompts: the self-attention key mask
        prompt_mask = torch.ones(N, prompt_len, dtype=torch.long)
        prompt_mask[0, : prompt_len - 1] = 0
    memory = torch.randn(B, M, 256, generator=g)
    memory_mask = torch.ones(B, M, dtype=torch.bool)
    memory_mask[-1, 30:] = False
    if grouped:
        index = G
    else:  # one memory row per query row (memory_index None)
        memory, memory_mask, index = memory.repeat_interleave(G, 0), memory_mask.repeat_interleave(G, 0), None
    want = decode(decoder, monkeypatch, False, prompt, prompt_mask, memory, memory_mask, index)
    assert not native_layers
    got = decode(decoder, monkeypatch, True, prompt, prompt_mask, memory, memory_mask, index)
    assert len(native_layers) == 4 + (prompt_len == 1)  # every single-token call
    for w, o in zip(want[0], got[0], strict=True):
        assert torch.equal(w, o)
    assert torch.equal(want[1], got[1]) and torch.equal(want[2], got[2])


def test_packed_layers_equal_their_python_layers(decoder, monkeypatch, native_layers):
    """A packed decoder: the op (packed_linear on the panels) equals its Python layers bit for bit, and the
    plain decoder up to rounding."""
    packed = pack_decoder(copy.deepcopy(decoder))
    assert type(packed.layers[0].mlp.fc1) is PackedLinear
    g = torch.Generator().manual_seed(3)
    memory, prompt = torch.randn(2, 37, 256, generator=g), torch.randint(1000, 2000, (10, 1), generator=g)
    want = decode(packed, monkeypatch, False, prompt, None, memory, None, 5)
    assert not native_layers
    got = decode(packed, monkeypatch, True, prompt, None, memory, None, 5)
    assert len(native_layers) == 5
    for w, o in zip(want[0], got[0], strict=True):
        assert torch.equal(w, o)
    assert torch.equal(want[1], got[1]) and torch.equal(want[2], got[2])
    plain = decode(decoder, monkeypatch, True, prompt, None, memory, None, 5)
    for p, o in zip(plain[0], got[0], strict=True):
        torch.testing.assert_close(o, p, rtol=1e-4, atol=1e-4)


def test_beam_search_through_native_layers(decoder_closing, monkeypatch, native_layers):
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(4, 5, 256, generator=g)
    start = torch.full((4, 1), 101, dtype=torch.long)
    kwargs = dict(beam_size=3, max_length=8, min_length=1, num_return=2)
    set_native(monkeypatch, False)
    want = beam_search(decoder_closing, memory, None, start, **kwargs)
    assert not native_layers
    set_native(monkeypatch, True)
    got = beam_search(decoder_closing, memory, None, start, **kwargs)
    assert native_layers
    assert torch.equal(got.ids, want.ids) and torch.equal(got.lengths, want.lengths)
    assert torch.equal(got.scores, want.scores)


def test_not_taken_where_the_python_layers_run_other_kernels(decoder, monkeypatch, native_layers):
    memory = torch.randn(2, 9, 256)
    prompt = torch.full((6, 2), 1500)
    decode(decoder, monkeypatch, True, prompt, None, memory, None, torch.arange(6) // 3, steps=1)  # gather
    decode(decoder, monkeypatch, True, prompt, None, memory, None, 3, steps=0)  # a two-token prompt
    assert not native_layers
    monkeypatch.setenv("MPLUG_FAST_ATTENTION", "sdpa")
    clear_backend_caches(decoder)
    try:
        decode(decoder, monkeypatch, True, prompt, None, memory, None, 3, steps=1)
        assert not native_layers
    finally:
        monkeypatch.delenv("MPLUG_FAST_ATTENTION")
        clear_backend_caches(decoder)
    decoder.train()
    try:
        decode(decoder, monkeypatch, True, prompt, None, memory, None, 3, steps=1)
        assert not native_layers
    finally:
        decoder.eval()
    decode(decoder, monkeypatch, True, prompt, None, memory, None, 3, steps=1)
    assert len(native_layers) == 1
    fc1 = decoder.layers[1].mlp.fc1  # a replaced module (here: a subclass of nn.Linear) is seen at once
    decoder.layers[1].mlp.fc1 = type("Other", (torch.nn.Linear,), {})(256, 1024)
    try:
        decode(decoder, monkeypatch, True, prompt, None, memory, None, 3, steps=1)
        assert len(native_layers) == 1
    finally:
        decoder.layers[1].mlp.fc1 = fc1
    with torch.no_grad():  # a parameter converted in place: the Python layers (which then fail as well)
        decoder.layers[2].attn.qkv.weight.data = decoder.layers[2].attn.qkv.weight.data.double()
    try:
        with pytest.raises(RuntimeError):
            decode(decoder, monkeypatch, True, prompt, None, memory, None, 3, steps=1)
        assert len(native_layers) == 1
    finally:
        decoder.layers[2].attn.qkv.weight.data = decoder.layers[2].attn.qkv.weight.data.float()
    decode(decoder, monkeypatch, True, prompt, None, memory, None, 3, steps=1)
    assert len(native_layers) == 2


def test_input_errors_and_meta(decoder):
    layers, D = len(decoder.layers), 256
    cache = torch.zeros(layers, 6, 4, 8, 64)
    kv = [torch.zeros(2, 4, 9, 64)] * layers
    good = dict(
        x=torch.zeros(6, D), params=[torch.zeros(1)] * (18 * layers), cache_k=cache, cache_v=cache.clone(),
        length=0, self_mask=None, memory_k=kv, memory_v=kv, memory_mask=None, eps=1e-12,
    )  # fmt: skip

    def call(**changes):
        return torch.ops.mplug_fast.decode_layers(*{**good, **changes}.values())

    wide = [torch.zeros(4, 4, 9, 64)] * layers  # 4 memory rows for 6 query rows
    with pytest.raises(RuntimeError, match="layers need"):
        call(params=good["params"][:-1])
    with pytest.raises(RuntimeError, match="not groups"):
        call(memory_k=wide, memory_v=wide)
    with pytest.raises(RuntimeError, match="outside the cache"):
        call(length=8)
    with pytest.raises(RuntimeError, match="self_mask"):
        call(length=2, self_mask=torch.ones(6, 2, dtype=torch.bool))
    meta = {k: [t.to("meta") for t in v] if isinstance(v, list) else v for k, v in good.items()}
    meta |= {k: good[k].to("meta") for k in ("x", "cache_k", "cache_v")}
    out = call(**meta)
    assert out.shape == (6, D) and out.device.type == "meta"

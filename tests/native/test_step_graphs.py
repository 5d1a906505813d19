"""beam_search(cuda_graph=True): the replayed static-buffer steps equal eager beam search.

On CPU the recorded steps run eagerly on the same buffers with the same host state (what a CUDA graph
replays); the `gpu` case records real CUDA graphs.
"""

from __future__ import annotations

import types

import pytest
import torch

from mplug_fast.generation import beam_search, graphs
from mplug_fast.inference.generate import caption_from_memory
from mplug_fast.modeling import native_decode
from mplug_fast.modeling.kv_cache import KVCache
from tests import test_generation

decoder = test_generation.decoder  # the module fixture: a tiny decoder whose samples close at different steps


def _inputs(B: int, seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    memory, memory_mask = test_generation._memory(B, seed=seed)
    return memory.to(device), memory_mask.to(device), torch.full((B, 1), 101, device=device)


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
@pytest.mark.parametrize("mode", ["official", "standard"])
def test_replayed_steps_equal_eager_beam_search(decoder, mode, native):
    kwargs = dict(beam_size=3, max_length=8, min_length=2, mode=mode, num_return=2, native=native)
    graphs._RECORDINGS.pop(decoder, None)
    for seed, sync_every in ((0, 1), (3, 3)):  # the first call records, the second replays
        memory, memory_mask, start = _inputs(4, seed)
        want = beam_search(decoder, memory, memory_mask, start, **kwargs)
        got = beam_search(
            decoder, memory, memory_mask, start, cuda_graph=True, sync_every=sync_every, **kwargs
        )
        assert len(set(want.lengths[:, 0].tolist())) > 1  # samples close at different steps
        assert torch.equal(got.ids, want.ids) and torch.equal(got.lengths, want.lengths)
        assert torch.equal(got.scores, want.scores)
    assert len(graphs._RECORDINGS[decoder]) == 1  # one shape: recorded once


def test_replays_reuse_the_static_buffers_and_stop_early(decoder, monkeypatch):
    graphs._RECORDINGS.pop(decoder, None)
    kwargs = dict(beam_size=3, max_length=12, sync_every=1)
    beam_search(decoder, *_inputs(4, 0), cuda_graph=True, **kwargs)
    (recorded,) = graphs._RECORDINGS[decoder].values()
    static = [x.data_ptr() for x in recorded.tensors.values()]
    cache_buffers = {x.data_ptr() for state in recorded.host.values() for x in (*state[2:5], *state[5])}
    assert len(cache_buffers) == 6  # the cache's buffer pair: k, v, mask and their spares
    written = set()
    update = KVCache.update

    def spy(self, layer, k, v):
        views = update(self, layer, k, v)
        written.update((self.k.data_ptr(), self.v.data_ptr(), self.mask.data_ptr()))
        return views

    def native_spy(layers, params, x, self_mask, memory_kv, memory_mask, cache):  # native decoder layers
        out = native_run(layers, params, x, self_mask, memory_kv, memory_mask, cache)
        written.update((cache.k.data_ptr(), cache.v.data_ptr(), cache.mask.data_ptr()))
        return out

    native_run = native_decode.run
    monkeypatch.setattr(KVCache, "update", spy)
    monkeypatch.setattr(native_decode, "run", native_spy)
    eager = test_generation._row_counts(decoder, lambda: beam_search(decoder, *_inputs(4, 0), **kwargs))
    written.clear()
    replayed = test_generation._row_counts(
        decoder, lambda: beam_search(decoder, *_inputs(4, 0), cuda_graph=True, **kwargs)
    )
    assert [x.data_ptr() for x in recorded.tensors.values()] == static  # the new call was loaded in place
    assert list(graphs._RECORDINGS[decoder].values()) == [recorded]
    assert len(written - cache_buffers) == 3  # only the prompt call wrote a cache of its own
    assert eager[-1] < 12 and len(eager) < 12  # samples left the eager batch, which stopped early
    assert replayed == [4] + [12] * (len(eager) - 1)  # the whole batch each step; stops where eager did


def test_recordings_follow_shapes_and_weights(decoder):
    graphs._RECORDINGS.pop(decoder, None)
    memory, memory_mask, start = _inputs(2, 1)
    with torch.inference_mode():  # buffers recorded in inference mode are written again outside it
        beam_search(decoder, memory, memory_mask, start, beam_size=2, max_length=4, cuda_graph=True)
    beam_search(decoder, memory, memory_mask, start, beam_size=2, max_length=4, cuda_graph=True)
    beam_search(decoder, memory, memory_mask, start, beam_size=2, max_length=5, cuda_graph=True)
    assert len(graphs._RECORDINGS[decoder]) == 2
    with torch.no_grad():
        weight = decoder.head.bias
        decoder.head.bias = torch.nn.Parameter(weight.clone())  # new weights: the recordings read the old
        try:
            beam_search(decoder, memory, memory_mask, start, beam_size=2, max_length=4, cuda_graph=True)
            assert len(graphs._RECORDINGS[decoder]) == 1
        finally:
            decoder.head.bias = weight
    with pytest.raises(ValueError, match="use_cache"):
        beam_search(decoder, memory, memory_mask, start, cuda_graph=True, use_cache=False)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["official", "standard"])
def test_cuda_graphs_equal_eager_beam_search(decoder, mode):
    dec = decoder.to("cuda")
    try:
        kwargs = dict(beam_size=3, max_length=8, min_length=2, mode=mode, num_return=2)
        for seed in (0, 3):
            memory, memory_mask, start = _inputs(4, seed, "cuda")
            want = beam_search(dec, memory, memory_mask, start, **kwargs)
            got = beam_search(dec, memory, memory_mask, start, cuda_graph=True, **kwargs)
            assert torch.equal(got.ids, want.ids) and torch.equal(got.lengths, want.lengths)
            torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-5)
        (recorded,) = graphs._RECORDINGS[dec].values()
        assert sorted(recorded.graphs) == list(range(1, 8))  # one CUDA graph per step index
    finally:
        graphs._RECORDINGS.pop(dec, None)
        decoder.to("cpu")


def test_caption_from_memory_with_left_padded_prompts(decoder):
    model = types.SimpleNamespace(decoder=decoder)  # caption_from_memory reads only the decoder
    memory, _, _ = _inputs(3, 5)
    prompt = torch.tensor([[0, 101, 2023], [101, 1037, 2023], [0, 0, 101]])
    prompt_mask = prompt != 0
    kwargs = dict(beam_size=2, max_length=6, min_length=1)
    want = caption_from_memory(model, memory, prompt, prompt_mask, **kwargs)
    for _ in range(2):  # record, replay
        got = caption_from_memory(model, memory, prompt, prompt_mask, cuda_graph=True, **kwargs)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.scores, want.scores)
    with pytest.raises(ValueError, match="method='beam'"):
        caption_from_memory(model, memory, method="greedy", cuda_graph=True)

"""beam_search with the native step equals the Python twin end to end (tiny decoder, both modes)."""

from __future__ import annotations

import pytest
import torch

from mplug_fast.generation import beam_search
from tests import test_generation

decoder = test_generation.decoder  # the module fixture: a tiny decoder whose samples close at different steps


@pytest.mark.parametrize("mode", ["official", "standard"])
def test_native_beam_search_equals_python(decoder, mode):
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(4, 5, 256, generator=g)
    start = torch.full((4, 1), 101, dtype=torch.long)
    kwargs = dict(beam_size=3, max_length=8, min_length=1, mode=mode, num_return=2)
    want = beam_search(decoder, memory, None, start, native=False, **kwargs)
    assert len(set(want.lengths[:, 0].tolist())) > 1  # samples close at different steps
    for sync_every in (1, 3):
        got = beam_search(decoder, memory, None, start, native=True, sync_every=sync_every, **kwargs)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.lengths, want.lengths)
        assert torch.equal(got.scores, want.scores)

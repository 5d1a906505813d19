"""Grounding: token ids against the vocab file, box <-> tokens conversion, greedy box decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mplug_fast.data.grounding_transform import GroundingTransform
from mplug_fast.data.tokenizer import DEFAULT_VOCAB_PATH
from mplug_fast.inference.grounding import (
    GROUNDING_NUM_BINS,
    PadGeometry,
    box_to_tokens,
    coordinate_token_ids,
    ground_tokens,
    tokens_to_box,
)


def test_coordinate_ids_match_the_vocab_file(tokenizer):
    vocab = DEFAULT_VOCAB_PATH.read_text(encoding="utf-8").splitlines()  # line i = id i
    prefix, coord = coordinate_token_ids(tokenizer)
    assert prefix == 344 and vocab[344] == "[unused339]"
    assert coord.tolist() == list(range(345, 682))
    assert [vocab[i] for i in coord.tolist()] == [f"[unused{340 + b}]" for b in range(337)]


@pytest.mark.parametrize("width, height", [(80, 50), (50, 80), (64, 64), (333, 17)])
def test_box_tokens_round_trip(tokenizer, width, height):
    S = 64
    prefix, coord = coordinate_token_ids(tokenizer)
    g = PadGeometry.of(width, height, S)
    rng = np.random.default_rng(width * height)
    for _ in range(20):
        x = np.sort(rng.uniform(0, width, 2))
        y = np.sort(rng.uniform(0, height, 2))
        box = [x[0], y[0], x[1], y[1]]
        tokens = box_to_tokens(box, g, prefix, coord)
        assert tokens[0] == prefix and ((tokens[1:] >= 345) & (tokens[1:] <= 681)).all()
        back = tokens_to_box(tokens[1:], g, int(coord[0]))
        # floor quantisation: centre and size lose < 1 bin each, so an edge moves < 1.5 bins
        bin_px = S / GROUNDING_NUM_BINS / g.scale
        assert (back - torch.tensor(box, dtype=torch.float64)).abs().max() < 1.5 * bin_px + 1e-9


def test_box_tokens_agree_with_the_data_pipeline(tokenizer):
    """box_to_tokens quantises the same normalised box as the eval GroundingTransform's target."""
    S = 64
    prefix, coord = coordinate_token_ids(tokenizer)
    img = np.zeros((50, 80, 3), dtype=np.uint8)
    box = [10.0, 5.0, 60.5, 40.0]
    sample = GroundingTransform(S, train=False)(img, box)
    bins = torch.floor(sample.box.double().clamp(0, 1) * GROUNDING_NUM_BINS).long()
    expected = coord[bins]
    assert box_to_tokens(box, PadGeometry.of(80, 50, S), prefix, coord)[1:].tolist() == expected.tolist()
    assert sample.image_mask.sum() == 64 * 40  # the geometry of the padding used by tokens_to_box
    g = PadGeometry.of(80, 50, S)
    assert (g.left, g.top, round(80 * g.scale), round(50 * g.scale)) == (0, 12, 64, 40)
    assert sample.image_mask[g.top, g.left] and not sample.image_mask[g.top - 1, 0]


def test_tokens_to_box_clamps(tokenizer):
    _, coord = coordinate_token_ids(tokenizer)
    g = PadGeometry.of(80, 50, 64)
    full = tokens_to_box(torch.tensor([345 + 168, 345 + 168, 681, 681]), g, int(coord[0]))
    assert full.tolist() == [0.0, 0.0, 80.0, 50.0]  # a box over the whole padded square -> the image


@torch.no_grad()
def test_ground_tokens_equal_full_recomputation_argmax(models, tokenizer):
    """Cached greedy decoding under the coordinate mask == re-running the decoder on the whole prefix and
    taking the argmax over the coordinate tokens (the official no-cache loop)."""
    model = models["grounding"]
    prefix, coord = coordinate_token_ids(tokenizer)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    batch = tokenizer(["the red square", "a blue circle on the left", "it"])
    ids, mask = batch.input_ids, batch.attention_mask
    tokens = ground_tokens(model, images, ids, mask, prefix, coord)
    memory, memory_mask = model.fused_memory(images, ids, mask)
    seq = torch.full((3, 1), prefix)
    for _ in range(4):
        logits = model.decode(seq, None, memory, memory_mask)[:, -1]  # [B, V]
        seq = torch.cat([seq, coord[logits[:, coord].argmax(-1)][:, None]], dim=1)
    assert tokens.tolist() == seq[:, 1:].tolist()

"""ITM: hard negatives are never positives (duplicate image ids included), follow softmax(sim), and the loss
equals a hand-built computation over the 3B pairs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mplug_fast.objectives.itm import itm_loss, multinomial_sampler, negative_weights, sample_negatives


def test_negative_weights_zero_on_positives_and_softmax_elsewhere():
    sim = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.5, 4.0, 0.5, 9.0]])
    pos = torch.tensor([[True, False, True, False], [False, True, False, False]])
    w = negative_weights(sim, pos)
    assert w[pos].eq(0).all()
    e = torch.exp(torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(w[0, [1, 3]], e / e.sum())
    e = torch.exp(torch.tensor([0.5, 0.5, 9.0]))
    torch.testing.assert_close(w[1, [0, 2, 3]], e / e.sum())
    torch.testing.assert_close(w.sum(1), torch.ones(2))


def test_hard_negatives_never_positive_with_duplicate_image_ids():
    ids = torch.tensor([0, 0, 1, 1, 2, 0, 3, 2])
    pos = ids[:, None] == ids[None, :]
    # similarities that favour the positives strongly: a careless sampler would pick them
    sim = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)) + 50 * pos.float()
    sampler = multinomial_sampler(torch.Generator().manual_seed(1))
    for _ in range(300):
        neg_img, neg_txt = sample_negatives(sim, sim.t().contiguous(), pos, sampler)
        assert not pos[torch.arange(8), neg_img].any()
        assert not pos[torch.arange(8), neg_txt].any()


def test_sampling_frequencies_follow_the_weights():
    sim = torch.tensor([[0.0, 1.0, 2.0, 0.5]]).repeat(20000, 1)
    pos = torch.zeros_like(sim, dtype=torch.bool)
    pos[:, 0] = True
    draws = multinomial_sampler(torch.Generator().manual_seed(0))(negative_weights(sim, pos))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    want = torch.softmax(torch.tensor([-float("inf"), 1.0, 2.0, 0.5]), 0)
    torch.testing.assert_close(freq, want, atol=0.015, rtol=0)


def test_uniform_negatives_ignore_the_similarities_and_skip_positives():
    sim = torch.tensor([[0.0, 9.0, -9.0, 0.5]]).repeat(20000, 1)
    pos = torch.zeros_like(sim, dtype=torch.bool)
    pos[:, 0] = True
    sampler = multinomial_sampler(torch.Generator().manual_seed(0))
    neg_image, neg_text = sample_negatives(sim, sim, pos, sampler, hard=False)
    for draws in (neg_image, neg_text):
        freq = torch.bincount(draws, minlength=4).float() / draws.numel()
        torch.testing.assert_close(freq, torch.tensor([0.0, 1 / 3, 1 / 3, 1 / 3]), atol=0.015, rtol=0)
    # the default (official) draw follows softmax(sim): column 1 nearly always
    assert sample_negatives(sim, sim, pos, sampler)[0].eq(1).float().mean() > 0.99


def test_row_without_any_negative_is_a_clear_error():
    pos = torch.tensor([[True, True], [True, True]])
    with pytest.raises(ValueError, match="cannot draw a hard negative"):
        negative_weights(torch.zeros(2, 2), pos)


class _ToyITM:
    """itm_logits = W · [mean image state ; masked-mean text state]: enough to check the pairing."""

    def __init__(self, D: int):
        self.W = torch.randn(2, 2 * D, generator=torch.Generator().manual_seed(3))

    def itm_logits(self, v, t, mask):
        m = mask.float().unsqueeze(-1)
        return torch.cat([v.mean(1), (t * m).sum(1) / m.sum(1)], -1) @ self.W.t()


def test_itm_loss_matches_hand_built_pairs():
    B, Nv, L, D = 4, 3, 5, 6
    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(B, Nv, D, generator=g), torch.randn(B, L, D, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    sim = torch.randn(B, B, generator=g)
    pos = torch.eye(B, dtype=torch.bool)
    model = _ToyITM(D)
    loss, extra = itm_loss(model, v, t, mask, sim, sim.t(), pos, lambda w: w.argmax(1))
    neg_img = sim.t().masked_fill(pos, -1e9).argmax(1)  # each text's hardest image
    neg_txt = sim.masked_fill(pos, -1e9).argmax(1)  # each image's hardest text
    assert extra["neg_image"].tolist() == neg_img.tolist() and extra["neg_text"].tolist() == neg_txt.tolist()
    logits, labels = [], []
    for i in range(B):
        logits.append(model.itm_logits(v[i : i + 1], t[i : i + 1], mask[i : i + 1]))
        labels.append(1)
    for i in range(B):
        logits.append(model.itm_logits(v[neg_img[i]][None], t[i : i + 1], mask[i : i + 1]))
        labels.append(0)
    for i in range(B):
        j = neg_txt[i]
        logits.append(model.itm_logits(v[i : i + 1], t[j][None], mask[j][None]))
        labels.append(0)
    want = F.cross_entropy(torch.cat(logits), torch.tensor(labels))
    torch.testing.assert_close(loss, want)

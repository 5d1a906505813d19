"""ITC / ITM with identical texts as positives (``same_text_positive``): hash, targets, queue, negatives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mplug_fast.objectives.itc import ITCLoss, text_identity
from mplug_fast.objectives.itm import sample_negatives


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_text_identity_ignores_padding_and_separates_texts():
    ids = torch.tensor(
        [[101, 7, 8, 102, 0, 0], [101, 7, 8, 102, 0, 0], [101, 8, 7, 102, 0, 0], [101, 7, 8, 9, 102, 0]]
    )
    mask = (ids != 0).long()
    h = text_identity(ids, mask)
    assert h[0] == h[1] and len({int(x) for x in h[[0, 2, 3]]}) == 3  # order matters, length matters
    padded = torch.cat([ids[:1], torch.zeros(1, 4, dtype=torch.long)], 1)  # same text, longer padding
    assert text_identity(padded, (padded != 0).long())[0] == h[0]
    assert text_identity(ids[:, :4], mask[:, :4])[0] == h[0]  # and shorter padding
    assert (h >= 0).all()
    vocab = torch.randint(1, 30000, (4000, 12), generator=torch.Generator().manual_seed(0))
    assert text_identity(vocab, torch.ones_like(vocab)).unique().numel() == 4000


def _hand_multi_positive(img, txt, img_m, txt_m, positives, temp):
    """alpha = 0: mean over rows of -(mean log-softmax over the row's positives), both directions."""
    loss = 0.0
    for q, keys in ((img, txt_m), (txt, img_m)):
        logp = F.log_softmax(q @ keys.t() / temp, dim=1)
        loss = loss - ((logp * positives).sum(1) / positives.sum(1)).mean()
    return loss / 2


def test_identical_texts_are_positives_in_the_batch_and_the_queue():
    B, E = 4, 8
    img, txt, img_m, txt_m = (_unit(B, E, seed=s) for s in range(4))
    ids = torch.tensor([0, 1, 2, 3])
    hashes = torch.tensor([50, 60, 50, 70])  # rows 0 and 2 have the same caption
    temp = torch.tensor(0.1)
    itc = ITCLoss(E, queue_size=0, same_text_positive=True)
    loss, extras = itc(img, txt, img_m, txt_m, temp, 0.0, ids, text_hashes=hashes)
    expected_pos = torch.eye(B, dtype=torch.bool)
    expected_pos[0, 2] = expected_pos[2, 0] = True
    assert torch.equal(extras["positives"], expected_pos)
    torch.testing.assert_close(loss, _hand_multi_positive(img, txt, img_m, txt_m, expected_pos.float(), temp))
    official, extras = ITCLoss(E, queue_size=0)(img, txt, img_m, txt_m, temp, 0.0, ids)
    assert torch.equal(extras["positives"], torch.eye(B, dtype=torch.bool))  # the default: image ids only
    assert not torch.isclose(official, loss)

    # the queue keeps the hashes: the next batch's caption 60 matches the queued row 1
    itc = ITCLoss(E, queue_size=B, same_text_positive=True)
    itc(img, txt, img_m, txt_m, temp, 0.0, ids, text_hashes=hashes)
    assert itc.queue.text_hashes.tolist() == [50, 60, 50, 70] and "queue.text_hashes" in itc.state_dict()
    _, extras = itc(img, txt, img_m, txt_m, temp, 0.0, ids + 10, text_hashes=torch.tensor([60, 1, 2, 3]))
    assert extras["positives"].tolist() == torch.eye(B, dtype=torch.bool).tolist()  # batch part only
    with pytest.raises(ValueError, match="needs text_hashes"):
        itc(img, txt, img_m, txt_m, temp, 0.0, ids)
    assert "queue.text_hashes" not in ITCLoss(E, queue_size=B).state_dict()


def test_itm_never_draws_an_identical_text_as_negative():
    B, E = 6, 8
    img, txt = _unit(B, E, seed=1), _unit(B, E, seed=2)
    hashes = torch.tensor([5, 5, 5, 6, 7, 8])  # the first three captions are the same text
    itc = ITCLoss(E, queue_size=0, same_text_positive=True)
    sims_boost = torch.zeros(B, B)
    sims_boost[:3, :3] = 50.0  # identical texts are by far the most similar: the ones hard mining would pick
    _, extras = itc(img, txt, img, txt, torch.tensor(0.1), 0.0, torch.arange(B), text_hashes=hashes)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        neg_image, neg_text = sample_negatives(
            extras["sim_i2t"] + sims_boost,
            extras["sim_t2i"] + sims_boost,
            extras["positives"],
            lambda w: torch.multinomial(w, 1, generator=g).squeeze(1),
        )
        assert (neg_text[:3] >= 3).all() and (neg_image[:3] >= 3).all()

"""Resuming with a released checkpoint's ITC queue: loaded on request, then the loss is the official one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mplug_fast.checkpoint import CheckpointError
from mplug_fast.checkpoint.official import official_queue_state
from mplug_fast.tasks import load_official_checkpoint
from mplug_fast.tasks.retrieval import RetrievalObjective
from tests.checkpoint.official_layout import OfficialDims, make_official_state_dict

DIMS = OfficialDims()
BERT = {"num_attention_heads": 4, "fusion_layers": 3, "num_hidden_layers": 6, "stride_layer": 2}
Q = 8  # queue slots of make_official_state_dict


def official_ita(img, txt, img_m, txt_m, temp, alpha, idx, image_queue, text_queue, idx_queue):
    """The official ITA of the retrieval model (spec §4): keys = [momentum batch ; whole queue] as columns,
    multi-positive hard targets from image ids, momentum soft targets, no masking of any queue slot."""
    idx = idx.view(-1, 1)
    pos = torch.eq(idx, torch.cat([idx.t(), idx_queue], dim=1)).float()
    hard = pos / pos.sum(1, keepdim=True)
    image_all = torch.cat([img_m.t(), image_queue], dim=1)  # [E, B + Q]
    text_all = torch.cat([txt_m.t(), text_queue], dim=1)
    t_i2t = alpha * F.softmax(img_m @ text_all / temp, dim=1) + (1 - alpha) * hard
    t_t2i = alpha * F.softmax(txt_m @ image_all / temp, dim=1) + (1 - alpha) * hard
    loss_i2t = -(F.log_softmax(img @ text_all / temp, dim=1) * t_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(txt @ image_all / temp, dim=1) * t_t2i).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def _checkpoint() -> dict[str, torch.Tensor]:
    sd = make_official_state_dict(DIMS, momentum=True, queues=True)
    g = torch.Generator().manual_seed(3)
    sd["idx_queue"] = torch.tensor([[-100, 7, -100, 2, -100, -100, 7, -100]])  # two ids shared with the batch
    sd["queue_ptr"] = torch.tensor([4])
    sd["image_queue"] = F.normalize(torch.randn(DIMS.embed_dim, Q, generator=g), dim=0)
    return sd


def _batch(B: int = 4):
    g = torch.Generator().manual_seed(5)
    images = torch.randn(B, 3, DIMS.grid * DIMS.patch, DIMS.grid * DIMS.patch, generator=g)
    ids = torch.randint(5, DIMS.vocab, (B, 6), generator=g)
    mask = torch.ones(B, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return {"images": images, "text_ids": ids, "text_mask": mask, "image_ids": torch.tensor([7, 3, 2, 3])}


def _features(model, batch):
    mask = batch["text_mask"].bool()
    with torch.no_grad():
        img = model.image_features(model.encode_image(batch["images"]))
        txt = model.text_features(model.encode_text(batch["text_ids"], mask))
        m = model.momentum_view()
        img_m = m.image_features(m.encode_image(batch["images"]))
        txt_m = m.text_features(m.encode_text(batch["text_ids"], mask))
    return img, txt, img_m, txt_m


def test_loaded_official_queue_gives_the_official_itc_loss() -> None:
    sd = _checkpoint()
    model = load_official_checkpoint(sd, "retrieval", bert_config=BERT)
    batch = _batch()
    objective = RetrievalObjective(model, queue_size=Q, alpha=0.4).eval()  # eval: no enqueue, no dropout
    fresh = objective(batch)["itc"]

    objective.itc.load_official_queue(official_queue_state(sd))
    loaded = objective(batch)["itc"]
    img, txt, img_m, txt_m = _features(model, batch)
    expected = official_ita(
        img,
        txt,
        img_m,
        txt_m,
        sd["temp"],
        0.4,
        batch["image_ids"],
        sd["image_queue"],
        sd["text_queue"],
        sd["idx_queue"],
    )
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-6)
    assert (fresh - expected).abs() > 0.05  # the default (empty queue) is a different loss
    q = objective.itc.queue
    assert int(q.ptr) == 4 and int(q.filled) == Q and q.ids.tolist() == [-1, 7, -1, 2, -1, -1, 7, -1]


def test_loaded_queue_keeps_working_as_a_fifo_and_resizes() -> None:
    sd = _checkpoint()
    model = load_official_checkpoint(sd, "retrieval", bert_config=BERT)
    objective = RetrievalObjective(model, queue_size=4, alpha=0.4).train()  # resized to the checkpoint's 8
    objective.itc.load_official_queue(official_queue_state({"model": sd}))
    assert objective.itc.queue.size == Q and objective.itc.queue.image.shape == (Q, DIMS.embed_dim)
    objective(_batch())  # training step: enqueues 4 features at the official pointer (slots 4..7)
    q = objective.itc.queue
    assert int(q.ptr) == 0 and q.ids.tolist() == [-1, 7, -1, 2, 7, 3, 2, 3]
    torch.testing.assert_close(q.image[:4], sd["image_queue"].t()[:4])


def test_pretraining_queue_without_ids_and_errors(tmp_path) -> None:
    sd = _checkpoint()
    del sd["idx_queue"]
    state = official_queue_state(sd)
    assert sorted(state) == ["image_queue", "queue_ptr", "text_queue"]
    objective_itc = RetrievalObjective(
        load_official_checkpoint(sd, "retrieval", bert_config=BERT), queue_size=Q
    ).itc
    objective_itc.load_official_queue(state)
    assert objective_itc.queue.ids.tolist() == [-1] * Q  # all queued keys are negatives

    no_queue = make_official_state_dict(DIMS)
    path = tmp_path / "vqa.pth"
    torch.save(no_queue, path)
    with pytest.raises(CheckpointError, match=r"no ITC queue .* in .*vqa\.pth"):
        official_queue_state(path)
    with pytest.raises(KeyError, match="text_queue"):
        objective_itc.load_official_queue({"image_queue": sd["image_queue"]})
    with pytest.raises(ValueError, match="embed_dim=16"):
        objective_itc.load_official_queue({"image_queue": torch.zeros(8, Q), "text_queue": torch.zeros(8, Q)})

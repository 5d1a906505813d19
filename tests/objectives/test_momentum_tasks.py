"""Momentum EMA (foreach) vs the per-parameter formula; frozen copies; the task objectives against hand
computations (VQA weighted answers + distillation, caption CE, grounding per-sample weighting)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mplug_fast.data import Tokenizer
from mplug_fast.metrics.boxes import box_cxcywh_to_xyxy, generalized_box_iou_aligned
from mplug_fast.objectives import momentum_update, parameter_pairs
from mplug_fast.tasks import build_model, build_objective
from mplug_fast.tasks.grounding import grounding_weights

from .conftest import grounding_batch, small_config


def generalized_iou(a, b):
    """The loss form of GIoU: finite for degenerate boxes, no validation."""
    return generalized_box_iou_aligned(a, b, eps=1e-9, validate=False)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


def test_momentum_update_equals_per_parameter_formula():
    g = torch.Generator().manual_seed(0)
    online = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    mom = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    want = [0.995 * m + 0.005 * p for p, m in zip(online, mom, strict=True)]
    momentum_update(online, mom, 0.995)
    for got, w in zip(mom, want, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="decay"):
        momentum_update(online, mom, 1.5)


def test_pretrain_momentum_frozen_and_updated_by_after_optimizer_step(tokenizer, one_thread):
    torch.manual_seed(0)
    model = build_model(small_config(), "pretrain")
    objective = build_objective("pretrain", model, tokenizer, queue_size=8)
    assert all(not p.requires_grad for p in model.momentum.parameters())
    trainable = {id(p) for p in objective.parameters() if p.requires_grad}
    assert not trainable & {id(p) for p in model.momentum.parameters()}
    src, dst = parameter_pairs(model, model.momentum)
    assert len(src) == len(list(model.momentum.parameters()))
    with torch.no_grad():
        for p in src:
            p.add_(0.1)
    before = [d.clone() for d in dst]
    objective.after_optimizer_step()
    for s, d, b in zip(src, dst, before, strict=True):
        torch.testing.assert_close(d, 0.995 * b + 0.005 * s, rtol=0, atol=1e-6)
    # MLM distillation reads a momentum MLM head, owned by the objective and updated with the rest
    head_m = objective.momentum_heads["mlm_head"]
    assert not any(p.requires_grad for p in head_m.parameters())
    with torch.no_grad():
        model.mlm_head.dense.weight.add_(1.0)
    before = head_m.dense.weight.clone()
    objective.after_optimizer_step()
    torch.testing.assert_close(head_m.dense.weight, 0.995 * before + 0.005 * model.mlm_head.dense.weight)
    objective.copy_to_momentum()
    assert torch.equal(head_m.dense.weight, model.mlm_head.dense.weight)
    assert "momentum_heads.mlm_head.dense.weight" in objective.state_dict()


def _vqa_batch(tokenizer, B=2, R=64):
    q = tokenizer(["what color is the circle", "how many squares"], padding="longest")
    a = tokenizer(["red", "blue", "two"], padding="longest")
    return {
        "images": torch.randn(B, 3, R, R, generator=torch.Generator().manual_seed(0)),
        "question_ids": q["input_ids"],
        "question_mask": q["attention_mask"].bool(),
        "answer_ids": a["input_ids"],
        "answer_mask": a["attention_mask"].bool(),
        "answer_index": torch.tensor([0, 0, 1]),
        "answer_weights": torch.tensor([0.7, 0.3, 1.0]),
    }


def test_vqa_weighted_answer_loss_and_distillation(tokenizer, one_thread):
    torch.manual_seed(0)
    model = build_model(small_config(), "vqa").eval()
    batch = _vqa_batch(tokenizer)
    plain = build_objective("vqa", model, distill=False)
    out = plain(batch)
    # hand: per-answer copies of the question memory, per-sequence summed CE, weights, / B
    memory, mm = model.fused_memory(batch["images"], batch["question_ids"], batch["question_mask"])
    idx = batch["answer_index"]
    logits = model.decode(batch["answer_ids"], batch["answer_mask"], memory[idx], mm[idx])
    targets = batch["answer_ids"][:, 1:].masked_fill(~batch["answer_mask"][:, 1:], -100)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none").sum(1)
    want = (batch["answer_weights"] * ce).sum() / 2
    torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-5)
    # distillation is really applied: identical momentum copies give soft targets = the model's own softmax,
    # so each token costs (1 - alpha) * CE + alpha * entropy
    distilled = build_objective("vqa", model, distill=True, alpha=0.4)
    assert distilled.momentum is not None and "fusion" in distilled.momentum
    logp = F.log_softmax(logits[:, :-1], -1)
    entropy = -(logp.exp() * logp).sum(-1).masked_fill(targets == -100, 0).sum(1)
    want_kd = (batch["answer_weights"] * (0.6 * ce + 0.4 * entropy)).sum() / 2
    torch.testing.assert_close(distilled(batch)["loss"], want_kd, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for p in distilled.momentum.parameters():
            p.add_(0.05 * torch.randn_like(p))
    got = distilled(batch)["loss"]
    assert not torch.allclose(got, want_kd)
    before = [p.clone() for p in distilled.momentum.parameters()]
    distilled.after_optimizer_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, distilled.momentum.parameters(), strict=True))


def test_caption_loss_matches_hand_ce(tokenizer, one_thread):
    torch.manual_seed(0)
    model = build_model(small_config(), "caption").eval()
    enc = tokenizer(["a photo of a red circle", "a photo of two squares"], padding="longest")
    batch = {
        "images": torch.randn(2, 3, 64, 64),
        "caption_ids": enc["input_ids"],
        "caption_mask": enc["attention_mask"].bool(),
    }
    out = build_objective("caption", model)(batch)
    logits = model(batch["images"], batch["caption_ids"], batch["caption_mask"])
    targets = batch["caption_ids"][:, 1:].masked_fill(~batch["caption_mask"][:, 1:], -100)
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits[:, :-1].transpose(1, 2), targets))
    # prompt "a photo of" (3 tokens) excluded from the loss
    out = build_objective("caption", model, prompt_length=3)(batch)
    targets[:, :3] = -100
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits[:, :-1].transpose(1, 2), targets))


def test_giou_and_weights_hand_values():
    a = torch.tensor([0.0, 0.0, 2.0, 2.0])
    b = torch.tensor([1.0, 1.0, 3.0, 3.0])
    # inter 1, union 7, hull 9: giou = 1/7 - 2/9
    assert generalized_iou(a, b).item() == pytest.approx(1 / 7 - 2 / 9)
    assert generalized_iou(a, a).item() == pytest.approx(1.0)
    assert box_cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])).tolist() == pytest.approx(
        [0.4, 0.3, 0.6, 0.7]
    )
    w_box, w_giou = grounding_weights(
        torch.tensor([[168, 168, 84, 84]]), torch.tensor([[0.5, 0.5, 0.25, 0.25]])
    )
    assert w_box.tolist()[0] == pytest.approx([0.0, 0.0, 0.0, 0.0], abs=1e-6)
    assert w_giou.item() == pytest.approx(0.0, abs=1e-6)


def test_grounding_loss_is_weighted_per_sample(tokenizer, one_thread):
    torch.manual_seed(0)
    model = build_model(small_config(), "grounding").eval()
    objective = build_objective("grounding", model, tokenizer)
    assert objective.coord_ids[0].item() == 345 and objective.coord_ids[-1].item() == 681
    assert objective.prefix_id == 344
    enc = tokenizer(["the red circle", "the big blue square on the left", "a triangle"], padding="longest")
    boxes = torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.7, 0.6, 0.5, 0.3], [0.1, 0.9, 0.1, 0.15]])
    batch = {
        "images": torch.randn(3, 3, 64, 64),
        "text_ids": enc["input_ids"],
        "text_mask": enc["attention_mask"].bool(),
        "boxes": boxes,
    }
    out = objective(batch)
    ids, bins = objective.box_ids(boxes)
    assert ids[:, 0].eq(344).all() and torch.equal(ids[:, 1:], bins + 345)
    logits = model(batch["images"], batch["text_ids"], batch["text_mask"], ids)[:, :-1]
    masked = logits + torch.full((logits.shape[-1],), -10000.0).index_fill(0, objective.coord_ids, 0.0)
    ce = F.cross_entropy(masked.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, 4] official prob mask
    pred = (masked.argmax(-1) - 345).float() / 336
    want = 0.0
    for i in range(3):
        w_box = (pred[i] - boxes[i]).abs().clamp(0, 5)
        w_giou = 1 - generalized_iou(box_cxcywh_to_xyxy(pred[i]), box_cxcywh_to_xyxy(boxes[i]))
        want += (ce[i] * w_box * w_giou).sum()
    torch.testing.assert_close(out["loss"], want / 12, rtol=1e-4, atol=1e-6)
    # the official broadcast ([B,1,4] x [B,4] x [B,1] -> [B,B,4]) gives another number
    wb = (pred - boxes).abs().clamp(0, 5)
    wg = 1 - generalized_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(boxes))
    buggy = (ce.view(3, 1, 4) * wb * wg[:, None]).mean()
    assert not torch.allclose(buggy, out["loss"])


def test_grounding_plain_ce_and_fewer_bins(tokenizer, one_thread):
    """box_weighting=False is the unweighted token CE over the coordinate tokens; num_bins sets the
    quantisation (32 bins: ids 345..377, bin floor(t * 32))."""
    torch.manual_seed(0)
    model = build_model(small_config(), "grounding").eval()
    objective = build_objective("grounding", model, tokenizer, num_bins=32, box_weighting=False)
    assert objective.coord_ids.tolist() == list(range(345, 378))
    batch = grounding_batch(tokenizer)
    boxes = batch["boxes"]
    out = objective(batch)
    ids, bins = objective.box_ids(boxes)
    assert bins.tolist() == [[9, 12, 6, 6], [31, 1, 16, 9]]
    logits = model(batch["images"], batch["text_ids"], batch["text_mask"], ids)[:, :-1]
    coord = logits.index_select(-1, objective.coord_ids)
    want = F.cross_entropy(coord.transpose(1, 2), bins)
    torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-6)
    weighted = build_objective("grounding", model, tokenizer, num_bins=32)(batch)["loss"]
    assert not torch.allclose(weighted, out["loss"])


def test_retrieval_objective_runs_with_multi_positives(one_thread):
    torch.manual_seed(0)
    model = build_model(small_config(), "retrieval")
    objective = build_objective("retrieval", model, queue_size=8)
    ids = torch.randint(1000, 2000, (4, 6))
    batch = {
        "images": torch.randn(4, 3, 64, 64),
        "text_ids": ids,
        "text_mask": torch.ones(4, 6, dtype=torch.bool),
        "image_ids": torch.tensor([0, 0, 1, 2]),
    }
    out = objective(batch)
    assert set(out) == {"loss", "itc", "itm"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.temp.grad is not None
    assert int(objective.itc.queue.filled) == 4 and objective.itc.queue.ids[:4].tolist() == [0, 0, 1, 2]
    with pytest.raises(KeyError, match="image_ids"):
        objective({k: v for k, v in batch.items() if k != "image_ids"})


def test_build_objective_errors(tokenizer):
    model = build_model(small_config(), "caption", init=False)
    with pytest.raises(ValueError, match="unknown task"):
        build_objective("no_such_task", model)
    with pytest.raises(ValueError, match="needs the 'vqa' model"):
        build_objective("vqa", model)
    with pytest.raises(KeyError, match="caption_ids"):
        build_objective("caption", model)({"images": torch.zeros(1, 3, 64, 64)})

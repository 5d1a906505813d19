"""Retrieval recall vs brute force; box utilities and Acc@0.5 on hand cases and independent formulas."""

from __future__ import annotations

import math

import pytest
import torch

from mplug_fast.metrics.boxes import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_iou_aligned,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    generalized_box_iou_aligned,
)
from mplug_fast.metrics.grounding import grounding_accuracy
from mplug_fast.metrics.retrieval import retrieval_recall


def brute_force_recall(s_i2t, s_t2i, img2txt, txt2img):
    """The official itm_eval loop: argsort descending, best rank among ground truths."""
    out = {}
    ranks = []
    for i in range(s_i2t.shape[0]):
        order = sorted(range(s_i2t.shape[1]), key=lambda t: -float(s_i2t[i, t]))
        ranks.append(min(order.index(t) for t in img2txt[i]))
    for k in (1, 5, 10):
        out[f"txt_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    ranks = []
    for t in range(s_t2i.shape[0]):
        order = sorted(range(s_t2i.shape[1]), key=lambda i: -float(s_t2i[t, i]))
        ranks.append(order.index(txt2img[t]))
    for k in (1, 5, 10):
        out[f"img_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_recall_vs_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n_img, per = 23, 5
    img2txt = [list(range(i * per, (i + 1) * per)) for i in range(n_img)]
    txt2img = [t // per for t in range(n_img * per)]
    s = torch.randn(n_img, n_img * per, generator=g)
    s[torch.arange(n_img).repeat_interleave(per), torch.arange(n_img * per)] += 1.5  # better than chance
    s_t2i = s.T + 0.3 * torch.randn(n_img * per, n_img, generator=g)
    ours = retrieval_recall(s, s_t2i, img2txt, txt2img)
    ref = brute_force_recall(s, s_t2i, img2txt, txt2img)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    assert 0 < ours["txt_r1"] < 100 and ours["r_mean"] == pytest.approx(
        (sum(ref[f"txt_r{k}"] for k in (1, 5, 10)) + sum(ref[f"img_r{k}"] for k in (1, 5, 10))) / 6
    )


def test_retrieval_hand_case():
    s = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])  # image 0: texts 0, 1; image 1: text 2
    r = retrieval_recall(s, s.T, [[0, 1], [2]], [0, 0, 1])
    assert r["txt_r1"] == 100.0
    assert r["img_r1"] == pytest.approx(100 * 2 / 3)  # text 1 prefers image 1 (0.3 > 0.1)
    with pytest.raises(ValueError, match="img2txt"):
        retrieval_recall(s, s.T, [[0]], [0, 0, 1])


def test_box_conversions_roundtrip():
    b = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.2, 0.2]], dtype=torch.float64)
    xyxy = box_cxcywh_to_xyxy(b)
    assert torch.allclose(xyxy[0], torch.tensor([0.4, 0.3, 0.6, 0.7], dtype=torch.float64))
    assert torch.allclose(box_xyxy_to_cxcywh(xyxy), b)


def test_iou_giou_hand_cases():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [3.0, 0.0, 4.0, 1.0]])
    iou = box_iou(a, b)
    assert iou.tolist()[0] == pytest.approx([1 / 7, 1.0, 0.0])
    giou = generalized_box_iou(a, b)
    # hull of a and b0: 3x3 = 9, union 7 -> 1/7 - 2/9; hull of a and b2: 4x2 = 8, union 5 -> 0 - 3/8
    assert giou.tolist()[0] == pytest.approx([1 / 7 - 2 / 9, 1.0, -3 / 8])


def test_iou_against_independent_formula():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(50, 4, generator=g, dtype=torch.float64)
    q = torch.rand(50, 4, generator=g, dtype=torch.float64)
    a = torch.cat([torch.minimum(p[:, :2], p[:, 2:]), torch.maximum(p[:, :2], p[:, 2:])], 1)
    b = torch.cat([torch.minimum(q[:, :2], q[:, 2:]), torch.maximum(q[:, :2], q[:, 2:])], 1)
    ours = box_iou_aligned(a, b)
    for i in range(50):
        ax0, ay0, ax1, ay1 = a[i].tolist()
        bx0, by0, bx1, by1 = b[i].tolist()
        iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
        ih = max(0.0, min(ay1, by1) - max(ay0, by0))
        inter = iw * ih
        union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
        assert math.isclose(ours[i].item(), inter / union, abs_tol=1e-12)
    assert torch.allclose(box_iou(a, b).diagonal(), ours)


def test_grounding_accuracy_clamps_predictions():
    gt = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.2, 0.2, 0.2, 0.2]])
    pred = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.6, 0.6, 0.2, 0.2]])
    assert grounding_accuracy(pred, gt) == 0.5
    # prediction spilling outside the image is clamped to [0, 1] before the IoU (official)
    gt2 = torch.tensor([[0.9, 0.5, 0.2, 0.4]])  # x in [0.8, 1.0]
    pred2 = torch.tensor([[1.0, 0.5, 0.4, 0.4]])  # x in [0.8, 1.2] -> clamped to [0.8, 1.0]: IoU 1
    assert grounding_accuracy(pred2, gt2) == 1.0
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        grounding_accuracy(pred, gt[:1])


def test_giou_with_eps_is_finite_on_degenerate_boxes_and_equal_elsewhere():
    """The loss form (eps=1e-9, no validation: no host sync) vs the metric form (eps=0)."""
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]])
    b = torch.tensor([[1.0, 1.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5], [0.6, 0.6, 0.8, 0.9]])
    metric = generalized_box_iou_aligned(a, b)
    loss_form = generalized_box_iou_aligned(a, b, eps=1e-9, validate=False)
    assert loss_form[0].item() == pytest.approx(metric[0].item(), abs=1e-7)
    assert metric[1].isnan() and torch.isfinite(loss_form).all()
    assert loss_form[1].item() == 0.0  # two identical points: no overlap area, no hull: IoU 0, penalty 0
    assert -1.0 <= loss_form[2].item() < 0.0  # a point outside a box: negative GIoU
    assert box_iou_aligned(a[1], b[1]).isnan() and box_iou_aligned(a[1], b[1], eps=1e-9).item() == 0.0
    with pytest.raises(ValueError, match="x1 < x0"):
        generalized_box_iou_aligned(a.flip(-1), b)
    generalized_box_iou_aligned(a.flip(-1), b, validate=False)  # not checked: no host sync

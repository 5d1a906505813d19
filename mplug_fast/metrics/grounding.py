"""Box utilities and the grounding metric Acc@IoU>=0.5 (spec §5.5, TransVG's evaluation).

Boxes are float tensors [..., 4], either (cx, cy, w, h) or (x0, y0, x1, y1) with x0 <= x1, y0 <= y1; any
unit (the model's are normalised to [0, 1] by the padded square image side).

    box_iou / generalized_box_iou              pairwise: [N, 4] x [M, 4] -> [N, M]
    box_iou_aligned / generalized_box_iou_aligned   elementwise: [..., 4] x [..., 4] -> [...]
    grounding_accuracy(pred_cxcywh, gt_cxcywh)  official: cxcywh -> xyxy, predictions clamped to [0, 1],
                                                fraction with IoU >= 0.5
"""

from __future__ import annotations

import torch
from torch import Tensor

IOU_THRESHOLD = 0.5


def _check(boxes: Tensor, name: str) -> Tensor:
    if not isinstance(boxes, Tensor):
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.shape[-1:] != (4,) or not boxes.is_floating_point():
        raise ValueError(
            f"{name} must be a float tensor [..., 4], got shape {list(boxes.shape)}, {boxes.dtype}"
        )
    return boxes


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> (cx - w/2, cy - h/2, cx + w/2, cy + h/2)."""
    cx, cy, w, h = _check(boxes, "boxes").unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] (x0, y0, x1, y1) -> ((x0 + x1)/2, (y0 + y1)/2, x1 - x0, y1 - y0)."""
    x0, y0, x1, y1 = _check(boxes, "boxes").unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """[..., 4] xyxy -> [...] area (0 for degenerate boxes)."""
    b = _check(boxes, "boxes")
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def _iou_parts(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Broadcasting intersection and union of xyxy boxes a [..., 4], b [..., 4]."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a) + box_area(b) - inter
    return inter, union


def _giou_from(a: Tensor, b: Tensor) -> Tensor:
    inter, union = _iou_parts(a, b)
    iou = inter / union
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    hull = (rb - lt).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull


def box_iou_aligned(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise IoU of xyxy boxes a [..., 4] and b [..., 4] (broadcast) -> [...]. Two empty boxes: NaN."""
    inter, union = _iou_parts(_check(a, "a"), _check(b, "b"))
    return inter / union


def generalized_box_iou_aligned(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise GIoU = IoU - (hull - union) / hull, in [-1, 1], of xyxy boxes (broadcast) -> [...]."""
    a, b = _check(a, "a"), _check(b, "b")
    _check_valid(a, "a")
    _check_valid(b, "b")
    return _giou_from(a, b)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of xyxy boxes a [N, 4] and b [M, 4] -> [N, M]."""
    return box_iou_aligned(_check(a, "a")[:, None, :], _check(b, "b")[None, :, :])


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise GIoU of xyxy boxes a [N, 4] and b [M, 4] -> [N, M]."""
    return generalized_box_iou_aligned(_check(a, "a")[:, None, :], _check(b, "b")[None, :, :])


def _check_valid(b: Tensor, name: str) -> None:
    if bool((b[..., 2:] < b[..., :2]).any()):
        raise ValueError(f"{name} has boxes with x1 < x0 or y1 < y0 (expected xyxy); convert cxcywh first")


def grounding_accuracy(pred_cxcywh: Tensor, gt_cxcywh: Tensor, threshold: float = IOU_THRESHOLD) -> float:
    """Acc@IoU>=threshold of predicted vs ground-truth boxes [B, 4], both normalised (cx, cy, w, h).

    As the official evaluation: both converted to xyxy, predictions clamped to [0, 1], a hit when
    IoU >= threshold. Returns the fraction of hits in [0, 1].
    """
    pred, gt = _check(pred_cxcywh, "pred_cxcywh"), _check(gt_cxcywh, "gt_cxcywh")
    if pred.shape != gt.shape or pred.dim() != 2:
        raise ValueError(f"pred and gt must both be [B, 4], got {list(pred.shape)} and {list(gt.shape)}")
    iou = box_iou_aligned(box_cxcywh_to_xyxy(pred).clamp(0, 1), box_cxcywh_to_xyxy(gt))
    return (iou.nan_to_num(0.0) >= threshold).double().mean().item()

"""Box utilities: the one home of box format conversion, area, IoU and GIoU (metrics and losses).

Boxes are float tensors [..., 4], either (cx, cy, w, h) or (x0, y0, x1, y1) with x0 <= x1, y0 <= y1; any
unit (the model's are normalised to [0, 1] by the padded square image side). IoU and GIoU come pairwise
([N, 4] x [M, 4] -> [N, M]) and elementwise (``*_aligned``: broadcast [..., 4] x [..., 4] -> [...]).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "as_boxes",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_iou_aligned",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "generalized_box_iou_aligned",
]


def as_boxes(boxes: Tensor, name: str = "boxes") -> Tensor:
    """`boxes` as a float tensor [..., 4] (lists are converted); anything else is an error naming `name`."""
    if not isinstance(boxes, Tensor):
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.shape[-1:] != (4,) or not boxes.is_floating_point():
        raise ValueError(
            f"{name} must be a float tensor [..., 4], got shape {list(boxes.shape)}, {boxes.dtype}"
        )
    return boxes


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> (cx - w/2, cy - h/2, cx + w/2, cy + h/2)."""
    cx, cy, w, h = as_boxes(boxes, "boxes").unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] (x0, y0, x1, y1) -> ((x0 + x1)/2, (y0 + y1)/2, x1 - x0, y1 - y0)."""
    x0, y0, x1, y1 = as_boxes(boxes, "boxes").unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """[..., 4] xyxy -> [...] area (0 for degenerate boxes)."""
    b = as_boxes(boxes, "boxes")
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def _iou_parts(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Broadcasting intersection and union of xyxy boxes a [..., 4], b [..., 4]."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a) + box_area(b) - inter
    return inter, union


def box_iou_aligned(a: Tensor, b: Tensor, *, eps: float = 0.0) -> Tensor:
    """Elementwise IoU of xyxy boxes a [..., 4] and b [..., 4] (broadcast) -> [...].

    eps: lower bound of the union. 0 (the metric): two empty boxes give NaN; > 0 (a loss): 0.
    """
    inter, union = _iou_parts(as_boxes(a, "a"), as_boxes(b, "b"))
    return inter / union.clamp(min=eps)


def generalized_box_iou_aligned(a: Tensor, b: Tensor, *, eps: float = 0.0, validate: bool = True) -> Tensor:
    """Elementwise GIoU = IoU - (hull - union) / hull, in [-1, 1], of xyxy boxes (broadcast) -> [...].

    eps: lower bound of the union and the hull (0: degenerate boxes give NaN; 1e-9 in losses: finite).
    validate: raise on boxes with x1 < x0 or y1 < y0 (one host synchronisation; pass False in a
    training step, e.g. for the grounding loss weights on predicted boxes).
    """
    a, b = as_boxes(a, "a"), as_boxes(b, "b")
    if validate:
        _check_valid(a, "a")
        _check_valid(b, "b")
    inter, union = _iou_parts(a, b)
    union = union.clamp(min=eps)
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    hull = (rb - lt).clamp(min=0).prod(-1).clamp(min=eps)
    return inter / union - (hull - union) / hull


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of xyxy boxes a [N, 4] and b [M, 4] -> [N, M]."""
    return box_iou_aligned(as_boxes(a, "a")[:, None, :], as_boxes(b, "b")[None, :, :])


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise GIoU of xyxy boxes a [N, 4] and b [M, 4] -> [N, M]."""
    return generalized_box_iou_aligned(as_boxes(a, "a")[:, None, :], as_boxes(b, "b")[None, :, :])


def _check_valid(b: Tensor, name: str) -> None:
    if bool((b[..., 2:] < b[..., :2]).any()):
        raise ValueError(f"{name} has boxes with x1 < x0 or y1 < y0 (expected xyxy); convert cxcywh first")

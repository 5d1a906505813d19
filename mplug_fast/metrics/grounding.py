"""The grounding metric Acc@IoU>=0.5 (fidelity §5.5, TransVG's evaluation): `grounding_accuracy`, as the
official evaluation (cxcywh -> xyxy, predictions clamped to [0, 1], the fraction with IoU >= 0.5). The box
utilities are in `boxes.py`.
"""

from __future__ import annotations

from torch import Tensor

from mplug_fast.metrics.boxes import as_boxes, box_cxcywh_to_xyxy, box_iou_aligned

IOU_THRESHOLD = 0.5


def grounding_accuracy(pred_cxcywh: Tensor, gt_cxcywh: Tensor, threshold: float = IOU_THRESHOLD) -> float:
    """Acc@IoU>=threshold of predicted vs ground-truth boxes [B, 4], both normalised (cx, cy, w, h).

    As the official evaluation: both converted to xyxy, predictions clamped to [0, 1], a hit when
    IoU >= threshold. Returns the fraction of hits in [0, 1].
    """
    pred, gt = as_boxes(pred_cxcywh, "pred_cxcywh"), as_boxes(gt_cxcywh, "gt_cxcywh")
    if pred.shape != gt.shape or pred.dim() != 2:
        raise ValueError(f"pred and gt must both be [B, 4], got {list(pred.shape)} and {list(gt.shape)}")
    iou = box_iou_aligned(box_cxcywh_to_xyxy(pred).clamp(0, 1), box_cxcywh_to_xyxy(gt))
    return (iou.nan_to_num(0.0) >= threshold).double().mean().item()

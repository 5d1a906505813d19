"""Visual grounding evaluation: boxes decoded greedily as 4 coordinate tokens
(``mplug_fast.inference.ground_tokens``), read back as bin / num_bins (official 336; normalised cx, cy, w, h
of the square input), Acc@IoU≥0.5 (``mplug_fast.metrics.grounding_accuracy``) and mean IoU against the
samples' ``box``.
Predictions: ``[{"index", "image_id", "expression", "box", "gt"}]`` (normalised cx, cy, w, h)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mplug_fast.tasks.base import Baseline, batches, eval_mode, write_json


def mean_iou(pred_cxcywh: Tensor, gt_cxcywh: Tensor) -> float:
    """Mean IoU of aligned boxes [B, 4] (normalised cx, cy, w, h; predictions clamped to [0, 1])."""
    from mplug_fast.metrics.grounding import box_cxcywh_to_xyxy, box_iou_aligned

    iou = box_iou_aligned(box_cxcywh_to_xyxy(pred_cxcywh).clamp(0, 1), box_cxcywh_to_xyxy(gt_cxcywh))
    return iou.nan_to_num(0.0).double().mean().item()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    tokenizer: Any,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    max_length: int = 20,
    threshold: float = 0.5,
    num_bins: int = 336,
    output: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Acc@IoU≥``threshold`` (percent) and mean IoU of ``model`` (a grounding model) on ``dataset``
    (samples: image, expression, box normalised cx, cy, w, h). ``num_bins``: the coordinate quantisation the
    model was trained with (official 336; the objective's ``num_bins`` option).

    Returns: {"acc@0.5" (or the threshold's name), "miou" (percent), "count", "boxes" [N, 4] predictions}.
    """
    from mplug_fast.data.collate import GroundingCollator
    from mplug_fast.inference import coordinate_token_ids, ground_tokens
    from mplug_fast.metrics import grounding_accuracy

    prefix, coord_ids = coordinate_token_ids(tokenizer, num_bins)
    coord_ids = coord_ids.to(device)
    first = int(coord_ids[0])
    collator = GroundingCollator(tokenizer, max_length=max_length)

    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:  # the collator consumes the expressions
        return {**collator(samples), "expression": [s["expression"] for s in samples]}

    preds, golds, rows = [], [], []
    with eval_mode(model):
        for batch in batches(dataset, collate, batch_size, device):
            tokens = ground_tokens(
                model, batch["images"], batch["text_ids"], batch["text_mask"], prefix, coord_ids
            )
            boxes = (tokens - first).clamp(0, num_bins).double().cpu() / num_bins  # [B, 4]
            gt = batch["boxes"].double().cpu()
            for i in range(boxes.shape[0]):
                rows.append(
                    {
                        "index": len(rows),
                        "image_id": batch.get("image_id", [None] * boxes.shape[0])[i],
                        "expression": batch["expression"][i],
                        "box": boxes[i].tolist(),
                        "gt": gt[i].tolist(),
                    }
                )
            preds.append(boxes)
            golds.append(gt)
    pred, gold = torch.cat(preds), torch.cat(golds)
    result: dict[str, Any] = {
        f"acc@{threshold:g}": 100.0 * grounding_accuracy(pred, gold, threshold),
        "miou": 100.0 * mean_iou(pred, gold),
        "count": pred.shape[0],
    }
    if output is not None:
        write_json(rows, output)
    result["boxes"] = pred
    return result


def baseline(train: Dataset, evaluation: Dataset, limit: int = 500) -> Baseline:
    """Acc@0.5 of predicting the mean training box (over up to ``limit`` samples) for every expression."""
    from mplug_fast.metrics import grounding_accuracy

    n = min(limit, len(train))
    mean_box = torch.stack([torch.as_tensor(train[i]["box"], dtype=torch.float64) for i in range(n)]).mean(0)
    gold = torch.stack(
        [torch.as_tensor(evaluation[i]["box"], dtype=torch.float64) for i in range(len(evaluation))]
    )
    acc = 100.0 * grounding_accuracy(mean_box.expand_as(gold).clone(), gold)
    box = ", ".join(f"{v:.3f}" for v in mean_box.tolist())
    return Baseline("acc@0.5", acc, f"the mean training box ({box}) for every expression")

"""Visual grounding: referring expression -> fusion -> decoder emits [unused339] + 4 coordinate tokens.

Training: `GroundingObjective` (coordinate-token CE weighted by the argmax box's L1 and 1 − GIoU,
fidelity §5.5).
Data: the synthetic ``GroundingDataset`` or the official ``RefCocoDataset``; batches from
``GroundingCollator``.

Evaluation: boxes decoded greedily as 4 coordinate tokens
(``mplug_fast.inference.ground_tokens``), read back as bin / num_bins (official 336; normalised cx, cy, w, h
of the square input), Acc@IoU≥0.5 (``mplug_fast.metrics.grounding_accuracy``) and mean IoU against the
samples' ``box``.
Predictions: ``[{"index", "image_id", "expression", "box", "gt"}]`` (normalised cx, cy, w, h)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from mplug_fast.data.collate import GroundingCollator
from mplug_fast.data.official_grounding import RefCocoDataset
from mplug_fast.data.synthetic import GroundingDataset
from mplug_fast.inference import coordinate_token_ids, ground_tokens
from mplug_fast.inference.grounding import GROUNDING_NUM_BINS
from mplug_fast.io import atomic_write_json
from mplug_fast.metrics import grounding_accuracy
from mplug_fast.metrics.boxes import box_cxcywh_to_xyxy, box_iou_aligned, generalized_box_iou_aligned
from mplug_fast.modeling import MPlugForGrounding
from mplug_fast.modeling.vision import sincos_pos_table
from mplug_fast.objectives.base import Objective
from mplug_fast.objectives.pretrain import require_keys
from mplug_fast.tasks.evaluation import batches, eval_mode, with_columns
from mplug_fast.tasks.protocol import Baseline, DataSource, Task, call_reader


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

    prefix, coord_ids = coordinate_token_ids(tokenizer, num_bins)
    coord_ids = coord_ids.to(device)
    first = int(coord_ids[0])
    collate = with_columns(GroundingCollator(tokenizer, max_length=max_length), "expression")
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
    pred, gold = torch.cat(preds), torch.cat(golds)  # [N, 4] normalised cx, cy, w, h
    iou = box_iou_aligned(box_cxcywh_to_xyxy(pred).clamp(0, 1), box_cxcywh_to_xyxy(gold))  # [N]
    result: dict[str, Any] = {
        f"acc@{threshold:g}": 100.0 * grounding_accuracy(pred, gold, threshold),
        "miou": 100.0 * iou.nan_to_num(0.0).double().mean().item(),
        "count": pred.shape[0],
    }
    if output is not None:
        atomic_write_json(output, rows)
    result["boxes"] = pred
    return result


def baseline(train: Dataset, evaluation: Dataset, limit: int = 500) -> Baseline:
    """Acc@0.5 of predicting the mean training box (over up to ``limit`` samples) for every expression."""

    n = min(limit, len(train))
    mean_box = torch.stack([torch.as_tensor(train[i]["box"], dtype=torch.float64) for i in range(n)]).mean(0)
    gold = torch.stack(
        [torch.as_tensor(evaluation[i]["box"], dtype=torch.float64) for i in range(len(evaluation))]
    )
    acc = 100.0 * grounding_accuracy(mean_box.expand_as(gold).clone(), gold)
    box = ", ".join(f"{v:.3f}" for v in mean_box.tolist())
    return Baseline("acc@0.5", acc, f"the mean training box ({box}) for every expression")


# ---- training --------------------------------------------------------------------------------------------


def grounding_weights(
    pred_bins: Tensor, target: Tensor, num_bins: int = GROUNDING_NUM_BINS
) -> tuple[Tensor, Tensor]:
    """(weight_bbox [B, 4] = |pred − target| clamped to [0, 5], weight_giou [B] = 1 − GIoU) of the argmax
    box (bins / num_bins, cxcywh) against the normalised target boxes [B, 4]."""
    pred = pred_bins.float() / num_bins
    w_box = (pred - target).abs().clamp(0, 5)
    # finite for degenerate boxes, no host sync (no validation) inside the training step
    giou = generalized_box_iou_aligned(
        box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target), eps=1e-9, validate=False
    )
    w_giou = 1.0 - giou
    return w_box, w_giou


def soft_bin_targets(bins: Tensor, num_classes: int, sigma: float) -> Tensor:
    """Target distributions [..., num_classes] over the coordinate tokens: a Gaussian of width ``sigma``
    (in bins) around each target bin of ``bins`` (long [...]), normalised over the classes."""
    k = torch.arange(num_classes, device=bins.device, dtype=torch.float32)
    d = k - bins.unsqueeze(-1).float()  # [..., num_classes]
    return torch.softmax(-0.5 * (d / sigma) ** 2, dim=-1)


@torch.no_grad()
def prepare_for_boxes(
    model: nn.Module, pos_table_scale: float = 0.0, reset_cross_query: bool = False
) -> None:
    """Ready a model from a pretraining that never needed positions for coordinate-token training (in place).

    ``pos_table_scale > 0`` adds that multiple of `sincos_pos_table` (unit-norm rows) to the patch rows of
    the visual position embedding: a pretraining whose losses never need the object's position leaves that
    embedding near its initial scale, a small fraction of the patch content, so no head can read a
    position from the features until it has grown. ``reset_cross_query`` zeroes the decoder's
    cross-attention query projections: the box tokens then start by attending to the whole memory alike
    instead of the pretraining's pattern (mostly the text tokens)."""
    if pos_table_scale > 0:
        pos = model.vision.pos_embed  # [1 + g * g, W], class token first
        grid = math.isqrt(pos.shape[0] - 1)
        if grid * grid != pos.shape[0] - 1:
            rows = pos.shape[0]
            raise ValueError(f"pos_table_scale needs a square patch grid; the position table has {rows} rows")
        pos[1:] += pos_table_scale * sincos_pos_table(grid, pos.shape[1]).to(pos)
    if reset_cross_query:
        for layer in model.decoder.layers:
            layer.cross.q_proj.weight.zero_()
            layer.cross.q_proj.bias.zero_()


@dataclass(frozen=True)
class GroundingOptions:
    """`GroundingObjective` options: the coordinate quantisation (official 336), the box weighting, the
    width (in bins) of the Gaussian soft targets (0: one-hot targets, official), and what
    `prepare_for_boxes` does to the model when the objective is built (both off: official)."""

    num_bins: int = GROUNDING_NUM_BINS
    box_weighting: bool = True
    label_sigma: float = 0.0
    pos_table_scale: float = 0.0
    reset_cross_query: bool = False

    def __post_init__(self) -> None:
        for name in ("label_sigma", "pos_table_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"grounding option {name} must be >= 0, got {getattr(self, name)}")


class GroundingObjective(Objective):
    """Grounding as coordinate tokens (fidelity §5.5): decoder input [unused339] + 4 bin tokens over the fused
    [image; expression]; CE over the 337 coordinate tokens only (the official prob mask adds −10000 to every
    other logit: the same softmax); per-token CE weighted (no grad) by the argmax box's L1 error per
    coordinate and its 1 − GIoU per sample:

        loss = mean_{i,k} CE[i, k] · w_box[i, k] · w_giou[i]

    Official bug fixed: there the CE [B, 1, 4] times w_box [B, 4] times w_giou [B, 1] broadcasts to
    [B, B, 4], i.e. every sample's CE is weighted by the batch-mean weights and the per-sample focus is lost.

    ``box_weighting=False`` (ours, not official) drops both weights: plain token CE. The weights are
    |error| (normalised, ~0.1 once roughly placed) times 1 − GIoU, so they shrink the coordinate gradients
    ~10x; from pretrained mPLUG weights that refines boxes, from scratch (the synthetic demo) it stalls
    position learning.

    ``label_sigma > 0`` (ours) replaces each one-hot target by a Gaussian over the neighbouring bins
    (`soft_bin_targets`): a prediction one bin off is then nearly right, so the loss orders the bins and
    its gradient says which way a box is off, not only that it is off. The logged ``ce`` stays the
    one-hot CE.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, **options: Any):  # options: `GroundingOptions`
        super().__init__()
        o = GroundingOptions(**options)
        # before training starts only: a resumed run loads its trained weights over these afterwards
        prepare_for_boxes(model, o.pos_table_scale, o.reset_cross_query)
        self.prefix_id, coord_ids = coordinate_token_ids(tokenizer, o.num_bins)  # long [num_bins + 1]
        self.model, self.num_bins, self.box_weighting = model, o.num_bins, o.box_weighting
        self.label_sigma = o.label_sigma
        self.register_buffer("coord_ids", coord_ids, persistent=False)

    def box_ids(self, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """boxes [B, 4] normalised cxcywh -> (decoder ids [B, 5], target bins [B, 4])."""
        bins = torch.floor(boxes.clamp(0, 1) * self.num_bins).long()
        prefix = torch.full_like(bins[:, :1], self.prefix_id)
        return torch.cat([prefix, self.coord_ids[bins]], 1), bins

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """batch: images, text_ids / text_mask [B, L], boxes [B, 4] (cx, cy, w, h in [0, 1]).
        Returns {"loss", "grounding", "ce" (one-hot CE, token mean), "ce_xy" (the same over cx, cy)}."""
        require_keys(batch, ("images", "text_ids", "text_mask", "boxes"), "GroundingObjective")
        boxes = batch["boxes"].float()
        ids, bins = self.box_ids(boxes)
        logits = self.model(batch["images"], batch["text_ids"], batch["text_mask"].bool(), ids)  # [B, 5, V]
        coord_logits = logits[:, :-1].index_select(-1, self.coord_ids).float()  # [B, 4, 337]
        ce = F.cross_entropy(coord_logits.transpose(1, 2), bins, reduction="none")  # [B, 4]
        token_loss = ce
        if self.label_sigma > 0:
            soft = soft_bin_targets(bins, coord_logits.shape[-1], self.label_sigma)  # [B, 4, 337]
            token_loss = -(soft * coord_logits.log_softmax(-1)).sum(-1)  # [B, 4]
        if self.box_weighting:
            with torch.no_grad():
                w_box, w_giou = grounding_weights(coord_logits.argmax(-1), boxes, self.num_bins)
            loss = (token_loss * w_box * w_giou[:, None]).mean()
        else:
            loss = token_loss.mean()
        return {
            "loss": loss,
            "grounding": loss.detach(),
            "ce": ce.mean().detach(),
            "ce_xy": ce[:, :2].mean().detach(),  # the centre tokens: the part that needs the image
        }


# ---- the task --------------------------------------------------------------------------------------------


class GroundingTask(Task):
    name = "grounding"
    metric = "acc@0.5"
    model_class = MPlugForGrounding
    collator = GroundingCollator
    reader = RefCocoDataset
    synthetic_class = GroundingDataset
    Options = GroundingOptions
    predictions_file = "grounding_result.json"
    text_length = 20  # official expression length (docs/fidelity.md §6)
    pipeline_method = "ground"
    evaluate = staticmethod(evaluate)
    baseline = staticmethod(baseline)

    def _objective(
        self, model: nn.Module, tokenizer: Any, options: GroundingOptions, data: DataSource | None
    ) -> Objective:
        return GroundingObjective(model, tokenizer, **vars(options))

    def official_dataset(self, split: str = "train", **kwargs: Any) -> Dataset:
        """TransVG split files: ``train`` (the training augmentation) follows the split."""
        return call_reader(self.reader, self.name, {"train": split == "train", **kwargs})

"""Cross-entropy for the classification tasks: SNLI-VE (3 classes) and NLVR2 (2 classes).

    batch {"images", "text_ids", "text_mask", "labels" [B] long}  ->  {"loss", "<task>", "acc"}

The model (`MPlugForVE` / `MPlugForNLVR`, ``mplug_fast.modeling.pairs``) maps (images, text) to logits
[B, C]; the loss is the batch-mean CE. ALBEF also distils from a momentum model for these tasks; mPLUG ships
no recipe for them, so this objective keeps plain CE (optional label smoothing) and no momentum copies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug_fast.objectives.pretrain import MomentumMixin, require_keys

CLASSIFICATION_TASKS = ("nlvr", "ve")


def classification_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Batch-mean CE of logits [B, C] (computed in fp32) against labels long [B] in 0..C-1."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"need logits [B, C] and labels [B], got {list(logits.shape)} and {list(labels.shape)}"
        )
    return F.cross_entropy(logits.float(), labels.long(), label_smoothing=label_smoothing)


class ClassificationObjective(MomentumMixin, nn.Module):
    """CE over the task model's logits: loss = mean_b −log softmax(logits_b)[label_b].

    Args:
        model: a classification model (``model.task`` "nlvr" or "ve"; ``model.labels``: class names).
        label_smoothing: in [0, 1) (0 = plain CE, the peers' setting).
    """

    def __init__(self, model: nn.Module, *, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.model, self.label_smoothing = model, label_smoothing
        self.task = getattr(model, "task", "classification")
        self.alpha, self.distill, self.alpha_warmup_steps = 0.0, False, 0
        self._init_momentum(model, None, 0.0)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """batch: images ([B,3,R,R] for VE, [B,2,3,R,R] for NLVR), text_ids / text_mask [B, L], labels [B].
        Returns {"loss", task name (the loss, detached), "acc" (batch accuracy, detached)}."""
        require_keys(batch, ("images", "text_ids", "text_mask", "labels"), type(self).__name__)
        labels = batch["labels"]  # range checked by F.cross_entropy (no host sync here)
        logits = self.model(batch["images"], batch["text_ids"], batch["text_mask"].bool())
        loss = classification_loss(logits, labels, self.label_smoothing)
        with torch.no_grad():
            acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, self.task: loss.detach(), "acc": acc}

"""The classification tasks: SNLI-VE (image + hypothesis -> 3 classes) and NLVR2 (image pair + statement ->
True / False), on the heads of ``mplug_fast.modeling.pairs``.

Training: `ClassificationObjective`, batch-mean CE of the head's logits. ALBEF also distils from a
momentum model for these tasks; mPLUG ships no recipe for them, so this keeps plain CE (optional label
smoothing) and no momentum copies.
Evaluation: accuracy, per-class accuracy, confusion matrix, predictions JSON ``[{"index", "image_id",
"sentence", "prediction", "label", "probs"}]`` with class names (``label`` None for unlabelled data), and the
majority-class baseline (headline metric "accuracy", percent).
Data: the synthetic ``VEDataset`` / ``NLVRDataset`` or the official readers ``SNLIVEJsonDataset`` /
``NLVR2JsonDataset``; batches from ``VECollator`` / ``NLVRCollator``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from mplug_fast.data.collate_pairs import NLVRCollator, VECollator
from mplug_fast.data.official_pairs import NLVR2JsonDataset, SNLIVEJsonDataset
from mplug_fast.data.synthetic.pairs import NLVRDataset, VEDataset
from mplug_fast.io import atomic_write_json
from mplug_fast.modeling import MPlugForNLVR, MPlugForVE
from mplug_fast.objectives.base import Objective
from mplug_fast.objectives.pretrain import require_keys
from mplug_fast.tasks.evaluation import batches, eval_mode, with_columns
from mplug_fast.tasks.protocol import Baseline, Task
from mplug_fast.tasks.sources import synthetic_scenes

CLASSIFIERS = (MPlugForVE, MPlugForNLVR)
BASELINE_LIMIT = 20000  # training labels read for the majority class (label(i) is cheap on every reader)


def dataset_label(dataset: Dataset, i: int) -> int | None:
    """The label id of item i, without rendering / loading images where the dataset has ``label(i)``."""
    if isinstance(dataset, Subset):
        return dataset_label(dataset.dataset, dataset.indices[i])
    if hasattr(dataset, "label"):
        return dataset.label(i)
    return dataset[i].get("label")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    tokenizer: Any,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    max_length: int = 40,
    output: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Accuracy of ``model`` (an NLVR or VE model) on ``dataset``.

    Returns: {"accuracy" (percent over labelled items; None when none is labelled), "acc_<class>" (percent per
    gold class, None for an absent class), "confusion" ([gold][predicted] counts), "count",
    "num_labelled", "predictions" (long [N] class ids)}, and "acc_type_<type>" (percent per statement type)
    when the items name their type (the synthetic datasets do).
    """
    if not isinstance(model, CLASSIFIERS):
        raise TypeError(
            f"classification evaluation needs an NLVR2 / SNLI-VE model ({MPlugForNLVR.__name__} / "
            f"{MPlugForVE.__name__}), got a {getattr(model, 'task', type(model).__name__)!r} model"
        )
    names = tuple(model.labels)
    collator = (NLVRCollator if isinstance(model, MPlugForNLVR) else VECollator)(
        tokenizer, max_length=max_length
    )
    C = len(names)
    confusion = torch.zeros(C, C, dtype=torch.long)  # [gold, predicted]
    by_type: dict[str, list[bool]] = {}  # statement type -> right or not, per labelled item
    preds, rows = [], []
    with eval_mode(model):
        for batch in batches(dataset, with_columns(collator, "sentence", "type"), batch_size, device):
            probs = model(batch["images"], batch["text_ids"], batch["text_mask"]).float().softmax(-1).cpu()
            pred = probs.argmax(-1).tolist()  # [B]
            gold = batch["labels"].tolist() if "labels" in batch else [None] * len(pred)
            image_ids = batch.get("image_id", [None] * len(pred))
            for b, (p, g, kind) in enumerate(zip(pred, gold, batch["type"])):
                rows.append(
                    {
                        "index": len(rows),
                        "image_id": image_ids[b],
                        "sentence": batch["sentence"][b],
                        "prediction": names[p],
                        "label": None if g is None else names[g],
                        "probs": [round(x, 6) for x in probs[b].tolist()],
                    }
                )
                if g is not None:
                    confusion[g, p] += 1
                    if kind is not None:
                        by_type.setdefault(kind, []).append(p == g)
            preds += pred
    labelled = int(confusion.sum())
    per_class = confusion.sum(1)
    result: dict[str, Any] = {
        "accuracy": 100.0 * int(confusion.trace()) / labelled if labelled else None,
        **{
            f"acc_{name}": 100.0 * int(confusion[c, c]) / int(per_class[c]) if per_class[c] else None
            for c, name in enumerate(names)
        },
        **{f"acc_type_{kind}": 100.0 * sum(v) / len(v) for kind, v in sorted(by_type.items())},
        "confusion": confusion.tolist(),
        "count": len(rows),
        "num_labelled": labelled,
    }
    if output is not None:
        atomic_write_json(output, rows)
    result["predictions"] = torch.tensor(preds, dtype=torch.long)
    return result


def baseline(train: Dataset, evaluation: Dataset, limit: int = BASELINE_LIMIT) -> Baseline:
    """Accuracy (percent) of always answering the most frequent training label (over up to ``limit``
    training items; ties: the lower id)."""
    n = min(limit, len(train))
    counts = Counter(lab for lab in (dataset_label(train, i) for i in range(n)) if lab is not None)
    if not counts:
        raise ValueError("the training set has no labels: no majority class")
    majority = min(counts, key=lambda c: (-counts[c], c))
    gold = [lab for lab in (dataset_label(evaluation, i) for i in range(len(evaluation))) if lab is not None]
    if not gold:
        raise ValueError("the evaluation set has no labels: no baseline accuracy")
    names = getattr(getattr(train, "dataset", train), "label_names", None)
    name = names[majority] if names else str(majority)
    acc = 100.0 * sum(g == majority for g in gold) / len(gold)
    share = 100.0 * counts[majority] / sum(counts.values())
    return Baseline("accuracy", acc, f"always {name!r}, the majority training label ({share:.1f}% of {n})")


# ---- training --------------------------------------------------------------------------------------------


class ClassificationObjective(Objective):
    """CE over the task model's logits: loss = mean_b −log softmax(logits_b)[label_b].

    Args:
        model: a classification model (``model.labels``: class names; ``model.task``: the logged loss name).
        label_smoothing: in [0, 1) (0 = plain CE, the peers' setting).
    """

    def __init__(self, model: nn.Module, *, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.model, self.label_smoothing = model, label_smoothing
        self.task = model.task

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """batch: images ([B,3,R,R] for VE, [B,2,3,R,R] for NLVR), text_ids / text_mask [B, L], labels [B].
        Returns {"loss", task name (the loss, detached), "acc" (batch accuracy, detached)}."""
        require_keys(batch, ("images", "text_ids", "text_mask", "labels"), type(self).__name__)
        labels = batch["labels"]  # range checked by F.cross_entropy (no host sync here)
        logits = self.model(batch["images"], batch["text_ids"], batch["text_mask"].bool())
        loss = F.cross_entropy(logits.float(), labels.long(), label_smoothing=self.label_smoothing)  # fp32
        with torch.no_grad():
            acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, self.task: loss.detach(), "acc": acc}


# ---- the tasks -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassificationOptions:
    """`ClassificationObjective` options."""

    label_smoothing: float = 0.0


class _ClassificationTask(Task):
    metric = "accuracy"
    Options = ClassificationOptions
    evaluate = staticmethod(evaluate)
    baseline = staticmethod(baseline)
    objective_class = ClassificationObjective

    def synthetic_dataset(self, split: str = "train", **world: Any) -> Dataset:
        """The synthetic pairs (``data.synthetic.pair_types``: the statement types; ``ve_labels``: the VE
        classes, for VE only)."""
        s = synthetic_scenes(split, **world)
        options: dict[str, Any] = {} if s.pair_types is None else {"types": s.pair_types}
        if s.ve_labels is not None:
            if self.synthetic_class is not VEDataset:
                raise ValueError("data.synthetic.ve_labels applies to the visual entailment task only")
            options["labels"] = s.ve_labels
        return self.synthetic_class(s.world, s.count, s.start, **options)


class VisualEntailmentTask(_ClassificationTask):
    """SNLI-VE: does the image entail, contradict or leave open the hypothesis?"""

    name = "ve"
    model_class = MPlugForVE
    predictions_file = "ve_result.json"
    collator = VECollator
    reader = SNLIVEJsonDataset
    synthetic_class = VEDataset


class NLVR2Task(_ClassificationTask):
    """NLVR2: is the statement true of the (left, right) image pair?"""

    name = "nlvr2"
    aliases = ("nlvr",)  # the task's name before it took its benchmark's (configs, --task, saved models)
    model_class = MPlugForNLVR
    predictions_file = "nlvr2_result.json"
    collator = NLVRCollator
    reader = NLVR2JsonDataset
    synthetic_class = NLVRDataset

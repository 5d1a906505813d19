"""NLVR2 and SNLI-VE: classification evaluation (accuracy, per-class accuracy, confusion matrix, predictions
JSON) and the majority-class baseline, for the heads of ``mplug_fast.modeling.pairs``.

    TASKS["ve"] / TASKS["nlvr"] = VE_SPEC / NLVR_SPEC (headline metric "accuracy", percent)

Data: the synthetic ``VEDataset`` / ``NLVRDataset`` (``mplug_fast.data.synthetic.pairs``) or the official
readers ``SNLIVEJsonDataset`` / ``NLVR2JsonDataset`` (``mplug_fast.data.official_pairs``), built by the
specs' ``synthetic_dataset`` / ``official_dataset``. Predictions: ``[{"index", "image_id", "sentence",
"prediction", "label", "probs"}]`` with class names (``label`` None for unlabelled data).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from mplug_fast.tasks.base import Baseline, TaskSpec, batches, eval_mode, write_json

PAIR_TASKS = ("nlvr", "ve")
BASELINE_LIMIT = 20000  # training labels read for the majority class (label(i) is cheap on every reader)


def dataset_label(dataset: Dataset, i: int) -> int | None:
    """The label id of item i, without rendering / loading images where the dataset has ``label(i)``."""
    if isinstance(dataset, Subset):
        return dataset_label(dataset.dataset, dataset.indices[i])
    if hasattr(dataset, "label"):
        return dataset.label(i)
    return dataset[i].get("label")


def _label_names(model: nn.Module) -> tuple[str, ...]:
    names = getattr(model, "labels", None)
    if getattr(model, "task", None) not in PAIR_TASKS or not names:
        raise TypeError(
            f"pair-task evaluation needs an NLVR / VE model (build_model(config, 'nlvr' | 've')), got a "
            f"{getattr(model, 'task', type(model).__name__)!r} model"
        )
    return tuple(names)


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
    from mplug_fast.data.collate import build_collate

    names = _label_names(model)
    collator = build_collate(model.task, tokenizer, max_length=max_length)

    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:  # the collator consumes the sentences
        return {
            **collator(samples),
            "sentence": [s["sentence"] for s in samples],
            "type": [s.get("type") for s in samples],
        }

    C = len(names)
    confusion = torch.zeros(C, C, dtype=torch.long)
    preds, rows = [], []
    by_type: dict[str, list[int]] = {}  # statement type -> [right, labelled]
    with eval_mode(model):
        for batch in batches(dataset, collate, batch_size, device):
            probs = model(batch["images"], batch["text_ids"], batch["text_mask"]).float().softmax(-1).cpu()
            pred = probs.argmax(-1)  # [B]
            gold = batch["labels"].cpu() if "labels" in batch else None
            if gold is not None:
                confusion += torch.bincount(gold * C + pred, minlength=C * C).view(C, C)
            pred_list, gold_list = pred.tolist(), None if gold is None else gold.tolist()
            image_ids = batch.get("image_id", [None] * len(pred))
            for b in range(len(pred)):
                kind = batch["type"][b]
                if kind is not None and gold_list is not None:
                    tally = by_type.setdefault(kind, [0, 0])
                    tally[0] += int(pred_list[b] == gold_list[b])
                    tally[1] += 1
                rows.append(
                    {
                        "index": len(rows),
                        "image_id": image_ids[b],
                        "sentence": batch["sentence"][b],
                        "prediction": names[pred_list[b]],
                        "label": None if gold_list is None else names[gold_list[b]],
                        "probs": [round(p, 6) for p in probs[b].tolist()],
                    }
                )
            preds.append(pred)
    labelled = int(confusion.sum())
    per_class = confusion.sum(1)
    result: dict[str, Any] = {
        "accuracy": 100.0 * int(confusion.trace()) / labelled if labelled else None,
        **{
            f"acc_{name}": 100.0 * int(confusion[c, c]) / int(per_class[c]) if per_class[c] else None
            for c, name in enumerate(names)
        },
        **{f"acc_type_{kind}": 100.0 * right / n for kind, (right, n) in sorted(by_type.items())},
        "confusion": confusion.tolist(),
        "count": len(rows),
        "num_labelled": labelled,
    }
    if output is not None:
        write_json(rows, output)
    result["predictions"] = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
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


# ---- task specs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairTaskSpec(TaskSpec):
    """A `TaskSpec` whose official-format readers are those of ``data.official_pairs`` (the synthetic
    datasets come through ``tasks.base.synthetic_dataset`` like every task's)."""

    def official_dataset(self, split: str = "train", **kwargs: Any) -> Dataset:
        from mplug_fast.data.official_pairs import official_pair_dataset

        return official_pair_dataset(self.name, split, **kwargs)


VE_SPEC = PairTaskSpec(
    name="ve", metric="accuracy", evaluate=evaluate, baseline=baseline, predictions_file="ve_result.json"
)
NLVR_SPEC = PairTaskSpec(
    name="nlvr", metric="accuracy", evaluate=evaluate, baseline=baseline, predictions_file="nlvr_result.json"
)

"""Caption SCST as a task: the CIDEr-D-optimised continuation of a CE-finetuned caption model (spec §5.3).

Training uses ``SCSTObjective`` (``mplug_fast.objectives.scst``) on one sample per training image with all of
its gold captions (the synthetic ``CaptionDataset`` / ``KarpathyCaptionDataset`` per-image form, collated by
``CaptionCollator``, which passes them on as ``captions``). Everything else is the captioning task's: the
evaluation (beam 5, min 8, max 25; BLEU, ROUGE-L, CIDEr-D), the metric (CIDEr), the most-frequent-caption
baseline, the datasets given to evaluation and baseline, and the predictions file.

The model is ``MPlugForSCST``, the caption model under the task name "scst" (identical weights: a
``save_pretrained`` caption model loads with ``from_pretrained(dir, task="scst")``, and back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from mplug_fast.tasks import caption as caption_task
from mplug_fast.tasks.base import TaskSpec, official_dataset, synthetic_dataset


@dataclass(frozen=True)
class CaptionDataTaskSpec(TaskSpec):
    """A `TaskSpec` whose evaluation and baseline datasets are those of the captioning task."""

    def synthetic_dataset(self, split: str = "train", **world: Any) -> Dataset:
        return synthetic_dataset("caption", split, **world)

    def official_dataset(self, split: str = "train", **kwargs: Any) -> Dataset:
        return official_dataset("caption", split, **kwargs)


SPEC = CaptionDataTaskSpec(
    name="scst",
    metric="CIDEr",
    evaluate=caption_task.evaluate,
    baseline=caption_task.baseline,
    eval_options={"beam_size": 5, "min_length": 8, "max_length": 25},  # official caption inference
    predictions_file="caption_result.json",  # COCO result format
)

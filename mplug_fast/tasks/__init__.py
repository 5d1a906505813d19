"""Downstream tasks end to end: per task an ``evaluate`` function (inference + metrics + predictions JSON) and
a `TaskSpec` (objective options, dataset builders, headline metric and its model-free baseline).

    TASKS["vqa" | "caption" | "retrieval" | "grounding"] -> TaskSpec
    get_task(name) -> TaskSpec

The CLI (``mplug-fast finetune`` / ``mplug-fast evaluate``) is ``mplug_fast.tasks.cli``.
"""

from __future__ import annotations

from mplug_fast.tasks import caption, grounding, pairs, retrieval, scst, video, vqa
from mplug_fast.tasks.base import Baseline, TaskSpec, official_dataset, synthetic_dataset

TASKS: dict[str, TaskSpec] = {
    "vqa": TaskSpec(
        name="vqa",
        metric="vqa_acc",
        evaluate=vqa.evaluate,
        baseline=vqa.baseline,
        eval_options={"method": "generate", "beam_size": 5, "max_answer_length": 10},
        predictions_file="vqa_result.json",  # EvalAI format
    ),
    "caption": TaskSpec(
        name="caption",
        metric="CIDEr",
        evaluate=caption.evaluate,
        baseline=caption.baseline,
        eval_options={"beam_size": 5, "min_length": 8, "max_length": 25},
        predictions_file="caption_result.json",  # COCO result format
    ),
    "scst": scst.SPEC,  # caption SCST (CIDEr-D reward): the caption evaluation, baseline and data
    "retrieval": TaskSpec(
        name="retrieval",
        metric="r_mean",
        evaluate=retrieval.evaluate,
        baseline=retrieval.baseline,
        eval_options={"k": 256},
        predictions_file="retrieval_top10.json",
    ),
    "grounding": TaskSpec(
        name="grounding",
        metric="acc@0.5",
        evaluate=grounding.evaluate,
        baseline=grounding.baseline,
        predictions_file="grounding_result.json",
    ),
    "nlvr": pairs.NLVR_SPEC,  # NLVR2: statement over an image pair, True / False (accuracy)
    "ve": pairs.VE_SPEC,  # SNLI-VE: entailment / neutral / contradiction (accuracy)
    **video.SPECS,  # zero-shot video_qa / video_caption / video_retrieval (evaluate only, image checkpoints)
}


def get_task(name: str) -> TaskSpec:
    """The `TaskSpec` of ``name``; a ValueError lists the available tasks."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "Baseline", "TaskSpec", "get_task", "official_dataset", "synthetic_dataset"]

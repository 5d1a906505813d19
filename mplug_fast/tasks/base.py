"""What every downstream task shares: the `TaskSpec` record and the evaluation plumbing.

A `TaskSpec` names a task's model/objective, its dataset builders (synthetic world and official formats),
its `evaluate(model, dataset, tokenizer, *, batch_size, device, ...) -> dict` function, the headline metric
and a `baseline(train_dataset, eval_dataset) -> Baseline` (a model-free reference: majority answer, chance
recall, constant box, most frequent caption) so reports can say "above baseline".
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

OFFICIAL_READERS = {
    "caption": "KarpathyCaptionDataset",
    "vqa": "VQAJsonDataset",
    "retrieval": "RetrievalJsonDataset",
    "grounding": "RefCocoDataset",
}


@dataclass(frozen=True)
class Baseline:
    """A model-free reference value of a task's headline metric, and how it was obtained."""

    metric: str
    value: float
    description: str


@dataclass(frozen=True)
class TaskSpec:
    """One downstream task.

    Attributes:
        name: the task (also the `build_model` task and the `build_objective` name).
        metric: the headline metric key of `evaluate`'s result (higher is better).
        evaluate: ``evaluate(model, dataset, tokenizer, *, batch_size, device, output=None, **options)``.
        baseline: ``baseline(train_dataset, eval_dataset) -> Baseline``.
        objective_options: defaults for ``build_objective(name, model, tokenizer, **options)``.
        eval_options: defaults of the task's evaluate options (overridable per call).
        eval_split: the split given to the synthetic / official builders for evaluation.
        predictions_file: the name of the predictions JSON `evaluate` writes under a run directory.
    """

    name: str
    metric: str
    evaluate: Callable[..., dict[str, Any]]
    baseline: Callable[[Dataset, Dataset], Baseline]
    objective_options: Mapping[str, Any] = field(default_factory=dict)
    eval_options: Mapping[str, Any] = field(default_factory=dict)
    eval_split: str = "test"
    predictions_file: str = "predictions.json"

    def synthetic_dataset(self, split: str = "train", **world: Any) -> Dataset:
        """The synthetic-world dataset of this task (see `synthetic_dataset`)."""
        return synthetic_dataset(self.name, split, **world)

    def official_dataset(self, split: str = "train", **kwargs: Any) -> Dataset:
        """The official-format reader of this task (see `official_dataset`)."""
        return official_dataset(self.name, split, **kwargs)


def synthetic_dataset(
    task: str,
    split: str = "train",
    *,
    image_size: int = 64,
    num_scenes: int = 20000,
    eval_scenes: int = 500,
    min_objects: int = 1,
    max_objects: int = 4,
    seed: int = 0,
    object_scale: float = 1.0,
    vqa_types: list[str] | None = None,
    pair_types: list[str] | None = None,
    ve_labels: list[str] | None = None,
) -> Dataset:
    """The synthetic dataset of ``task`` (also the trainer's, for ``data.source: synthetic``): split "train"
    reads scenes 0..num_scenes-1, any other split the held-out scenes num_scenes..num_scenes+eval_scenes-1
    (captioning: the "test" form, all gold captions per image; SCST: that form for both splits). The keyword
    arguments are those of the run config's ``data.synthetic`` section."""
    from mplug_fast.data import synthetic as syn

    world = syn.SyntheticWorld(
        image_size=image_size,
        max_objects=max_objects,
        min_objects=min_objects,
        seed=seed,
        object_scale=object_scale,
    )
    n, start = (num_scenes, 0) if split == "train" else (eval_scenes, num_scenes)
    if task == "pretrain":
        return syn.PretrainDataset(world, n, start)
    if task == "scst":  # one item per scene with all its captions (the SCST references), both splits
        return syn.CaptionDataset(world, n, start, split="test")
    if task == "vqa":
        return syn.VQADataset(world, n, start, types=tuple(vqa_types or syn.QA_TYPES))
    if task == "caption":
        return syn.CaptionDataset(world, n, start, split="train" if split == "train" else "test")
    if task == "retrieval":
        return syn.RetrievalDataset(world, n, start)
    if task == "grounding":
        return syn.GroundingDataset(world, n, start)
    if task in ("nlvr", "ve"):  # classification: data/synthetic/pairs.py
        from mplug_fast.data.synthetic.pairs import pair_dataset

        options: dict[str, Any] = {} if pair_types is None else {"types": tuple(pair_types)}
        if ve_labels is not None:
            if task != "ve":
                raise ValueError("data.synthetic.ve_labels applies to task 've' only")
            options["labels"] = tuple(ve_labels)
        return pair_dataset(task, world, n, start, **options)
    if task.startswith("video_"):  # zero-shot video: moving-shapes videos of the same world
        from mplug_fast.data.synthetic.video import synthetic_video_dataset

        return synthetic_video_dataset(
            task,
            split,
            image_size=image_size,
            num_scenes=num_scenes,
            eval_scenes=eval_scenes,
            min_objects=min_objects,
            max_objects=max_objects,
            seed=seed,
            vqa_types=vqa_types,
            object_scale=object_scale,
        )
    raise ValueError(f"no synthetic dataset for task {task!r}; available: {sorted(OFFICIAL_READERS)}")


def official_dataset(task: str, split: str = "train", **kwargs: Any) -> Dataset:
    """The official-format reader of ``task`` (``mplug_fast.data.official``) for ``split``; ``kwargs`` are the
    reader's arguments (``ann``, ``image_root``, ``image_size``, ... ; grounding: ``split_file``)."""
    from mplug_fast.data import official

    if task.startswith("video_"):  # evaluate-only zero-shot video readers (MSRVTT-QA, MSRVTT, VATEX)
        from mplug_fast.data.official_video import OFFICIAL_VIDEO_READERS

        if task not in OFFICIAL_VIDEO_READERS:
            raise ValueError(f"no official-format reader for task {task!r}")
        try:
            return OFFICIAL_VIDEO_READERS[task](**{**kwargs, "split": split})
        except TypeError as e:
            raise ValueError(f"the official {task} options do not fit its reader ({e})") from e
    if task not in OFFICIAL_READERS:
        raise ValueError(
            f"no official-format reader for task {task!r}; available: {sorted(OFFICIAL_READERS)}"
        )
    reader = getattr(official, OFFICIAL_READERS[task])
    kwargs = dict(kwargs)
    if task == "grounding":
        kwargs.setdefault("train", split == "train")
    else:
        kwargs["split"] = split
    try:
        return reader(**kwargs)
    except TypeError as e:
        raise ValueError(f"the official {task} options do not fit {reader.__name__} ({e})") from e


# ---- evaluation plumbing ------------------------------------------------------------------------------


def limit_dataset(dataset: Dataset, limit: int | None) -> Dataset:
    """The first ``limit`` items of ``dataset`` (all when None)."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return Subset(dataset, range(limit))


def batches(
    dataset: Dataset, collate_fn: Callable[[list], dict], batch_size: int, device: torch.device | str
) -> Iterator[dict[str, Any]]:
    """The dataset in order, collated, with tensors on ``device``."""
    from mplug_fast.data.collate import move_to

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    for batch in loader:
        yield move_to(batch, device, non_blocking=False)


class eval_mode:
    """``with eval_mode(model):`` — model.eval() inside, the previous train/eval mode restored after."""

    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Writes ``obj`` as JSON to ``path`` atomically (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def item_text(dataset: Dataset, i: int, key: str) -> Any:
    """``dataset[i][key]`` without rendering / loading the image where the dataset allows it (synthetic VQA,
    caption and retrieval; official VQA and caption). ``gt_answers``: the human answers of a VQA sample."""
    ann = getattr(dataset, "ann", None)
    if key in ("answers", "gt_answers") and isinstance(ann, list) and hasattr(dataset, "question_text"):
        answer = ann[i].get("answer")  # official VQAJsonDataset: the raw human answers
        if answer is not None:
            return [answer] if isinstance(answer, str) else list(answer)
    gold, items = getattr(dataset, "gold", None), getattr(dataset, "_items", None)
    if key in ("caption", "captions") and gold is not None and items is not None:  # KarpathyCaptionDataset
        k, c = items[i]
        if key == "captions":
            return list(gold[k])
        if c >= 0:
            return dataset.prompt + gold[k][c]
    if key in ("question", "answers", "gt_answers") and hasattr(dataset, "question"):
        _, qa = dataset.question(i)
        return qa.question if key == "question" else [qa.answer]
    per_scene = getattr(dataset, "captions_per_scene", None)
    if key in ("caption", "captions") and per_scene is not None and hasattr(dataset, "_scene"):
        if getattr(dataset, "split", "train") == "test":  # synthetic CaptionDataset, test form
            return dataset._scene(i).captions
        if hasattr(dataset, "texts"):  # synthetic RetrievalDataset
            return dataset.texts[i]
        return dataset._scene(i // per_scene).captions[i % per_scene]  # CaptionDataset, train form
    if key == "gt_answers":
        sample = dataset[i]
        return sample.get("gt_answers", sample["answers"])
    return dataset[i][key]

"""The evaluation plumbing every task's `evaluate` shares: ordered device batches (with a progress bar on a
terminal), eval mode, dataset limits, reading an item's text without rendering its image."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from mplug_fast.data.collate import move_to

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
    """The dataset in order, collated, with tensors on ``device``; a tqdm bar over the batches when stderr is
    a terminal (``disable=None``: nothing is written to a log or a pipe)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    for batch in tqdm(loader, desc="evaluate", dynamic_ncols=True, leave=False, disable=None):
        yield move_to(batch, device, non_blocking=False)


def with_columns(collate_fn: Callable[[list], dict], *keys: str) -> Callable[[list], dict]:
    """``collate_fn`` whose batches also carry the samples' raw ``keys`` (a list each, None where absent):
    the texts a collator consumes, for the predictions file."""
    return lambda samples: {**collate_fn(samples), **{k: [s.get(k) for s in samples] for k in keys}}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``with eval_mode(model):`` — model.eval() inside, the previous train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


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

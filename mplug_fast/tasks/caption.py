"""Captioning evaluation: beam-search captions (official beam 5, min 8, max 25) scored with BLEU-1..4,
ROUGE-L and CIDEr-D (``mplug_fast.metrics.caption_scores``, PTB-style tokenisation); predictions written in
the COCO result format ``[{"image_id", "caption"}]``."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from mplug_fast.tasks.base import Baseline, batches, eval_mode, item_text, write_json


def _gold_captions(sample_captions: Any) -> list[str]:
    if isinstance(sample_captions, str) or not sample_captions:
        raise ValueError(f"caption evaluation needs 'captions' (a non-empty list), got {sample_captions!r}")
    return list(sample_captions)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    tokenizer: Any,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    prompt: str = "",
    method: str = "beam",
    beam_size: int = 5,
    max_length: int = 25,
    min_length: int = 8,
    use_java: bool = False,
    output: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Caption metrics of ``model`` (a caption model) on ``dataset`` (test-form samples: ``image``,
    ``captions`` = all gold captions, ``image_id``).

    Returns:
        {"BLEU_1".."BLEU_4", "ROUGE_L", "CIDEr" (fractions, as pycocoevalcap), "count", "notes",
         "predictions": {image_id: caption}}.
    """
    from mplug_fast.data.collate import CaptionCollator
    from mplug_fast.inference import caption_generate
    from mplug_fast.inference.inputs import left_padded_prompts
    from mplug_fast.metrics import caption_scores

    prompt_ids = prompt_mask = None
    if prompt.strip():
        prompt_ids, prompt_mask = left_padded_prompts(tokenizer, [prompt], max_length)
    start = 1 if prompt_ids is None else prompt_ids.shape[1]
    collate = CaptionCollator(tokenizer, max_length=max_length)
    predictions: dict[Any, str] = {}
    gold: dict[Any, list[str]] = {}
    with eval_mode(model):
        for batch in batches(dataset, collate, batch_size, device):
            if "captions" not in batch:
                raise ValueError(
                    "caption evaluation needs test-form samples with 'captions' (all gold captions); "
                    f"got keys {sorted(batch)} (use the test split)"
                )
            B = batch["images"].shape[0]
            p_ids = None if prompt_ids is None else prompt_ids.expand(B, -1).to(device)
            p_mask = None if prompt_mask is None else prompt_mask.expand(B, -1).to(device)
            out = caption_generate(
                model,
                batch["images"],
                p_ids,
                p_mask,
                method=method,
                beam_size=beam_size,
                max_length=max_length,
                min_length=min_length,
            )
            for i in range(B):
                image_id = batch["image_id"][i]
                if image_id in predictions:
                    raise ValueError(f"duplicate image_id {image_id!r} in the caption evaluation set")
                text = tokenizer.decode(out.ids[i, 0, start:].tolist(), skip_special_tokens=True)
                predictions[image_id] = text.strip()
                gold[image_id] = _gold_captions(batch["captions"][i])
    scores, notes = caption_scores(gold, {k: [v] for k, v in predictions.items()}, use_java=use_java)
    if output is not None:
        write_json([{"image_id": k, "caption": v} for k, v in predictions.items()], output)
    return {**scores, "count": len(predictions), "notes": notes, "predictions": predictions}


def most_frequent_caption(train: Dataset, limit: int = 2000) -> str:
    """The most frequent (lower-cased) caption of up to ``limit`` training samples (ties: first seen)."""
    texts = getattr(train, "texts", None)
    if texts is None:
        texts = [item_text(train, i, "caption") for i in range(min(limit, len(train)))]
    counts = Counter(t.lower().strip() for t in texts[:limit])
    if not counts:
        raise ValueError("the training set has no captions")
    return counts.most_common(1)[0][0]


def baseline(train: Dataset, evaluation: Dataset, limit: int = 2000) -> Baseline:
    """CIDEr-D of answering every evaluation image with the most frequent training caption."""
    from mplug_fast.metrics import caption_scores

    caption = most_frequent_caption(train, limit)
    gold = {i: _gold_captions(item_text(evaluation, i, "captions")) for i in range(len(evaluation))}
    scores, _ = caption_scores(gold, {i: [caption] for i in gold})
    return Baseline(
        "CIDEr", scores["CIDEr"], f"the most frequent training caption {caption!r} for every image"
    )

"""Captioning: the decoder over the raw image tokens (the official caption model's text encoder and fusion
are dead weights).

Training: `CaptionObjective`, token-mean CE (fidelity §5.2). Evaluation: beam-search captions (official
beam 5, min 8, max 25) scored with BLEU-1..4, ROUGE-L and CIDEr-D (``mplug_fast.metrics.caption_scores``,
PTB-style tokenisation); predictions written in the COCO result format ``[{"image_id", "caption"}]``.
Data: the synthetic ``CaptionDataset`` or the official ``KarpathyCaptionDataset`` (train form: one sample
per caption; test form: one per image with all its captions); batches from ``CaptionCollator``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mplug_fast.data.collate import CaptionCollator
from mplug_fast.data.official import KarpathyCaptionDataset
from mplug_fast.data.synthetic import CaptionDataset
from mplug_fast.inference.generate import caption_generate
from mplug_fast.inference.inputs import prompt_ids
from mplug_fast.io import atomic_write_json
from mplug_fast.metrics import caption_scores
from mplug_fast.modeling import MPlugForCaption
from mplug_fast.objectives.base import Objective
from mplug_fast.objectives.losses import lm_loss
from mplug_fast.objectives.pretrain import require_keys
from mplug_fast.tasks.evaluation import batches, eval_mode, item_text
from mplug_fast.tasks.protocol import Baseline, Task
from mplug_fast.tasks.sources import synthetic_scenes


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

    collate = CaptionCollator(tokenizer, max_length=max_length)
    options = dict(method=method, beam_size=beam_size, max_length=max_length, min_length=min_length)
    with eval_mode(model):
        return caption_evaluation(
            batches(dataset, collate, batch_size, device),
            tokenizer,
            lambda batch, prompt: caption_generate(model, batch["images"], prompt, **options),
            prompt,
            max_length,
            device,
            use_java=use_java,
            output=output,
        )


def caption_evaluation(
    batches: Iterable[dict[str, Any]],
    tokenizer: Any,
    generate: Callable[[dict[str, Any], Tensor], Any],
    prompt: str,
    max_length: int,
    device: torch.device | str,
    *,
    id_key: str = "image_id",
    use_java: bool = False,
    output: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Captions and scores the items of test-form batches (``captions``: all gold captions of each item;
    ids: ``batch[id_key]``, else the running index). ``generate(batch, prompt)`` -> the batch's
    `GenerationOutput` (``prompt``: ids [B, Lp] of "[CLS] prompt", [CLS] alone for none); the prompt's
    tokens are cut from the generated text. ``output``: the COCO-style result JSON ``[{id_key, "caption"}]``.

    Returns: {"BLEU_1".."BLEU_4", "ROUGE_L", "CIDEr", "count", "notes", "predictions": {id: caption}}."""
    start_ids = prompt_ids(tokenizer, prompt, max_length)  # [1, Lp]: "[CLS] prompt"
    predictions: dict[Any, str] = {}
    gold: dict[Any, list[str]] = {}
    for batch in batches:
        if "captions" not in batch:
            raise ValueError(
                "caption evaluation needs test-form samples with 'captions' (all gold captions); "
                f"got keys {sorted(batch)} (use the test split)"
            )
        B = len(batch["captions"])
        out = generate(batch, start_ids.expand(B, -1).to(device))
        for i, key in enumerate(batch.get(id_key, range(len(predictions), len(predictions) + B))):
            if key in predictions:
                raise ValueError(f"duplicate {id_key} {key!r} in the caption evaluation set")
            text = tokenizer.decode(out.ids[i, 0, start_ids.shape[1] :].tolist(), skip_special_tokens=True)
            predictions[key], gold[key] = text.strip(), _gold_captions(batch["captions"][i])
    scores, notes = caption_scores(gold, {k: [v] for k, v in predictions.items()}, use_java=use_java)
    if output is not None:
        atomic_write_json(output, [{id_key: k, "caption": v} for k, v in predictions.items()])
    return {**scores, "count": len(predictions), "notes": notes, "predictions": predictions}


def baseline(train: Dataset, evaluation: Dataset, limit: int = 2000) -> Baseline:
    """CIDEr-D of answering every evaluation image with the most frequent (lower-cased) caption of up to
    ``limit`` training samples (ties: first seen)."""
    texts = getattr(train, "texts", None)
    if texts is None:  # one caption per item (train form), or all captions of an image (test form)
        texts = []
        for i in range(min(limit, len(train))):
            text = item_text(train, i, "caption")
            texts.extend([text] if isinstance(text, str) else text)
    counts = Counter(t.lower().strip() for t in texts[:limit])
    if not counts:
        raise ValueError("the training set has no captions")
    caption = counts.most_common(1)[0][0]
    gold = {i: _gold_captions(item_text(evaluation, i, "captions")) for i in range(len(evaluation))}
    scores, _ = caption_scores(gold, {i: [caption] for i in gold})
    return Baseline(
        "CIDEr", scores["CIDEr"], f"the most frequent training caption {caption!r} for every image"
    )


# ---- training --------------------------------------------------------------------------------------------


class CaptionObjective(Objective):
    """Captioning CE (docs/fidelity.md §5.2): decoder over the image tokens, token-mean CE of caption_ids[1:].

    Official: no label smoothing, no distillation, and the prompt tokens are part of the target (labels are
    the ids with only padding ignored) — the defaults here. Options: `label_smoothing` (> 0 to smooth) and
    `prompt_length` (number of target tokens after [CLS] excluded from the loss, as BLIP does).
    """

    def __init__(self, model: nn.Module, *, label_smoothing: float = 0.0, prompt_length: int = 0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0 or prompt_length < 0:
            raise ValueError(
                "need 0 <= label_smoothing < 1 and prompt_length >= 0, "
                f"got {label_smoothing}, {prompt_length}"
            )
        self.model, self.label_smoothing, self.prompt_length = model, label_smoothing, prompt_length

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """batch: images [B,3,R,R], caption_ids / caption_mask [B, L]. Returns {"loss", "caption"}."""
        require_keys(batch, ("images", "caption_ids", "caption_mask"), "CaptionObjective")
        ids, mask = batch["caption_ids"], batch["caption_mask"].bool()
        logits = self.model(batch["images"], ids, mask)
        loss = lm_loss(
            logits, ids, mask, label_smoothing=self.label_smoothing, ignore_prefix=self.prompt_length
        )
        return {"loss": loss, "caption": loss.detach()}


# ---- the task --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionOptions:
    """`CaptionObjective` options (official: no label smoothing, the prompt is part of the target)."""

    label_smoothing: float = 0.0
    prompt_length: int = 0


class CaptionTask(Task):
    name = "caption"
    metric = "CIDEr"
    model_class = MPlugForCaption
    collator = CaptionCollator
    reader = KarpathyCaptionDataset
    objective_class = CaptionObjective
    Options = CaptionOptions
    eval_options = {"beam_size": 5, "min_length": 8, "max_length": 25}  # official caption inference
    predictions_file = "caption_result.json"  # COCO result format
    text_length = 25  # official caption length (docs/fidelity.md §6)
    pipeline_method = "caption"
    aliases = ("captioning",)
    evaluate = staticmethod(evaluate)
    baseline = staticmethod(baseline)

    def synthetic_dataset(self, split: str = "train", **world: Any) -> Dataset:
        s = synthetic_scenes(split, **world)
        return CaptionDataset(s.world, s.count, s.start, split="train" if split == "train" else "test")

"""Collators of the classification tasks.

    VECollator    {"images" [B,3,R,R], "text_ids" [B,L] long, "text_mask" [B,L] bool, "labels" [B] long}
    NLVRCollator  {"images" [B,2,3,R,R] (left, right), "text_ids", "text_mask", "labels" [B] long}

Samples (synthetic ``VEDataset`` / ``NLVRDataset`` or the official readers of ``data.official_pairs``):
VE ``image`` [3,R,R], ``sentence``, ``label`` (int); NLVR ``images`` [2,3,R,R], ``sentence``, ``label``.
A batch where no sample has a ``label`` (unlabelled test data) has no ``labels``; the rest of each sample
(``label_name``, ``type``, ``image_id``, ...) passes through as lists. Sentences are truncated to
``max_length`` tokens (40: ALBEF / BLIP clean them to <= 30 words and tokenize without truncation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mplug_fast.data.collate import Batch, PretrainCollator, Sample
from mplug_fast.data.tokenizer import Tokenizer

DEFAULT_MAX_LENGTH = 40


def _labels(samples: Sequence[Sample], who: str) -> Tensor | None:
    have = [("label" in s and s["label"] is not None) for s in samples]
    if not any(have):
        return None
    if not all(have):
        raise ValueError(f"{who}: some samples have a 'label' and some do not")
    try:
        return torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{who}: 'label' must be an int class id per sample ({e})") from None


class _PairCollator(PretrainCollator):
    """Shared: sentence encoding, optional labels; subclasses say how the images stack."""

    text_key = "sentence"

    def __init__(self, tokenizer: Tokenizer | None = None, max_length: int | None = DEFAULT_MAX_LENGTH):
        super().__init__(tokenizer, max_length)

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        batch = super().__call__(samples)
        labels = _labels(samples, type(self).__name__)
        return batch if labels is None else {**batch, "labels": labels}


class VECollator(_PairCollator):
    """Visual entailment samples -> one image [3, R, R] and one hypothesis per row."""

    consumed = frozenset({"image", "sentence", "label"})


class NLVRCollator(_PairCollator):
    """NLVR samples -> an image pair [2, 3, R, R] (left, right) and one statement per row."""

    image_key, image_shape = "images", "[2, 3, R, R]"
    consumed = frozenset({"images", "sentence", "label"})

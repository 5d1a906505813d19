"""Dataset sample dicts -> the shared model batches (the batch protocol; all masks bool, True = real token).

    pretrain   {"images" [B,3,R,R], "text_ids" [B,L] long, "text_mask" [B,L] bool}
    vqa        {"images", "question_ids" [B,Lq], "question_mask",
                "answer_ids" [N,La] ([CLS] answer [SEP] [SEP]), "answer_mask" [N,La],
                "answer_index" [N] long (the question of each answer), "answer_weights" [N] float}
    caption    {"images", "caption_ids" [B,L], "caption_mask" [B,L]}  (prompt included in the ids)
    retrieval  {"images", "text_ids", "text_mask", "image_ids" [B] long}
    grounding  {"images", "text_ids", "text_mask", "boxes" [B,4] float normalised cx, cy, w, h}

Lengths follow the official code (docs/fidelity.md §6): questions truncated to 25 tokens, answers untruncated,
captions 25, retrieval 30, grounding 20 (padded to exactly 20), pretraining captions 30. Each collator also
passes through the sample's metadata (``image_id``, ``question_id``, ``answers``, ``captions``, ``type``,
...) as lists under their own names, so evaluation can read them; the protocol keys win on a clash.

Samples come from the synthetic datasets (``mplug_fast.data.synthetic``) or the official-format readers: a
pretraining / caption / retrieval sample has ``image`` and ``caption`` (caption test samples: ``captions``),
VQA ``image``, ``question``, ``answers``, ``weights``, grounding ``image``, ``expression``, ``box``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mplug_fast.data.tokenizer import Tokenizer

Sample = dict[str, Any]
Batch = dict[str, Any]


def check_samples(samples: Sequence[Sample], required: Sequence[str], who: str) -> None:
    if not samples:
        raise ValueError(f"{who} got an empty batch")
    for i, s in enumerate(samples):
        missing = [k for k in required if k not in s]
        if missing:
            raise KeyError(f"{who}: sample {i} lacks {missing}; it has {sorted(s)}")


def stack_tensors(
    samples: Sequence[Sample],
    key: str,
    shape: str,
    who: str,
    hint: str = "apply a transform",
    share: str = "a shape",
) -> Tensor:
    """[B, *shape] from each sample's ``key``: a tensor of ``shape`` (e.g. "[2, 3, R, R]": as many dims, the
    numbers exact), the same for the whole batch; otherwise a one-line error naming ``hint`` as the fix."""
    dims = [d.strip() for d in shape.strip("[]").split(",")]
    values = [s[key] for s in samples]

    def fits(v: Any) -> bool:
        return (
            isinstance(v, Tensor)
            and v.dim() == len(dims)
            and all(not d.isdigit() or n == int(d) for d, n in zip(dims, v.shape))
        )

    if not all(fits(v) for v in values):
        got = sorted({str(list(v.shape)) if isinstance(v, Tensor) else type(v).__name__ for v in values})
        raise TypeError(f"{who}: every sample's {key!r} must be a {shape} tensor ({hint}); got {got}")
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) != 1:
        raise ValueError(f"{who}: the {key!r} tensors of one batch must share {share}, got {sorted(shapes)}")
    return torch.stack(values)


def metadata(samples: Sequence[Sample], skip: set[str]) -> Batch:
    """Every other key of the samples, as a list (keys missing from some samples are dropped)."""
    keys = [k for k in samples[0] if k not in skip and all(k in s for s in samples)]
    return {k: [s[k] for s in samples] for k in keys}


class _Collator(abc.ABC):
    """Shared plumbing: the tokenizer and the text encoding with bool masks."""

    consumed: frozenset[str] = frozenset({"image"})

    def __init__(self, tokenizer: Tokenizer | None = None):
        self.tokenizer = Tokenizer() if tokenizer is None else tokenizer

    def _encode(
        self, texts: list[str], max_length: int | None, *, pad_to_max: bool = False
    ) -> tuple[Tensor, Tensor]:
        """ids long [B, L] and mask bool [B, L]; truncated to ``max_length`` when given."""
        enc = self.tokenizer(
            texts,
            padding="max_length" if pad_to_max else "longest",
            max_length=max_length,
            truncation=max_length is not None,
        )
        return enc.input_ids, enc.attention_mask.bool()

    @abc.abstractmethod
    def __call__(self, samples: Sequence[Sample]) -> Batch:
        """Samples -> the task's batch dict."""

    def _with_metadata(self, samples: Sequence[Sample], batch: Batch) -> Batch:
        meta = metadata(samples, set(self.consumed) | set(batch))
        return {**meta, **batch}


class PretrainCollator(_Collator):
    """Image-caption pairs -> {"images", "text_ids", "text_mask"} (captions truncated to ``max_length``).

    The base of the other one-image-one-text collators, which read other keys (``image_key``, ``text_key``),
    stack images of another ``image_shape`` or pad the texts to exactly ``max_length`` (``pad_to_max``).
    """

    consumed = frozenset({"image", "caption"})
    image_key, image_shape, text_key, pad_to_max = "image", "[3, R, R]", "caption", False

    def __init__(self, tokenizer: Tokenizer | None = None, max_length: int | None = 30):
        super().__init__(tokenizer)
        self.max_length = max_length

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        check_samples(samples, (self.image_key, self.text_key), type(self).__name__)
        texts = [s[self.text_key] for s in samples]
        ids, mask = self._encode(texts, self.max_length, pad_to_max=self.pad_to_max)
        return self._with_metadata(
            samples,
            {
                "images": stack_tensors(samples, self.image_key, self.image_shape, type(self).__name__),
                "text_ids": ids,
                "text_mask": mask,
            },
        )


class VQACollator(_Collator):
    """VQA samples -> questions [B, Lq] and the flattened answers [N, La] of all questions.

    Each answer is encoded as ``answer + "[SEP]"`` (``[CLS] answer [SEP] [SEP]``: official decoder target),
    ``answer_index[n]`` is the question of answer n and ``answer_weights[n]`` its weight (1.0 when a sample
    has no ``weights``).
    """

    consumed = frozenset({"image", "question", "answers", "weights"})

    def __init__(self, tokenizer: Tokenizer | None = None, max_question_length: int | None = 25):
        super().__init__(tokenizer)
        self.max_question_length = max_question_length

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        check_samples(samples, ("image", "question", "answers"), type(self).__name__)
        q_ids, q_mask = self._encode([s["question"] for s in samples], self.max_question_length)
        answers: list[str] = []
        weights: list[float] = []
        index: list[int] = []
        for i, s in enumerate(samples):
            ans = [s["answers"]] if isinstance(s["answers"], str) else list(s["answers"])
            if not ans:
                raise ValueError(f"VQACollator: sample {i} has no answers")
            w = s.get("weights")
            w = [1.0] * len(ans) if w is None else [float(x) for x in w]
            if len(w) != len(ans):
                raise ValueError(f"VQACollator: sample {i} has {len(ans)} answers but {len(w)} weights")
            answers += ans
            weights += w
            index += [i] * len(ans)
        a_ids, a_mask = self._encode([a + "[SEP]" for a in answers], None)
        batch = {
            "images": stack_tensors(samples, "image", "[3, R, R]", type(self).__name__),
            "question_ids": q_ids,
            "question_mask": q_mask,
            "answer_ids": a_ids,
            "answer_mask": a_mask,
            "answer_index": torch.tensor(index, dtype=torch.long),
            "answer_weights": torch.tensor(weights, dtype=torch.float32),
        }
        meta = self._with_metadata(samples, batch)
        meta["answers"] = [s["answers"] for s in samples]  # raw gold answers per question, for evaluation
        return meta


class CaptionCollator(_Collator):
    """Caption samples -> ``prompt + caption + "[SEP]"`` ids [B, L] (truncated to ``max_length``).

    Test samples (``captions``: all gold captions, no ``caption``) give only the images and the metadata.
    """

    consumed = frozenset({"image", "caption"})

    def __init__(self, tokenizer: Tokenizer | None = None, max_length: int = 25, prompt: str = ""):
        super().__init__(tokenizer)
        self.max_length, self.prompt = max_length, prompt

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        check_samples(samples, ("image",), type(self).__name__)
        batch: Batch = {"images": stack_tensors(samples, "image", "[3, R, R]", type(self).__name__)}
        if all("caption" in s for s in samples):
            texts = [self.prompt + s["caption"].lower() + "[SEP]" for s in samples]
            batch["caption_ids"], batch["caption_mask"] = self._encode(texts, self.max_length)
        elif any("caption" in s for s in samples):
            raise ValueError("CaptionCollator: some samples have a 'caption' and some do not")
        return self._with_metadata(samples, batch)


class RetrievalCollator(PretrainCollator):
    """Image-text pairs -> {"images", "text_ids", "text_mask", "image_ids"} (``image_id`` must be an int)."""

    consumed = frozenset({"image", "caption", "image_id"})

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        check_samples(samples, ("image", "caption", "image_id"), type(self).__name__)
        try:
            image_ids = torch.tensor([int(s["image_id"]) for s in samples], dtype=torch.long)
        except (TypeError, ValueError) as e:
            raise TypeError(f"RetrievalCollator: image_id must be an int per sample ({e})") from None
        return {**super().__call__(samples), "image_ids": image_ids}


class GroundingCollator(PretrainCollator):
    """Referring expressions -> text [B, max_length] (padded to exactly ``max_length``) and boxes [B, 4]."""

    consumed = frozenset({"image", "expression", "box"})
    text_key, pad_to_max = "expression", True

    def __init__(self, tokenizer: Tokenizer | None = None, max_length: int = 20):
        super().__init__(tokenizer, max_length)

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        check_samples(samples, ("image", "expression", "box"), type(self).__name__)
        boxes = torch.stack([torch.as_tensor(s["box"], dtype=torch.float32).reshape(4) for s in samples])
        return {**super().__call__(samples), "boxes": boxes}


def move_to(batch: Batch, device: torch.device | str, non_blocking: bool = True) -> Batch:
    """The batch with its tensors on ``device`` (everything else unchanged)."""
    return {
        k: v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v for k, v in batch.items()
    }

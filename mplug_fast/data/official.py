"""Readers for the official mPLUG annotation formats (docs/fidelity.md §8) as ``torch.utils.data.Dataset``s:
pretraining (``PretrainJsonDataset``), COCO Karpathy captioning (``KarpathyCaptionDataset``) and VQA
(``VQAJsonDataset``) here, retrieval, grounding, NLVR2 / SNLI-VE and video in the ``official_*`` modules. Each
yields the same sample dicts as the synthetic datasets (``mplug_fast.data.synthetic``), so the collators,
trainers and evaluators take either.

Text: ``pre_caption`` / ``pre_question`` are the official cleaners (ALBEF lineage): lower-case, delete the
characters , . ' ! ? " ( ) * # : ; ~, turn - and / into spaces (pre_caption also maps "<person>" to "person",
collapses repeated whitespace and strips), then keep at most ``max_words`` space-separated words. Pretraining
and retrieval captions go through ``pre_caption`` (30 words), questions through ``pre_question`` (30 words);
caption-finetuning targets are only lower-cased (docs/fidelity.md §5.2), like the official code.

Images: ``image_root`` / relative path (absolute paths are used as they are), loaded with
``mplug_fast.data.transforms.load_image`` and transformed by ``transform`` (default: the official
``train_transform`` for training splits, ``test_transform`` otherwise). A missing or unreadable image (one
over PIL's decompression-bomb limit included) is recorded, warned about once, and its sample is replaced by
the next sample (index + 1, + 2, ...) whose image loads -- deterministic, so every epoch and every worker
make the same substitution. When the recorded bad images exceed ``max_bad_fraction`` of the dataset's
distinct images, loading raises ``RuntimeError`` naming them. ``check_images()`` scans every file up
front. (With DataLoader workers each worker keeps its own record.)

Annotations: read and type-checked with ``mplug_fast.data.annotations``; a bad file or record raises
``AnnotationError`` naming the file, the record within it and the field.
"""

from __future__ import annotations

import abc
import random
import re
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from mplug_fast.data.annotations import (
    LIST,
    TEXT,
    TEXT_OR_TEXTS,
    AnnotationError,
    AnnotationSource,
    PathLike,
    Record,
    field,
    load_annotations,
)
from mplug_fast.data.transforms import load_image, test_transform, train_transform

Transform = Callable[[Image.Image], Tensor]

DEFAULT_MAX_WORDS = 30  # official max_words (captions) and max_ques_words (questions)
DEFAULT_MAX_BAD_FRACTION = 0.01
KARPATHY_FOLDERS = {"train2014": "train2014_img", "val2014": "val2014_img"}  # mPLUG's COCO folder names
VG_ANSWER_WEIGHT = 0.5  # official weight of the single answer of VG / GQA questions

_STRIP_CHARS = re.compile(r"[,.'!?\"()*#:;~]")


# ---- text --------------------------------------------------------------------------------------------------


def pre_caption(caption: str, max_words: int = DEFAULT_MAX_WORDS) -> str:
    """The official caption cleaner (see the module docstring); keeps at most ``max_words`` words."""
    text = (
        _STRIP_CHARS.sub("", caption.lower())
        .replace("-", " ")
        .replace("/", " ")
        .replace("<person>", "person")
    )
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def pre_question(question: str, max_words: int = DEFAULT_MAX_WORDS) -> str:
    """The official question cleaner: like ``pre_caption`` but without whitespace collapsing, only a right
    strip of spaces (so doubled spaces survive and count as empty words for the truncation, as officially)."""
    text = _STRIP_CHARS.sub("", question.lower()).replace("-", " ").replace("/", " ").rstrip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def vqa_answer_weights(answers: Sequence[str]) -> tuple[list[str], list[float]]:
    """Unique answers (first-seen order) and their weights count / len(answers) (official VQA v2 weights)."""
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"expected a non-empty list of answers, got {answers!r}")
    weights: dict[str, float] = {}
    for a in answers:
        weights[a] = weights.get(a, 0.0) + 1.0 / len(answers)
    return list(weights), list(weights.values())


# ---- robust image loading ----------------------------------------------------------------------------------


class ImageDataset(Dataset, abc.ABC):
    """Plumbing shared by the readers: image paths per item, robust loading with substitution.

    Subclasses set ``self._paths`` (one resolved path per item; items with several images also override
    ``_item_paths``) and implement ``_sample(i, *images)``. ``split`` is "train", "val" or "test"; ``scale``
    is the crop scale of the default training transform.
    """

    _paths: list[Path]

    def __init__(
        self,
        image_root: PathLike | None,
        max_bad_fraction: float,
        split: str = "train",
        image_size: int = 384,
        transform: Transform | None = None,
        scale: tuple[float, float] = (0.5, 1.0),
    ):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if split not in ("train", "val", "test"):
            raise ValueError(f"split={split!r} is not supported. Available: 'train', 'val', 'test'")
        if transform is None:
            train = split == "train"
            transform = train_transform(image_size, scale=scale) if train else test_transform(image_size)
        self.split, self.transform = split, transform
        self.image_root = None if image_root is None else Path(image_root)
        self.max_bad_fraction = max_bad_fraction
        self.bad_images: dict[str, str] = {}  # path -> reason
        self.num_replaced = 0

    def _resolve(self, rel: str, root: Path | None = None) -> Path:
        p = Path(rel)
        root = self.image_root if root is None else root
        return p if p.is_absolute() or root is None else root / p

    def __len__(self) -> int:
        return len(self._paths)

    def _item_paths(self, i: int) -> tuple[Path, ...]:
        """The images of item ``i``, in the order ``_sample`` takes them."""
        return (self._paths[i],)

    def _distinct_paths(self) -> list[Path]:
        return list(dict.fromkeys(p for i in range(len(self)) for p in self._item_paths(i)))

    @cached_property
    def num_distinct_images(self) -> int:  # the paths are fixed once the subclass has set them
        return len(self._distinct_paths())

    def _mark_bad(self, path: Path, reason: str) -> None:
        key = str(path)
        if key in self.bad_images:
            return
        self.bad_images[key] = reason
        warnings.warn(
            f"{type(self).__name__}: skipping image {key!r} ({reason}); {len(self.bad_images)} bad so far",
            RuntimeWarning,
            stacklevel=3,
        )
        limit = self.max_bad_fraction * self.num_distinct_images
        if len(self.bad_images) > limit:
            listed = "\n  ".join(f"{p}: {r}" for p, r in list(self.bad_images.items())[:20])
            more = "" if len(self.bad_images) <= 20 else f"\n  ... and {len(self.bad_images) - 20} more"
            raise RuntimeError(
                f"{type(self).__name__}: {len(self.bad_images)} of {self.num_distinct_images} images are "
                f"missing or unreadable, more than max_bad_fraction={self.max_bad_fraction} allows "
                f"(check image_root={str(self.image_root)!r}):\n  {listed}{more}"
            )

    def _try_load(self, path: Path) -> Image.Image | None:
        if str(path) in self.bad_images:
            return None
        try:
            return load_image(path)
        except (FileNotFoundError, IsADirectoryError, ValueError, OSError) as e:
            self._mark_bad(path, f"{type(e).__name__}: {e}")
            return None

    def _check_index(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length {len(self)}")
        return i % len(self)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._check_index(i)
        n = len(self)
        for k in range(n):
            j = (i + k) % n
            images = []
            for path in self._item_paths(j):
                image = self._try_load(path)
                if image is None:
                    break
                images.append(image)
            else:
                self.num_replaced += k > 0
                return self._sample(j, *images)
        raise RuntimeError(f"{type(self).__name__}: no item has loadable images ({len(self.bad_images)} bad)")

    @abc.abstractmethod
    def _sample(self, i: int, *images: Image.Image) -> dict[str, Any]:
        """Item `i` as a sample dict, given its loaded image(s)."""

    def check_images(self, decode: bool = False) -> list[str]:
        """Scans every distinct image (existence; full decoding with ``decode=True``), records and warns
        about bad ones (raising past ``max_bad_fraction``) and returns their paths."""
        for p in self._distinct_paths():
            if decode:
                self._try_load(p)
            elif not p.is_file():
                self._mark_bad(p, "FileNotFoundError: no such file")
        return list(self.bad_images)


class AnnotatedImageDataset(ImageDataset):
    """The constructor shared by the retrieval and sentence-pair readers: one annotation list
    (``self.ann``) whose texts are cut to ``max_words``; a subclass reads ``self.ann`` in ``_read``."""

    def __init__(
        self,
        ann: AnnotationSource,
        image_root: PathLike | None = None,
        split: str = "train",
        image_size: int = 384,
        transform: Transform | None = None,
        max_words: int = DEFAULT_MAX_WORDS,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    ):
        super().__init__(image_root, max_bad_fraction, split, image_size, transform)
        self.ann = load_annotations(ann)
        self.max_words = max_words
        self._read()

    @abc.abstractmethod
    def _read(self) -> None: ...


def first_seen_ids(paths: Sequence[Path]) -> list[int]:
    """The image id of each path: the distinct paths numbered 0, 1, ... in first-seen order."""
    ids = {p: k for k, p in enumerate(dict.fromkeys(paths))}
    return [ids[p] for p in paths]


def gallery(
    items: Iterable[tuple[Hashable, Any, list[str]]],
) -> tuple[list[Any], list[str], list[int], list[list[int]]]:
    """A retrieval gallery from (key, media, texts) triples, the distinct keys numbered 0, 1, ... in
    first-seen order: (the media of each key (as first seen), all texts, txt2media, media2txt)."""
    media: list[Any] = []
    texts: list[str] = []
    txt2media: list[int] = []
    media2txt: list[list[int]] = []
    index: dict[Hashable, int] = {}
    for key, value, captions in items:
        k = index.setdefault(key, len(media))
        if k == len(media):
            media.append(value)
            media2txt.append([])
        media2txt[k] += range(len(texts), len(texts) + len(captions))
        txt2media += [k] * len(captions)
        texts += captions
    return media, texts, txt2media, media2txt


def _sentence(record: Record, sentence: Any) -> str:
    """One of mPLUG's ``sentences``: {"raw": text} or the text itself."""
    raw = sentence.get("raw") if isinstance(sentence, Mapping) else sentence
    if not isinstance(raw, str):
        raise AnnotationError(f'{record.origin}: field "sentences" must hold strings or {{"raw": string}}')
    return raw


# ---- pretraining -------------------------------------------------------------------------------------------


class PretrainJsonDataset(ImageDataset):
    """Pretraining image-text list (the ALBEF/mPLUG ``pretrain_dataset``): [{"image", "caption"}].

    A list of captions yields one per item, drawn from ``random.Random(f"{seed}:{epoch}:{index}")``
    (``set_epoch`` changes the draw). ``image_id`` is the item index. Default transform: the official
    pre-training ``train_transform(image_size, scale=(0.2, 1.0))``.
    """

    def __init__(
        self,
        ann: AnnotationSource,
        image_root: PathLike | None = None,
        image_size: int = 256,
        transform: Transform | None = None,
        max_words: int = DEFAULT_MAX_WORDS,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
        seed: int = 0,
    ):
        super().__init__(image_root, max_bad_fraction, "train", image_size, transform, scale=(0.2, 1.0))
        self.ann = load_annotations(ann)
        for e in self.ann:
            field(e, "caption", TEXT_OR_TEXTS)
        self._paths = [self._resolve(field(e, "image", TEXT)) for e in self.ann]
        self.max_words, self.seed, self.epoch = max_words, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _sample(self, i: int, image: Image.Image) -> dict[str, Any]:
        caption = self.ann[i]["caption"]
        if isinstance(caption, list):
            caption = random.Random(f"{self.seed}:{self.epoch}:{i}").choice(caption)
        return {
            "image": self.transform(image),
            "caption": pre_caption(caption, self.max_words),
            "image_id": i,
        }


# ---- captioning --------------------------------------------------------------------------------------------


class KarpathyCaptionDataset(ImageDataset):
    """COCO Karpathy captioning (``split`` "train": one item per sentence; "test"/"val": one per image).

    Accepts mPLUG's entries {"filename", "filepath", "sentences": [{"raw"}]} (image at
    ``image_root / folder_map.get(filepath, filepath) / filename``), ALBEF/BLIP's {"image", "caption"} and
    Karpathy's dataset_coco.json (filter with ``karpathy_splits``, e.g. ("train", "restval")).
    Captions are lower-cased (and stripped) as the official caption code does; ``prompt`` is prepended to
    training captions (official COCO: ""). Samples: image, caption (train) or captions (all gold), image_id
    (the entry's cocoid / image_id when it is an int, else the position of the image).
    """

    def __init__(
        self,
        ann: AnnotationSource,
        image_root: PathLike | None = None,
        split: str = "train",
        image_size: int = 384,
        transform: Transform | None = None,
        prompt: str = "",
        folder_map: Mapping[str, str] = KARPATHY_FOLDERS,
        karpathy_splits: Sequence[str] | None = None,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    ):
        super().__init__(image_root, max_bad_fraction, split, image_size, transform)
        entries = load_annotations(ann)
        if karpathy_splits is not None:
            entries = [e for e in entries if e.get("split") in set(karpathy_splits)]
        self.prompt = prompt
        self.images: list[Path] = []
        self.image_ids: list[int] = []
        self.gold: list[list[str]] = []
        for k, e in enumerate(entries):
            if "sentences" in e:
                folder = field(e, "filepath", TEXT, "")
                path = self._resolve(str(Path(folder_map.get(folder, folder)) / field(e, "filename", TEXT)))
                caps = [_sentence(e, s) for s in field(e, "sentences", LIST)]
                if not caps:
                    raise AnnotationError(f'{e.origin}: field "sentences" is empty')
            else:
                path = self._resolve(field(e, "image", TEXT))
                caps = field(e, "caption", TEXT_OR_TEXTS)
                caps = [caps] if isinstance(caps, str) else caps
            image_id = next(
                (e[key] for key in ("cocoid", "image_id", "id") if isinstance(e.get(key), int)), k
            )
            self.images.append(path)
            self.image_ids.append(image_id)
            self.gold.append([c.lower().strip() for c in caps])
        if split == "train":
            self._items = [(k, c) for k, caps in enumerate(self.gold) for c in range(len(caps))]
        else:
            self._items = [(k, -1) for k in range(len(self.images))]
        self._paths = [self.images[k] for k, _ in self._items]

    def _sample(self, i: int, image: Image.Image) -> dict[str, Any]:
        k, c = self._items[i]
        x = self.transform(image)
        if c < 0:
            return {"image": x, "captions": list(self.gold[k]), "image_id": self.image_ids[k]}
        return {"image": x, "caption": self.prompt + self.gold[k][c], "image_id": self.image_ids[k]}


# ---- VQA ---------------------------------------------------------------------------------------------------


class VQAJsonDataset(ImageDataset):
    """VQA v2 / VG / GQA questions in the official JSON format.

    Args:
        ann: annotation list(s). Entries: ``dataset`` ("vqa" default, "vg", "gqa"), ``image``, ``question``,
            ``answer`` (list of the 10 human answers for vqa, a string for vg/gqa; absent on test),
            ``question_id`` (test/val), optional ``ocr`` ([[pos, token], ...]) and ``object_label`` ("a&&b").
        image_root: root of "vqa" images; ``roots`` maps other dataset names ("vg", "gqa") to their roots.
        split: "train" (answers required: weights count/10 for vqa, 0.5 for vg/gqa) or "test"/"val".
        add_ocr / add_object: append " [SEP] " + cleaned OCR tokens (<= 30 words) / object labels to the
            question (the released VQA scripts use both).

    Samples: image, question, answers, weights, question_id, image_id (the index of the image path),
    and on non-train splits with answers also gt_answers (the raw list, for ``vqa_score``).
    """

    def __init__(
        self,
        ann: AnnotationSource,
        image_root: PathLike | None = None,
        split: str = "train",
        roots: Mapping[str, PathLike] | None = None,
        image_size: int = 384,
        transform: Transform | None = None,
        max_question_words: int = DEFAULT_MAX_WORDS,
        add_ocr: bool = False,
        add_object: bool = False,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    ):
        super().__init__(image_root, max_bad_fraction, split, image_size, transform)
        self.ann = load_annotations(ann)
        self.max_question_words = max_question_words
        self.add_ocr, self.add_object = add_ocr, add_object
        roots_p = {k: Path(v) for k, v in (roots or {}).items()}
        self._paths = []
        for e in self.ann:
            field(e, "question", TEXT)
            if split == "train" or "answer" in e:
                field(e, "answer", TEXT_OR_TEXTS)
            field(e, "ocr", LIST, None)
            field(e, "object_label", TEXT, None)
            name = field(e, "dataset", TEXT, "vqa")
            if name != "vqa" and name not in roots_p:
                raise AnnotationError(f"{e.origin} is from dataset {name!r}; pass roots={{{name!r}: ...}}")
            self._paths.append(self._resolve(field(e, "image", TEXT), roots_p.get(name)))
        self._image_ids = first_seen_ids(self._paths)

    def question_text(self, i: int) -> str:
        e = self.ann[i]
        q = pre_question(e["question"], self.max_question_words)
        if self.add_ocr and e.get("ocr"):
            tokens = " ".join(str(t[1]) if isinstance(t, (list, tuple)) else str(t) for t in e["ocr"])
            q = q + " [SEP] " + pre_question(tokens, DEFAULT_MAX_WORDS)
        if self.add_object and e.get("object_label"):
            q = q + " [SEP] " + " ".join(e["object_label"].split("&&"))
        return q

    def _sample(self, i: int, image: Image.Image) -> dict[str, Any]:
        e = self.ann[i]
        out: dict[str, Any] = {"image": self.transform(image), "question": self.question_text(i)}
        if "answer" in e:
            if isinstance(e["answer"], str):
                out["answers"], out["weights"] = [e["answer"]], [VG_ANSWER_WEIGHT]
            else:
                out["answers"], out["weights"] = vqa_answer_weights(e["answer"])
                if self.split != "train":
                    out["gt_answers"] = list(e["answer"])
        out["question_id"] = e.get("question_id", i)
        out["image_id"] = self._image_ids[i]
        return out

"""Readers for the NLVR2 and SNLI-VE annotation files of the ALBEF / BLIP releases
(``nlvr_{train,dev,test}.json``, ``ve_{train,dev,test}.json``), the files the mPLUG code base's (unused)
NLVR / VE dataset classes read (docs/fidelity.md §8). Same sample dicts as the synthetic ``VEDataset`` /
``NLVRDataset``:

    NLVR2JsonDataset  [{"images": [left, right], "sentence", "label": "True" | "False"}]
                        -> images [2, 3, R, R], sentence, label (1 = True, 0 = False), label_name, image_id
    SNLIVEJsonDataset [{"image", "sentence", "label": "entailment" | "neutral" | "contradiction"}]
                        -> image [3, R, R], sentence, label (0 contradiction, 1 neutral, 2 entailment),
                           label_name, image_id

Files: anything ``mplug_fast.data.annotations.load_annotations`` reads. Labels: strings as above
(case-insensitive), also bools / ints (already ids); an entry without ``label`` is unlabelled (test data
without answers). Sentences go through the official ``pre_caption`` (lower case, punctuation removed, <= 30
words), as in ALBEF / BLIP.

Images: ``image_root`` / path. SNLI-VE ``image`` is a Flickr30k id in the ALBEF files ("2248275918"): a
name without a suffix gets ``image_ext`` (".jpg"), as ALBEF's ``'%s.jpg' % ann['image']``. NLVR2 paths are
relative to ``image_root`` ("dev/dev-850-0-img0.png" style). Loading, the missing-image policy and the default
transforms are those of ``mplug_fast.data.official``; an NLVR item needs both its images.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mplug_fast.data.annotations import (
    TEXT,
    TEXT_OR_INT,
    TEXTS,
    AnnotationError,
    AnnotationSource,
    PathLike,
    Record,
    field,
)
from mplug_fast.data.official import (
    DEFAULT_MAX_BAD_FRACTION,
    DEFAULT_MAX_WORDS,
    AnnotatedImageDataset,
    Transform,
    first_seen_ids,
    pre_caption,
)

VE_LABELS: tuple[str, ...] = ("contradiction", "neutral", "entailment")  # = modeling.pairs.VE_LABELS
NLVR_LABELS: tuple[str, ...] = ("False", "True")


def parse_label(value: Any, names: Sequence[str], where: str) -> int:
    """A label string (case-insensitive), bool or int id -> the id in ``names``; AnnotationError otherwise."""
    if isinstance(value, bool) and len(names) == 2:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    if isinstance(value, str):
        lowered = [n.lower() for n in names]
        if value.strip().lower() in lowered:
            return lowered.index(value.strip().lower())
    raise AnnotationError(
        f"{where}: label {value!r} is not one of {list(names)} (or an id 0..{len(names) - 1})"
    )


class _LabelledPairs(AnnotatedImageDataset):
    """Shared by both readers: the annotations, the split, the sentences and the labels; a subclass sets
    ``_paths`` (and what else its ``_sample`` needs) in ``_read_images``."""

    label_names: tuple[str, ...]

    def _read(self) -> None:
        self._labels: list[int | None] = [self._parse(e) for e in self.ann]
        self._read_images()

    @abc.abstractmethod
    def _read_images(self) -> None: ...

    def _parse(self, e: Record) -> int | None:
        field(e, "sentence", TEXT)
        label = e.get("label")
        if label is None and self.split == "train":
            raise AnnotationError(f"{e.origin} (train split) has no 'label'")
        return None if label is None else parse_label(label, self.label_names, e.origin)

    def label(self, i: int) -> int | None:
        """The label id of item i (None: unlabelled), without loading the image(s)."""
        return self._labels[self._check_index(i)]

    def _text_and_label(self, i: int) -> dict[str, Any]:
        out: dict[str, Any] = {"sentence": pre_caption(self.ann[i]["sentence"], self.max_words)}
        if self._labels[i] is not None:
            out["label"], out["label_name"] = self._labels[i], self.label_names[self._labels[i]]
        return out


class SNLIVEJsonDataset(_LabelledPairs):
    """SNLI-VE (ALBEF / BLIP ``ve_*.json``): one item per (image, hypothesis)."""

    label_names = VE_LABELS

    def __init__(
        self,
        ann: AnnotationSource,
        image_root: PathLike | None = None,
        split: str = "train",
        image_size: int = 384,
        transform: Transform | None = None,
        max_words: int = DEFAULT_MAX_WORDS,
        image_ext: str = ".jpg",
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    ):
        self.image_ext = image_ext
        super().__init__(ann, image_root, split, image_size, transform, max_words, max_bad_fraction)

    def _read_images(self) -> None:
        names = [str(field(e, "image", TEXT_OR_INT)) for e in self.ann]
        self._paths = [self._resolve(n if Path(n).suffix else n + self.image_ext) for n in names]
        self._image_ids = first_seen_ids(self._paths)

    def _sample(self, i: int, image: Image.Image) -> dict[str, Any]:
        return {"image": self.transform(image), **self._text_and_label(i), "image_id": self._image_ids[i]}


class NLVR2JsonDataset(_LabelledPairs):
    """NLVR2 (ALBEF / BLIP ``nlvr_*.json``): one item per (left image, right image, statement)."""

    label_names = NLVR_LABELS

    def _read_images(self) -> None:
        self._paths, self._right_paths = [], []
        for e in self.ann:
            images = field(e, "images", TEXTS)
            if len(images) != 2:
                raise AnnotationError(
                    f'{e.origin}: field "images" must be a list [left, right], got {images!r}'
                )
            self._paths.append(self._resolve(images[0]))
            self._right_paths.append(self._resolve(images[1]))
        ids = first_seen_ids(self._paths + self._right_paths)  # left images first
        self._image_ids = list(zip(ids[: len(self._paths)], ids[len(self._paths) :], strict=True))

    def _item_paths(self, i: int) -> tuple[Path, ...]:
        return self._paths[i], self._right_paths[i]

    def _sample(self, i: int, left: Image.Image, right: Image.Image) -> dict[str, Any]:
        return {
            "images": torch.stack([self.transform(left), self.transform(right)]),  # [2, 3, R, R]
            **self._text_and_label(i),
            "image_id": self._image_ids[i][0],
            "right_image_id": self._image_ids[i][1],
            "identifier": self.ann[i].get("identifier", i),
        }

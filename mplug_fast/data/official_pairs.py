"""Readers for the NLVR2 and SNLI-VE annotation files of the ALBEF / BLIP releases
(``nlvr_{train,dev,test}.json``, ``ve_{train,dev,test}.json``), the files the mPLUG code base's (unused)
NLVR / VE dataset classes read (docs/fidelity.md §8). Same sample dicts as the synthetic ``VEDataset`` /
``NLVRDataset``:

    NLVR2JsonDataset  [{"images": [left, right], "sentence", "label": "True" | "False"}]
                        -> images [2, 3, R, R], sentence, label (1 = True, 0 = False), label_name, image_id
    SNLIVEJsonDataset [{"image", "sentence", "label": "entailment" | "neutral" | "contradiction"}]
                        -> image [3, R, R], sentence, label (0 contradiction, 1 neutral, 2 entailment),
                           label_name, image_id

Files: a JSON list, several of them (concatenated), JSON lines (one object per line, e.g. ``.jsonl``) or an
in-memory list. Labels: strings as above (case-insensitive), also bools / ints (already ids); an entry
without ``label`` is unlabelled (test data without answers). Sentences go through the official
``pre_caption`` (lower case, punctuation removed, <= 30 words), as in ALBEF / BLIP.

Images: ``image_root`` / path. SNLI-VE ``image`` is a Flickr30k id in the ALBEF files ("2248275918"): a
name without a suffix gets ``image_ext`` (".jpg"), as ALBEF's ``'%s.jpg' % ann['image']``. NLVR2 paths are
relative to ``image_root`` ("dev/dev-850-0-img0.png" style). Missing or unreadable images follow the policy of
``mplug_fast.data.official`` (warn once, substitute the next item whose images load, raise past
``max_bad_fraction``); an NLVR item needs both its images. Default transforms: the official fine-tuning
``train_transform`` (scale (0.5, 1.0), horizontal flip, RandAugment, as ALBEF / BLIP) for split "train",
``test_transform`` otherwise; pass ``transform`` to change it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mplug_fast.data.official import (
    DEFAULT_MAX_BAD_FRACTION,
    DEFAULT_MAX_WORDS,
    ImageDataset,
    PathLike,
    Transform,
    default_transform,
    pre_caption,
    require_fields,
)

VE_LABELS: tuple[str, ...] = ("contradiction", "neutral", "entailment")  # = modeling.pairs.VE_LABELS
NLVR_LABELS: tuple[str, ...] = ("False", "True")


def load_annotations(
    ann: PathLike | Sequence[PathLike] | Sequence[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """Entries from a JSON list file, a JSON-lines file, several files (concatenated) or an in-memory list."""
    if isinstance(ann, (str, Path)):
        paths: list[PathLike] = [ann]
    elif len(ann) > 0 and isinstance(ann[0], Mapping):
        return [dict(a) for a in ann]  # type: ignore[arg-type]
    else:
        paths = list(ann)  # type: ignore[arg-type]
    out: list[dict[str, Any]] = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"annotation file {str(p)!r} does not exist")
        text = p.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if data is None or isinstance(data, dict):  # JSON lines (a one-line file parses as one dict)
            data = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        data.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(
                            f"{str(p)!r} line {n} is neither a JSON list nor JSON lines: {e}"
                        ) from e
        if not isinstance(data, list) or not all(isinstance(e, Mapping) for e in data):
            raise ValueError(f"annotation file {str(p)!r} must hold a JSON list of objects or JSON lines")
        out.extend(dict(e) for e in data)
    return out


def parse_label(value: Any, names: Sequence[str], where: str) -> int:
    """A label string (case-insensitive), bool or int id -> the id in ``names``; ValueError otherwise."""
    if isinstance(value, bool) and len(names) == 2:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    if isinstance(value, str):
        lowered = [n.lower() for n in names]
        if value.strip().lower() in lowered:
            return lowered.index(value.strip().lower())
    raise ValueError(f"{where}: label {value!r} is not one of {list(names)} (or an id 0..{len(names) - 1})")


class SNLIVEJsonDataset(ImageDataset):
    """SNLI-VE (ALBEF / BLIP ``ve_*.json``): one item per (image, hypothesis)."""

    label_names = VE_LABELS

    def __init__(
        self,
        ann: PathLike | Sequence[PathLike] | Sequence[Mapping[str, Any]],
        image_root: PathLike | None = None,
        split: str = "train",
        image_size: int = 384,
        transform: Transform | None = None,
        max_words: int = DEFAULT_MAX_WORDS,
        image_ext: str = ".jpg",
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    ):
        super().__init__(image_root, max_bad_fraction)
        if split not in ("train", "val", "test"):
            raise ValueError(f"split={split!r} is not supported. Available: 'train', 'val', 'test'")
        self.ann = load_annotations(ann)
        self.split, self.max_words = split, max_words
        self._labels: list[int | None] = []
        self._paths = []
        for i, e in enumerate(self.ann):
            require_fields(e, ("image", "sentence"), "SNLI-VE annotation", i)
            name = str(e["image"])
            self._paths.append(self._resolve(name if Path(name).suffix else name + image_ext))
            label = e.get("label")
            self._labels.append(
                None if label is None else parse_label(label, VE_LABELS, f"SNLI-VE entry {i}")
            )
        if split == "train" and None in self._labels:
            raise ValueError(f"SNLI-VE train entry {self._labels.index(None)} has no 'label'")
        ids = {p: k for k, p in enumerate(dict.fromkeys(self._paths))}
        self._image_ids = [ids[p] for p in self._paths]
        self.transform = default_transform(transform, split == "train", image_size, (0.5, 1.0))

    def label(self, i: int) -> int | None:
        """The label id of item i (None: unlabelled), without loading the image."""
        return self._labels[self._check_index(i)]

    def _sample(self, i: int, image: Image.Image) -> dict[str, Any]:
        out: dict[str, Any] = {
            "image": self.transform(image),
            "sentence": pre_caption(self.ann[i]["sentence"], self.max_words),
        }
        if self._labels[i] is not None:
            out["label"], out["label_name"] = self._labels[i], VE_LABELS[self._labels[i]]
        out["image_id"] = self._image_ids[i]
        return out


class NLVR2JsonDataset(ImageDataset):
    """NLVR2 (ALBEF / BLIP ``nlvr_*.json``): one item per (left image, right image, statement)."""

    label_names = NLVR_LABELS

    def __init__(
        self,
        ann: PathLike | Sequence[PathLike] | Sequence[Mapping[str, Any]],
        image_root: PathLike | None = None,
        split: str = "train",
        image_size: int = 384,
        transform: Transform | None = None,
        max_words: int = DEFAULT_MAX_WORDS,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    ):
        super().__init__(image_root, max_bad_fraction)
        if split not in ("train", "val", "test"):
            raise ValueError(f"split={split!r} is not supported. Available: 'train', 'val', 'test'")
        self.ann = load_annotations(ann)
        self.split, self.max_words = split, max_words
        self._paths, self._right_paths = [], []
        self._labels: list[int | None] = []
        for i, e in enumerate(self.ann):
            require_fields(e, ("images", "sentence"), "NLVR2 annotation", i)
            images = e["images"]
            if isinstance(images, str) or len(images) != 2:
                raise ValueError(f"NLVR2 entry {i}: 'images' must be a list [left, right], got {images!r}")
            self._paths.append(self._resolve(str(images[0])))
            self._right_paths.append(self._resolve(str(images[1])))
            label = e.get("label")
            self._labels.append(
                None if label is None else parse_label(label, NLVR_LABELS, f"NLVR2 entry {i}")
            )
        if split == "train" and None in self._labels:
            raise ValueError(f"NLVR2 train entry {self._labels.index(None)} has no 'label'")
        ids = {p: k for k, p in enumerate(dict.fromkeys(self._paths + self._right_paths))}
        self._image_ids = [(ids[a], ids[b]) for a, b in zip(self._paths, self._right_paths, strict=True)]
        self.transform = default_transform(transform, split == "train", image_size, (0.5, 1.0))

    @property
    def num_distinct_images(self) -> int:
        return len(set(self._paths) | set(self._right_paths))

    def label(self, i: int) -> int | None:
        """The label id of item i (1 = True; None: unlabelled), without loading the images."""
        return self._labels[self._check_index(i)]

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._check_index(i)
        n = len(self)
        for k in range(n):
            j = (i + k) % n
            left = self._try_load(self._paths[j])
            right = self._try_load(self._right_paths[j]) if left is not None else None
            if left is not None and right is not None:
                self.num_replaced += k > 0
                return self._pair_sample(j, left, right)
        raise RuntimeError(
            f"{type(self).__name__}: no item has two loadable images ({len(self.bad_images)} bad)"
        )

    def _sample(self, i: int, image: Image.Image) -> dict[str, Any]:
        raise TypeError("NLVR2JsonDataset items need two images: use dataset[i]")

    def _pair_sample(self, i: int, left: Image.Image, right: Image.Image) -> dict[str, Any]:
        out: dict[str, Any] = {
            "images": torch.stack([self.transform(left), self.transform(right)]),  # [2, 3, R, R]
            "sentence": pre_caption(self.ann[i]["sentence"], self.max_words),
        }
        if self._labels[i] is not None:
            out["label"], out["label_name"] = self._labels[i], NLVR_LABELS[self._labels[i]]
        out["image_id"], out["right_image_id"] = self._image_ids[i]
        out["identifier"] = self.ann[i].get("identifier", i)
        return out

    def check_images(self, decode: bool = False) -> list[str]:
        """Scans every distinct image of both sides (see ``ImageDataset.check_images``)."""
        for p in dict.fromkeys(self._paths + self._right_paths):
            if decode:
                self._try_load(p)
            elif not p.is_file():
                self._mark_bad(p, "FileNotFoundError: no such file")
        return list(self.bad_images)

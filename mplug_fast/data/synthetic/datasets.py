"""``torch.utils.data.Dataset`` views of a ``SyntheticWorld`` for each task, plus baselines.

Every dataset reads scenes ``start, start + 1, ...`` of its world (give train/val/test disjoint ``start``
ranges) and renders them on access; items are dicts whose image is ``transform(scene.image())``, by default
``test_transform(world.image_size)`` (CLIP-normalised float32 [3, R, R]). Which caption / question /
expression an index gets is drawn from the world's per-scene RNG, so items are deterministic.

    PretrainDataset    image, caption, image_id                      (ITC/ITM/MLM/PrefixLM pairs)
    CaptionDataset     train: image, caption, image_id  (one item per (scene, caption))
                       test:  image, captions (all gold), image_id  (one item per scene)
    VQADataset         image, question, answers, weights, type, question_id, image_id
    RetrievalDataset   image, caption, image_id  (pairs), plus texts / txt2img / img2txt for evaluation
    GroundingDataset   image, expression, box (cx, cy, w, h) in [0, 1], box_xyxy (pixels), box_bins
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from mplug_fast.data.synthetic.world import QA, QA_TYPES, Scene, SyntheticWorld
from mplug_fast.data.transforms import test_transform

GROUNDING_NUM_BINS = 336  # official image_res for the coordinate bins (docs/fidelity.md §5.5): bins 0..336


def box_to_bins(box_cxcywh: Sequence[float] | Tensor, num_bins: int = GROUNDING_NUM_BINS) -> Tensor:
    """Normalised (cx, cy, w, h) -> long [4] bins floor(clamp(t, 0, 1) * num_bins) in 0..num_bins.

    The official coordinate token of bin b is ``[unused{340 + b}]`` (``Tokenizer.unused_token_id(340 + b)``),
    after the prefix ``[unused339]``.
    """
    t = torch.as_tensor(box_cxcywh, dtype=torch.float64)
    return torch.floor(t.clamp(0, 1) * num_bins).long()


def check_subset(given: Sequence[str], valid: Sequence[str], what: str) -> tuple[str, ...]:
    """``given`` as a tuple, after checking it is a non-empty subset of ``valid`` without repeats."""
    given = tuple(given)
    unknown = [g for g in given if g not in valid]
    if unknown or not given or len(set(given)) != len(given):
        raise ValueError(
            f"{what} must be a non-empty subset of {list(valid)} without repeats, got {list(given)}"
        )
    return given


class _SceneDataset(Dataset):
    """Shared plumbing: a world, a scene range and an image transform."""

    media_key, id_key = "image", "image_id"  # the sample keys of the rendered scene and of its index

    def __init__(
        self,
        world: SyntheticWorld,
        num_scenes: int,
        start: int = 0,
        transform: Callable[[Image.Image], Tensor] | None = None,
    ):
        if num_scenes < 1 or start < 0:
            raise ValueError(
                f"need num_scenes >= 1 and start >= 0, got num_scenes={num_scenes}, start={start}"
            )
        self.world, self.num_scenes, self.start = world, num_scenes, start
        self.transform = self._default_transform() if transform is None else transform

    def _default_transform(self) -> Callable[[Any], Tensor]:
        return test_transform(self.world.image_size)

    def _scene(self, k: int) -> Scene:
        """Scene k of this dataset (0 <= k < num_scenes)."""
        return self.world.scene(self.start + k)

    def _scene_graph(self, k: int) -> Scene:
        """Scene k's objects and image without its texts (``SyntheticWorld.scene(texts=False)``)."""
        return self.world.scene(self.start + k, texts=False)

    def _media(self, scene: Scene) -> Tensor:
        """The transformed picture of a scene: float32 [3, R, R] (videos: [T, 3, R, R])."""
        return self.transform(scene.image())

    def _check(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length {len(self)}")
        return i % len(self)

    def __len__(self) -> int:
        return self.num_scenes


class PretrainDataset(_SceneDataset):
    """Image-caption pairs: item k is scene ``start + k`` with one of its captions."""

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = self._check(i)
        scene = self._scene(k)
        caption = self.world.rng(scene.index, "pretrain").choice(scene.captions)
        return {"image": self.transform(scene.image()), "caption": caption, "image_id": scene.index}


class CaptionDataset(_SceneDataset):
    """Captioning. ``split="train"``: one item per (scene, caption), the first ``captions_per_scene`` of each
    scene; ``"test"``: one item per scene with all its captions as gold."""

    def __init__(
        self,
        world: SyntheticWorld,
        num_scenes: int,
        start: int = 0,
        split: str = "train",
        captions_per_scene: int = 4,
        transform: Callable[[Image.Image], Tensor] | None = None,
    ):
        super().__init__(world, num_scenes, start, transform)
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r} is not supported. Available: 'train', 'test'")
        if captions_per_scene < 1:
            raise ValueError(f"captions_per_scene must be >= 1, got {captions_per_scene}")
        self.split, self.captions_per_scene = split, captions_per_scene  # every scene has >= 4 captions

    def __len__(self) -> int:
        return self.num_scenes * (self.captions_per_scene if self.split == "train" else 1)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._check(i)
        if self.split == "test":
            scene = self._scene(i)
            return {self.media_key: self._media(scene), "captions": scene.captions, self.id_key: scene.index}
        scene = self._scene(i // self.captions_per_scene)
        caption = scene.captions[i % self.captions_per_scene]
        return {self.media_key: self._media(scene), "caption": caption, self.id_key: scene.index}


class VQADataset(_SceneDataset):
    """VQA: item k is one question about scene ``start + k`` (types restricted by ``types``; None: all of
    ``all_types``).

    Answers are a list with weights (one answer, weight 1.0: the synthetic world is unambiguous), the official
    training format; ``question_id`` = k.
    """

    all_types = QA_TYPES

    def __init__(
        self,
        world: SyntheticWorld,
        num_scenes: int,
        start: int = 0,
        types: Sequence[str] | None = None,
        transform: Callable[[Image.Image], Tensor] | None = None,
    ):
        super().__init__(world, num_scenes, start, transform)
        self.types = check_subset(self.all_types if types is None else types, self.all_types, "types")

    def question(self, i: int) -> tuple[Scene, QA]:
        """The scene (a ``VideoScene`` for videos) and the QA of item i, without rendering the image."""
        k = self._check(i)
        scene = self._scene(k)
        rng = self.world.rng(scene.index, "vqa")
        available = [t for t in self.types if any(q.type == t for q in scene.qa)]
        if not available:  # e.g. types=("color",) when no object of the scene is nameable without its colour
            available = list(dict.fromkeys(q.type for q in scene.qa))  # the world asks them in type order
        kind = rng.choice(available)  # type first: balanced over the asked types
        return scene, rng.choice([q for q in scene.qa if q.type == kind])

    def __getitem__(self, i: int) -> dict[str, Any]:
        scene, qa = self.question(i)
        return {
            self.media_key: self._media(scene),
            "question": qa.question,
            "answers": [qa.answer],
            "weights": [1.0],
            "type": qa.type,
            "question_id": self._check(i),
            self.id_key: scene.index,
        }


class RetrievalDataset(_SceneDataset):
    """Image-text retrieval. Items: (image, caption, image_id) pairs, ``captions_per_scene`` per scene (the
    first ones).

    For evaluation: ``texts`` (all captions), ``txt2img[t]`` (its scene k), ``img2txt[k]`` (its text ids) and
    ``image(k)`` (the transformed image of scene k); the texts are built on first use.
    """

    def __init__(
        self,
        world: SyntheticWorld,
        num_scenes: int,
        start: int = 0,
        captions_per_scene: int = 2,
        transform: Callable[[Image.Image], Tensor] | None = None,
    ):
        super().__init__(world, num_scenes, start, transform)
        if not 1 <= captions_per_scene <= 4:
            raise ValueError(f"captions_per_scene must be in 1..4, got {captions_per_scene}")
        self.captions_per_scene = captions_per_scene

    @cached_property
    def texts(self) -> list[str]:
        n = self.captions_per_scene  # every scene has >= 4 captions: exactly n texts per scene
        return [c for k in range(self.num_scenes) for c in self._scene(k).captions[:n]]

    @property
    def txt2img(self) -> list[int]:
        return [t // self.captions_per_scene for t in range(len(self))]

    @property
    def img2txt(self) -> list[list[int]]:
        n = self.captions_per_scene
        return [list(range(k * n, (k + 1) * n)) for k in range(self.num_scenes)]

    def __len__(self) -> int:
        return self.num_scenes * self.captions_per_scene

    def image(self, k: int) -> Tensor:
        return self._media(self._scene(k))

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._check(i)
        k = i // self.captions_per_scene
        return {self.media_key: self.image(k), "caption": self.texts[i], self.id_key: k}


class GroundingDataset(_SceneDataset):
    """Visual grounding: item k is one referring expression of scene ``start + k`` and its box.

    ``box``: float [4] normalised (cx, cy, w, h); ``box_xyxy``: float [4] pixels (right/bottom exclusive);
    ``box_bins``: long [4] coordinate bins 0..336 (``box_to_bins``). The image is the square scene itself
    (no padding), so normalising by the image side is the official "padded square" normalisation.
    """

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = self._check(i)
        scene = self._scene(k)
        ref = self.world.rng(scene.index, "grounding").choice(scene.referring)
        return {
            "image": self.transform(scene.image()),
            "expression": ref.expression,
            "box": torch.tensor(ref.box_cxcywh, dtype=torch.float32),
            "box_xyxy": torch.tensor(ref.box_xyxy, dtype=torch.float32),
            "box_bins": box_to_bins(ref.box_cxcywh),
            "image_id": scene.index,
        }


# ---- baselines -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MajorityBaseline:
    """Accuracy of answering without looking at the image.

    Attributes:
        answer: the most frequent answer overall; accuracy: its accuracy over all questions.
        per_type: type -> (most frequent answer of that type, its accuracy on that type).
        prior_accuracy: overall accuracy when each question gets its type's majority answer.
        count: number of questions.
    """

    answer: str
    accuracy: float
    per_type: dict[str, tuple[str, float]]
    prior_accuracy: float
    count: int


def majority_baseline(qa: Iterable[QA | tuple[str, str, str]]) -> MajorityBaseline:
    """The majority-answer baselines of a list of (question, answer, type) triples (ties: first seen)."""
    items = [QA(*q) for q in qa]
    if not items:
        raise ValueError("majority_baseline needs at least one question")
    overall = Counter(q.answer for q in items).most_common(1)[0]
    per_type: dict[str, tuple[str, float]] = {}
    hits = 0
    for t in dict.fromkeys(q.type for q in items):
        answers = [q.answer for q in items if q.type == t]
        best, n = Counter(answers).most_common(1)[0]
        per_type[t] = (best, n / len(answers))
        hits += n
    return MajorityBaseline(
        answer=overall[0],
        accuracy=overall[1] / len(items),
        per_type=per_type,
        prior_accuracy=hits / len(items),
        count=len(items),
    )


def world_majority_baseline(world: SyntheticWorld, num_scenes: int = 500, start: int = 0) -> MajorityBaseline:
    """``majority_baseline`` over every question of scenes ``start .. start + num_scenes - 1``."""
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    return majority_baseline(q for scene in world.scenes(start, start + num_scenes) for q in scene.qa)

"""Synthetic visual entailment (SNLI-VE-like) and two-image reasoning (NLVR2-like) on a ``SyntheticWorld``.

    VEDataset     image, sentence (hypothesis), label (0 contradiction, 1 neutral, 2 entailment), label_name,
                  type, image_id
    NLVRDataset   images [2, 3, R, R] (left, right), sentence, label (0 False, 1 True), label_name, type,
                  image_id (left scene), right_image_id

Labels are exactly balanced: item k has label ``labels[k % len(labels)]``; the statement is then written to
have that label (the world's scene graph decides it). Every word is a single bert-base-uncased WordPiece
(``pair_vocabulary``). Datasets read scenes ``start .. start + num_scenes - 1`` only, so train / eval ranges
stay disjoint, and everything is drawn from the world's per-scene RNG (deterministic items).

VE hypotheses (types ``VE_TYPES``), about scene k:
    color    "there is a red object"                     entailed iff an object has that colour
    object   "there is a red circle"                     entailed iff that (colour, shape) is drawn
    count    "there are two circles"                     entailment: the true count; contradiction: more
                                                         than drawn (never fewer: "two" of three is
                                                         arguably true)
    spatial  "the red circle is to the left of the blue square"   entailment: the relation holds (boxes
                                                         separated, see world.py); contradiction: swapped
Neutral (decision): "the red circle is heavy" -- an attribute from ``NEUTRAL_ATTRIBUTES`` that the renderer
never draws (weight, temperature, material, age, ...), said of an object that *is* in the scene, so the
presupposition holds and the image can neither confirm nor refute it. Honest but text-detectable: neutral
hypotheses have their own template (SNLI's neutral class is also partly detectable from the text alone,
the "hypothesis-only" artefact); the image decides entailment vs contradiction. ``labels=("contradiction",
"entailment")`` drops the neutral class. A type with no statement for a scene (spatial with one object)
falls back to ``object`` (always possible).

NLVR statements (types ``NLVR_TYPES``) over the pair (left = scene k, right = another scene of the range):
    side_color  "the left image contains a red object"             only the named image matters
    both_color  "both images contain a red object"                 False: at least one image lacks it;
                                                                    True or False, the two images share
                                                                    a colour (one object each: the same
                                                                    colour), so the pair alone does not
                                                                    give the label away
    count       "the right image has more objects than the left image"   False: it has fewer
The right scene is the first scene after k (cyclically within the range) for which the wanted label can be
written; when none of the next ``MAX_SEARCH`` can, the item falls back to ``side_color``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch import Tensor

from mplug_fast.data.synthetic.datasets import _SceneDataset, check_subset
from mplug_fast.data.synthetic.world import (
    COLORS,
    NUMBER_WORDS,
    PLURALS,
    RELATIONS,
    SHAPES,
    Scene,
    SyntheticWorld,
    _relation_holds,
    _relation_words,
)

VE_LABELS: tuple[str, ...] = ("contradiction", "neutral", "entailment")  # ids 0, 1, 2 (ALBEF / BLIP)
NLVR_LABELS: tuple[str, ...] = ("False", "True")  # ids 0, 1
VE_TYPES: tuple[str, ...] = ("color", "object", "count", "spatial")
NLVR_TYPES: tuple[str, ...] = ("side_color", "both_color", "count")
NEUTRAL_ATTRIBUTES: tuple[str, ...] = tuple(
    "heavy hot cold old new soft wet wooden metal broken clean dirty".split()
)
MAX_SEARCH = 256  # right-scene candidates tried per NLVR item


class Statement(NamedTuple):
    sentence: str
    label: int  # index into the dataset's label names
    type: str  # VE: one of VE_TYPES or "neutral"; NLVR: one of NLVR_TYPES


def pair_vocabulary(world: SyntheticWorld) -> list[str]:
    """Every word a VE / NLVR statement can contain (each a single bert-base-uncased WordPiece)."""
    extra = "there is are a an object objects the left right image images contains contain both has more than"
    words = set(world.vocabulary()) | set(extra.split()) | set(NEUTRAL_ATTRIBUTES)
    return sorted(words | set(NUMBER_WORDS))  # count contradictions may name more than max_objects


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---- visual entailment ---------------------------------------------------------------------------------


def ve_statement(scene: Scene, label: str, kind: str, rng: random.Random) -> Statement | None:
    """A hypothesis of ``kind`` about ``scene`` with ``label`` ("neutral" ignores ``kind``), or None when
    the scene has none (spatial statements need a separated pair)."""
    objs = scene.objects
    lab = VE_LABELS.index(label)
    if label == "neutral":
        o = rng.choice(objs)
        return Statement(f"the {o.color} {o.shape} is {rng.choice(NEUTRAL_ATTRIBUTES)}", lab, "neutral")
    true = label == "entailment"
    if kind == "color":
        present = sorted({o.color for o in objs})
        c = rng.choice(present if true else sorted(set(COLORS) - set(present)))
        return Statement(f"there is {_a(c)} {c} object", lab, kind)
    if kind == "object":
        present = {(o.color, o.shape) for o in objs}
        pool = sorted(present) if true else sorted({(c, s) for c in COLORS for s in SHAPES} - present)
        c, s = rng.choice(pool)
        return Statement(f"there is {_a(c)} {c} {s}", lab, kind)
    if kind == "count":
        counts = Counter(o.shape for o in objs)
        s = rng.choice(sorted(counts) if true else SHAPES)
        n = counts[s] if true else rng.randint(counts[s] + 1, len(NUMBER_WORDS) - 1)
        sentence = f"there is one {s}" if n == 1 else f"there are {NUMBER_WORDS[n]} {PLURALS[s]}"
        return Statement(sentence, lab, kind)
    if kind == "spatial":
        pairs = [(a, b, r) for a in objs for b in objs for r in RELATIONS if _relation_holds(a, b, r)]
        if not pairs:
            return None
        a, b, r = rng.choice(pairs)
        if not true:
            a, b = b, a
        return Statement(
            f"the {a.color} {a.shape} is {_relation_words(r)} the {b.color} {b.shape}", lab, kind
        )
    raise ValueError(f"unknown VE statement type {kind!r}; available: {list(VE_TYPES)}")


class VEDataset(_SceneDataset):
    """Visual entailment: item k is one hypothesis about scene ``start + k`` (see the module docstring).

    Args:
        types: hypothesis types of the entailment / contradiction items (subset of ``VE_TYPES``).
        labels: the label names used (subset of ``VE_LABELS``; the label ids stay those of ``VE_LABELS``).
    """

    label_names = VE_LABELS

    def __init__(
        self,
        world: SyntheticWorld,
        num_scenes: int,
        start: int = 0,
        types: Sequence[str] = VE_TYPES,
        labels: Sequence[str] = VE_LABELS,
        transform: Callable[[Image.Image], Tensor] | None = None,
    ):
        super().__init__(world, num_scenes, start, transform)
        self.types = check_subset(types, VE_TYPES, "types")
        self.labels = check_subset(labels, VE_LABELS, "labels")

    def label(self, i: int) -> int:
        """The label id of item i (no scene generated)."""
        return VE_LABELS.index(self.labels[self._check(i) % len(self.labels)])

    def statement(self, i: int) -> tuple[Scene, Statement]:
        """The scene and hypothesis of item i, without rendering the image."""
        k = self._check(i)
        scene = self._scene_graph(k)
        rng = self.world.rng(scene.index, "ve")
        label = self.labels[k % len(self.labels)]
        kind = rng.choice(self.types)
        st = ve_statement(scene, label, kind, rng)
        if st is None:
            st = ve_statement(scene, label, "object", rng)
        assert st is not None, "object statements exist for every scene"
        return scene, st

    def __getitem__(self, i: int) -> dict[str, Any]:
        scene, st = self.statement(i)
        return {
            "image": self.transform(scene.image()),
            "sentence": st.sentence,
            "label": st.label,
            "label_name": VE_LABELS[st.label],
            "type": st.type,
            "image_id": scene.index,
        }


# ---- NLVR ------------------------------------------------------------------------------------------------


def nlvr_statement(left: Scene, right: Scene, truth: bool, kind: str, rng: random.Random) -> Statement | None:
    """A statement of ``kind`` about the (left, right) pair that is ``truth``, or None when the pair has
    none (both_color: no shared colour; count: equal object counts)."""
    colors = [{o.color for o in s.objects} for s in (left, right)]
    lab = int(truth)
    if kind == "side_color":
        side = rng.randrange(2)
        pool = colors[side] if truth else set(COLORS) - colors[side]
        c = rng.choice(sorted(pool))
        return Statement(f"the {('left', 'right')[side]} image contains {_a(c)} {c} object", lab, kind)
    if kind == "both_color":  # only pairs that share a colour, True or False: the text decides
        shared = colors[0] & colors[1]
        if not shared:
            return None
        pool = shared if truth else set(COLORS) - shared
        c = rng.choice(sorted(pool))
        return Statement(f"both images contain {_a(c)} {c} object", lab, kind)
    if kind == "count":
        n = (len(left.objects), len(right.objects))
        if n[0] == n[1]:
            return None
        more = 0 if n[0] > n[1] else 1  # the side with more objects
        side = more if truth else 1 - more
        names = ("left", "right")
        sentence = f"the {names[side]} image has more objects than the {names[1 - side]} image"
        return Statement(sentence, lab, kind)
    raise ValueError(f"unknown NLVR statement type {kind!r}; available: {list(NLVR_TYPES)}")


class NLVRDataset(_SceneDataset):
    """Two-image reasoning: item k pairs scene ``start + k`` (left) with a later scene of the range (right)
    and one statement about the pair, True for odd k and False for even k (see the module docstring)."""

    label_names = NLVR_LABELS

    def __init__(
        self,
        world: SyntheticWorld,
        num_scenes: int,
        start: int = 0,
        types: Sequence[str] = NLVR_TYPES,
        transform: Callable[[Image.Image], Tensor] | None = None,
    ):
        super().__init__(world, num_scenes, start, transform)
        self.types = check_subset(types, NLVR_TYPES, "types")

    def label(self, i: int) -> int:
        """The label id of item i (1 = True; no scene generated)."""
        return self._check(i) % 2

    def statement(self, i: int) -> tuple[Scene, Scene, Statement]:
        """(left scene, right scene, statement) of item i, without rendering the images."""
        k = self._check(i)
        left = self._scene_graph(k)
        rng = self.world.rng(left.index, "statement")
        truth = bool(k % 2)
        kind = rng.choice(self.types)
        n = self.num_scenes
        offsets = list(range(1, min(n, MAX_SEARCH + 1))) if n > 1 else [0]
        if kind == "count" and self.world.min_objects == self.world.max_objects:
            offsets = []  # every scene has the same number of objects: no count statement exists
        for j in offsets:
            right = self._scene_graph((k + j) % n)
            st = nlvr_statement(left, right, truth, kind, rng)
            if st is not None:
                return left, right, st
        right = self._scene_graph((k + 1) % n)
        st = nlvr_statement(left, right, truth, "side_color", rng)
        assert st is not None, "side_color statements exist for every pair"
        return left, right, st

    def __getitem__(self, i: int) -> dict[str, Any]:
        left, right, st = self.statement(i)
        return {
            "images": torch.stack([self.transform(left.image()), self.transform(right.image())]),
            "sentence": st.sentence,
            "label": st.label,
            "label_name": NLVR_LABELS[st.label],
            "type": st.type,
            "image_id": left.index,
            "right_image_id": right.index,
        }

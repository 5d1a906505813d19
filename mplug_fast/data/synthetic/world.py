"""A procedural world of coloured shapes: scenes, captions, VQA pairs and referring expressions, from a seed.

For demos and smoke runs of every task without downloading data. A scene is a plain background plus 1..N
non-overlapping objects (shape x colour x size), drawn with ``PIL.ImageDraw`` at any resolution, with no
anti-aliasing, so every object pixel has exactly its palette colour. Everything about scene ``index`` is
derived from ``random.Random(f"{seed}:{index}")`` (string seeds hash with SHA-512: stable across processes
and ``PYTHONHASHSEED``), so datasets can be any length and workers need no shared state.

Guarantees (tested in ``tests/data/test_synthetic.py``):
    * within a scene every (colour, shape) pair is unique, so "the red circle" always names one object;
    * every word of every text is a single WordPiece of bert-base-uncased (no "##" pieces, no [UNK]);
    * answers are computed from the scene graph; existence and spatial yes/no questions come in yes/no pairs
      (exactly balanced);
    * boxes are tight: ``box_xyxy`` is in pixels with an exclusive right/bottom edge (w = x1 - x0), and the
      drawn object touches all four sides; ``box_cxcywh`` is that box divided by the image size;
    * "A left of B" means A's box ends before B's begins (x1_A <= x0_B), likewise "above"; spatial questions
      and expressions are only made about pairs separated that way.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {  # saturated, far from the grey backgrounds and from each other
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 225, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
SIZES: dict[str, float] = {"small": 0.17, "large": 0.30}  # object side as a fraction of the image side
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
MIN_IMAGE_SIZE = 16
MIN_OBJECT_SIDE = 4  # pixels
QA_TYPES: tuple[str, ...] = ("color", "shape", "count", "exist", "spatial")
# relation word -> (axis, A before B?): "A left of B" iff A's box ends before B's begins on x
RELATIONS: dict[str, tuple[int, bool]] = {
    "left of": (0, True),
    "right of": (0, False),
    "above": (1, True),
    "below": (1, False),
}


class QA(NamedTuple):
    question: str
    answer: str
    type: str  # one of QA_TYPES


class Referring(NamedTuple):
    expression: str
    box_cxcywh: tuple[float, float, float, float]  # normalised by the image size
    box_xyxy: tuple[int, int, int, int]  # pixels, right/bottom exclusive
    object_index: int  # into Scene.objects


@dataclass(frozen=True)
class SceneObject:
    shape: str  # one of SHAPES
    color: str  # one of COLORS
    size: str  # "small" | "large"
    box: tuple[int, int, int, int]  # xyxy pixels, right/bottom exclusive; the shape touches all four sides

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def phrase(self, with_size: bool = True) -> str:
        """ "a large red circle" (article chosen for the first word)."""
        words = f"{self.size} {self.color} {self.shape}" if with_size else f"{self.color} {self.shape}"
        return ("an " if words[0] in "aeiou" else "a ") + words


@dataclass
class Scene:
    """One generated scene: its scene graph and all texts about it.

    Attributes:
        index: the scene's index in its world.
        image_size: R, the side of the square image in pixels.
        background: RGB of the plain background.
        objects: the objects, in drawing order (they never overlap).
        captions: several captions (different templates).
        qa: (question, answer, type) triples, types from ``QA_TYPES``.
        referring: unambiguous referring expressions with the box of the object they name.
    """

    index: int
    image_size: int
    background: tuple[int, int, int]
    objects: list[SceneObject]
    captions: list[str] = field(default_factory=list)
    qa: list[QA] = field(default_factory=list)
    referring: list[Referring] = field(default_factory=list)

    def image(self) -> Image.Image:
        """The scene drawn as an RGB PIL image R x R (deterministic: only the scene graph is used)."""
        R = self.image_size
        img = Image.new("RGB", (R, R), self.background)
        draw = ImageDraw.Draw(img)
        for o in self.objects:
            _draw_object(draw, o)
        return img

    def box_cxcywh(self, obj: SceneObject) -> tuple[float, float, float, float]:
        """The object's box as normalised (cx, cy, w, h) in [0, 1] (docs/fidelity.md §5.5 target format)."""
        x0, y0, x1, y1 = obj.box
        R = float(self.image_size)
        return ((x0 + x1) / 2 / R, (y0 + y1) / 2 / R, (x1 - x0) / R, (y1 - y0) / R)


def _draw_object(draw: ImageDraw.ImageDraw, o: SceneObject) -> None:
    x0, y0, x1, y1 = o.box
    xe, ye = x1 - 1, y1 - 1  # PIL coordinates are inclusive
    fill = COLORS[o.color]
    if o.shape == "square":
        draw.rectangle([x0, y0, xe, ye], fill=fill)
    elif o.shape == "circle":
        draw.ellipse([x0, y0, xe, ye], fill=fill)
    elif o.shape == "triangle":  # apex up, base on the bottom edge
        draw.polygon([(x0, ye), (xe, ye), ((x0 + xe) / 2, y0)], fill=fill)
    elif o.shape == "diamond":
        cx, cy = (x0 + xe) / 2, (y0 + ye) / 2
        draw.polygon([(cx, y0), (xe, cy), (cx, ye), (x0, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {o.shape!r}. Available: {', '.join(SHAPES)}")


# ---- text helpers ----------------------------------------------------------------------------------------


def _join(items: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    """True if boxes a and b (xyxy) are at least ``gap`` pixels apart along x or along y."""
    return a[0] >= b[2] + gap or b[0] >= a[2] + gap or a[1] >= b[3] + gap or b[1] >= a[3] + gap


def _relation_holds(a: SceneObject, b: SceneObject, relation: str) -> bool:
    """True if ``a`` is ``relation`` of ``b``: the first's box ends before the second's begins on the axis."""
    axis, a_first = RELATIONS[relation]
    first, second = (a, b) if a_first else (b, a)
    return first.box[axis + 2] <= second.box[axis]


def _relation_words(relation: str) -> str:
    """ "left of" -> "to the left of"; "above" -> "above"."""
    return "to the " + relation if relation in ("left of", "right of") else relation


def _count_caption(shapes: list[str]) -> str:
    """ "there are two circles and one square": the shapes counted, the most frequent first."""
    counts = sorted(Counter(shapes).items(), key=lambda x: -x[1])
    phrases = [f"{NUMBER_WORDS[n]} {s if n == 1 else PLURALS[s]}" for s, n in counts]
    return ("there is " if counts[0][1] == 1 else "there are ") + _join(phrases)


# ---- the world -----------------------------------------------------------------------------------------


class SyntheticWorld:
    """Scenes of coloured shapes, generated on the fly from (seed, index).

    Args:
        image_size: R, the square image side in pixels (>= 16); objects are 0.17 R (small) or 0.30 R (large).
        max_objects: the most objects in a scene (1..8); fewer are placed when they do not fit.
        min_objects: the fewest objects drawn for a scene (placement may still drop some at tiny sizes).
        seed: world seed; scene ``index`` of two worlds with the same seed is identical.
        object_scale: multiplies the object sides (0.17 R / 0.30 R at 1.0): larger objects are easier to see
            at low resolution (2.0 at 32 px: 11 px / 19 px objects), at the cost of fewer fitting.

    Example:
        >>> world = SyntheticWorld(image_size=64, max_objects=4, seed=0)
        >>> scene = world.scene(3)
        >>> img = scene.image()            # PIL RGB 64 x 64
        >>> scene.qa[0]  # QA(question='what color is the circle?', answer='red', type='color')
    """

    def __init__(
        self,
        image_size: int = 64,
        max_objects: int = 4,
        min_objects: int = 1,
        seed: int = 0,
        object_scale: float = 1.0,
    ):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be an int >= {MIN_IMAGE_SIZE}, got {image_size!r}")
        if not 1 <= min_objects <= max_objects <= len(NUMBER_WORDS) - 1:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {len(NUMBER_WORDS) - 1}, got min_objects="
                f"{min_objects}, max_objects={max_objects}"
            )
        if not 0.25 <= object_scale <= 2.5:
            raise ValueError(f"object_scale must be in [0.25, 2.5], got {object_scale!r}")
        self.image_size, self.seed = image_size, seed
        self.max_objects, self.min_objects = max_objects, min_objects
        self.object_scale = float(object_scale)
        self.sides = {
            s: max(MIN_OBJECT_SIDE, min(image_size - 2, round(f * object_scale * image_size)))
            for s, f in SIZES.items()
        }

    @classmethod
    def from_config(cls, section: Any) -> SyntheticWorld:
        """The world of a run config's ``data.synthetic`` section (a dataclass or a mapping; keys that are not
        world parameters, such as ``num_scenes``, are ignored). Use this rather than listing the fields, so a
        new world parameter reaches every consumer."""
        values = section if isinstance(section, Mapping) else vars(section)
        keys = ("image_size", "max_objects", "min_objects", "seed", "object_scale")
        return cls(**{k: values[k] for k in keys if k in values})

    def __repr__(self) -> str:
        scale = "" if self.object_scale == 1.0 else f", object_scale={self.object_scale}"
        return (
            f"SyntheticWorld(image_size={self.image_size}, max_objects={self.max_objects}, "
            f"min_objects={self.min_objects}, seed={self.seed}{scale})"
        )

    def rng(self, index: int, purpose: str = "scene") -> random.Random:
        """The deterministic RNG of scene ``index`` for ``purpose`` (datasets use their own purposes)."""
        return random.Random(f"{self.seed}:{index}:{purpose}")

    def answer_list(self) -> list[str]:
        """Every answer a question can have: colours, shapes, number words 0..max_objects, yes, no."""
        return [*COLORS, *SHAPES, *NUMBER_WORDS[: self.max_objects + 1], "yes", "no"]

    def vocabulary(self) -> list[str]:
        """Every word any text of this world can contain (each a single bert-base-uncased WordPiece)."""
        words = set(self.answer_list()) | set(PLURALS.values()) | set(SIZES)
        templates = "a an and the of with picture image there is are what how many color shape object objects"
        templates += " is to left right above below on at top bottom"
        return sorted(words | set(templates.split()))

    # ---- generation ------------------------------------------------------------------------------------

    def scene(self, index: int, texts: bool = True) -> Scene:
        """Scene ``index`` (any int >= 0): its scene graph, captions, QA pairs and referring expressions.
        ``texts=False``: the scene graph only (captions, QA and referring left empty; the objects and the
        image are the same, since the texts draw from their own RNGs), for datasets that make their own texts
        from the objects (3-8x faster: the texts are most of a scene's cost)."""
        if index < 0:
            raise IndexError(f"scene index must be >= 0, got {index}")
        rng = self.rng(index)
        R = self.image_size
        background, kinds = self.draw_background_and_kinds(rng)
        gap = max(1, R // 32)
        objects: list[SceneObject] = []
        for color, shape in kinds:
            size = rng.choice(tuple(SIZES))
            side = self.sides[size]
            for _ in range(100):
                x0, y0 = rng.randint(gap, R - side - gap), rng.randint(gap, R - side - gap)
                box = (x0, y0, x0 + side, y0 + side)
                if all(_apart(box, o.box, gap) for o in objects):
                    objects.append(SceneObject(shape=shape, color=color, size=size, box=box))
                    break
        if not objects:  # cannot happen for R >= 16 (one object always fits), kept as an invariant
            raise AssertionError(f"scene {index}: no object could be placed at image_size {R}")
        scene = Scene(index=index, image_size=R, background=background, objects=objects)
        if not texts:
            return scene
        scene.captions = self._captions(scene, self.rng(index, "captions"))
        scene.qa = self._questions(scene, self.rng(index, "qa"))
        scene.referring = self._referring(scene)
        return scene

    def draw_background_and_kinds(
        self, rng: random.Random
    ) -> tuple[tuple[int, int, int], list[tuple[str, str]]]:
        """A scene's first draws: its background (a light-to-mid grey, tinted a little: no object colour is
        near it) and the (colour, shape) of each object to place, min_objects..max_objects unique pairs."""
        background = tuple(min(255, max(0, g + rng.randint(-8, 8))) for g in [rng.randint(100, 160)] * 3)
        n = rng.randint(self.min_objects, self.max_objects)
        return background, rng.sample([(c, s) for c in COLORS for s in SHAPES], n)

    def scenes(self, start: int = 0, stop: int | None = None):
        """Iterates scenes start, start + 1, ... (forever when ``stop`` is None)."""
        i = start
        while stop is None or i < stop:
            yield self.scene(i)
            i += 1

    def _captions(self, scene: Scene, rng: random.Random) -> list[str]:
        objs = scene.objects
        left_to_right = sorted(objs, key=lambda o: o.center[0])
        shuffled = rng.sample(objs, len(objs))
        captions = [
            _join([o.phrase() for o in left_to_right]),
            "a picture of " + _join([o.phrase(with_size=rng.random() < 0.5) for o in shuffled]),
            _count_caption([o.shape for o in objs]),
            "an image with " + _join([o.phrase(with_size=False) for o in shuffled]),
        ]
        pairs = [
            (a, b, r)
            for a in objs
            for b in objs
            if a is not b
            for r in RELATIONS
            if _relation_holds(a, b, r) and RELATIONS[r][1]  # "left of" / "above": one phrasing per pair
        ]
        if pairs:
            a, b, r = rng.choice(pairs)
            if rng.random() < 0.5:  # the same fact, phrased from the other object
                a, b, r = b, a, {"left of": "right of", "above": "below"}[r]
            rel = _relation_words(r)
            captions.append(f"{a.phrase()} {rel} {b.phrase()}")
        return captions

    def _questions(self, scene: Scene, rng: random.Random) -> list[QA]:
        objs = scene.objects
        shape_n = Counter(o.shape for o in objs)
        color_n = Counter(o.color for o in objs)
        qa: list[QA] = []

        # colour, then shape: "what color is the circle?", "what shape is the red object?" -- the object named
        # by the other attribute (and its size when that alone is ambiguous)
        for asked, other, noun in (("color", "shape", ""), ("shape", "color", " object")):
            other_n = Counter(getattr(o, other) for o in objs)
            size_other_n = Counter((o.size, getattr(o, other)) for o in objs)
            candidates = []
            for o in objs:
                if other_n[getattr(o, other)] == 1:
                    candidates.append((f"the {getattr(o, other)}{noun}", o))
                elif size_other_n[(o.size, getattr(o, other))] == 1:
                    candidates.append((f"the {o.size} {getattr(o, other)}{noun}", o))
            for desc, o in rng.sample(candidates, min(2, len(candidates))):
                qa.append(QA(f"what {asked} is {desc}?", getattr(o, asked), asked))

        # count: shapes (present or not), colours, all objects
        shape = rng.choice(SHAPES)
        qa.append(QA(f"how many {PLURALS[shape]} are there?", NUMBER_WORDS[shape_n[shape]], "count"))
        color = rng.choice(tuple(COLORS)) if rng.random() < 0.3 else rng.choice(objs).color
        qa.append(QA(f"how many {color} objects are there?", NUMBER_WORDS[color_n[color]], "count"))
        if rng.random() < 0.5:
            qa.append(QA("how many objects are there?", NUMBER_WORDS[len(objs)], "count"))

        # existence: one yes and one no per scene (exactly balanced)
        present = {(o.color, o.shape) for o in objs}
        c, s = rng.choice(sorted(present))
        yes = QA(f"is there {'an' if c[0] in 'aeiou' else 'a'} {c} {s}?", "yes", "exist")
        c, s = rng.choice(sorted({(c, s) for c in COLORS for s in SHAPES} - present))
        no = QA(f"is there {'an' if c[0] in 'aeiou' else 'a'} {c} {s}?", "no", "exist")
        qa.extend([yes, no] if rng.random() < 0.5 else [no, yes])

        # spatial: a separated pair, asked once true and once false (exactly balanced)
        pairs = [(a, b, r) for a in objs for b in objs for r in RELATIONS if _relation_holds(a, b, r)]
        if pairs:
            a, b, r = rng.choice(pairs)
            rel = _relation_words(r)
            q_yes = QA(f"is the {a.color} {a.shape} {rel} the {b.color} {b.shape}?", "yes", "spatial")
            q_no = QA(f"is the {b.color} {b.shape} {rel} the {a.color} {a.shape}?", "no", "spatial")
            qa.extend([q_yes, q_no] if rng.random() < 0.5 else [q_no, q_yes])
        return qa

    def _referring(self, scene: Scene) -> list[Referring]:
        objs = scene.objects
        shape_n = Counter(o.shape for o in objs)
        color_n = Counter(o.color for o in objs)
        size_shape_n = Counter((o.size, o.shape) for o in objs)
        out: list[Referring] = []
        for i, o in enumerate(objs):
            exprs = [f"the {o.color} {o.shape}", f"the {o.size} {o.color} {o.shape}"]
            if shape_n[o.shape] == 1:
                exprs.append(f"the {o.shape}")
            elif size_shape_n[(o.size, o.shape)] == 1:
                exprs.append(f"the {o.size} {o.shape}")
            if color_n[o.color] == 1:
                exprs.append(f"the {o.color} object")
            if shape_n[o.shape] == 2:  # "the circle on the left": the other one lies wholly to the right
                (other,) = [p for p in objs if p is not o and p.shape == o.shape]
                words = ("on the left", "on the right", "at the top", "at the bottom")  # in RELATIONS order
                for relation, word in zip(RELATIONS, words):
                    if _relation_holds(o, other, relation):
                        exprs.append(f"the {o.shape} {word}")
            cxcywh = scene.box_cxcywh(o)
            out.extend(Referring(e, cxcywh, o.box, i) for e in exprs)
        return out

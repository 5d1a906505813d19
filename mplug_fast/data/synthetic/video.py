"""Moving-shapes videos: scenes of the synthetic world whose objects travel along straight lines.

A video scene is a ``SyntheticWorld``-style scene (plain background, 1..N objects with unique (colour, shape)
pairs) of T frames in which every object moves left, right, up or down at a constant whole number of pixels
per frame. Everything about video ``index`` comes from ``random.Random(f"{seed}:{index}:video...")``
(deterministic across processes), so datasets can be any length.

Guarantees (tested in ``tests/data/test_video.py``):
    * every object stays inside the frame with the world's margin, and the rectangles swept by two objects
      over the clip are separated by that margin: objects never touch in any frame;
    * an object's box at frame t is its frame-0 box shifted by t * speed along its direction (image y grows
      downward: "up" decreases y); speed >= 1, so the motion is visible between consecutive frames;
    * texts are built from the world's words plus "video", "moving", "which", "direction" and the four
      directions: every word a single bert-base-uncased WordPiece;
    * QA types: "color", "shape", "count", "exist" (the image world's questions, which do not change over
      time; "spatial" ones do and are not asked), "motion" ("is the red circle moving left?", one yes and one
      no per video: exactly balanced) and "direction" ("which direction is the red circle moving?").

    SyntheticVideoWorld(image_size, max_objects, min_objects, seed, num_frames)  .scene(i) -> VideoScene
    VideoQADataset / VideoCaptionDataset / VideoRetrievalDataset  items {"video": [T, 3, R, R], ...}
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image
from torch import Tensor

from mplug_fast.data.synthetic.datasets import CaptionDataset, RetrievalDataset, VQADataset, _SceneDataset
from mplug_fast.data.synthetic.world import (
    QA,
    Scene,
    SceneObject,
    SyntheticWorld,
    _apart,
    _count_caption,
    _join,
)
from mplug_fast.data.video import VideoTransform

# direction word -> (dx, dy) unit step in image coordinates (y grows downward)
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_QA_TYPES: tuple[str, ...] = ("color", "shape", "count", "exist", "motion", "direction")
STATIC_QA_TYPES: tuple[str, ...] = ("color", "shape", "count", "exist")  # true in every frame
DEFAULT_NUM_FRAMES = 8


@dataclass(frozen=True)
class MovingObject:
    """An object of a video: its frame-0 appearance and box, and a straight-line motion."""

    start: SceneObject  # shape, colour, size and box at frame 0
    direction: str  # one of DIRECTIONS
    speed: int  # pixels per frame, >= 1

    def at(self, t: int) -> SceneObject:
        """The object at frame t (box shifted by t * speed along the direction)."""
        dx, dy = DIRECTIONS[self.direction]
        x0, y0, x1, y1 = self.start.box
        s = t * self.speed
        box = (x0 + dx * s, y0 + dy * s, x1 + dx * s, y1 + dy * s)
        return SceneObject(shape=self.start.shape, color=self.start.color, size=self.start.size, box=box)

    def swept_box(self, num_frames: int) -> tuple[int, int, int, int]:
        """The rectangle covered over frames 0..num_frames-1 (xyxy, right/bottom exclusive)."""
        a, b = self.start.box, self.at(num_frames - 1).box
        return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


@dataclass
class VideoScene:
    """One generated video: T = ``num_frames`` frames of moving ``objects`` (unique (colour, shape) pairs) and
    the texts about it; the other fields as in a ``Scene`` (the second caption names every motion, the QA
    types are ``VIDEO_QA_TYPES``)."""

    index: int
    image_size: int
    num_frames: int
    background: tuple[int, int, int]
    objects: list[MovingObject]
    captions: list[str] = field(default_factory=list)
    qa: list[QA] = field(default_factory=list)

    def scene_at(self, t: int) -> Scene:
        """Frame t as a still ``Scene`` (scene graph only: no texts)."""
        if not 0 <= t < self.num_frames:
            raise IndexError(f"frame {t} out of range for a video of {self.num_frames} frames")
        return Scene(self.index, self.image_size, self.background, [o.at(t) for o in self.objects])

    def frame(self, t: int) -> Image.Image:
        """Frame t drawn as an RGB PIL image R x R."""
        return self.scene_at(t).image()

    def frames(self) -> list[Image.Image]:
        """The T frames, in order."""
        return [self.frame(t) for t in range(self.num_frames)]


class SyntheticVideoWorld:
    """Videos of moving coloured shapes, generated on the fly from (seed, index).

    Args:
        image_size, max_objects, min_objects, seed, object_scale: as ``SyntheticWorld`` (same objects,
            sizes and colours).
        num_frames: T, the frames of every video (>= 2: the motion must be visible).
        max_speed: the fastest motion in pixels per frame (None: as fast as lets an object cross half the
            free width of the frame over the clip; at least 1).
    """

    def __init__(
        self,
        image_size: int = 64,
        max_objects: int = 4,
        min_objects: int = 1,
        seed: int = 0,
        num_frames: int = DEFAULT_NUM_FRAMES,
        max_speed: int | None = None,
        object_scale: float = 1.0,
    ):
        self.world = SyntheticWorld(image_size, max_objects, min_objects, seed, object_scale=object_scale)
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 2:
            raise ValueError(f"num_frames must be an int >= 2 (motion needs two frames), got {num_frames!r}")
        if max_speed is not None and max_speed < 1:
            raise ValueError(f"max_speed must be >= 1 pixel per frame, got {max_speed}")
        self.image_size, self.seed = image_size, seed
        self.max_objects, self.min_objects = max_objects, min_objects
        self.num_frames, self.max_speed = num_frames, max_speed
        self.gap = max(1, image_size // 32)
        longest = image_size - max(self.world.sides.values()) - 2 * self.gap + 1  # 1 px per frame still fits
        if num_frames > longest:
            raise ValueError(
                f"num_frames {num_frames} is too long for image_size {image_size}: a large object moving "
                f"1 px per frame would leave the frame; use num_frames <= {longest} or a larger image_size"
            )

    def __repr__(self) -> str:
        return (
            f"SyntheticVideoWorld(image_size={self.image_size}, max_objects={self.max_objects}, "
            f"min_objects={self.min_objects}, seed={self.seed}, num_frames={self.num_frames})"
        )

    def rng(self, index: int, purpose: str = "video") -> random.Random:
        """The deterministic RNG of video ``index`` for ``purpose`` (never equal to an image scene's)."""
        return random.Random(f"{self.seed}:{index}:video:{purpose}")

    def answer_list(self) -> list[str]:
        """Every answer a video question can have: the image world's answers and the four directions."""
        return [*self.world.answer_list(), *DIRECTIONS]

    def vocabulary(self) -> list[str]:
        """Every word any text of this world can contain (each a single bert-base-uncased WordPiece)."""
        return sorted(set(self.world.vocabulary()) | {"video", "moving", "which", "direction", *DIRECTIONS})

    def _speed_limit(self, side: int) -> int:
        free = self.image_size - side - 2 * self.gap
        fastest = max(1, free // (2 * (self.num_frames - 1)))
        return fastest if self.max_speed is None else min(fastest, self.max_speed)

    def scene(self, index: int) -> VideoScene:
        """Video ``index`` (any int >= 0): its moving objects, captions and QA pairs."""
        if index < 0:
            raise IndexError(f"video index must be >= 0, got {index}")
        rng = self.rng(index)
        R, T, gap = self.image_size, self.num_frames, self.gap
        background, kinds = self.world.draw_background_and_kinds(rng)
        objects: list[MovingObject] = []
        for color, shape in kinds:
            size = rng.choice(("small", "large"))
            side = self.world.sides[size]
            direction = rng.choice(tuple(DIRECTIONS))
            for _ in range(100):
                speed = rng.randint(1, self._speed_limit(side))
                travel = speed * (T - 1)
                dx, dy = DIRECTIONS[direction]
                lo_x, hi_x = gap + travel * (dx < 0), R - side - gap - travel * (dx > 0)
                lo_y, hi_y = gap + travel * (dy < 0), R - side - gap - travel * (dy > 0)
                if lo_x > hi_x or lo_y > hi_y:
                    continue  # cannot fit this fast; draw another speed
                x0, y0 = rng.randint(lo_x, hi_x), rng.randint(lo_y, hi_y)
                obj = MovingObject(
                    SceneObject(shape, color, size, (x0, y0, x0 + side, y0 + side)), direction, speed
                )
                if all(_apart(obj.swept_box(T), p.swept_box(T), gap) for p in objects):
                    objects.append(obj)
                    break
        if not objects:  # the first object always fits (speed 1 fits, checked in __init__): an invariant
            raise AssertionError(f"video {index}: no object could be placed at image_size {R}")
        video = VideoScene(index=index, image_size=R, num_frames=T, background=background, objects=objects)
        video.captions = self._captions(video, self.rng(index, "captions"))
        video.qa = self._questions(video, self.rng(index, "qa"))
        return video

    scenes = SyntheticWorld.scenes  # videos start, start + 1, ... (forever when ``stop`` is None)

    def _captions(self, video: VideoScene, rng: random.Random) -> list[str]:
        objs = video.objects
        shuffled = rng.sample(objs, len(objs))
        return [
            "a video of " + _join([o.start.phrase() for o in shuffled]),
            _join([f"{o.start.phrase(with_size=rng.random() < 0.5)} moving {o.direction}" for o in shuffled]),
            _count_caption([o.start.shape for o in objs]),
            "a video with " + _join([o.start.phrase(with_size=False) for o in rng.sample(objs, len(objs))]),
        ]

    def _questions(self, video: VideoScene, rng: random.Random) -> list[QA]:
        # the image world's questions about frame 0, minus those that change over time ("spatial")
        still = video.scene_at(0)
        qa = [q for q in self.world._questions(still, rng) if q.type in STATIC_QA_TYPES]
        # motion: one true and one false direction of one object (exactly balanced yes / no)
        o = rng.choice(video.objects)
        name = f"the {o.start.color} {o.start.shape}"
        wrong = rng.choice([d for d in DIRECTIONS if d != o.direction])
        yes = QA(f"is {name} moving {o.direction}?", "yes", "motion")
        no = QA(f"is {name} moving {wrong}?", "no", "motion")
        qa.extend([yes, no] if rng.random() < 0.5 else [no, yes])
        # direction: which way each of up to two objects moves
        for o in rng.sample(video.objects, min(2, len(video.objects))):
            question = f"which direction is the {o.start.color} {o.start.shape} moving?"
            qa.append(QA(question, o.direction, "direction"))
        return qa


# ---- datasets -------------------------------------------------------------------------------------------


class _VideoDataset(_SceneDataset):
    """Shared plumbing: a video world, a video range and a frame transform ([T, 3, R, R] per video)."""

    world: SyntheticVideoWorld
    media_key, id_key = "video", "video_id"

    def _default_transform(self) -> Callable[[Sequence[Image.Image]], Tensor]:
        return VideoTransform(self.world.image_size)

    def _media(self, video: VideoScene) -> Tensor:  # type: ignore[override]
        return self.transform(video.frames())

    def video(self, k: int) -> Tensor:
        """The transformed frames of video k of this dataset: float32 [T, 3, R, R]."""
        return self._media(self._scene(k))


class VideoQADataset(_VideoDataset, VQADataset):
    """Video QA: item k is one question about video ``start + k`` (type drawn first, among ``types``).

    Items: video, question, answers (one), weights ([1.0]), type, question_id (= k), video_id.
    """

    all_types = VIDEO_QA_TYPES

    def answer_list(self) -> list[str]:
        """The candidate answers for ranking (every answer the world can give)."""
        return self.world.answer_list()


class VideoCaptionDataset(_VideoDataset, CaptionDataset):
    """Video captioning. ``split="train"``: one item per (video, caption) (the first ``captions_per_scene``);
    ``"test"``: one item per video with all its captions as gold. Items: video, caption(s), video_id."""

    def __init__(
        self,
        world: SyntheticVideoWorld,
        num_scenes: int,
        start: int = 0,
        split: str = "test",
        captions_per_scene: int = 4,
        transform: Callable[[Sequence[Image.Image]], Tensor] | None = None,
    ):
        if not 1 <= captions_per_scene <= 4:
            raise ValueError(f"captions_per_scene must be in 1..4, got {captions_per_scene}")
        super().__init__(world, num_scenes, start, split, captions_per_scene, transform)  # type: ignore[arg-type]


class VideoRetrievalDataset(_VideoDataset, RetrievalDataset):
    """Video-text retrieval: (video, caption, video_id) pairs, ``captions_per_scene`` per video (the first
    ones: "a video of ..." and the motion caption). Gallery: ``texts``, ``txt2vid[t]``, ``vid2txt[k]`` and
    ``video(k)``, built on first use."""

    txt2vid = RetrievalDataset.txt2img
    vid2txt = RetrievalDataset.img2txt


__all__ = [
    "DIRECTIONS",
    "STATIC_QA_TYPES",
    "VIDEO_QA_TYPES",
    "MovingObject",
    "SyntheticVideoWorld",
    "VideoCaptionDataset",
    "VideoQADataset",
    "VideoRetrievalDataset",
    "VideoScene",
]

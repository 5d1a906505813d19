"""The run config's ``data.synthetic`` section and the synthetic world's scenes of a split, as every task's
``synthetic_dataset`` reads them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mplug_fast.data.synthetic import SyntheticWorld


@dataclass
class SyntheticSection:
    """The built-in synthetic world (``mplug_fast.data.synthetic``)."""

    image_size: int = 64  # rendered side in pixels (and the model's input resolution unless resized)
    num_scenes: int = 20000  # training scenes 0 .. num_scenes - 1
    eval_scenes: int = 500  # held-out scenes num_scenes .. num_scenes + eval_scenes - 1
    min_objects: int = 1
    max_objects: int = 4
    seed: int = 0
    object_scale: float = 1.0  # object sides x this (SyntheticWorld): > 1 = larger objects at low resolution
    vqa_types: list[str] | None = None  # restrict the VQA question types (None: all)
    pair_types: list[str] | None = None  # restrict the VE / NLVR statement types (None: all)
    ve_labels: list[str] | None = None  # VE label names used (None: contradiction, neutral, entailment)


@dataclass(frozen=True)
class SyntheticScenes:
    """The scenes of one split: ``world.scene(start) .. world.scene(start + count - 1)``, and the task
    options of the run config's ``data.synthetic`` section (None = the dataset's default)."""

    world: SyntheticWorld
    count: int
    start: int
    vqa_types: tuple[str, ...] | None = None
    pair_types: tuple[str, ...] | None = None
    ve_labels: tuple[str, ...] | None = None


def synthetic_scenes(split: str = "train", **world: Any) -> SyntheticScenes:
    """Split "train" reads scenes 0..num_scenes-1, any other split the held-out scenes
    num_scenes..num_scenes+eval_scenes-1. The keyword arguments are the run config's ``data.synthetic``
    (`SyntheticSection`)."""
    o = SyntheticSection(**world)
    count, start = (o.num_scenes, 0) if split == "train" else (o.eval_scenes, o.num_scenes)
    tuples = [None if v is None else tuple(v) for v in (o.vqa_types, o.pair_types, o.ve_labels)]
    return SyntheticScenes(SyntheticWorld.from_config(o), count, start, *tuples)

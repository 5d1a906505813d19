"""The synthetic world's scenes of a split, as every task's ``synthetic_dataset`` reads them."""

from __future__ import annotations

from dataclasses import dataclass

from mplug_fast.data.synthetic import SyntheticWorld


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


def synthetic_scenes(
    split: str = "train",
    *,
    image_size: int = 64,
    num_scenes: int = 20000,
    eval_scenes: int = 500,
    min_objects: int = 1,
    max_objects: int = 4,
    seed: int = 0,
    object_scale: float = 1.0,
    vqa_types: list[str] | None = None,
    pair_types: list[str] | None = None,
    ve_labels: list[str] | None = None,
) -> SyntheticScenes:
    """Split "train" reads scenes 0..num_scenes-1, any other split the held-out scenes
    num_scenes..num_scenes+eval_scenes-1. The keyword arguments are the run config's ``data.synthetic``."""
    world = SyntheticWorld(
        image_size=image_size,
        max_objects=max_objects,
        min_objects=min_objects,
        seed=seed,
        object_scale=object_scale,
    )
    count, start = (num_scenes, 0) if split == "train" else (eval_scenes, num_scenes)
    as_tuple = lambda v: None if v is None else tuple(v)  # noqa: E731
    return SyntheticScenes(
        world, count, start, as_tuple(vqa_types), as_tuple(pair_types), as_tuple(ve_labels)
    )

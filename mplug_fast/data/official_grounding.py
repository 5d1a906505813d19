"""The official grounding reader: RefCOCO / RefCOCO+ / RefCOCOg (and ReferIt / Flickr) from TransVG split
files (see mplug_fast.data.official for the shared image handling)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mplug_fast.data.annotations import AnnotationError
from mplug_fast.data.grounding_transform import GroundingTransform
from mplug_fast.data.official import DEFAULT_MAX_BAD_FRACTION, ImageDataset, PathLike
from mplug_fast.data.synthetic.datasets import box_to_bins
from mplug_fast.io import torch_load

XYXY_DATASETS = ("referit", "flickr")  # TransVG: these split files hold xyxy boxes, the others xywh


class RefCocoDataset(ImageDataset):
    """RefCOCO / RefCOCO+ / RefCOCOg (and ReferIt / Flickr) grounding from TransVG split files.

    Args:
        split_file: ``<split_root>/<ds>/<ds>_<split>.pth`` (a pickled list of tuples), or an in-memory list.
        image_root: folder of the images (official: ``data_root/other/images/mscoco/images/train2014``).
        dataset: "unc" / "unc+" / "gref" / "gref_umd" (xywh boxes), "referit" / "flickr" (xyxy boxes).
        train: the TransVG training augmentation (``GroundingTransform(train=True)``) or the eval transform.
        transform: a ``GroundingTransform``-like callable (image, box_xyxy, text) -> GroundingSample.
        truncate_boxes: cast boxes to int like TransVG's ``np.array(bbox, dtype=int)`` (default: kept as
            floats, a deviation: fractional pixel boxes are not truncated).

    Samples: image [3, S, S] padded, expression, box (cx, cy, w, h) / S, box_xyxy (pixels of the padded
    input), box_bins, image_mask, image_id.
    """

    def __init__(
        self,
        split_file: PathLike | Sequence[Sequence[Any]],
        image_root: PathLike | None = None,
        dataset: str = "unc",
        train: bool = False,
        image_size: int = 336,
        transform: GroundingTransform | None = None,
        truncate_boxes: bool = False,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    ):
        transform = transform if transform is not None else GroundingTransform(image_size, train=train)
        super().__init__(image_root, max_bad_fraction, "train" if train else "test", image_size, transform)
        where = "grounding split"
        if isinstance(split_file, (str, Path)):
            records, where = torch_load(split_file), Path(split_file).name  # weights only; errors name it
            if len(records) == 0:
                raise AnnotationError(f"grounding split file {where!r} is empty: it holds no records")
        else:
            records = list(split_file)
        self.dataset = dataset
        self.records: list[tuple[Path, list[float], str]] = []
        for k, r in enumerate(records):
            r = tuple(r)
            if dataset == "flickr" and len(r) == 3:
                file, box, phrase = r
            elif len(r) >= 4:
                file, _, box, phrase = r[:4]
            else:
                raise AnnotationError(
                    f"{where} record {k} has {len(r)} fields; expected (file, _, bbox, phrase, ...)"
                )
            if not (isinstance(file, str) and isinstance(phrase, str)):
                raise AnnotationError(f"{where} record {k}: the file and the phrase must be strings")
            if isinstance(box, str) or len(box) != 4 or any(isinstance(b, (str, bytes)) for b in box):
                raise AnnotationError(f"{where} record {k}: bbox must be 4 numbers, got {box!r}")
            box = [float(b) for b in box]
            if truncate_boxes:
                box = [float(int(b)) for b in box]
            if dataset not in XYXY_DATASETS:
                box = [box[0], box[1], box[0] + box[2], box[1] + box[3]]
            self.records.append((self._resolve(file), box, phrase.lower()))
        self._paths = [r[0] for r in self.records]

    def _sample(self, i: int, image: Image.Image) -> dict[str, Any]:
        _, box, phrase = self.records[i]
        s = self.transform(image, box, phrase)
        S = s.image.shape[-1]
        cx, cy, w, h = s.box.tolist()
        xyxy = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dtype=torch.float32) * S
        return {
            "image": s.image,
            "expression": s.text,
            "box": s.box,
            "box_xyxy": xyxy,
            "box_bins": box_to_bins(s.box),
            "image_mask": s.image_mask,
            "image_id": i,
        }

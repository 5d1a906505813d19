"""The official retrieval reader (COCO / Flickr30k in the ALBEF format): image-text pairs for training, a
gallery (texts, txt2img, img2txt, image(k)) for evaluation (see mplug_fast.data.official for the shared
image handling)."""

from __future__ import annotations

from typing import Any

from PIL import Image
from torch import Tensor

from mplug_fast.data.annotations import (
    TEXT,
    TEXT_OR_TEXTS,
    field,
)
from mplug_fast.data.official import (
    AnnotatedImageDataset,
    gallery,
    pre_caption,
)


class RetrievalJsonDataset(AnnotatedImageDataset):
    """COCO / Flickr30k Karpathy retrieval.

    train: [{"image", "caption", "image_id"}] -> one item per pair; image ids (any hashable) are mapped to
    0..N-1 in first-seen order (as the official ``re_train_dataset``), so positives share an id.
    val/test: [{"image", "caption": [..]}] -> one item per (image, caption) pair, and for evaluation
    ``texts`` / ``txt2img`` / ``img2txt`` / ``image(k)`` / ``num_images``, like the synthetic
    ``RetrievalDataset``. Captions go through ``pre_caption`` (30 words).
    """

    def _read(self) -> None:
        split = self.split
        items = []  # (image key, image path, captions): train entries of one image id are one image
        for k, e in enumerate(self.ann):
            path = self._resolve(field(e, "image", TEXT))
            caps = field(e, "caption", TEXT if split == "train" else TEXT_OR_TEXTS)
            caps = [pre_caption(c, self.max_words) for c in ([caps] if isinstance(caps, str) else caps)]
            items.append((e.get("image_id", str(path)) if split == "train" else k, path, caps))
        self.image_paths, self.texts, self.txt2img, self.img2txt = gallery(items)
        self._paths = [self.image_paths[k] for k in self.txt2img]

    @property
    def num_images(self) -> int:
        return len(self.image_paths)

    def image(self, k: int) -> Tensor:
        """The transformed image k (evaluation: iterate k over ``num_images``); a bad image raises."""
        img = self._try_load(self.image_paths[k])
        if img is None:
            raise RuntimeError(f"image {k} ({self.image_paths[k]}) is missing or unreadable")
        return self.transform(img)

    def _sample(self, i: int, image: Image.Image) -> dict[str, Any]:
        return {"image": self.transform(image), "caption": self.texts[i], "image_id": self.txt2img[i]}

"""The grounding (TransVG) image pipeline (fidelity §7): resize the longer side, pad to a square, random
crop / flip (with the text's left and right swapped) / colour jitter in training; the boxes follow every
step."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from PIL import Image, ImageEnhance
from torch import Tensor

from mplug_fast.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    ImageLike,
    check_size,
    load_image,
    make_rng,
    normalize,
    to_tensor,
)

# the official grounding *eval* normalises with these (fidelity §7: a bug)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GROUNDING_IMAGE_SIZE = 336  # official: hard-wired image_res of the grounding model and its coordinate bins


# official RandomSelect: a phrase with one of these words is never cropped
DIRECTION_WORDS = ("left", "right", "top", "bottom", "middle")


def swap_left_right(text: str) -> str:
    """Swaps left and right in a phrase: the text half of the grounding horizontal flip.

    "the man on the left" -> "the man on the right". The official code swaps every substring (so "bright"
    becomes "bleft"); we swap words starting with left/right ("leftmost" -> "rightmost", "bright" unchanged).
    """
    return re.sub(r"\b(left|right)", lambda m: "right" if m.group(1) == "left" else "left", text)


class GroundingSample(NamedTuple):
    image: Tensor  # float32 [3, S, S], normalised, zero (= the mean colour) on padding
    image_mask: Tensor  # bool [S, S], True = image pixel, False = padding (official mask: 1 = padding)
    box: Tensor  # float32 [4] (cx, cy, w, h) normalised by S
    text: str  # the phrase, left/right swapped when the image was flipped


class GroundingTransform:
    """TransVG's grounding pipeline (fidelity §7, ``dataset/vg_transforms.py``): image + xyxy box + phrase ->
    ``GroundingSample`` padded to S x S (S = 336 officially).

    Eval: long side -> S (bilinear), ToTensor, normalise, centred zero padding.
    Train: with p 0.5, unless the phrase contains a direction word: short side -> {400, 500, 600}, a random
    384..600 crop that keeps the box centre; then long side -> one of {S, S-16, ..., S-96}; ColorJitter
    (brightness, contrast, saturation 0.4, random order) with p 0.8; horizontal flip p 0.5 (box mirrored,
    left/right swapped in the text); ToTensor, normalise, zero padding at a random offset. For S != 336 the
    pixel constants scale by S / 336.

    Deviations from the official code (documented fixes): the crop requires the box centre inside the crop
    (the official test compares cx with the top row and cy with the left column), the text swap is by word
    start (``swap_left_right``), and the default mean/std are CLIP's for eval too (pass
    ``mean=IMAGENET_MEAN, std=IMAGENET_STD`` to reproduce the official evaluation).
    """

    def __init__(
        self,
        image_size: int = GROUNDING_IMAGE_SIZE,
        train: bool = False,
        color_jitter: bool = True,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        seed: int | random.Random | None = None,
    ):
        self.image_size, self.train, self.color_jitter = check_size(image_size), train, color_jitter
        self.mean, self.std = tuple(mean), tuple(std)
        f = image_size / GROUNDING_IMAGE_SIZE
        self.long_sizes = [max(1, round((GROUNDING_IMAGE_SIZE - 16 * i) * f)) for i in range(7)]
        self.short_sizes = [max(1, round(s * f)) for s in (400, 500, 600)]
        self.crop_range = (max(1, round(384 * f)), max(1, round(600 * f)))
        self.rng = make_rng(seed)

    @staticmethod
    def _resize(
        img: Image.Image, box: list[float], size: int, long_side: bool
    ) -> tuple[Image.Image, list[float]]:
        side = max(img.width, img.height) if long_side else min(img.width, img.height)
        ratio = size / side
        new_w, new_h = max(1, round(img.width * ratio)), max(1, round(img.height * ratio))
        return img.resize((new_w, new_h), Image.Resampling.BILINEAR), [c * ratio for c in box]

    def _crop(self, img: Image.Image, box: list[float], rng: Any) -> tuple[Image.Image, list[float]]:
        lo, hi = self.crop_range
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        for _ in range(20):  # official max_try
            w = rng.randint(min(lo, img.width), min(img.width, hi))
            h = rng.randint(min(lo, img.height), min(img.height, hi))
            i, j = rng.randint(0, img.height - h), rng.randint(0, img.width - w)
            if j < cx < j + w and i < cy < i + h:
                x0, y0, x1, y1 = box[0] - j, box[1] - i, box[2] - j, box[3] - i
                clamped = [min(max(x0, 0), w), min(max(y0, 0), h), min(max(x1, 0), w), min(max(y1, 0), h)]
                return img.crop((j, i, j + w, i + h)), clamped
        return img, box

    def _jitter(self, img: Image.Image, rng: Any) -> Image.Image:
        if rng.random() >= 0.8:
            return img
        enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
        for k in rng.sample(range(3), 3):  # random order
            img = enhancers[k](img).enhance(rng.uniform(0.6, 1.4))
        return img

    def __call__(
        self,
        image: ImageLike,
        box_xyxy: Sequence[float],
        text: str = "",
        rng: random.Random | Any | None = None,
    ) -> GroundingSample:
        """Args: image: any ``load_image`` input. box_xyxy: the box in pixels of ``image``. text: the phrase.
        rng: RNG for this call (train only; default the transform's)."""
        rng = self.rng if rng is None else rng
        img = load_image(image)
        box = [float(c) for c in box_xyxy]
        if len(box) != 4 or not (box[0] <= box[2] and box[1] <= box[3]):
            raise ValueError(f"box_xyxy must be 4 numbers x0 <= x1, y0 <= y1 in pixels, got {list(box_xyxy)}")
        S = self.image_size
        if self.train:
            if not any(w in text for w in DIRECTION_WORDS) and rng.random() < 0.5:
                img, box = self._resize(img, box, rng.choice(self.short_sizes), long_side=False)
                img, box = self._crop(img, box, rng)
            img, box = self._resize(img, box, rng.choice(self.long_sizes), long_side=True)
            if self.color_jitter:
                img = self._jitter(img, rng)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                box = [img.width - box[2], box[1], img.width - box[0], box[3]]
                text = swap_left_right(text)
        else:
            img, box = self._resize(img, box, S, long_side=True)
        x = normalize(to_tensor(img), self.mean, self.std)  # [3, h, w]
        h, w = x.shape[1:]
        dh, dw = S - h, S - w
        if self.train:
            top, left = rng.randint(0, dh), rng.randint(0, dw)
        else:
            top, left = round(dh / 2.0 - 0.1), round(dw / 2.0 - 0.1)
        out = torch.zeros(3, S, S)
        out[:, top : top + h, left : left + w] = x  # [3, S, S]
        mask = torch.zeros(S, S, dtype=torch.bool)
        mask[top : top + h, left : left + w] = True
        x0, y0, x1, y1 = box[0] + left, box[1] + top, box[2] + left, box[3] + top
        cxcywh = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dtype=torch.float32) / S
        return GroundingSample(image=out, image_mask=mask, box=cxcywh, text=text)

    def __repr__(self) -> str:
        return f"GroundingTransform(image_size={self.image_size}, train={self.train}, mean={self.mean})"

"""User inputs of the pipeline: images of every kind, batches, and texts (checked and truncated).

Images: a path (str / Path), a PIL image (any mode: grayscale, RGBA, palette -> RGB), a numpy array
(HWC or HW, uint8 or float in [0, 1]; a 4-D array is a batch), a tensor (CHW / HWC / HW; a 4-D tensor is a
batch), or a list / tuple of those. Loading and conversion are `mplug_fast.data.load_image`'s.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mplug_fast.data.tokenizer import Tokenizer
from mplug_fast.data.transforms import load_image

ImageInput = str | Path | Image.Image | np.ndarray | Tensor


def image_list(images: ImageInput | Sequence[ImageInput]) -> tuple[list[Image.Image], bool]:
    """One image or a batch -> (RGB PIL images, is_batch). Raises with the offending item's position."""
    if isinstance(images, (str, Path, Image.Image)):
        items, is_batch = [images], False
    elif isinstance(images, (np.ndarray, Tensor)):
        if images.ndim == 4:
            items, is_batch = list(images), True
        elif images.ndim in (2, 3):
            items, is_batch = [images], False
        else:
            raise ValueError(
                f"image array must be HW, HWC / CHW or a batch NHWC / NCHW, got shape {list(images.shape)}"
            )
    elif isinstance(images, Sequence):
        items, is_batch = list(images), True
        if not items:
            raise ValueError("got an empty list of images")
    else:
        raise TypeError(
            f"unsupported image type {type(images).__name__}; pass a path, a PIL image, a numpy array, "
            "a tensor, or a list of them"
        )
    out = []
    for n, item in enumerate(items):
        try:
            out.append(load_image(item))
        except (ValueError, TypeError) as e:
            if is_batch:
                raise type(e)(f"image {n} of the batch: {e}") from e
            raise
    return out, is_batch


def text_list(texts: str | Sequence[str], what: str) -> tuple[list[str], bool]:
    """One text or a list -> (texts, is_batch); empty or non-string texts raise naming `what`."""
    if isinstance(texts, str):
        items, is_batch = [texts], False
    elif isinstance(texts, Sequence):
        items, is_batch = list(texts), True
        if not items:
            raise ValueError(f"got an empty list of {what}s")
    else:
        raise TypeError(f"{what} must be a string or a list of strings, got {type(texts).__name__}")
    for n, text in enumerate(items):
        where = f"{what} {n}" if is_batch else what
        if not isinstance(text, str):
            raise TypeError(f"{where} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{where} is empty; give some text")
    return items, is_batch


def broadcast(a: list, b: list, what_a: str, what_b: str) -> tuple[list, list]:
    """Pairs two lists: equal lengths pair up, a single item repeats."""
    if len(a) == len(b):
        return a, b
    if len(a) == 1:
        return a * len(b), b
    if len(b) == 1:
        return a, b * len(a)
    raise ValueError(f"got {len(a)} {what_a}s and {len(b)} {what_b}s; give one of either, or as many of each")


def tokenize(tokenizer: Tokenizer, texts: list[str], max_length: int, what: str) -> tuple[Tensor, Tensor]:
    """ "[CLS] text [SEP]" ids and masks long [B, L] padded to the longest; texts over `max_length` tokens
    are cut (keeping the final [SEP]) with a warning."""
    for n, text in enumerate(texts):
        length = len(tokenizer.encode(text))
        if length > max_length:
            warnings.warn(
                f"{what} {n} has {length} tokens (with [CLS] and [SEP]); truncated to {max_length}: "
                f"{text[:60]!r}...",
                stacklevel=3,
            )
    batch = tokenizer(texts, padding="longest", max_length=max_length, truncation=True)
    return batch.input_ids, batch.attention_mask


def prompt_ids(tokenizer: Tokenizer, prompt: str, max_length: int) -> Tensor:
    """A decoder prompt as ids long [1, Lp] of "[CLS] prompt" (no final [SEP]; a prompt over ``max_length``
    tokens is cut with a warning); [CLS] alone for an empty prompt."""
    if not prompt.strip():
        return torch.tensor([[tokenizer.cls_token_id]])
    ids, _ = tokenize(tokenizer, [prompt], max_length, "prompt")  # one prompt: no padding
    return ids[:, :-1]  # drop the [SEP]

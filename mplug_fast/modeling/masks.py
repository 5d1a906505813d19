"""Padding masks: the one conversion to the bool form every module and op takes (True = attend)."""

from __future__ import annotations

import torch
from torch import Tensor


def as_bool_mask(mask: Tensor | None, shape: torch.Size | tuple[int, ...] | None = None) -> Tensor | None:
    """A 0/1 (any integer or float dtype) or bool padding mask as bool, True = attend (a real token).

    Args:
        mask: [B, L] (or any shape), nonzero / True = attend; None = no padding.
        shape: the shape the mask must have (e.g. the ids' [B, L]); None = not checked.
    Returns:
        bool tensor of the same shape (the input itself when already bool), or None.
    """
    if mask is None:
        return None
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"attention mask must have the shape of the ids {list(shape)}, got {list(mask.shape)}"
        )
    return mask if mask.dtype == torch.bool else mask != 0

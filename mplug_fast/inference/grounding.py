"""Visual grounding inference: the decoder writes a box as coordinate tokens (docs/fidelity.md §5.5).

Token layout (bert-base-uncased vocab, checked by `coordinate_token_ids` against the vocab file):

    [unused339] (id 344)                       the box prefix, the decoder's start token
    [unused340 + b] (ids 345 .. 681), b=0..336 coordinate bin b (337 bins)

The decoder emits 4 coordinate tokens (cx, cy, w, h) greedily, with every non-coordinate logit
lowered by 10000 (the official `bbox_prob_mask`). Bin b stands for b / 336 of the padded square image:
the image is resized so its long side is S (the model's resolution), zero-padded to S x S centred
(`mplug_fast.data.GroundingTransform`, eval mode), and the box is normalised by S. Training quantises
t -> floor(clamp(t, 0, 1) * 336); inference reads bin b back as b / 336 (official), converts cxcywh to
xyxy, clamps to [0, 1] (official `eval_utils`), then undoes the padding and the resize to get pixels of
the original image (clamped to the image).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mplug_fast.data.tokenizer import Tokenizer
from mplug_fast.generation import greedy, token_bias
from mplug_fast.metrics.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from mplug_fast.modeling import MPlug

GROUNDING_NUM_BINS = 336  # official: image_res of the grounding model, hard-wired in the bins
PREFIX_UNUSED = 339  # [unused339] starts a box; bin b is [unused{340 + b}]
BOX_LOGIT_PENALTY = -10000.0  # official bbox_prob_mask value on non-coordinate tokens


def coordinate_token_ids(tokenizer: Tokenizer, num_bins: int = GROUNDING_NUM_BINS) -> tuple[int, Tensor]:
    """(prefix id, coordinate ids long [num_bins + 1]) looked up by name in the tokenizer's vocab.

    Raises ValueError when the coordinate ids are not consecutive (the decoding below reads bin b as
    id - first id, as the official code does)."""
    prefix = tokenizer.unused_token_id(PREFIX_UNUSED)
    ids = [tokenizer.unused_token_id(PREFIX_UNUSED + 1 + b) for b in range(num_bins + 1)]
    if ids != list(range(ids[0], ids[0] + num_bins + 1)):  # checked on the host (any default device)
        raise ValueError("the vocab's [unused340..] coordinate tokens are not consecutive ids")
    return prefix, torch.tensor(ids)


@dataclass(frozen=True)
class PadGeometry:
    """How an image of `width` x `height` pixels sits in the S x S grounding input: pixel (x, y) of the
    image is at (x * scale + left, y * scale + top)."""

    width: int
    height: int
    size: int  # S
    scale: float
    left: int
    top: int

    @classmethod
    def of(cls, width: int, height: int, size: int) -> PadGeometry:
        """The eval `GroundingTransform` geometry: long side -> S (scale S / long side), centred padding."""
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        scale = size / max(width, height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        left, top = round((size - new_w) / 2.0 - 0.1), round((size - new_h) / 2.0 - 0.1)
        return cls(width=width, height=height, size=size, scale=scale, left=left, top=top)


def box_to_tokens(
    box_xyxy: Tensor | list[float],
    geometry: PadGeometry,
    prefix_id: int,
    coord_ids: Tensor,
    num_bins: int = GROUNDING_NUM_BINS,
) -> Tensor:
    """A box in pixels of the original image -> the decoder's target ids long [5]: prefix + (cx, cy, w, h)
    coordinate tokens (the training quantisation floor(clamp(t, 0, 1) * num_bins))."""
    b = torch.as_tensor(box_xyxy, dtype=torch.float64)
    g = geometry
    padded = b * g.scale + torch.tensor([g.left, g.top, g.left, g.top], dtype=torch.float64)
    bins = torch.floor((box_xyxy_to_cxcywh(padded) / g.size).clamp(0, 1) * num_bins).long()  # [4]
    return torch.cat([torch.tensor([prefix_id]), coord_ids[bins]])


def tokens_to_box(
    tokens: Tensor, geometry: PadGeometry, first_coord_id: int, num_bins: int = GROUNDING_NUM_BINS
) -> Tensor:
    """4 coordinate token ids [..., 4] (cx, cy, w, h) -> box float64 [..., 4] (x0, y0, x1, y1) in pixels
    of the original image: bin / num_bins, cxcywh -> xyxy, clamp to [0, 1], undo padding and resize,
    clamp to the image."""
    bins = (tokens.to(torch.float64) - first_coord_id).clamp(0, num_bins)
    xyxy = box_cxcywh_to_xyxy(bins / num_bins).clamp(0, 1) * geometry.size  # padded pixels
    g = geometry
    offset = torch.tensor([g.left, g.top, g.left, g.top], dtype=torch.float64)
    box = (xyxy - offset) / g.scale
    limit = torch.tensor([g.width, g.height, g.width, g.height], dtype=torch.float64)
    return torch.minimum(box.clamp(min=0), limit)


@torch.no_grad()
def ground_tokens(
    model: MPlug,
    images: Tensor,
    text_ids: Tensor,
    text_mask: Tensor | None,
    prefix_id: int,
    coord_ids: Tensor,
) -> Tensor:
    """Greedy box decoding for a batch.

    Args:
        model: a grounding model (text encoder, fusion, decoder).
        images: [B, 3, S, S] padded grounding inputs.  text_ids / text_mask: [B, L] the expressions.
        prefix_id: [unused339].  coord_ids: long [num_bins + 1] the coordinate tokens.
    Returns:
        long [B, 4] coordinate token ids (cx, cy, w, h).
    """
    memory, memory_mask = model.fused_memory(images, text_ids, text_mask)  # [B, Nv + L, D]
    decoder = model.decoder
    V = decoder.embeddings.word.num_embeddings
    bias = token_bias(V, coord_ids, BOX_LOGIT_PENALTY, device=images.device)
    start = torch.full((images.shape[0], 1), prefix_id, dtype=torch.long, device=images.device)
    out = greedy(
        decoder, memory, memory_mask, start, max_length=4, min_length=0, eos_id=None, logit_bias=bias
    )
    return out.ids[:, 0, 1:5]  # [B, 4]

"""Image-text retrieval scoring (docs/fidelity.md §5.4): ITC similarities for every pair, then ITM on the
top-k of each query.

    1. every image -> ViT -> CLS -> vision_proj -> normalise; every text -> text encoder -> CLS ->
       text_proj -> normalise; sims = img . txt^T  [Ni, Nt]
    2. i2t: for each image its top-k texts by sim; t2i: for each text its top-k images
    3. score = the ITM head's class-1 logit of the fused (image, text) pair; every other entry -100
       (official; the ITC similarity is not added for images)

The pairs of both directions are merged first, so a pair in both top-k lists runs the fusion once, and
they run in chunks of `batch_size` pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mplug_fast.modeling import MPlug

UNSCORED = -100.0  # official fill value outside the top-k


@dataclass
class RetrievalScores:
    """i2t: float [Ni, Nt] image -> text scores (ITM logit on each image's top-k texts, -100 elsewhere);
    t2i: float [Nt, Ni] likewise per text; itc: float [Ni, Nt] the ITC cosine similarities."""

    i2t: Tensor
    t2i: Tensor
    itc: Tensor


@torch.no_grad()
def itm_scores(
    model: MPlug,
    image_states: Tensor,
    text_states: Tensor,
    text_mask: Tensor | None,
    image_index: Tensor,
    text_index: Tensor,
    batch_size: int = 64,
) -> Tensor:
    """ITM class-1 logits of the pairs (image_index[p], text_index[p]) -> float [P].

    Args: image_states [Ni, Nv, D] (after the adapter); text_states [Nt, L, D] (text encoder);
    text_mask [Nt, L] 1 = token; image_index / text_index long [P]."""
    out = []
    for i, t in zip(image_index.split(batch_size), text_index.split(batch_size)):
        mask = None if text_mask is None else text_mask[t]
        logits = model.itm_logits(image_states[i], text_states[t], mask)  # copy: [p, Nv, D] gathered
        out.append(logits[:, 1].float())
    return torch.cat(out) if out else torch.zeros(0, device=image_states.device)


@torch.no_grad()
def retrieval_scores(
    model: MPlug,
    images: Tensor,
    text_ids: Tensor,
    text_mask: Tensor | None,
    *,
    k: int = 256,
    batch_size: int = 64,
) -> RetrievalScores:
    """Scores every image against every text (official retrieval evaluation).

    Args:
        model: a retrieval (or pretraining) model.
        images: [Ni, 3, R, R]; text_ids / text_mask: [Nt, L].
        k: ITM-reranked candidates per query (official k_test 256; clamped to the gallery size).
        batch_size: images per ViT call and pairs per ITM call.
    Returns:
        `RetrievalScores` (i2t [Ni, Nt], t2i [Nt, Ni], itc [Ni, Nt]).
    """
    Ni, Nt = images.shape[0], text_ids.shape[0]
    if Ni == 0 or Nt == 0:
        raise ValueError(f"need at least one image and one text, got {Ni} images and {Nt} texts")
    v = torch.cat([model.encode_image(x) for x in images.split(batch_size)])  # [Ni, Nv, D]
    t = model.encode_text(text_ids, text_mask)  # [Nt, L, D]
    itc = (model.image_features(v) @ model.text_features(t).t()).float()  # [Ni, Nt]
    return rerank(model, itc, v, t, text_mask, k=k, batch_size=batch_size)


def rerank(
    model: MPlug,
    itc: Tensor,
    image_states: Tensor,
    text_states: Tensor,
    text_mask: Tensor | None,
    *,
    k: int,
    batch_size: int,
    add_itc: bool = False,
) -> RetrievalScores:
    """ITM on each query's top-k by ITC similarity itc [Ni, Nt] (image_states [Ni, N, D]: an image's tokens
    or a video's frame tokens; text_states [Nt, L, D]); score = the ITM class-1 logit (+ the ITC similarity
    when ``add_itc``), -100 outside the top-k."""
    Ni, Nt = itc.shape
    top_t = itc.topk(min(k, Nt), dim=1).indices  # [Ni, kt] texts of each image
    top_i = itc.t().topk(min(k, Ni), dim=1).indices  # [Nt, ki] images of each text
    dev = itc.device
    keys_i2t = (torch.arange(Ni, device=dev)[:, None] * Nt + top_t).reshape(-1)  # pair key i * Nt + j
    keys_t2i = (top_i * Nt + torch.arange(Nt, device=dev)[:, None]).reshape(-1)
    keys = torch.unique(torch.cat([keys_i2t, keys_t2i]))  # sorted, each pair once
    scores = itm_scores(model, image_states, text_states, text_mask, keys // Nt, keys % Nt, batch_size)  # [P]
    if add_itc:
        scores = scores + itc.reshape(-1)[keys]
    i2t = torch.full((Ni, Nt), UNSCORED, device=dev)
    t2i = torch.full((Nt, Ni), UNSCORED, device=dev)
    i2t.view(-1)[keys_i2t] = scores[torch.searchsorted(keys, keys_i2t)]
    t2i.scatter_(1, top_i, scores[torch.searchsorted(keys, keys_t2i)].view(Nt, -1))
    return RetrievalScores(i2t=i2t, t2i=t2i, itc=itc)

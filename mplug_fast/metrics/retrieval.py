"""Image-text retrieval recall (the official ``itm_eval``): TR@1/5/10, IR@1/5/10 and their means.

Text retrieval (TR, image -> text): the rank of an image is the best rank among its ground-truth captions;
image retrieval (IR, text -> image): the rank of the caption's image. R@K = percent of queries ranked < K.

Ties: a query's rank is the number of candidates scoring strictly higher than its best ground truth (ties
count in the query's favour). The official code ranks with ``np.argsort`` (tie order unspecified); the two
agree whenever scores are distinct, as continuous similarity/ITM scores are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

RECALL_KS = (1, 5, 10)


def _as_tensor(x: Tensor | np.ndarray, name: str) -> Tensor:
    t = torch.as_tensor(x).detach().cpu()
    if t.dim() != 2 or not t.is_floating_point():
        raise ValueError(
            f"{name} must be a 2-D float score matrix, got shape {list(t.shape)}, dtype {t.dtype}"
        )
    return t.double()


def ranks_image_to_text(scores_i2t: Tensor, img2txt: Sequence[Sequence[int]]) -> Tensor:
    """long [Ni]: for each image, #texts scoring above its best ground-truth text (scores_i2t [Ni, Nt])."""
    Ni, Nt = scores_i2t.shape
    if len(img2txt) != Ni:
        raise ValueError(f"img2txt has {len(img2txt)} entries for {Ni} images")
    gt = torch.zeros(Ni, Nt, dtype=torch.bool)
    for i, txts in enumerate(img2txt):
        if len(txts) == 0:
            raise ValueError(f"image {i} has no ground-truth text")
        gt[i, list(txts)] = True
    best = scores_i2t.masked_fill(~gt, float("-inf")).amax(dim=1, keepdim=True)  # [Ni, 1]
    return (scores_i2t > best).sum(dim=1)


def ranks_text_to_image(scores_t2i: Tensor, txt2img: Sequence[int]) -> Tensor:
    """long [Nt]: for each text, #images scoring above its image (scores_t2i [Nt, Ni])."""
    Nt, Ni = scores_t2i.shape
    if len(txt2img) != Nt:
        raise ValueError(f"txt2img has {len(txt2img)} entries for {Nt} texts")
    idx = torch.as_tensor(list(txt2img), dtype=torch.long)
    if idx.numel() and (idx.min() < 0 or idx.max() >= Ni):
        raise ValueError(f"txt2img entries must lie in [0, {Ni}), got range [{idx.min()}, {idx.max()}]")
    gt_score = scores_t2i.gather(1, idx[:, None])  # [Nt, 1]
    return (scores_t2i > gt_score).sum(dim=1)


def retrieval_recall(
    scores_i2t: Tensor | np.ndarray,
    scores_t2i: Tensor | np.ndarray,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
) -> dict[str, float]:
    """TR/IR recall in percent.

    Args:
        scores_i2t: float [Ni, Nt] image -> text scores (higher = better).
        scores_t2i: float [Nt, Ni] text -> image scores (often ``scores_i2t.T``; the official rerank fills
            the two separately).
        img2txt: per image, its ground-truth text indices. txt2img: per text, its image index.

    Returns:
        {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean"}
    """
    s_i2t, s_t2i = _as_tensor(scores_i2t, "scores_i2t"), _as_tensor(scores_t2i, "scores_t2i")
    if s_t2i.shape != s_i2t.shape[::-1]:
        raise ValueError(f"scores_t2i must be [Nt, Ni] = {list(s_i2t.shape[::-1])}, got {list(s_t2i.shape)}")
    r_img = ranks_image_to_text(s_i2t, img2txt)
    r_txt = ranks_text_to_image(s_t2i, txt2img)
    out: dict[str, float] = {}
    for prefix, ranks in (("txt", r_img), ("img", r_txt)):
        for k in RECALL_KS:
            out[f"{prefix}_r{k}"] = 100.0 * (ranks < k).double().mean().item()
        out[f"{prefix}_r_mean"] = sum(out[f"{prefix}_r{k}"] for k in RECALL_KS) / len(RECALL_KS)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out

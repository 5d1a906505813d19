"""Image-text retrieval evaluation: ITC similarities for every pair, ITM rerank of each query's top-k
(``mplug_fast.inference.retrieval_scores``), TR/IR recall@1/5/10 and their mean
(``mplug_fast.metrics.retrieval_recall``); also the ITC-only recalls. Predictions: each query's top 10."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from mplug_fast.tasks.base import Baseline, eval_mode, write_json

RECALL_KS = (1, 5, 10)


def _gallery(dataset: Dataset) -> tuple[Sequence[str], Sequence[int], Sequence[Sequence[int]]]:
    missing = [a for a in ("texts", "txt2img", "img2txt", "image") if not hasattr(dataset, a)]
    if missing:
        raise TypeError(
            f"retrieval evaluation needs a gallery dataset with texts / txt2img / img2txt / image(k) "
            f"(RetrievalDataset, RetrievalJsonDataset); {type(dataset).__name__} lacks {missing}"
        )
    return dataset.texts, dataset.txt2img, dataset.img2txt


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    tokenizer: Any,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    k: int = 256,
    max_length: int = 30,
    output: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Recall of ``model`` (a retrieval model) over the whole gallery of ``dataset``.

    Args:
        k: ITM-reranked candidates per query (official k_test 256; clamped to the gallery size).
    Returns:
        {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", ..., "r_mean" (percent, ITC + ITM rerank),
         the same keys prefixed "itc/" (ITC similarities alone), "num_images", "num_texts"}.
    """
    from mplug_fast.inference import retrieval_scores
    from mplug_fast.metrics import retrieval_recall

    texts, txt2img, img2txt = _gallery(dataset)
    images = torch.stack([dataset.image(j) for j in range(len(img2txt))]).to(device)
    enc = tokenizer(list(texts), padding="longest", max_length=max_length, truncation=True)
    ids, mask = enc.input_ids.to(device), enc.attention_mask.bool().to(device)
    with eval_mode(model):
        scores = retrieval_scores(model, images, ids, mask, k=k, batch_size=batch_size)
    result: dict[str, Any] = dict(retrieval_recall(scores.i2t, scores.t2i, img2txt, txt2img))
    itc = retrieval_recall(scores.itc, scores.itc.t(), img2txt, txt2img)
    result.update({f"itc/{key}": v for key, v in itc.items()})
    result["num_images"], result["num_texts"] = len(img2txt), len(texts)
    if output is not None:
        top = min(10, len(texts)), min(10, len(img2txt))
        write_json(
            {
                "i2t": [row.topk(top[0]).indices.tolist() for row in scores.i2t.cpu()],
                "t2i": [row.topk(top[1]).indices.tolist() for row in scores.t2i.cpu()],
            },
            output,
        )
    return result


def chance_recall(img2txt: Sequence[Sequence[int]], num_texts: int) -> dict[str, float]:
    """Expected recall (percent) of a uniformly random ranking: TR R@k = mean over images of
    1 − C(Nt − m, k) / C(Nt, k) (m = the image's texts), IR R@k = min(k, Ni) / Ni."""
    Ni = len(img2txt)
    out: dict[str, float] = {}
    for k in RECALL_KS:
        kt = min(k, num_texts)
        tr = [1.0 - math.comb(num_texts - len(t), kt) / math.comb(num_texts, kt) for t in img2txt]
        out[f"txt_r{k}"] = 100.0 * sum(tr) / Ni
        out[f"img_r{k}"] = 100.0 * min(k, Ni) / Ni
    for prefix in ("txt", "img"):
        out[f"{prefix}_r_mean"] = sum(out[f"{prefix}_r{k}"] for k in RECALL_KS) / len(RECALL_KS)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def baseline(train: Dataset, evaluation: Dataset) -> Baseline:
    """The expected mean recall of a random ranking of the evaluation gallery (``chance_recall``)."""
    texts, _, img2txt = _gallery(evaluation)
    value = chance_recall(img2txt, len(texts))["r_mean"]
    return Baseline("r_mean", value, f"random ranking of {len(img2txt)} images / {len(texts)} texts")

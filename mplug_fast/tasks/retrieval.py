"""Image-text retrieval: ITC (projections + temperature, momentum encoders) and ITM (fusion + itm_head).

Training: `RetrievalObjective` (fidelity §5.4). Data: the synthetic ``RetrievalDataset`` or the official
``RetrievalJsonDataset``; batches from ``RetrievalCollator``.

Evaluation: ITC similarities for every pair, ITM rerank of each query's top-k
(``mplug_fast.inference.retrieval_scores``), TR/IR recall@1/5/10 and their mean
(``mplug_fast.metrics.retrieval_recall``); also the ITC-only recalls. Predictions: each query's top 10."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mplug_fast.data.collate import RetrievalCollator
from mplug_fast.data.official_retrieval import RetrievalJsonDataset
from mplug_fast.data.synthetic import RetrievalDataset
from mplug_fast.inference.retrieval import RetrievalScores, retrieval_scores
from mplug_fast.io import atomic_write_json
from mplug_fast.metrics import retrieval_recall
from mplug_fast.modeling import MPlugForRetrieval
from mplug_fast.objectives.pretrain import ContrastiveObjective, ContrastiveOptions
from mplug_fast.tasks.evaluation import eval_mode
from mplug_fast.tasks.protocol import Baseline, Task

RECALL_KS = (1, 5, 10)


def gallery(
    dataset: Dataset, item: str = "image"
) -> tuple[Sequence[str], Sequence[int], Sequence[Sequence[int]]]:
    """(texts, text -> item, item -> texts) of a retrieval gallery of images (``item`` "image": texts /
    txt2img / img2txt / image(k)) or videos ("video": texts / txt2vid / vid2txt / video(k))."""
    short = "img" if item == "image" else "vid"
    names = ("texts", f"txt2{short}", f"{short}2txt", item)
    missing = [a for a in names if not hasattr(dataset, a)]
    if missing:
        raise TypeError(
            f"{item} retrieval evaluation needs a gallery dataset with {' / '.join(names)}(k) "
            f"(RetrievalDataset, RetrievalJsonDataset, VideoRetrievalDataset); {type(dataset).__name__} "
            f"lacks {missing}"
        )
    return dataset.texts, getattr(dataset, names[1]), getattr(dataset, names[2])


def recall_result(
    scores: RetrievalScores,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    output: str | os.PathLike[str] | None,
    directions: tuple[str, str] = ("i2t", "t2i"),
) -> dict[str, Any]:
    """TR/IR recall@1/5/10 and means of ``scores`` (ITC + ITM rerank), the same prefixed "itc/" (ITC
    alone); ``output``: each query's top 10 written as {directions[0]: [[j, ...]], directions[1]: ...}."""
    result: dict[str, Any] = dict(retrieval_recall(scores.i2t, scores.t2i, img2txt, txt2img))
    itc = retrieval_recall(scores.itc, scores.itc.t(), img2txt, txt2img)
    result.update({f"itc/{key}": v for key, v in itc.items()})
    if output is not None:
        top = {
            d: [row.topk(min(10, row.numel())).indices.tolist() for row in m.cpu()]
            for d, m in zip(directions, (scores.i2t, scores.t2i))
        }
        atomic_write_json(output, top)
    return result


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

    texts, txt2img, img2txt = gallery(dataset)
    images = torch.stack([dataset.image(j) for j in range(len(img2txt))]).to(device)
    enc = tokenizer(list(texts), padding="longest", max_length=max_length, truncation=True)
    ids, mask = enc.input_ids.to(device), enc.attention_mask.bool().to(device)
    with eval_mode(model):
        scores = retrieval_scores(model, images, ids, mask, k=k, batch_size=batch_size)
    result = recall_result(scores, img2txt, txt2img, output)
    result["num_images"], result["num_texts"] = len(img2txt), len(texts)
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


def baseline(train: Dataset, evaluation: Dataset, item: str = "image") -> Baseline:
    """The expected mean recall of a random ranking of the evaluation gallery of images (``item`` "video":
    of videos) (``chance_recall``)."""
    texts, _, item2txt = gallery(evaluation, item)
    value = chance_recall(item2txt, len(texts))["r_mean"]
    return Baseline("r_mean", value, f"random ranking of {len(item2txt)} {item}s / {len(texts)} texts")


# ---- training --------------------------------------------------------------------------------------------


class RetrievalObjective(ContrastiveObjective):
    """Retrieval finetuning (fidelity §5.4): ITC with the queue, momentum distillation and multi-positive
    targets by image id, + ITM with hard negatives (never an image with the same id). The temperature is
    clamped (the official retrieval model does not: a documented deviation). Options: the base class's."""

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """batch: images, text_ids / text_mask [B, L], image_ids [B]. Returns {"loss", "itc", "itm"}."""
        if "image_ids" not in batch and "image_id" not in batch:
            raise KeyError(
                "RetrievalObjective needs 'image_ids' [B] (captions of one image are all positives)"
            )
        return super().forward(batch)


# ---- the task --------------------------------------------------------------------------------------------


class RetrievalTask(Task):
    name = "retrieval"
    metric = "r_mean"
    model_class = MPlugForRetrieval
    collator = RetrievalCollator
    reader = RetrievalJsonDataset
    synthetic_class = RetrievalDataset
    objective_class = RetrievalObjective
    Options = ContrastiveOptions
    eval_options = {"k": 256}
    predictions_file = "retrieval_top10.json"
    pipeline_method = "rank"
    limitable = False  # the official gallery is the split
    evaluate = staticmethod(evaluate)
    baseline = staticmethod(baseline)

"""VQA evaluation: answers by beam-search generation (official) or by ranking an answer list, scored with
the official VQA accuracy; predictions written in the EvalAI format ``[{"question_id", "answer"}]``."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from mplug_fast.tasks.base import Baseline, batches, eval_mode, item_text


def score_questions(
    predictions: Mapping[Hashable, str],
    gold: Mapping[Hashable, Sequence[str]],
    types: Mapping[Hashable, str] | None = None,
) -> tuple[float, dict[str, float], str]:
    """(accuracy %, per-type accuracy %, kind) of the predictions.

    A question with several human answers (VQA v2: 10) gets the official VQA accuracy (``vqa_score``:
    min(#matches / 3, 1) over the leave-one-out subsets); a question with a single answer (the synthetic
    world, VG, GQA) gets the normalised exact match (``exact_match``) -- the official formula would give it 0
    even when right, as no other annotator is left. ``kind`` is "official", "exact" or "mixed".
    """
    from mplug_fast.metrics.vqa import exact_match, vqa_score

    if not predictions:
        raise ValueError("no predictions to score")
    per_q = {
        q: exact_match(p, gold[q]) if len(gold[q]) == 1 else vqa_score(p, gold[q])
        for q, p in predictions.items()
    }
    singles = sum(len(gold[q]) == 1 for q in predictions)
    kind = "exact" if singles == len(per_q) else "official" if singles == 0 else "mixed"
    groups: dict[str, list[float]] = {}
    for q, acc in per_q.items():
        if types is not None:
            groups.setdefault(types[q], []).append(acc)
    per_type = {t: 100.0 * sum(v) / len(v) for t, v in groups.items()}
    return 100.0 * sum(per_q.values()) / len(per_q), per_type, kind


def _gold(batch: dict[str, Any], i: int) -> list[str]:
    """The human answers of question i of a collated batch (``gt_answers`` when the reader has them)."""
    gold = batch.get("gt_answers", batch["answers"])[i]
    return [gold] if isinstance(gold, str) else list(gold)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    tokenizer: Any,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    method: str = "generate",
    answer_list: Sequence[str] | None = None,
    beam_size: int = 5,
    max_answer_length: int = 10,
    k: int = 128,
    max_question_length: int = 25,
    output: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """VQA accuracy of ``model`` (a vqa model) on ``dataset`` (VQA samples).

    Args:
        method: "generate" (beam search, ``beam_size`` / ``max_answer_length``) or "rank" (``answer_list``
            ranked, top ``k`` by first token then full likelihood).
        output: where to write the EvalAI result JSON (None: not written).
    Returns:
        {"vqa_acc": percent (see `score_questions`), "vqa_acc_kind",
         "vqa_acc/<type>": percent per question type (when samples have ``type``),
         "count": questions, "predictions": {question_id: answer}}.
    """
    from mplug_fast.data.collate import VQACollator
    from mplug_fast.inference import vqa_generate, vqa_rank
    from mplug_fast.metrics import write_vqa_results

    if method not in ("generate", "rank"):
        raise ValueError(f"method must be 'generate' or 'rank', got {method!r}")
    answers_t = None
    if method == "rank":
        if not answer_list:
            raise ValueError("method='rank' needs a non-empty answer_list")
        enc = tokenizer([a + "[SEP]" for a in answer_list], padding="longest")
        answers_t = (enc.input_ids.to(device), enc.attention_mask.to(device))
    collate = VQACollator(tokenizer, max_question_length=max_question_length)
    predictions: dict[Any, str] = {}
    gold: dict[Any, list[str]] = {}
    types: dict[Any, str] = {}
    n = 0
    with eval_mode(model):
        for batch in batches(dataset, collate, batch_size, device):
            B = batch["images"].shape[0]
            args = (model, batch["images"], batch["question_ids"], batch["question_mask"])
            if answers_t is not None:
                ranked = vqa_rank(*args, *answers_t, k=min(k, len(answer_list)))
                answers = [answer_list[int(i)] for i in ranked.indices[:, 0]]
            else:
                out = vqa_generate(*args, beam_size=beam_size, max_length=max_answer_length)
                answers = [
                    tokenizer.decode(row[1:].tolist(), skip_special_tokens=True) for row in out.ids[:, 0]
                ]
            qids = batch.get("question_id", list(range(n, n + B)))
            for i in range(B):
                qid = qids[i]
                if qid in predictions:
                    raise ValueError(f"duplicate question_id {qid!r} in the VQA evaluation set")
                predictions[qid] = answers[i].strip()
                gold[qid] = _gold(batch, i)
                if "type" in batch:
                    types[qid] = batch["type"][i]
            n += B
    overall, per_type, kind = score_questions(predictions, gold, types or None)
    result: dict[str, Any] = {"vqa_acc": overall, "count": len(predictions), "vqa_acc_kind": kind}
    result.update({f"vqa_acc/{t}": v for t, v in sorted(per_type.items())})
    if output is not None:
        write_vqa_results(predictions, output)
    result["predictions"] = predictions
    return result


def baseline(train: Dataset, evaluation: Dataset, limit: int = 2000) -> Baseline:
    """The majority answer of (up to ``limit``) training questions, scored as `evaluate` scores (official VQA
    accuracy / exact match, see `score_questions`) on the evaluation questions."""
    counts = Counter(a for i in range(min(limit, len(train))) for a in item_text(train, i, "answers"))
    if not counts:
        raise ValueError("the training set has no answers")
    majority = counts.most_common(1)[0][0]
    gold = {}
    for i in range(len(evaluation)):
        answers = item_text(evaluation, i, "gt_answers")
        gold[i] = [answers] if isinstance(answers, str) else list(answers)
    acc = score_questions(dict.fromkeys(gold, majority), gold)[0]
    return Baseline("vqa_acc", acc, f"majority training answer {majority!r} for every question")


def answer_list_from(dataset: Dataset, limit: int = 5000) -> list[str]:
    """The distinct answers of (up to ``limit``) samples of ``dataset``, most frequent first (a rank list)."""
    counts = Counter(a for i in range(min(limit, len(dataset))) for a in item_text(dataset, i, "answers"))
    return [a for a, _ in counts.most_common()]

"""VQA: question -> fusion -> decoder over [image; question] generates (or ranks) the answer.

Training: `VQAObjective`, the weighted-answer decoder loss (fidelity §5.1), distillation from momentum copies.
Evaluation: answers by beam-search generation (official) or by ranking an answer list, scored with the
official VQA accuracy; predictions written in the EvalAI format ``[{"question_id", "answer"}]``.
Data: the synthetic ``VQADataset`` or the official ``VQAJsonDataset``; batches from ``VQACollator``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mplug_fast.data.collate import VQACollator
from mplug_fast.data.official import VQAJsonDataset
from mplug_fast.data.synthetic import QA_TYPES, VQADataset
from mplug_fast.inference.generate import vqa_generate, vqa_rank
from mplug_fast.metrics import write_vqa_results
from mplug_fast.metrics.vqa import exact_match, vqa_score
from mplug_fast.modeling import MomentumView, MPlugForVQA
from mplug_fast.modeling.momentum import MomentumCopies
from mplug_fast.objectives.base import Objective
from mplug_fast.objectives.losses import lm_loss
from mplug_fast.objectives.pretrain import MomentumMixin, require_keys
from mplug_fast.tasks.evaluation import batches, eval_mode, item_text
from mplug_fast.tasks.protocol import Baseline, Task
from mplug_fast.tasks.sources import synthetic_scenes

AnswerList = tuple[list[str], Tensor, Tensor]  # answers to rank, their ids / mask [A, La] (`answer_tokens`)


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


def _answers(gold: str | Sequence[str]) -> list[str]:
    """A question's human answers as a list (a reader may give one answer as a string)."""
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
    if method not in ("generate", "rank"):
        raise ValueError(f"method must be 'generate' or 'rank', got {method!r}")
    answers = None
    if method == "rank":
        if not answer_list:
            raise ValueError("method='rank' needs a non-empty answer_list")
        answers = answer_tokens(tokenizer, [a.strip() for a in answer_list], device)
    collate = VQACollator(tokenizer, max_question_length=max_question_length)

    def answer(batch: dict[str, Any]) -> list[str]:
        q = (batch["images"], batch["question_ids"], batch["question_mask"])
        return answer_batch(
            model, tokenizer, *q, answers=answers, k=k, beam_size=beam_size, max_length=max_answer_length
        )

    with eval_mode(model):
        result = answer_accuracy(batches(dataset, collate, batch_size, device), answer)
    if output is not None:
        write_vqa_results(result["predictions"], output)
    return result


def answer_tokens(tokenizer: Any, answers: Sequence[str], device: torch.device | str) -> AnswerList:
    """An answer list to rank: (the answers, ids / mask long [A, La] of "[CLS] answer [SEP] [SEP]")."""
    enc = tokenizer([a + "[SEP]" for a in answers], padding="longest")
    return list(answers), enc.input_ids.to(device), enc.attention_mask.to(device)


def answer_batch(
    model: nn.Module,
    tokenizer: Any,
    images: Tensor,
    question_ids: Tensor,
    question_mask: Tensor | None,
    *,
    answers: AnswerList | None = None,
    k: int = 128,
    double_count_first: bool = True,
    **generation: Any,
) -> list[str]:
    """The answers to a batch of questions (images [B, 3, R, R], question_ids / mask [B, Lq]): the best of
    ``answers`` (`answer_tokens`; official ranking, top ``k`` by first token, then full likelihood) when
    given, else generated by beam search (``generation``: `vqa_generate`'s options)."""
    args = (model, images, question_ids, question_mask)
    if answers is not None:
        names, ids, mask = answers
        ranked = vqa_rank(*args, ids, mask, k=k, double_count_first=double_count_first)  # k clamped to A
        return [names[int(i)] for i in ranked.indices[:, 0]]
    out = vqa_generate(*args, **generation)
    return [tokenizer.decode(row[1:].tolist(), skip_special_tokens=True).strip() for row in out.ids[:, 0]]


def answer_accuracy(
    batches: Iterable[dict[str, Any]], answer: Callable[[dict[str, Any]], list[str]], what: str = "VQA"
) -> dict[str, Any]:
    """Answers and scores the questions of collated batches (``answer(batch)``: the batch's predicted
    answers; question ids default to the running index): {"vqa_acc" (see `score_questions`), "count",
    "vqa_acc_kind", "vqa_acc/<type>" (when the batches have ``type``), "predictions": {question_id:
    answer}}."""
    predictions: dict[Any, str] = {}
    gold: dict[Any, list[str]] = {}
    types: dict[Any, str] = {}
    for batch in batches:
        answers = answer(batch)
        qids = batch.get("question_id", range(len(predictions), len(predictions) + len(answers)))
        for i, qid in enumerate(qids):
            if qid in predictions:
                raise ValueError(f"duplicate question_id {qid!r} in the {what} evaluation set")
            # the human answers: ``gt_answers`` when the reader has them
            predictions[qid], gold[qid] = answers[i], _answers(batch.get("gt_answers", batch["answers"])[i])
            if "type" in batch:
                types[qid] = batch["type"][i]
    overall, per_type, kind = score_questions(predictions, gold, types or None)
    result: dict[str, Any] = {"vqa_acc": overall, "count": len(predictions), "vqa_acc_kind": kind}
    result.update({f"vqa_acc/{t}": v for t, v in sorted(per_type.items())})
    return {**result, "predictions": predictions}


def baseline(train: Dataset, evaluation: Dataset, limit: int = 2000) -> Baseline:
    """The majority answer of (up to ``limit``) training questions, scored as `evaluate` scores (official VQA
    accuracy / exact match, see `score_questions`) on the evaluation questions."""
    answers = answer_list_from(train, limit)
    if not answers:
        raise ValueError("the training set has no answers")
    majority = answers[0]
    gold = {i: _answers(item_text(evaluation, i, "gt_answers")) for i in range(len(evaluation))}
    acc = score_questions(dict.fromkeys(gold, majority), gold)[0]
    return Baseline("vqa_acc", acc, f"majority training answer {majority!r} for every question")


def answer_list_from(dataset: Dataset, limit: int = 5000) -> list[str]:
    """The distinct answers of (up to ``limit``) samples of ``dataset``, most frequent first (a rank list)."""
    counts = Counter(a for i in range(min(limit, len(dataset))) for a in item_text(dataset, i, "answers"))
    return [a for a, _ in counts.most_common()]


# ---- training --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VQAOptions:
    """`VQAObjective` options (official yaml: distill true, alpha 0.4, momentum 0.995)."""

    distill: bool = True
    alpha: float = 0.4
    momentum: float = 0.995
    alpha_warmup_steps: int = 0


class VQAObjective(MomentumMixin, Objective):
    """VQA: loss = Σ_n weight_n · seqloss_n / B over the N answers of the B questions (docs/fidelity.md §5.1).

    The question memory [v'; t'] is computed once per question; each answer's decoder rows read it through
    `answer_index` (no per-answer copies). seqloss = per-sequence summed token loss.

    Distillation (decision): the official code builds and updates a momentum model every step but never
    passes alpha to the decoder, so the branch costs a full forward and changes nothing (fidelity §10.2). Here
    `distill=True` (default, alpha 0.4 as the official yaml) really mixes in the momentum decoder's soft
    labels: seqloss = Σ_t (1 − alpha)·CE + alpha·soft-CE over the vocabulary. The EMA copies (vision,
    adapter, text encoder, fusion — never updated officially, a bug — and decoder) live in this objective,
    created from the model's weights at construction (load the weights first, or call `copy_to_momentum`).
    `distill=False` reproduces what the official run effectively optimises, at half the cost.
    """

    MOMENTUM = ("vision", "adapter", "text_encoder", "fusion", "decoder")

    def __init__(self, model: nn.Module, **options: Any):  # options: `VQAOptions`
        super().__init__()
        o = VQAOptions(**options)
        self.model = model
        self.alpha, self.distill, self.alpha_warmup_steps = o.alpha, o.distill, o.alpha_warmup_steps
        self.momentum = MomentumCopies(model, self.MOMENTUM) if o.distill else None
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._init_momentum(model, self.momentum, o.momentum)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """batch: images [B,3,R,R], question_ids/mask [B,Lq], answer_ids/mask [N,La], answer_index [N],
        answer_weights [N]. Returns {"loss", "vqa"}."""
        keys = ("images", "question_ids", "question_mask", "answer_ids", "answer_mask", "answer_index")
        require_keys(batch, (*keys, "answer_weights"), "VQAObjective")
        images, q_ids, q_mask, a_ids, a_mask, index = (batch[k] for k in keys)
        q_mask, a_mask = q_mask.bool(), a_mask.bool()
        weights = batch["answer_weights"].to(torch.float32)
        alpha = self.next_alpha()
        memory, memory_mask = self.model.fused_memory(images, q_ids, q_mask)
        logits = self.model.decode(a_ids, a_mask, memory, memory_mask, memory_index=index)
        soft = None
        if self.momentum is not None and alpha > 0:
            with torch.no_grad():
                m = MomentumView(self.momentum)
                memory_m, _ = m.fused_memory(images, q_ids, q_mask)
                soft = m.decode(a_ids, a_mask, memory_m, memory_mask, memory_index=index)
        seq = lm_loss(logits, a_ids, a_mask, soft_logits=soft, alpha=alpha, reduction="sequence")  # [N]
        loss = (weights * seq).sum() / images.shape[0]
        return {"loss": loss, "vqa": loss.detach()}


# ---- the task --------------------------------------------------------------------------------------------


class VQATask(Task):
    name = "vqa"
    metric = "vqa_acc"
    model_class = MPlugForVQA
    collator = VQACollator
    reader = VQAJsonDataset
    objective_class = VQAObjective
    Options = VQAOptions
    eval_options = {"method": "generate", "beam_size": 5, "max_answer_length": 10}
    predictions_file = "vqa_result.json"  # EvalAI format
    length_option = "max_question_length"
    text_length = 25  # official question length (docs/fidelity.md §6)
    pipeline_method = "answer"
    evaluate = staticmethod(evaluate)
    baseline = staticmethod(baseline)

    def synthetic_dataset(self, split: str = "train", **world: Any) -> Dataset:
        s = synthetic_scenes(split, **world)
        return VQADataset(s.world, s.count, s.start, types=s.vqa_types or tuple(QA_TYPES))

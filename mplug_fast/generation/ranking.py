"""Scoring given sequences: teacher-forced log-likelihoods and answer-list ranking (docs/fidelity.md §5.7)."""

from __future__ import annotations

import torch
from torch import Tensor

from mplug_fast.generation.outputs import RankedAnswers
from mplug_fast.generation.state import as_memory_kv
from mplug_fast.modeling.decoder import MemoryKV, TextDecoder
from mplug_fast.modeling.masks import as_bool_mask


def sequence_log_probs(
    decoder: TextDecoder,
    memory: Tensor | MemoryKV,
    memory_mask: Tensor | None,
    ids: Tensor,
    mask: Tensor | None = None,
    memory_index: Tensor | int | None = None,
) -> Tensor:
    """Teacher-forced log-likelihood of ids [N, L] given ids[:, 0]: sum over t >= 1 (where mask[:, t]) of
    log p(ids[:, t] | ids[:, :t]) -> [N] fp32. Keeps the autograd graph (no no_grad here).

    This is minus the official per-sequence summed CE (`reduction='none'`, pad -> -100).
    memory_index: long [N], memory row of each sequence (None when the memory has N rows), or an int G:
    contiguous groups of G sequences per memory row.
    """
    memory_kv = as_memory_kv(decoder, memory)
    memory_mask = as_bool_mask(memory_mask)
    logits = decoder(ids, mask, None, memory_mask, memory_kv=memory_kv, memory_index=memory_index)
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [N, L-1, V]
    token_lp = log_probs.gather(2, ids[:, 1:, None])[..., 0]  # [N, L-1]
    if mask is not None:
        token_lp = token_lp.masked_fill(~as_bool_mask(mask)[:, 1:], 0.0)
    return token_lp.sum(dim=1)


@torch.no_grad()
def rank_answers(
    decoder: TextDecoder,
    memory: Tensor | MemoryKV,
    memory_mask: Tensor | None,
    answer_ids: Tensor,
    answer_mask: Tensor | None,
    k: int = 128,
    double_count_first: bool = True,
) -> RankedAnswers:
    """Answer-list ranking (official `rank_answer`, fidelity §5.7).

    1. One decoder step on [CLS] (answer_ids[0, 0]) per question: log p(first answer token) of every
       answer, log_softmax over the full vocabulary -> [Q, A]; the top k answers per question.
    2. The k candidates of every question are scored teacher-forced in one batch [Q*k, La], reading the
       question's memory K/V through `memory_index` (never tiled): s = sum over t >= 1 of log p(token t),
       padding excluded (the official per-sequence summed CE, negated; it includes both final [SEP]s).
    3. score = s + log p(first token) when `double_count_first` (the official code: the first answer token
       is counted twice, once from step 1 and once inside s), else score = s (the chain-rule log-likelihood).
       Candidates are sorted by score (stable); probs = softmax of the scores over the k candidates.

    Args:
        memory: [Q, M, D] (or its projected K/V); memory_mask: [Q, M] 1 = attend.
        answer_ids: long [A, La] "[CLS] answer [SEP] [SEP]" right-padded; answer_mask: [A, La] 1 = token.
        k: candidates per question (official k_test = 128; clamped to A).
    Returns:
        `RankedAnswers`: indices long [Q, k] into the answer list, best first; scores, probs [Q, k].
    """
    memory_kv = as_memory_kv(decoder, memory)
    memory_mask = as_bool_mask(memory_mask)
    Q = memory_kv[0][0].shape[0]
    A = answer_ids.shape[0]
    k = min(k, A)
    start = answer_ids[:1, :1].expand(Q, 1)  # [Q, 1] the [CLS] of the first answer (official)
    logits = decoder(start, None, None, memory_mask, memory_kv=memory_kv)[:, 0].float()  # [Q, V]
    first_lp = torch.log_softmax(logits, dim=-1).index_select(1, answer_ids[:, 1])  # [Q, A]
    top_first, top_index = first_lp.topk(k, dim=1)  # [Q, k]
    flat = top_index.reshape(-1)  # [Q*k]
    mask = None if answer_mask is None else answer_mask[flat]
    # Rows q*k .. q*k + k - 1 are question q's candidates: memory_index=k shares its memory K/V.
    s = sequence_log_probs(decoder, memory_kv, memory_mask, answer_ids[flat], mask, memory_index=k)
    scores = s.view(Q, k)
    if double_count_first:
        scores = scores + top_first
    scores, order = scores.sort(dim=1, descending=True, stable=True)
    return RankedAnswers(indices=top_index.gather(1, order), scores=scores, probs=scores.softmax(dim=1))

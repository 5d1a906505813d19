"""One beam-search step for the open samples of a batch: the Python twin of the native
`torch.ops.mplug_fast.beam_step` (kernels/), and the choice between the two.

Both update the step state in place with the same fp32 operations, and select candidates in (score
descending, lower index first) order, so they return identical hypotheses and scores. Samples are never
dropped here: a sample that closes is marked in `closed` and left untouched by later steps until the caller
drops it, so the caller needs a host synchronisation only when it wants to (`beam_search(sync_every=)`).

State (Bo open rows of a batch of B samples, K beams, vocabulary V, sequence buffer Lbuf):
    running [Bo, K] fp32: official: the unpenalized cumulative scores (-inf: dead beam); standard: the
        cumulative log-probs.  seq long [Bo, K, Lbuf].  closed bool [Bo].
    open_ids long [Bo]: each row's sample.
    fin_scores fp32 [B, S], fin_seqs long [B, S, Lbuf], fin_lengths long [B, S]: the finished hypotheses by
        sample; official: S = max_length * K, slot step * K + k, -inf = not recorded; standard: S = K, the
        best K, sorted descending.  steps long [B]: the steps each sample ran.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mplug_fast.ops.native import native_op, unavailable_reason

NEG_EOS = -1e20  # official: the [SEP] log-prob before min_length


def gnmt_length_penalty(step: int, alpha: float = 0.6) -> float:
    """GNMT length penalty of the official beam search at 0-based `step`: ((5 + step + 1) / 6) ** alpha."""
    return ((5.0 + (step + 1)) / 6.0) ** alpha


def stable_topk(x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The n largest entries of each row of x [R, C]: (values, indices) [R, n], value descending, equal
    values by lower index (`torch.topk` leaves the order of ties unspecified). One host synchronisation
    (whether a tie crosses the n-th place), none while a CUDA graph records: the tie path, exact for every
    row, then always runs."""
    R, C = x.shape
    values, index = x.topk(min(n + 1, C), dim=-1)  # [R, n + 1], ties in any order
    threshold = values[:, n - 1 : n]  # [R, 1] the n-th largest value
    recording = x.is_cuda and torch.cuda.is_current_stream_capturing()
    crossing = values.shape[1] > n and (recording or bool((values[:, n] == values[:, n - 1]).any()))
    index = index[:, :n]
    if crossing:  # a tie across the n-th place: take the lowest columns
        above, tied = x > threshold, x == threshold
        chosen = above | (tied & (tied.cumsum(-1) <= n - above.sum(-1, keepdim=True)))  # n per row
        slot = torch.where(chosen, chosen.cumsum(-1) - 1, n)  # [R, C] rank by column; n = not chosen
        columns = torch.arange(C, device=x.device).expand(R, C)
        index = torch.zeros(R, n + 1, dtype=torch.long, device=x.device).scatter_(1, slot, columns)[:, :n]
    index = index.sort(dim=1).values  # chosen columns in increasing order, then by value (stable)
    values = x.gather(1, index)
    order = values.sort(dim=1, descending=True, stable=True).indices
    return values.gather(1, order), index.gather(1, order)


def _merge(fin_scores, fin_seqs, fin_lengths, open_ids, open_rows, scores, seqs, length) -> None:
    """Merges candidates scores [Bo, C] / seqs [Bo, C, Lbuf] (of `length` tokens) of the open rows into
    their samples' kept best K (standard mode), sorted descending, stable."""
    K, L = fin_scores.shape[1], fin_seqs.shape[2]
    old_scores, old_seqs, old_lengths = fin_scores[open_ids], fin_seqs[open_ids], fin_lengths[open_ids]
    all_scores = torch.cat([old_scores, scores], dim=1)  # [Bo, K + C]
    order = all_scores.sort(dim=1, descending=True, stable=True).indices[:, :K]  # [Bo, K]
    all_seqs = torch.cat([old_seqs, seqs], dim=1)  # copy: [Bo, K + C, Lbuf]
    all_lengths = torch.cat([old_lengths, torch.full_like(scores, length, dtype=torch.long)], dim=1)
    keep = open_rows[:, None]
    fin_scores[open_ids] = torch.where(keep, all_scores.gather(1, order), old_scores)
    fin_seqs[open_ids] = torch.where(
        keep[..., None], all_seqs.gather(1, order[..., None].expand(-1, -1, L)), old_seqs
    )
    fin_lengths[open_ids] = torch.where(keep, all_lengths.gather(1, order), old_lengths)


def beam_step_reference(
    logits: Tensor,
    bias: Tensor | None,
    running: Tensor,
    seq: Tensor,
    closed: Tensor,
    open_ids: Tensor,
    fin_scores: Tensor,
    fin_seqs: Tensor,
    fin_lengths: Tensor,
    steps: Tensor,
    step: int,
    prompt_len: int,
    max_length: int,
    min_length: int,
    eos_id: int,
    alpha: float,
    official: bool,
    exact: bool,
) -> tuple[Tensor, Tensor]:
    """One step of `beam_search` (`official` or standard mode, `exact` early stopping: the rules are in its
    docstring) on the state of the module docstring, updated in place; the twin of the native op.

    logits [Bo*K, V] fp32 (+ bias [V] before the log-softmax); eos_id -1 = none.
    Returns (beam, token) long [Bo, K]: origin beam and token of each new beam (closed rows: k, 0).
    """
    Bo, K = running.shape
    V, L = logits.shape[1], seq.shape[2]
    open_rows = ~closed  # [Bo]
    log_probs = torch.log_softmax(logits if bias is None else logits + bias, dim=-1).view(Bo, K, V)
    if step < min_length and eos_id >= 0:
        log_probs[..., eos_id] = NEG_EOS
    lp = gnmt_length_penalty(step, alpha)
    last = step + 1 == max_length
    length = prompt_len + step + 1
    totals = log_probs + running[..., None]  # [Bo, K, V]
    n = K if official else 2 * K
    top, top_ids = stable_topk((totals / lp if official else totals).view(Bo, K * V), n)  # [Bo, n]
    beam, token = top_ids // V, top_ids % V
    cand = seq.gather(1, beam[..., None].expand(-1, -1, L))  # [Bo, n, Lbuf]
    cand[:, :, prompt_len + step] = token
    is_eos = token == eos_id if eos_id >= 0 else torch.zeros_like(token, dtype=torch.bool)
    if official:
        closing = torch.ones_like(open_rows) if last else is_eos[:, 0]  # [Bo]
        record = is_eos | closing[:, None]
        slots = slice(step * K, (step + 1) * K)
        old = fin_scores[open_ids, slots]
        fin_scores[open_ids, slots] = torch.where(
            open_rows[:, None], torch.where(record, top, float("-inf")), old
        )
        fin_seqs[open_ids, slots] = torch.where(open_rows[:, None, None], cand, fin_seqs[open_ids, slots])
        fin_lengths[open_ids, slots] = torch.where(open_rows[:, None], length, fin_lengths[open_ids, slots])
        new_running, new_seq = top * lp, cand
    else:
        rank = torch.arange(2 * K, device=logits.device)
        finished = is_eos & (rank < K) & (top > NEG_EOS / 2)
        scores = torch.where(finished, top / lp, float("-inf"))
        _merge(fin_scores, fin_seqs, fin_lengths, open_ids, open_rows, scores, cand, length)
        keep = is_eos.to(torch.int8).sort(dim=1, stable=True).indices[:, :K]  # non-[SEP] first, by rank
        new_running = top.gather(1, keep)
        new_seq = cand.gather(1, keep[..., None].expand(-1, -1, L))
        beam, token = beam.gather(1, keep), token.gather(1, keep)
        if last:  # beams still running hit max_length
            _merge(fin_scores, fin_seqs, fin_lengths, open_ids, open_rows, new_running / lp, new_seq, length)
            closing = torch.ones_like(open_rows)
        else:
            bound_lp = gnmt_length_penalty(max_length - 1, alpha) if exact else lp
            worst = fin_scores[open_ids, K - 1]
            closing = (worst > float("-inf")) & (new_running[:, 0] / bound_lp <= worst)
    running.copy_(torch.where(open_rows[:, None], new_running, running))
    seq.copy_(torch.where(open_rows[:, None, None], new_seq, seq))
    steps[open_ids] = torch.where(open_rows, step + 1, steps[open_ids])
    closed |= closing
    identity = torch.arange(K, device=logits.device).expand(Bo, K)
    return torch.where(open_rows[:, None], beam, identity), torch.where(open_rows[:, None], token, 0)


def resolve_beam_step(native: bool | None, device_type: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """The native op (native None: when it can run on `device_type`; True: required) or the Python twin."""
    op = None if native is False else native_op("beam_step", device_type)
    if native and op is None:
        raise RuntimeError(
            f"native beam_step requested but unavailable: {unavailable_reason('beam_step', device_type)}"
        )
    return op if op is not None else beam_step_reference

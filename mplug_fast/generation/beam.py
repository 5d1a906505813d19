"""Beam search: the official mPLUG beam search (docs/fidelity.md §5.6) and a standard one.

Samples finish independently: when a sample closes (official: its top beam emits [SEP]; standard: no
running beam can improve it) its rows, memory K/V rows and cache rows leave the batch before the next step.
Host synchronisation: one count of the open samples per step; everything else stays on the device.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mplug_fast.generation.outputs import PAD_ID, SEP_ID, GenerationOutput
from mplug_fast.generation.state import DecodingState, as_memory_kv, check_lengths
from mplug_fast.modeling.decoder import MemoryKV, TextDecoder

NEG_EOS = -1e20  # official: the [SEP] log-prob before min_length


def _log_probs(logits: Tensor, logit_bias: Tensor | None) -> Tensor:
    """fp32 log-softmax over the vocabulary of logits [N, V] (+ bias [V])."""
    if logit_bias is not None:
        logits = logits + logit_bias
    return torch.log_softmax(logits, dim=-1)


def gnmt_length_penalty(step: int, alpha: float = 0.6) -> float:
    """GNMT length penalty of the official beam search at 0-based `step`: ((5 + step + 1) / 6) ** alpha."""
    return ((5.0 + (step + 1)) / 6.0) ** alpha


@torch.no_grad()
def beam_search(
    decoder: TextDecoder,
    memory: Tensor | MemoryKV,
    memory_mask: Tensor | None,
    start_ids: Tensor,
    start_mask: Tensor | None = None,
    *,
    beam_size: int = 5,
    max_length: int = 10,
    min_length: int = 1,
    mode: Literal["official", "standard"] = "official",
    length_penalty: float = 0.6,
    eos_id: int | None = SEP_ID,
    pad_id: int = PAD_ID,
    num_return: int = 1,
    early_stopping: Literal["heuristic", "exact"] = "heuristic",
    logit_bias: Tensor | None = None,
    use_cache: bool = True,
) -> GenerationOutput:
    """Beam search over `beam_size` beams per sample; samples finish independently.

    Args:
        decoder: the `TextDecoder` (eval mode for the official inference).
        memory: [B, M, D] decoder memory, or its `decoder.project_memory(memory)`.
        memory_mask: [B, M] 1 = attend (None = all).
        start_ids: long [B, Lp] ([CLS] or a left-padded prompt); start_mask: [B, Lp] 1 = token.
        beam_size: K.  max_length: generation steps T (tokens after the start ids).
        min_length: [SEP] is forbidden (log-prob -1e20) at steps < min_length.
        mode: "official": fidelity §5.6 exactly -- each step scores = (log p + running) / lp with the
            GNMT lp ((5 + step + 1) / 6) ** length_penalty, top-K over K x V, running = score * lp; at the
            first step only beam 0 is live; a beam that emits [SEP] is recorded as a hypothesis with its
            penalized score but stays in the beam and keeps being extended; when a sample's top beam
            (index 0) emits [SEP], or at step T - 1, every beam of that step is recorded (even those not
            ending in [SEP]) and the sample closes; its hypotheses are sorted by score (stable: ties keep
            the recording order) and the best `num_return` returned.
            "standard": finished beams retire and their slot is taken by the next best candidate (top 2K
            per step, as in HF transformers; a [SEP] candidate ranked below K is dropped); the best K
            finished hypotheses are kept (same lp, applied at the step they finish); beams still running at
            step T - 1 finish there. A sample stops when it holds K finished hypotheses and no running beam
            can beat the worst of them: "heuristic" compares the best running score penalized at the
            current length (HF's default; with K = 1 this equals greedy decoding), "exact" penalizes it at
            max_length (a true bound, since log-probs are <= 0 and lp grows).
        length_penalty: alpha (0.6).  eos_id: [SEP] (102); None = never stop early (e.g. grounding).
        pad_id: filler after the end.  num_return: R <= K hypotheses per sample.
        logit_bias: [V] added to the logits before the log-softmax (grounding's coordinate mask).
        use_cache: incremental decoding (True) or full recomputation of the prefix each step.
    Returns:
        `GenerationOutput` with ids [B, R, Lp + T'] (T' = steps run), scores [B, R], lengths [B, R].
    """
    if mode not in ("official", "standard"):
        raise ValueError(f"mode must be 'official' or 'standard', got {mode!r}")
    if early_stopping not in ("heuristic", "exact"):
        raise ValueError(f"early_stopping must be 'heuristic' or 'exact', got {early_stopping!r}")
    if not 1 <= num_return <= beam_size:
        raise ValueError(f"num_return must be in [1, beam_size={beam_size}], got {num_return}")
    check_lengths(decoder, start_ids, max_length, min_length)
    memory_kv = as_memory_kv(decoder, memory)
    state = DecodingState(decoder, memory_kv, memory_mask, start_ids, start_mask, max_length, use_cache)
    logits = state.start()  # [B, V]
    B, Lp = start_ids.shape
    K, V = beam_size, logits.shape[-1]
    if V < 2 * K + 1:
        raise ValueError(f"beam_size {K} is too large for a vocabulary of {V}")
    device = logits.device
    rows = torch.arange(B, device=device).repeat_interleave(K)  # [B*K]: sample of each beam
    state.expand(rows, group=K)
    logits = logits[rows]  # [B*K, V] (the beams of a sample start identical)
    seq = torch.full((B, K, Lp + max_length), pad_id, dtype=torch.long, device=device)
    seq[:, :, :Lp] = start_ids[:, None]
    beam_offset = (torch.arange(B, device=device) * K)[:, None]  # [B, 1]
    running = torch.full((B, K), float("-inf"), device=device)
    running[:, 0] = 0.0  # first step: only beam 0 is live
    run = _official if mode == "official" else _standard
    return run(
        state,
        logits,
        seq,
        running,
        beam_offset,
        Lp=Lp,
        K=K,
        V=V,
        max_length=max_length,
        min_length=min_length,
        alpha=length_penalty,
        eos_id=eos_id,
        pad_id=pad_id,
        num_return=num_return,
        exact=early_stopping == "exact",
        logit_bias=logit_bias,
    )


def _official(
    state,
    logits,
    seq,
    running,
    beam_offset,
    *,
    Lp,
    K,
    V,
    max_length,
    min_length,
    alpha,
    eos_id,
    pad_id,
    num_return,
    exact,
    logit_bias,
) -> GenerationOutput:
    """fidelity §5.6 (`TextGenerator._fast_translate_batch`), batched; see `beam_search`.

    `seq`, `running`, `logits` hold the open samples only (`open_ids` [Bo]: their sample numbers); the
    recorded hypotheses `hyp_*` are indexed by sample."""
    B, device = seq.shape[0], seq.device
    T = max_length
    hyp_scores = torch.full((B, T, K), float("-inf"), device=device)  # [B, step, beam] recorded scores
    hyp_valid = torch.zeros((B, T, K), dtype=torch.bool, device=device)
    hyp_seqs = torch.full((B, T, K, Lp + T), pad_id, dtype=torch.long, device=device)
    open_ids = torch.arange(B, device=device)  # [Bo] samples still open
    steps_run = T
    for step in range(T):
        Bo = open_ids.shape[0]
        log_probs = _log_probs(logits, logit_bias).view(Bo, K, V)
        if step < min_length and eos_id is not None:
            log_probs[..., eos_id] = NEG_EOS
        lp = gnmt_length_penalty(step, alpha)
        scores = (log_probs + running[..., None]) / lp  # [Bo, K, V]
        top_scores, top_ids = scores.view(Bo, K * V).topk(K, dim=-1)  # [Bo, K], sorted
        running = top_scores * lp  # official: recover the log-probs by multiplying back
        beam = top_ids // V  # [Bo, K] origin beam
        token = top_ids % V  # [Bo, K]
        seq = seq.gather(1, beam[..., None].expand_as(seq))  # reorder: [Bo, K, Lp + T]
        seq[:, :, Lp + step] = token
        last = step + 1 == T
        if last:
            finished = torch.ones_like(token, dtype=torch.bool)
        elif eos_id is None:
            finished = torch.zeros_like(token, dtype=torch.bool)
        else:
            finished = token == eos_id
        closing = finished[:, 0]  # [Bo] top beam finished: the sample closes
        record = finished | closing[:, None]  # closing samples record every beam
        hyp_scores[open_ids, step] = torch.where(record, top_scores, float("-inf"))
        hyp_valid[open_ids, step] = record
        hyp_seqs[open_ids, step] = seq
        steps_run = step + 1
        if last:
            break
        still_open = ~closing
        n_open = int(still_open.sum())  # the one host sync per step
        if n_open == 0:
            break
        select = beam + beam_offset[:Bo]  # [Bo, K] decoder row each new beam continues
        if n_open < Bo:  # drop the closed samples from the batch
            keep = still_open.nonzero()[:, 0]  # [Bo']
            open_ids, seq, running = open_ids[keep], seq[keep], running[keep]
            token, select = token[keep], select[keep]
            state.keep_samples(keep)
        logits = state.advance(token.reshape(-1), select.reshape(-1))  # [Bo'*K, V]
    # Sort every sample's hypotheses; flattened (step, beam) order = the official recording order.
    flat_scores = hyp_scores[:, :steps_run].reshape(B, -1)  # [B, T'*K]
    flat_valid = hyp_valid[:, :steps_run].reshape(B, -1)
    key = torch.where(flat_valid, flat_scores, float("-inf"))
    order = key.sort(dim=1, descending=True, stable=True).indices[:, :num_return]  # [B, R]
    L = Lp + steps_run
    ids = hyp_seqs[:, :steps_run].reshape(B, -1, Lp + T)[:, :, :L]
    ids = ids.gather(1, order[..., None].expand(-1, -1, L))  # [B, R, L]
    lengths = Lp + 1 + order // K  # the step a hypothesis was recorded at, + 1
    return GenerationOutput(ids=ids, scores=flat_scores.gather(1, order), lengths=lengths)


def _standard(
    state,
    logits,
    seq,
    running,
    beam_offset,
    *,
    Lp,
    K,
    V,
    max_length,
    min_length,
    alpha,
    eos_id,
    pad_id,
    num_return,
    exact,
    logit_bias,
) -> GenerationOutput:
    """Standard beam search (finished beams retire); see `beam_search`. Closed samples leave the batch
    as in `_official` (`open_ids`); the kept finished hypotheses `fin_*` are indexed by sample."""
    B, device = seq.shape[0], seq.device
    T = max_length
    Lbuf = Lp + T
    fin_scores = torch.full((B, K), float("-inf"), device=device)  # best K finished, sorted
    fin_seqs = torch.full((B, K, Lbuf), pad_id, dtype=torch.long, device=device)
    fin_lengths = torch.zeros((B, K), dtype=torch.long, device=device)
    open_ids = torch.arange(B, device=device)  # [Bo] samples still open
    rank = torch.arange(2 * K, device=device)  # [2K]
    steps_run = T

    def merge(scores: Tensor, seqs: Tensor, lengths: Tensor) -> None:
        """Merge new finished candidates [Bo, C] of the open samples into their kept best K."""
        all_scores = torch.cat([fin_scores[open_ids], scores], dim=1)  # [Bo, K + C]
        order = all_scores.sort(dim=1, descending=True, stable=True).indices[:, :K]  # [Bo, K]
        fin_scores[open_ids] = all_scores.gather(1, order)
        all_seqs = torch.cat([fin_seqs[open_ids], seqs], dim=1)  # copy: [Bo, K + C, Lbuf]
        fin_seqs[open_ids] = all_seqs.gather(1, order[..., None].expand(-1, -1, Lbuf))
        fin_lengths[open_ids] = torch.cat([fin_lengths[open_ids], lengths], dim=1).gather(1, order)

    for step in range(T):
        Bo = open_ids.shape[0]
        log_probs = _log_probs(logits, logit_bias).view(Bo, K, V)
        if step < min_length and eos_id is not None:
            log_probs[..., eos_id] = NEG_EOS
        lp = gnmt_length_penalty(step, alpha)
        totals = log_probs + running[..., None]  # [Bo, K, V] cumulative log-probs
        top_totals, top_ids = totals.view(Bo, K * V).topk(2 * K, dim=-1)  # [Bo, 2K], sorted
        beam = top_ids // V
        token = top_ids % V
        cand = seq.gather(1, beam[..., None].expand(-1, -1, Lbuf))  # [Bo, 2K, Lbuf]
        cand[:, :, Lp + step] = token
        is_eos = token == eos_id if eos_id is not None else torch.zeros_like(token, dtype=torch.bool)
        finished = is_eos & (rank < K) & (top_totals > NEG_EOS / 2)  # [Bo, 2K]
        step_len = torch.full_like(token, Lp + step + 1)
        merge(torch.where(finished, top_totals / lp, float("-inf")), cand, step_len)
        # The K best non-[SEP] candidates continue (stable sort: non-[SEP] first, in score order).
        keep_cand = is_eos.to(torch.int8).sort(dim=1, stable=True).indices[:, :K]  # [Bo, K]
        running = top_totals.gather(1, keep_cand)
        seq = cand.gather(1, keep_cand[..., None].expand(-1, -1, Lbuf))
        token = token.gather(1, keep_cand)
        beam = beam.gather(1, keep_cand)
        steps_run = step + 1
        if step + 1 == T:  # beams still running hit max_length
            merge(running / lp, seq, step_len[:, :K])
            break
        bound_lp = gnmt_length_penalty(T - 1, alpha) if exact else lp
        best_running = running[:, 0] / bound_lp  # [Bo] (running is sorted)
        worst_kept = fin_scores[open_ids, -1]
        still_open = ~((worst_kept > float("-inf")) & (best_running <= worst_kept))
        n_open = int(still_open.sum())  # the one host sync per step
        if n_open == 0:
            break
        select = beam + beam_offset[:Bo]  # [Bo, K]
        if n_open < Bo:  # drop the closed samples from the batch
            keep = still_open.nonzero()[:, 0]
            open_ids, seq, running = open_ids[keep], seq[keep], running[keep]
            token, select = token[keep], select[keep]
            state.keep_samples(keep)
        logits = state.advance(token.reshape(-1), select.reshape(-1))
    L = Lp + steps_run
    return GenerationOutput(
        ids=fin_seqs[:, :num_return, :L],
        scores=fin_scores[:, :num_return],
        lengths=fin_lengths[:, :num_return],
    )

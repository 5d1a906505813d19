"""Decoding with the text decoder: beam search, greedy, sampling, answer-list ranking.

    beam_search(decoder, memory, memory_mask, start_ids, ...)    official_spec.md §5.6 ("official") or
                                                                 a standard beam search ("standard")
    greedy(decoder, memory, memory_mask, start_ids, ...)         grounding (§5.5, with `logit_bias`)
    sample(decoder, memory, memory_mask, start_ids, ...)         temperature / top-k / top-p sampling
    rank_answers(decoder, memory, memory_mask, answer_ids, ...)  answer-list ranking (§5.7)
    sequence_log_probs(decoder, memory, memory_mask, ids, ...)   teacher-forced log-likelihoods

`memory` is the decoder memory [B, M, D] (VQA / grounding: the fused [v'; t'] from `MPlug.fused_memory`;
captioning: the image tokens from `MPlug.encode_image`) or its per-layer cross-attention K/V from
`TextDecoder.project_memory`. Either way the memory is projected once per sample and shared by every beam,
sample and answer candidate through `memory_index`; it is never tiled. `start_ids` [B, Lp] is [CLS] (101)
or a prompt ([CLS] + prompt tokens, without the final [SEP]); prompts of different lengths are
**left**-padded with `start_mask` (the last column must be a real token). Positions are column indices,
as in a full forward of the same padded batch. The prompt is run once per sample, then its self-attention
cache is copied to the beams.

Incremental decoding (default, `use_cache=True`) keeps a `KVCache`; `use_cache=False` re-runs the decoder
over the whole prefix at every step (the official way, still with the shared memory K/V): same results,
kept as a baseline for benchmarks and tests.

Finished samples leave the batch: when a sample closes (official beam search: its top beam emits
[SEP]; standard: no running beam can improve it; greedy / sampling: all of its rows emitted [SEP]) its rows,
its memory K/V rows and its cache rows are dropped before the next step, so the decoder only runs the
samples still open. Host synchronisation: one count of the open samples per step (to stop, and to
compact when it fell); everything else stays on the device. The beam reorder of the self-attention cache
is a gather into a second preallocated buffer (swapped), not an in-place advanced-index copy.
No gradients flow through decoding (`torch.no_grad`); for SCST, re-score the returned ids with
`sequence_log_probs` (one teacher-forced forward that keeps the graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mplug_fast.modeling.decoder import MemoryKV, TextDecoder
from mplug_fast.modeling.layers import KVCache

CLS_ID, SEP_ID, PAD_ID = 101, 102, 0
NEG_EOS = -1e20  # official: the [SEP] log-prob before min_length


@dataclass
class GenerationOutput:
    """R hypotheses per sample, best first.

    ids: long [B, R, L] start ids + generated tokens (incl. the final [SEP] if emitted), then pad_id.
    scores: float [B, R]: beam search: cumulative log-prob / length penalty at the hypothesis' last step
        (official); greedy / sample: the sum of the model's log-probs of the generated tokens.
    lengths: long [B, R]: tokens in `ids` before the padding (start ids included).
    """

    ids: Tensor
    scores: Tensor
    lengths: Tensor


@dataclass
class RankedAnswers:
    """indices: long [Q, k] answer-list rows, best first; scores: float [Q, k] (see `rank_answers`);
    probs: float [Q, k] softmax of the scores over the k candidates (what the official code returns)."""

    indices: Tensor
    scores: Tensor
    probs: Tensor


def gnmt_length_penalty(step: int, alpha: float = 0.6) -> float:
    """GNMT length penalty of the official beam search at 0-based `step`: ((5 + step + 1) / 6) ** alpha."""
    return ((5.0 + (step + 1)) / 6.0) ** alpha


def token_bias(
    vocab_size: int, allowed_ids: Tensor | range, penalty: float = -10000.0, device=None
) -> Tensor:
    """A logit bias [V]: 0 on `allowed_ids`, `penalty` elsewhere (official grounding `prob_mask`:
    coordinate tokens 345..681 allowed, -10000 elsewhere)."""
    bias = torch.full((vocab_size,), penalty, device=device)
    allowed = torch.as_tensor(list(allowed_ids) if isinstance(allowed_ids, range) else allowed_ids)
    bias[allowed.to(bias.device)] = 0.0
    return bias


# --------------------------------------------------------------------------------------------- helpers
def _as_memory_kv(decoder: TextDecoder, memory: Tensor | MemoryKV) -> MemoryKV:
    if isinstance(memory, Tensor):
        return decoder.project_memory(memory)  # per layer: (k, v), each [B, H, M, Dh]
    if len(memory) != len(decoder.layers):
        raise ValueError(f"memory_kv has {len(memory)} layers, the decoder {len(decoder.layers)}")
    return memory


def _as_bool(mask: Tensor | None) -> Tensor | None:
    return mask if mask is None or mask.dtype == torch.bool else mask != 0


class _SwapCache(KVCache):
    """`KVCache` whose `reorder` gathers rows into a second buffer of the same shape and swaps the two
    (`index_select(..., out=)`: one contiguous gather, no allocation while the row count stays the same);
    a new row count (prompt -> beams, dropping finished samples) allocates new buffers."""

    def __init__(self, num_layers: int, max_length: int):
        super().__init__(num_layers, max_length)
        self._spare: tuple[Tensor, Tensor, Tensor] | None = None  # (k, v, mask) of the same shape

    def reorder(self, index: Tensor) -> None:
        """Row i becomes old row index[i]; index: long [N']."""
        if self.k is None:
            return
        if index.shape[0] != self.k.shape[1]:
            self._spare = None
            super().reorder(index)
            return
        if self._spare is None:
            self._spare = (torch.empty_like(self.k), torch.empty_like(self.v), torch.empty_like(self.mask))
        k, v, mask = self._spare
        torch.index_select(self.k, 1, index, out=k)  # [layers, N, H, Lmax, Dh]
        torch.index_select(self.v, 1, index, out=v)
        torch.index_select(self.mask, 0, index, out=mask)  # [N, Lmax]
        self._spare = (self.k, self.v, self.mask)
        self.k, self.v, self.mask = k, v, mask


class _DecodingState:
    """The decoder side of a batch being decoded: incremental (KV cache) or full recomputation.

    Rows start as the B prompts (row b reads memory row b); `expand(index, group)` copies them to G rows
    per sample (beams / samples, contiguous: row n reads memory row n // G, passed to the decoder as the
    int `memory_index` G, so the memory K/V is never gathered per row); `advance(tokens, select)` reorders
    rows within their sample and appends a token.
    """

    def __init__(
        self,
        decoder: TextDecoder,
        memory_kv: MemoryKV,
        memory_mask: Tensor | None,
        start_ids: Tensor,
        start_mask: Tensor | None,
        max_new_tokens: int,
        use_cache: bool,
    ):
        B, Lp = start_ids.shape
        Bm = memory_kv[0][0].shape[0]
        if Bm != B:
            raise ValueError(
                f"start_ids has {B} rows but the memory has {Bm}; give one prompt per memory row"
            )
        if start_mask is not None:
            if start_mask.shape != start_ids.shape:
                raise ValueError(
                    f"start_mask must have the shape of start_ids {list(start_ids.shape)}, "
                    f"got {list(start_mask.shape)}"
                )
            if not bool(start_mask[:, -1].all()):
                raise ValueError("prompts must be left-padded: the last column of start_mask must be all 1")
        self.decoder = decoder
        self.memory_kv = memory_kv
        self.memory_mask = memory_mask
        self.memory_index: int | None = None  # None: rows are the B prompts; G: row n reads memory row n // G
        self.use_cache = use_cache
        self.ids = start_ids  # full prefix [N, L] (no-cache mode only)
        self.mask = start_mask  # bool [N, L] or None (no-cache mode only)
        self.cache = _SwapCache(len(decoder.layers), Lp + max_new_tokens) if use_cache else None

    def _last_logits(self, ids: Tensor, mask: Tensor | None) -> Tensor:
        h = self.decoder.hidden_states(
            ids,
            mask,
            None,
            self.memory_mask,
            memory_kv=self.memory_kv,
            memory_index=self.memory_index,
            cache=self.cache,
        )  # [N, l, D]
        return self.decoder.head(h[:, -1], self.decoder.embeddings.word.weight).float()  # [N, V]

    def start(self) -> Tensor:
        """Run the prompts: next-token logits [B, V] (fp32)."""
        return self._last_logits(self.ids, self.mask)

    def expand(self, index: Tensor, group: int | None = None) -> None:
        """Rows become the old rows `index` [N']; `group`: G after copying each prompt to G rows (None: the
        rows stay in their sample, e.g. a beam reorder)."""
        if group is not None:
            self.memory_index = group
        if self.cache is not None:
            self.cache.reorder(index)
        else:
            self.ids = self.ids[index]
            self.mask = None if self.mask is None else self.mask[index]

    def keep_samples(self, keep: Tensor) -> None:
        """Drop finished samples: only the memory rows `keep` (long [B'], increasing) stay. The caller
        then selects their decoder rows with `advance(tokens, select)`."""
        self.memory_kv = [(k.index_select(0, keep), v.index_select(0, keep)) for k, v in self.memory_kv]
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, keep)

    def advance(self, tokens: Tensor, select: Tensor | None = None) -> Tensor:
        """Reorder rows by `select` [N] (None = keep), append `tokens` [N]; next-token logits [N, V]."""
        if select is not None:
            self.expand(select)
        tokens = tokens[:, None]  # [N, 1]
        if self.cache is not None:
            return self._last_logits(tokens, None)
        self.ids = torch.cat([self.ids, tokens], dim=1)  # copy: [N, L + 1]
        if self.mask is not None:
            self.mask = F.pad(self.mask, (0, 1), value=True)  # copy: [N, L + 1]
        return self._last_logits(self.ids, self.mask)


def _log_probs(logits: Tensor, logit_bias: Tensor | None) -> Tensor:
    """fp32 log-softmax over the vocabulary of logits [N, V] (+ bias [V])."""
    if logit_bias is not None:
        logits = logits + logit_bias
    return torch.log_softmax(logits, dim=-1)


def _check_lengths(decoder: TextDecoder, start_ids: Tensor, max_length: int, min_length: int) -> None:
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if min_length < 0:
        raise ValueError(f"min_length must be >= 0, got {min_length}")
    total = start_ids.shape[1] + max_length
    if total > decoder.embeddings.max_positions:
        raise ValueError(
            f"prompt ({start_ids.shape[1]}) + max_length ({max_length}) = {total} tokens exceed "
            f"max_position_embeddings={decoder.embeddings.max_positions}"
        )


# --------------------------------------------------------------------------------------------- beam search
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
        mode: "official": official_spec §5.6 exactly -- each step scores = (log p + running) / lp with the
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
    _check_lengths(decoder, start_ids, max_length, min_length)
    memory_kv = _as_memory_kv(decoder, memory)
    state = _DecodingState(
        decoder, memory_kv, _as_bool(memory_mask), start_ids, _as_bool(start_mask), max_length, use_cache
    )
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
    """official_spec §5.6 (`TextGenerator._fast_translate_batch`), batched; see `beam_search`.

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


# ----------------------------------------------------------------------------------------- greedy / sample
def _filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Top-k then nucleus (top-p) filtering of logits [N, V]: removed entries become -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        remove = probs.cumsum(dim=-1) - probs > top_p  # mass before this token already exceeds top_p
        remove[:, 0] = False  # keep at least one token
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


def _sequential(
    state: _DecodingState,
    logits: Tensor,
    start_ids: Tensor,
    *,
    max_length: int,
    min_length: int,
    eos_id: int | None,
    pad_id: int,
    logit_bias: Tensor | None,
    choose,
    group: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """One token per row per step until [SEP] or max_length; `choose(log_probs, logits) -> tokens [n]`.

    Rows come in contiguous groups of `group` per sample; a sample whose rows all ended leaves the batch
    (`open_rows`: the rows still decoded, `logits` [n, V] holds them)."""
    N, Lp = start_ids.shape
    G = group
    device = logits.device
    ids = torch.full((N, Lp + max_length), pad_id, dtype=torch.long, device=device)
    ids[:, :Lp] = start_ids
    scores = torch.zeros(N, device=device)
    lengths = torch.full((N,), Lp + max_length, dtype=torch.long, device=device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    open_rows = torch.arange(N, device=device)  # [n]
    steps_run = max_length
    for step in range(max_length):
        if logit_bias is not None:
            logits = logits + logit_bias
        if step < min_length and eos_id is not None:
            logits[:, eos_id] = float("-inf")
        log_probs = torch.log_softmax(logits, dim=-1)  # [n, V] the model's distribution
        done_rows = finished[open_rows]  # [n]
        token = choose(log_probs, logits).masked_fill(done_rows, pad_id)  # [n]
        token_lp = log_probs.gather(1, token[:, None])[:, 0].masked_fill(done_rows, 0.0)
        scores[open_rows] += token_lp
        ids[open_rows, Lp + step] = token
        if eos_id is not None:
            ended = (token == eos_id) & ~done_rows
            lengths[open_rows] = torch.where(ended, Lp + step + 1, lengths[open_rows])
            done_rows = done_rows | ended
            finished[open_rows] = done_rows
        steps_run = step + 1
        if step + 1 == max_length:
            break
        n = open_rows.shape[0]
        still_open = ~done_rows.view(n // G, G).all(dim=1)  # [n / G] samples with a running row
        n_open = int(still_open.sum())  # the one host sync per step
        if n_open == 0:
            break
        if n_open < n // G:  # drop the finished samples from the batch
            keep = still_open.nonzero()[:, 0]  # [n' / G]
            select = (keep[:, None] * G + torch.arange(G, device=device)).view(-1)  # [n']
            open_rows, token = open_rows[select], token[select]
            state.keep_samples(keep)
            logits = state.advance(token, select)
        else:
            logits = state.advance(token)
    lengths = lengths.clamp(max=Lp + steps_run)
    return ids[:, : Lp + steps_run], scores, lengths


@torch.no_grad()
def greedy(
    decoder: TextDecoder,
    memory: Tensor | MemoryKV,
    memory_mask: Tensor | None,
    start_ids: Tensor,
    start_mask: Tensor | None = None,
    *,
    max_length: int = 10,
    min_length: int = 1,
    eos_id: int | None = SEP_ID,
    pad_id: int = PAD_ID,
    logit_bias: Tensor | None = None,
    use_cache: bool = True,
) -> GenerationOutput:
    """Greedy decoding (arguments as in `beam_search`); a row stops at its [SEP], then gets pad_id.

    Grounding (§5.5): start_ids = [unused339] (344) per sample, max_length = min_length = 4, eos_id=None,
    logit_bias = token_bias(V, range(345, 682)). Returns ids [B, 1, L], scores [B, 1] (sum of the
    log-probs of the generated tokens, after `logit_bias` and the min_length [SEP] mask), lengths [B, 1].
    """
    _check_lengths(decoder, start_ids, max_length, min_length)
    memory_kv = _as_memory_kv(decoder, memory)
    state = _DecodingState(
        decoder, memory_kv, _as_bool(memory_mask), start_ids, _as_bool(start_mask), max_length, use_cache
    )
    ids, scores, lengths = _sequential(
        state,
        state.start(),
        start_ids,
        max_length=max_length,
        min_length=min_length,
        eos_id=eos_id,
        pad_id=pad_id,
        logit_bias=logit_bias,
        choose=lambda log_probs, logits: log_probs.argmax(dim=-1),
    )
    return GenerationOutput(ids=ids[:, None], scores=scores[:, None], lengths=lengths[:, None])


@torch.no_grad()
def sample(
    decoder: TextDecoder,
    memory: Tensor | MemoryKV,
    memory_mask: Tensor | None,
    start_ids: Tensor,
    start_mask: Tensor | None = None,
    *,
    num_return: int = 1,
    max_length: int = 10,
    min_length: int = 1,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    eos_id: int | None = SEP_ID,
    pad_id: int = PAD_ID,
    logit_bias: Tensor | None = None,
    use_cache: bool = True,
) -> GenerationOutput:
    """Ancestral sampling of `num_return` sequences per sample (SCST), sharing the memory K/V.

    Each step draws from softmax(filter(logits / temperature)) with `top_k` then `top_p` filtering,
    using `generator` (reproducible). Returns ids [B, R, L], lengths [B, R] and scores [B, R] = the sum of
    the *model's* log-probs of the drawn tokens (temperature 1, unfiltered; after `logit_bias` and the
    min_length [SEP] mask).
    top_k=1 is greedy decoding.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use greedy() for argmax decoding")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if num_return < 1:
        raise ValueError(f"num_return must be >= 1, got {num_return}")
    _check_lengths(decoder, start_ids, max_length, min_length)
    memory_kv = _as_memory_kv(decoder, memory)
    state = _DecodingState(
        decoder, memory_kv, _as_bool(memory_mask), start_ids, _as_bool(start_mask), max_length, use_cache
    )
    logits = state.start()  # [B, V]
    B = start_ids.shape[0]
    rows = torch.arange(B, device=logits.device).repeat_interleave(num_return)  # [B*R]
    state.expand(rows, group=num_return)

    def choose(log_probs: Tensor, logits: Tensor) -> Tensor:
        probs = _filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)  # [N, V]
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    ids, scores, lengths = _sequential(
        state,
        logits[rows],
        start_ids[rows],
        max_length=max_length,
        min_length=min_length,
        eos_id=eos_id,
        pad_id=pad_id,
        logit_bias=logit_bias,
        choose=choose,
        group=num_return,
    )
    R = num_return
    return GenerationOutput(ids=ids.view(B, R, -1), scores=scores.view(B, R), lengths=lengths.view(B, R))


# --------------------------------------------------------------------------------------------- scoring
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
    memory_kv = _as_memory_kv(decoder, memory)
    logits = decoder(ids, mask, None, _as_bool(memory_mask), memory_kv=memory_kv, memory_index=memory_index)
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [N, L-1, V]
    token_lp = log_probs.gather(2, ids[:, 1:, None])[..., 0]  # [N, L-1]
    if mask is not None:
        token_lp = token_lp.masked_fill(~_as_bool(mask)[:, 1:], 0.0)
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
    """Answer-list ranking (official `rank_answer`, official_spec §5.7).

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
    memory_kv = _as_memory_kv(decoder, memory)
    memory_mask = _as_bool(memory_mask)
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

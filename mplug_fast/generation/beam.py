"""Beam search: the official mPLUG beam search (docs/fidelity.md §5.6) and a standard one.

Each step's selection and finished-hypothesis bookkeeping is one call (`beam_step`: the native op of
kernels/ when built, else its Python twin; identical results). Samples finish independently: a closing
sample is frozen on the device, and at every `sync_every`-th step one host count of the open samples stops
the search or drops the closed samples' rows, memory K/V rows and cache rows from the batch.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mplug_fast.generation.beam_step import NEG_EOS, gnmt_length_penalty, resolve_beam_step
from mplug_fast.generation.outputs import PAD_ID, SEP_ID, GenerationOutput
from mplug_fast.generation.state import DecodingState, as_memory_kv, check_lengths
from mplug_fast.modeling.decoder import MemoryKV, TextDecoder

__all__ = ["NEG_EOS", "beam_search", "gnmt_length_penalty"]


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
    native: bool | None = None,
    sync_every: int | None = None,
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
        native: the native `beam_step` op (None: when built for this device; True: required; False: the
            Python twin). Candidates tied in score are taken in (beam, token) order either way.
        sync_every: steps between the host checks for closed samples (None: 1 on CPU, 4 on CUDA, where a
            step then runs without host synchronisation); results do not depend on it.
    Returns:
        `GenerationOutput` with ids [B, R, Lp + T'] (T' = steps run), scores [B, R], lengths [B, R].
    """
    if mode not in ("official", "standard"):
        raise ValueError(f"mode must be 'official' or 'standard', got {mode!r}")
    if early_stopping not in ("heuristic", "exact"):
        raise ValueError(f"early_stopping must be 'heuristic' or 'exact', got {early_stopping!r}")
    if not 1 <= num_return <= beam_size:
        raise ValueError(f"num_return must be in [1, beam_size={beam_size}], got {num_return}")
    if sync_every is not None and sync_every < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
    check_lengths(decoder, start_ids, max_length, min_length)
    memory_kv = as_memory_kv(decoder, memory)
    state = DecodingState(decoder, memory_kv, memory_mask, start_ids, start_mask, max_length, use_cache)
    logits = state.start()  # [B, V]
    B, Lp = start_ids.shape
    K, V, T = beam_size, logits.shape[-1], max_length
    if V < 2 * K + 1:
        raise ValueError(f"beam_size {K} is too large for a vocabulary of {V}")
    device = logits.device
    step_fn = resolve_beam_step(native, device.type)
    sync_every = sync_every or (4 if device.type == "cuda" else 1)
    if logit_bias is not None:
        logit_bias = logit_bias.float().contiguous()
    rows = torch.arange(B, device=device).repeat_interleave(K)  # [B*K]: sample of each beam
    state.expand(rows, group=K)
    logits = logits[rows]  # [B*K, V] (the beams of a sample start identical)
    Lbuf = Lp + T
    seq = torch.full((B, K, Lbuf), pad_id, dtype=torch.long, device=device)
    seq[:, :, :Lp] = start_ids[:, None]
    beam_offset = (torch.arange(B, device=device) * K)[:, None]  # [B, 1]
    running = torch.full((B, K), float("-inf"), device=device)
    running[:, 0] = 0.0  # first step: only beam 0 is live
    S = T * K if mode == "official" else K  # finished-hypothesis slots per sample
    fin_scores = torch.full((B, S), float("-inf"), device=device)
    fin_seqs = torch.full((B, S, Lbuf), pad_id, dtype=torch.long, device=device)
    fin_lengths = torch.zeros((B, S), dtype=torch.long, device=device)
    steps = torch.zeros(B, dtype=torch.long, device=device)  # steps each sample ran
    closed = torch.zeros(B, dtype=torch.bool, device=device)
    open_ids = torch.arange(B, device=device)  # [Bo] samples still in the batch
    for step in range(T):
        Bo = open_ids.shape[0]
        beam, token = step_fn(
            logits.contiguous(),
            logit_bias,
            running,
            seq,
            closed,
            open_ids,
            fin_scores,
            fin_seqs,
            fin_lengths,
            steps,
            step,
            Lp,
            T,
            min_length,
            -1 if eos_id is None else eos_id,
            length_penalty,
            mode == "official",
            early_stopping == "exact",
        )  # [Bo, K] each
        if step + 1 == T:
            break
        select = beam + beam_offset[:Bo]  # [Bo, K] decoder row each new beam continues
        if (step + 1) % sync_every == 0:
            still_open = ~closed
            n_open = int(still_open.sum())  # the host sync
            if n_open == 0:
                break
            if n_open < Bo:  # drop the closed samples from the batch
                keep = still_open.nonzero()[:, 0]  # [Bo']
                open_ids, seq, running, closed = open_ids[keep], seq[keep], running[keep], closed[keep]
                token, select = token[keep], select[keep]
                state.keep_samples(keep)
        logits = state.advance(token.reshape(-1), select.reshape(-1))  # [Bo'*K, V]
    # Official: sort every sample's recorded hypotheses (slot order = the official recording order);
    # standard: already sorted.
    order = fin_scores.sort(dim=1, descending=True, stable=True).indices[:, :num_return]  # [B, R]
    L = Lp + int(steps.max())
    ids = fin_seqs.gather(1, order[..., None].expand(-1, -1, Lbuf))[:, :, :L]  # [B, R, L]
    return GenerationOutput(ids=ids, scores=fin_scores.gather(1, order), lengths=fin_lengths.gather(1, order))

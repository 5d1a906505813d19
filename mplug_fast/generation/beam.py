"""Beam search: the official mPLUG beam search (docs/fidelity.md §5.6) and a standard one (`beam_search`).

Each step's selection and finished-hypothesis bookkeeping is one call (`beam_step`, native op or Python
twin). Samples finish independently; the steps run eagerly, dropping closed samples from the batch, or, with
`cuda_graph=True`, on static buffers recorded as CUDA graphs (`graphs.py`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from mplug_fast.generation.beam_step import gnmt_length_penalty, resolve_beam_step
from mplug_fast.generation.graphs import step_graphs
from mplug_fast.generation.outputs import PAD_ID, SEP_ID, GenerationOutput
from mplug_fast.generation.state import DecodingState
from mplug_fast.modeling.decoder import MemoryKV, TextDecoder

__all__ = ["beam_search", "gnmt_length_penalty"]

logger = logging.getLogger(__name__)


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
    cuda_graph: bool = False,
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
        cuda_graph: replay steps 1 .. T-1 as CUDA graphs (`generation/graphs.py`), recorded on the first
            call of each (decoder weights, batch, beams, lengths, memory length, settings) and replayed by
            later calls; closed samples then stay in the batch, frozen. Needs `use_cache`; results are
            those of `cuda_graph=False`. Off CUDA: the same static-buffer steps run eagerly (one log line).
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
    if cuda_graph and not use_cache:
        raise ValueError("cuda_graph=True replays the cached decode step: it needs use_cache=True")
    state = DecodingState(
        decoder, memory, memory_mask, start_ids, start_mask, max_length, min_length, use_cache
    )
    logits = state.start()  # [B, V]
    B, Lp = start_ids.shape
    K, V, T = beam_size, logits.shape[-1], max_length
    if V < 2 * K + 1:
        raise ValueError(f"beam_size {K} is too large for a vocabulary of {V}")
    device = logits.device
    if cuda_graph and device.type != "cuda":
        _log_no_graphs(device.type)
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
    settings = (Lp, T, min_length, -1 if eos_id is None else eos_id, length_penalty)  # the step's scalars
    settings += (mode == "official", early_stopping == "exact")
    fin = [fin_scores, fin_seqs, fin_lengths, steps]
    # step 0; beam, token: [Bo, K] origin beam and token of each new beam
    beam, token = step_fn(logits.contiguous(), logit_bias, running, seq, closed, open_ids, *fin, 0, *settings)
    select = beam + beam_offset  # [Bo, K] decoder row each new beam continues
    if cuda_graph and T > 1:  # closed samples stay in the batch, frozen by the beam step
        beams = dict(running=running, seq=seq, closed=closed, open_ids=open_ids, fin_scores=fin_scores)
        beams |= dict(fin_seqs=fin_seqs, fin_lengths=fin_lengths, steps=steps, token=token, select=select)
        fin = _replay_steps(state, step_fn, settings, beams, beam_offset, logit_bias, sync_every)
    else:  # closed samples leave the batch at the host checks
        for step in range(1, T):
            Bo = open_ids.shape[0]
            if step % sync_every == 0:
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
            beam, token = step_fn(
                logits.contiguous(), logit_bias, running, seq, closed, open_ids, *fin, step, *settings
            )
            select = beam + beam_offset[: open_ids.shape[0]]
    fin_scores, fin_seqs, fin_lengths, steps = fin
    # Official: sort every sample's recorded hypotheses (slot order = the official recording order);
    # standard: already sorted.
    order = fin_scores.sort(dim=1, descending=True, stable=True).indices[:, :num_return]  # [B, R]
    L = Lp + int(steps.max())
    ids = fin_seqs.gather(1, order[..., None].expand(-1, -1, Lbuf))[:, :, :L]  # [B, R, L]
    return GenerationOutput(ids=ids, scores=fin_scores.gather(1, order), lengths=fin_lengths.gather(1, order))


@functools.cache
def _log_no_graphs(device_type: str) -> None:
    logger.info(
        "cuda_graph=True on %s: no CUDA graphs there; the static-buffer steps run eagerly", device_type
    )


def _replay_steps(
    state: DecodingState,
    step_fn: Callable[..., tuple[Tensor, Tensor]],
    settings: tuple,
    beams: dict[str, Tensor],
    beam_offset: Tensor,
    logit_bias: Tensor | None,
    sync_every: int,
) -> list[Tensor]:
    """Steps 1 .. T-1 of `beam_search` on the static buffers of `step_graphs` (recorded the first time).

    beams: the beam state after step 0, the whole batch open (running, seq, closed, open_ids, fin_scores,
    fin_seqs, fin_lengths, steps, token, select). Returns the static fin_scores, fin_seqs, fin_lengths,
    steps after the last step run."""
    cache = state.cache
    tensors = dict(k=cache.k, v=cache.v, mask=cache.mask, beam_offset=beam_offset, **beams)
    for i, (k, v) in enumerate(state.memory_kv):
        tensors |= {f"memory_k{i}": k, f"memory_v{i}": v}  # [B, H, M, Dh] each
    if state.memory_mask is not None:
        tensors["memory_mask"] = state.memory_mask
    if logit_bias is not None:
        tensors["logit_bias"] = logit_bias
    key = (
        tuple((name, tuple(x.shape), x.dtype, x.device) for name, x in tensors.items()),
        cache.padded,
        state.decoder.training,
        step_fn,
        settings,
    )
    graphs = step_graphs(state.decoder, key, tensors)
    s = graphs.tensors  # the static buffers
    cache.use_buffers(s["k"], s["v"], s["mask"])
    state.memory_kv = [(s[f"memory_k{i}"], s[f"memory_v{i}"]) for i in range(len(state.memory_kv))]
    state.memory_mask, logit_bias = s.get("memory_mask"), s.get("logit_bias")
    fin = [s["fin_scores"], s["fin_seqs"], s["fin_lengths"], s["steps"]]
    beam_state = (s["running"], s["seq"], s["closed"], s["open_ids"], *fin)

    def step(t: int) -> None:
        logits = state.advance(s["token"].view(-1), s["select"].view(-1))  # [B*K, V]
        beam, token = step_fn(logits.contiguous(), logit_bias, *beam_state, t, *settings)
        s["token"].copy_(token)
        s["select"].copy_(beam + s["beam_offset"])

    def stop(t: int) -> bool:
        return t % sync_every == 0 and bool(s["closed"].all())  # the host sync

    graphs.run(step, cache, range(1, settings[1]), stop)
    return fin

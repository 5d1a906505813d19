"""Token-by-token decoding: greedy (grounding, docs/fidelity.md §5.5) and ancestral sampling (SCST).

A row stops at its [SEP] (then gets pad_id); a sample whose rows all ended leaves the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mplug_fast.generation.outputs import PAD_ID, SEP_ID, GenerationOutput
from mplug_fast.generation.state import DecodingState
from mplug_fast.modeling.decoder import MemoryKV, TextDecoder


def token_bias(
    vocab_size: int, allowed_ids: Tensor | range, penalty: float = -10000.0, device=None
) -> Tensor:
    """A logit bias [V]: 0 on `allowed_ids`, `penalty` elsewhere (official grounding `prob_mask`:
    coordinate tokens 345..681 allowed, -10000 elsewhere)."""
    bias = torch.full((vocab_size,), penalty, device=device)
    allowed = torch.as_tensor(list(allowed_ids) if isinstance(allowed_ids, range) else allowed_ids)
    bias[allowed.to(bias.device)] = 0.0
    return bias


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
    state: DecodingState,
    start_ids: Tensor,
    *,
    max_length: int,
    min_length: int,
    eos_id: int | None,
    pad_id: int,
    logit_bias: Tensor | None,
    choose,
    group: int | None = None,
) -> GenerationOutput:
    """One token per row per step until [SEP] or max_length; `choose(log_probs, logits) -> tokens [n]`.

    `group`: G rows per sample, contiguous (the prompts are copied to them; None: the B prompts are the
    rows). A sample whose rows all ended leaves the batch (`open_rows`: the rows still decoded, `logits`
    [n, V] holds them). Returns ids [B, G, L], scores [B, G], lengths [B, G]."""
    logits = state.start()  # [B, V]
    B, G = start_ids.shape[0], group or 1
    if group is not None:
        rows = torch.arange(B, device=logits.device).repeat_interleave(G)  # [B*G]
        state.expand(rows, group=G)
        logits, start_ids = logits[rows], start_ids[rows]
    N, Lp = start_ids.shape
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
    lengths = lengths.clamp(max=Lp + steps_run).view(B, G)
    return GenerationOutput(
        ids=ids[:, : Lp + steps_run].view(B, G, -1), scores=scores.view(B, G), lengths=lengths
    )


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
    state = DecodingState(
        decoder, memory, memory_mask, start_ids, start_mask, max_length, min_length, use_cache
    )
    return _sequential(
        state,
        start_ids,
        max_length=max_length,
        min_length=min_length,
        eos_id=eos_id,
        pad_id=pad_id,
        logit_bias=logit_bias,
        choose=lambda log_probs, logits: log_probs.argmax(dim=-1),
    )


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
    state = DecodingState(
        decoder, memory, memory_mask, start_ids, start_mask, max_length, min_length, use_cache
    )

    def choose(log_probs: Tensor, logits: Tensor) -> Tensor:
        probs = _filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)  # [N, V]
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    return _sequential(
        state,
        start_ids,
        max_length=max_length,
        min_length=min_length,
        eos_id=eos_id,
        pad_id=pad_id,
        logit_bias=logit_bias,
        choose=choose,
        group=num_return,
    )

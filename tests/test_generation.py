"""Incremental decoding and `mplug_fast.generation` on the tiny preset (random weights, eval, fp32).

Oracles: a full recomputation of the decoder (no cache), and a literal transcription of the official
beam search (fidelity §5.6, `TextGenerator._fast_translate_batch`) that re-runs the decoder on
the whole prefix with the memory tiled per beam.
"""

from __future__ import annotations

import pytest
import torch

import mplug_fast
from mplug_fast.generation import (
    beam_search,
    gnmt_length_penalty,
    greedy,
    rank_answers,
    sample,
    sequence_log_probs,
    token_bias,
)
from mplug_fast.modeling.decoder import TextDecoder
from mplug_fast.modeling.kv_cache import KVCache
from mplug_fast.modeling.layers import init_bert_weights

CLS, SEP, PAD = 101, 102, 0
ATOL = 1e-5
RTOL = 1e-5  # fp32 paths of the same math sum in another order: logits ~10 differ by ~1e-5 on some CPUs


@pytest.fixture(scope="module")
def decoder() -> TextDecoder:
    """The tiny decoder with peaked, context-dependent next-token distributions and a likely [SEP]
    (BERT init gives near-uniform ones: scale the tied embeddings (logit std ~3), raise the [SEP] bias
    close to the typical top logit, so that [SEP] competes with the best tokens)."""
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(1234)
        dec = TextDecoder(mplug_fast.get_config("tiny"))
        dec.apply(init_bert_weights)
        with torch.no_grad():
            dec.embeddings.word.weight.mul_(10.0)
            dec.head.bias[SEP] = 10.0
    return dec.eval()


def _memory(B: int, M: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(B, M, 256, generator=g)
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[::2, M - 2 :] = False  # padded memory rows (as the question part of a VQA memory)
    return memory, mask


# ------------------------------------------------------------------------------------------------ cache
def test_kv_cache_buffers_are_written_in_place(decoder):
    memory, memory_mask = _memory(2)
    kv = decoder.project_memory(memory)
    cache = decoder.new_cache(8)
    decoder.step(torch.full((2, 1), CLS), cache, kv, memory_mask)
    k_buffer = cache.k
    decoder.step(torch.tensor([[5], [6]]), cache, kv, memory_mask)
    assert cache.k is k_buffer and cache.length == 2
    assert cache.k.shape == (4, 2, 4, 8, 64)  # [layers, N, H, Lmax, Dh]
    with pytest.raises(ValueError, match="max_length"):
        decoder.step(torch.zeros(2, 7, dtype=torch.long), cache, kv, memory_mask)


@torch.no_grad()
def test_cached_equals_recomputation_step_by_step(decoder):
    B, L = 3, 9
    memory, memory_mask = _memory(B)
    ids = torch.randint(1000, 5000, (B, L))
    ids[:, 0] = CLS
    full = decoder(ids, None, memory, memory_mask)  # [B, L, V]
    kv = decoder.project_memory(memory)
    cache = decoder.new_cache(L)
    chunks = [decoder.step(ids[:, :2], cache, kv, memory_mask)]  # a 2-token prompt, then one token a step
    for i in range(2, L):
        chunks.append(decoder.step(ids[:, i : i + 1], cache, kv, memory_mask))
        prefix = decoder(ids[:, : i + 1], None, memory, memory_mask)[:, -1]  # recompute the prefix
        torch.testing.assert_close(chunks[-1][:, 0], prefix, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_cached_left_padded_prompts(decoder):
    B, Lp, T = 3, 5, 4
    memory, memory_mask = _memory(B)
    ids = torch.randint(1000, 5000, (B, Lp + T))
    mask = torch.ones(B, Lp + T, dtype=torch.bool)
    mask[0, :3] = False  # left padding of different lengths
    mask[1, :1] = False
    ids[~mask] = PAD
    full = decoder(ids, mask, memory, memory_mask)
    kv = decoder.project_memory(memory)
    cache = decoder.new_cache(Lp + T)
    out = [decoder.step(ids[:, :Lp], cache, kv, memory_mask, mask=mask[:, :Lp])]
    out += [decoder.step(ids[:, i : i + 1], cache, kv, memory_mask) for i in range(Lp, Lp + T)]
    out = torch.cat(out, dim=1)
    torch.testing.assert_close(out[mask], full[mask], atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_cached_with_shared_memory_and_reorder(decoder):
    """Beams read one memory row each through memory_index; reorder follows the beam choice."""
    B, K, L = 2, 3, 6
    memory, memory_mask = _memory(B)
    kv = decoder.project_memory(memory)
    index = torch.arange(B).repeat_interleave(K)  # [B*K]
    ids = torch.randint(1000, 5000, (B * K, L))
    ids[:, 0] = CLS
    cache = decoder.new_cache(L)
    decoder.step(ids[:B, :1], cache, kv, memory_mask)  # [CLS] once per sample ...
    cache.reorder(index)  # ... copied to the beams
    perm = torch.tensor([2, 0, 0, 4, 5, 3])  # beam reorder within each sample
    hist = ids.clone()
    grouped = decoder.new_cache(L)  # the same with memory_index=K (groups of K rows per memory row)
    decoder.step(ids[:B, :1], grouped, kv, memory_mask)
    grouped.reorder(index)
    for i in range(1, L):
        logits = decoder.step(hist[:, i : i + 1], cache, kv, memory_mask, memory_index=index)
        logits_grouped = decoder.step(hist[:, i : i + 1], grouped, kv, memory_mask, memory_index=K)
        ref = decoder(hist[:, : i + 1], None, memory[index], memory_mask[index])[:, -1]  # memory tiled
        torch.testing.assert_close(logits[:, 0], ref, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(logits_grouped[:, 0], ref, atol=ATOL, rtol=RTOL)
        cache.reorder(perm)
        grouped.reorder(perm)
        hist = hist[perm]
    with pytest.raises(ValueError, match="groups of 4"):
        decoder(hist[:, :1], None, None, memory_mask, memory_kv=kv, memory_index=4)


# ------------------------------------------------------------------------------------------------ oracle
@torch.no_grad()
def official_beam_search(
    decoder, memory, memory_mask, start_ids, beam_size, max_length, min_length, out_size=1, alpha=0.6
):
    """`TextGenerator._fast_translate_batch` as in fidelity §5.6, line by line (no cache, memory tiled).
    log_softmax replaces log(softmax) (the same up to rounding)."""
    K, device = beam_size, memory.device
    B = memory.shape[0]
    src = memory.repeat_interleave(K, dim=0)  # tile(memory, beam)
    att = memory_mask.repeat_interleave(K, dim=0)
    batch_offset = torch.arange(B)
    beam_offset = torch.arange(0, B * K, step=K)
    alive_seq = start_ids.repeat_interleave(K, dim=0)
    topk_log_probs = torch.tensor([0.0] + [float("-inf")] * (K - 1), device=device).repeat(B)
    hypotheses = [[] for _ in range(B)]
    results = {"scores": [[] for _ in range(B)], "predictions": [[] for _ in range(B)]}
    for step in range(max_length):
        logits = decoder(alive_seq, None, src, att)[:, -1, :]
        vocab_size = logits.size(-1)
        log_probs = torch.log_softmax(logits, dim=-1)
        if step < min_length:
            log_probs[:, SEP] = -1e20
        log_probs += topk_log_probs.view(-1).unsqueeze(1)
        lp = ((5.0 + (step + 1)) / 6.0) ** alpha
        curr_scores = log_probs / lp
        curr_scores = curr_scores.reshape(-1, K * vocab_size)
        topk_scores, topk_ids = curr_scores.topk(K, dim=-1)
        topk_log_probs = topk_scores * lp
        topk_beam_index = topk_ids.div(vocab_size, rounding_mode="trunc")
        topk_ids = topk_ids.fmod(vocab_size)
        batch_index = topk_beam_index + beam_offset[: topk_beam_index.size(0)].unsqueeze(1)
        select_indices = batch_index.view(-1)
        alive_seq = torch.cat([alive_seq.index_select(0, select_indices), topk_ids.view(-1, 1)], -1)
        is_finished = topk_ids.eq(SEP)
        if step + 1 == max_length:
            is_finished.fill_(1)
        end_condition = is_finished[:, 0].eq(1)
        if is_finished.any():
            predictions = alive_seq.view(-1, K, alive_seq.size(-1))
            for i in range(is_finished.size(0)):
                b = int(batch_offset[i])
                if end_condition[i]:
                    is_finished[i].fill_(1)
                finished_hyp = is_finished[i].nonzero().view(-1)
                for j in finished_hyp:
                    hypotheses[b].append((topk_scores[i, j], predictions[i, j, 0:]))
                if end_condition[i]:
                    best_hyp = sorted(hypotheses[b], key=lambda x: x[0], reverse=True)
                    for score, pred in best_hyp[:out_size]:
                        results["scores"][b].append(score)
                        results["predictions"][b].append(pred)
            non_finished = end_condition.eq(0).nonzero().view(-1)
            if len(non_finished) == 0:
                break
            topk_log_probs = topk_log_probs.index_select(0, non_finished)
            batch_index = batch_index.index_select(0, non_finished)
            batch_offset = batch_offset.index_select(0, non_finished)
            alive_seq = predictions.index_select(0, non_finished).view(-1, alive_seq.size(-1))
        select_indices = batch_index.view(-1)
        src = src.index_select(0, select_indices)
        att = att.index_select(0, select_indices)
    return results


def test_length_penalty_numbers():
    assert gnmt_length_penalty(0) == 1.0
    assert gnmt_length_penalty(1) == pytest.approx(1.09690, abs=1e-5)
    assert gnmt_length_penalty(1) == pytest.approx((7 / 6) ** 0.6, rel=1e-12)


@pytest.mark.parametrize(
    "beam_size, max_length, min_length, num_return",
    [(1, 5, 1, 1), (3, 6, 1, 3), (3, 7, 3, 2), (5, 6, 2, 5), (5, 4, 0, 1)],
)
def test_official_beam_search_matches_literal_official(
    decoder, beam_size, max_length, min_length, num_return
):
    B = 4
    memory, memory_mask = _memory(B, seed=beam_size + max_length)
    start = torch.full((B, 1), CLS)
    ref = official_beam_search(
        decoder, memory, memory_mask, start, beam_size, max_length, min_length, out_size=num_return
    )
    for use_cache in (True, False):
        out = beam_search(
            decoder,
            memory,
            memory_mask,
            start,
            beam_size=beam_size,
            max_length=max_length,
            min_length=min_length,
            num_return=num_return,
            use_cache=use_cache,
        )
        for b in range(B):
            assert len(ref["predictions"][b]) == num_return
            for r, (pred, score) in enumerate(zip(ref["predictions"][b], ref["scores"][b])):
                n = int(out.lengths[b, r])
                assert n == len(pred), (b, r)
                assert out.ids[b, r, :n].tolist() == pred.tolist(), (b, r, use_cache)
                assert (out.ids[b, r, n:] == PAD).all()
                assert abs(float(out.scores[b, r]) - float(score)) <= ATOL + RTOL * abs(float(score))


def test_official_beam_search_exercises_finished_beams(decoder):
    """The fixture's decoder makes samples close early and at max_length, and beams go on after [SEP]."""
    B, flags = 4, set()
    for seed in (9, 1, 2):
        memory, memory_mask = _memory(B, seed=seed)
        out = beam_search(
            decoder,
            memory,
            memory_mask,
            torch.full((B, 1), CLS),
            beam_size=3,
            max_length=8,
            min_length=2,
            num_return=3,
        )
        ends_with_sep = out.ids.gather(2, (out.lengths - 1)[..., None])[..., 0] == SEP
        flags |= {"closed early"} if (out.lengths[:, 0] < 9).any() else set()
        flags |= {"hit max_length"} if (out.lengths[:, 0] == 9).any() else set()
        flags |= {"non-[SEP] hypothesis"} if (~ends_with_sep).any() else set()
        flags |= {"went on after [SEP]"} if ((out.ids == SEP).sum(-1) > ends_with_sep.long()).any() else set()
        assert (out.lengths >= 1 + 3).all()  # min_length 2: [SEP] never before step 2
        assert (out.scores[:, :-1] >= out.scores[:, 1:]).all()
    assert len(flags) == 4, flags


@torch.no_grad()
def test_official_beam_search_with_prompt_matches_literal(decoder):
    B = 3
    memory, memory_mask = _memory(B, seed=3)
    prompt = torch.tensor([[CLS, 1037, 3861, 1997]]).expand(B, -1)  # "[CLS] a picture of"
    ref = official_beam_search(decoder, memory, memory_mask, prompt, 3, 5, 2)
    out = beam_search(decoder, memory, memory_mask, prompt, beam_size=3, max_length=5, min_length=2)
    for b in range(B):
        n = int(out.lengths[b, 0])
        assert out.ids[b, 0, :n].tolist() == ref["predictions"][b][0].tolist()
        assert abs(float(out.scores[b, 0]) - float(ref["scores"][b][0])) <= ATOL + RTOL * abs(
            ref["scores"][b][0]
        )


@torch.no_grad()
def test_left_padded_prompts_cached_equals_uncached(decoder):
    B = 3
    memory, memory_mask = _memory(B, seed=4)
    prompt = torch.randint(1000, 5000, (B, 4))
    prompt[:, 0] = CLS
    mask = torch.ones(B, 4, dtype=torch.bool)
    mask[0, :2] = False
    prompt[0, :2] = PAD
    kw = dict(beam_size=3, max_length=5, min_length=1, num_return=2)
    for mode in ("official", "standard"):
        a = beam_search(decoder, memory, memory_mask, prompt, mask, mode=mode, **kw)
        b = beam_search(decoder, memory, memory_mask, prompt, mask, mode=mode, use_cache=False, **kw)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.lengths, b.lengths)
        torch.testing.assert_close(a.scores, b.scores, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="left-padded"):
        beam_search(decoder, memory, memory_mask, prompt, mask.flip(1))


# ------------------------------------------------------------------------------------------------ standard
@pytest.mark.parametrize("beam_size", [2, 4])
@pytest.mark.parametrize("early_stopping", ["heuristic", "exact"])
def test_standard_beam_search(decoder, beam_size, early_stopping):
    B, T = 4, 7
    memory, memory_mask = _memory(B, seed=5)
    start = torch.full((B, 1), CLS)
    out = beam_search(
        decoder,
        memory,
        memory_mask,
        start,
        beam_size=beam_size,
        max_length=T,
        min_length=2,
        mode="standard",
        num_return=beam_size,
        early_stopping=early_stopping,
    )
    assert (out.scores[:, :-1] >= out.scores[:, 1:]).all()
    last = out.ids.gather(2, (out.lengths - 1)[..., None])[..., 0]
    assert ((last == SEP) | (out.lengths == 1 + T)).all()
    assert ((out.ids[..., 1:] == SEP).sum(-1) <= 1).all()  # finished beams retire at their [SEP]
    assert (out.lengths >= 1 + 3).all()
    # Scores are the length-penalized log-likelihoods of the returned ids.
    ids = out.ids.flatten(0, 1)
    lengths = out.lengths.flatten()
    mask = torch.arange(ids.shape[1]) < lengths[:, None]
    logp = sequence_log_probs(
        decoder, memory, memory_mask, ids, mask, torch.arange(B).repeat_interleave(beam_size)
    )
    lp = torch.tensor([gnmt_length_penalty(int(n) - 2) for n in lengths])
    torch.testing.assert_close(logp / lp, out.scores.flatten(), atol=1e-4, rtol=0)


def test_greedy_equals_standard_beam_one(decoder):
    B = 4
    memory, memory_mask = _memory(B, seed=6)
    start = torch.full((B, 1), CLS)
    g = greedy(decoder, memory, memory_mask, start, max_length=8, min_length=2)
    b = beam_search(
        decoder, memory, memory_mask, start, beam_size=1, max_length=8, min_length=2, mode="standard"
    )
    assert torch.equal(g.ids, b.ids) and torch.equal(g.lengths, b.lengths)
    assert (g.lengths < 9).any() and (g.lengths == 9).any()  # some rows stop at [SEP], some run out
    g2 = greedy(decoder, memory, memory_mask, start, max_length=8, min_length=2, use_cache=False)
    assert torch.equal(g.ids, g2.ids)
    torch.testing.assert_close(g.scores, g2.scores, atol=ATOL, rtol=RTOL)


def test_sampling(decoder):
    B = 3
    memory, memory_mask = _memory(B, seed=7)
    start = torch.full((B, 1), CLS)
    g = greedy(decoder, memory, memory_mask, start, max_length=6)
    s = sample(
        decoder,
        memory,
        memory_mask,
        start,
        max_length=6,
        top_k=1,
        num_return=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(s.ids, g.ids.expand(-1, 2, -1))
    torch.testing.assert_close(s.scores, g.scores.expand(-1, 2), atol=ATOL, rtol=RTOL)

    def draw(seed, **kw):
        return sample(
            decoder,
            memory,
            memory_mask,
            start,
            max_length=6,
            num_return=4,
            generator=torch.Generator().manual_seed(seed),
            **kw,
        )

    a, b, c = draw(1, temperature=1.5), draw(1, temperature=1.5), draw(2, temperature=1.5)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores)
    assert not torch.equal(a.ids, c.ids)
    p = draw(3, top_p=0.5, top_k=50)
    assert p.ids.shape[:2] == (B, 4)
    # Scores are the model's log-likelihoods of the drawn tokens.
    ids, lengths = a.ids.flatten(0, 1), a.lengths.flatten()
    mask = torch.arange(ids.shape[1]) < lengths[:, None]
    ref = sequence_log_probs(decoder, memory, memory_mask, ids, mask, torch.arange(B).repeat_interleave(4))
    torch.testing.assert_close(a.scores.flatten(), ref.detach(), atol=1e-4, rtol=5e-5)


def test_grounding_greedy_with_coordinate_bias(decoder):
    B = 2
    memory, memory_mask = _memory(B, seed=8)
    bias = token_bias(30522, range(345, 682))
    out = greedy(
        decoder,
        memory,
        memory_mask,
        torch.full((B, 1), 344),
        max_length=4,
        min_length=4,
        eos_id=None,
        logit_bias=bias,
    )
    assert out.ids.shape == (B, 1, 5) and (out.lengths == 5).all()
    assert ((out.ids[:, 0, 1:] >= 345) & (out.ids[:, 0, 1:] <= 681)).all()


# ------------------------------------------------------------------------------------------------ ranking
@torch.no_grad()
def test_rank_answers_matches_brute_force(decoder):
    Q, A, La = 3, 12, 5
    memory, memory_mask = _memory(Q, seed=10)
    g = torch.Generator().manual_seed(11)
    answer_ids = torch.randint(1000, 5000, (A, La), generator=g)
    answer_ids[:, 0] = CLS
    lengths = torch.randint(3, La + 1, (A,), generator=g)  # "[CLS] a.. [SEP] [SEP]", right-padded
    answer_mask = torch.arange(La) < lengths[:, None]
    answer_ids[torch.arange(A), lengths - 1] = SEP
    answer_ids[torch.arange(A), lengths - 2] = SEP
    answer_ids[~answer_mask] = PAD
    k = 5
    for double in (True, False):
        out = rank_answers(
            decoder, memory, memory_mask, answer_ids, answer_mask, k=k, double_count_first=double
        )
        for q in range(Q):
            # Brute force: every answer with the memory of question q, no sharing, no cache.
            logits = decoder(
                answer_ids,
                answer_mask,
                memory[q : q + 1].expand(A, -1, -1),
                memory_mask[q : q + 1].expand(A, -1),
            )
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, answer_ids[:, 1:, None])[..., 0]
            logp = (logp * answer_mask[:, 1:]).sum(1)  # [A] chain-rule log-likelihood
            first = logp.new_tensor(
                [float(torch.log_softmax(logits[a, 0], -1)[answer_ids[a, 1]]) for a in range(A)]
            )
            candidates = first.topk(k).indices  # the k answers with the most likely first token
            score = logp[candidates] + (first[candidates] if double else 0.0)
            order = score.sort(descending=True, stable=True).indices
            assert out.indices[q].tolist() == candidates[order].tolist()
            torch.testing.assert_close(out.scores[q], score[order], atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(out.probs[q], score[order].softmax(0), atol=ATOL, rtol=RTOL)
    # k larger than the list: clamped.
    assert rank_answers(decoder, memory, memory_mask, answer_ids, answer_mask, k=128).indices.shape == (Q, A)


def test_kv_cache_rejects_bad_sizes():
    with pytest.raises(ValueError):
        KVCache(0, 4)


# ------------------------------------------------------------------------------------------ compaction
def _row_counts(decoder, fn):
    """Runs fn() and returns the number of rows of every decoder call."""
    counts = []
    handle = decoder.embeddings.register_forward_hook(lambda m, args, out: counts.append(out.shape[0]))
    try:
        fn()
    finally:
        handle.remove()
    return counts


@torch.no_grad()
@pytest.mark.parametrize("method", ["official", "standard", "greedy", "sample"])
def test_finished_samples_leave_the_batch_and_batch_equals_singles(decoder, method):
    B = 4
    memory, memory_mask = _memory(B, seed=11)
    start = torch.full((B, 1), CLS)

    def run(rows):
        m, mm, st = memory[rows], memory_mask[rows], start[rows]
        if method in ("official", "standard"):
            return beam_search(decoder, m, mm, st, beam_size=3, max_length=8, min_length=1, mode=method)
        if method == "greedy":
            return greedy(decoder, m, mm, st, max_length=8, min_length=1)
        return sample(decoder, m, mm, st, num_return=2, max_length=8, top_k=1)  # top_k=1: deterministic

    counts = _row_counts(decoder, lambda: run(slice(None)))
    batch = run(slice(None))
    steps = counts[1:]  # after the prompt call
    assert steps == sorted(steps, reverse=True)  # rows only ever leave
    assert len(set(steps)) > 1, f"no sample left the batch early: {counts}"
    for b in range(B):
        single = run(slice(b, b + 1))
        n = int(single.lengths[0, 0])
        assert int(batch.lengths[b, 0]) == n
        assert batch.ids[b, :, :n].tolist() == single.ids[0, :, :n].tolist()
        torch.testing.assert_close(batch.scores[b], single.scores[0], atol=ATOL, rtol=RTOL)

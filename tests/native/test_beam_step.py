"""The native beam_step op against its Python twin: identical state, hypotheses and scores, step by step.

Random logits over a small vocabulary, rounded to a coarse grid so that candidates tie; a boosted [SEP]
so that beams and samples finish early; batch and beam sizes 1..8; both modes; the search driven as
`beam_search` drives it (closed samples dropped at every sync, with sync_every 1 and 3).
"""

from __future__ import annotations

import pytest
import torch

from mplug_fast.generation.beam_step import beam_step_reference, stable_topk

EOS, PAD, LP, T, V = 5, 0, 2, 6, 23


def _run(step_fn, B, K, official, exact, sync_every, seed, bias=None, device="cpu"):
    """A synthetic beam search of T steps over random logits; returns the final state and every step's
    (beam, token), on the CPU."""
    g = torch.Generator().manual_seed(seed)
    S = T * K if official else K
    running = torch.full((B, K), float("-inf"))
    running[:, 0] = 0.0
    seq = torch.full((B, K, LP + T), PAD, dtype=torch.long)
    seq[:, :, :LP] = torch.randint(1, V, (B, 1, LP), generator=g)
    fin_scores = torch.full((B, S), float("-inf"))
    fin_seqs = torch.full((B, S, LP + T), PAD, dtype=torch.long)
    fin_lengths = torch.zeros((B, S), dtype=torch.long)
    steps = torch.zeros(B, dtype=torch.long)
    closed = torch.zeros(B, dtype=torch.bool)
    open_ids = torch.arange(B)
    running, seq, fin_scores, fin_seqs, fin_lengths, steps, closed, open_ids = (
        t.to(device) for t in (running, seq, fin_scores, fin_seqs, fin_lengths, steps, closed, open_ids)
    )
    bias = None if bias is None else bias.to(device)
    picks = []
    for step in range(T):
        Bo = open_ids.shape[0]
        logits = (torch.randn(B * K, V, generator=g) * 2).round() / 2  # many ties
        logits[:, EOS] += torch.rand(B * K, generator=g) * 3  # early finishes
        logits = logits.to(device).view(B, K, V)[open_ids].reshape(Bo * K, V)
        args = (logits, bias, running, seq, closed, open_ids, fin_scores, fin_seqs, fin_lengths, steps)
        beam, token = step_fn(*args, step, LP, T, 1, EOS, 0.6, official, exact)
        picks.append((open_ids.cpu(), beam.cpu(), token.cpu()))
        if (step + 1) % sync_every == 0 and not bool(closed.all()):
            keep = (~closed).nonzero()[:, 0]
            open_ids, running, seq, closed = open_ids[keep], running[keep], seq[keep], closed[keep]
    return tuple(t.cpu() for t in (fin_scores, fin_seqs, fin_lengths, steps)), picks


CASES = [(B, K) for B in range(1, 9) for K in (1, 3)] + [(2, K) for K in range(1, 9)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)], ids=["cpu", "cuda"])
@pytest.mark.parametrize("official", [True, False], ids=["official", "standard"])
def test_native_equals_python_twin(official, device):
    """The native op against the Python twin on the same device (the same log-softmax kernel)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    op = torch.ops.mplug_fast.beam_step
    for B, K in CASES:
        for sync_every in (1, 3):
            for exact in (False, True) if not official else (False,):
                seed = 100 * B + 10 * K + sync_every
                want, want_picks = _run(
                    beam_step_reference, B, K, official, exact, sync_every, seed, device=device
                )
                got, got_picks = _run(op, B, K, official, exact, sync_every, seed, device=device)
                case = f"B={B} K={K} sync_every={sync_every} exact={exact}"
                for name, w, o in zip(("fin_scores", "fin_seqs", "fin_lengths", "steps"), want, got):
                    assert torch.equal(w, o), f"{case}: {name} differs"
                for step, (w, o) in enumerate(zip(want_picks, got_picks)):
                    assert all(torch.equal(a, b) for a, b in zip(w, o)), f"{case}: step {step} picks differ"


def test_the_cases_finish_early_and_tie():
    """The random cases close samples before the last step and hold tied candidates (else the test above
    would not test them)."""
    (_, _, _, steps), _ = _run(beam_step_reference, 8, 3, True, False, 1, 7)
    assert int(steps.min()) < T
    logits = (torch.randn(1000, V, generator=torch.Generator().manual_seed(0)) * 2).round() / 2
    assert (logits.sort(dim=1).values.diff(dim=1) == 0).any(dim=1).float().mean() > 0.9


def test_native_with_bias_and_no_eos():
    bias = torch.zeros(V)
    bias[7:12] = float("-inf")  # a masked band of the vocabulary
    for official in (True, False):
        want, _ = _run(beam_step_reference, 3, 4, official, False, 1, 11, bias)
        got, _ = _run(torch.ops.mplug_fast.beam_step, 3, 4, official, False, 1, 11, bias)
        assert all(torch.equal(w, o) for w, o in zip(want, got))


def test_stable_topk_orders_ties_by_index():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (50, 40), generator=g).float()
    x[::7, ::3] = float("-inf")
    for n in (1, 5, 17):
        values, index = stable_topk(x, n)
        want = x.sort(dim=1, descending=True, stable=True)
        assert torch.equal(values, want.values[:, :n]) and torch.equal(index, want.indices[:, :n])


def test_meta_and_bad_shapes():
    B, K, S, L = 2, 3, 3, LP + T
    meta = dict(device="meta")
    state = (
        torch.empty(B, K, **meta),
        torch.empty(B, K, L, dtype=torch.long, **meta),
        torch.empty(B, dtype=torch.bool, **meta),
        torch.empty(B, dtype=torch.long, **meta),
        torch.empty(B, S, **meta),
        torch.empty(B, S, L, dtype=torch.long, **meta),
        torch.empty(B, S, dtype=torch.long, **meta),
        torch.empty(B, dtype=torch.long, **meta),
    )
    beam, token = torch.ops.mplug_fast.beam_step(
        torch.empty(B * K, V, **meta), None, *state, 0, LP, T, 1, EOS, 0.6, False, False
    )
    assert beam.shape == token.shape == (B, K) and beam.device.type == "meta"
    cpu = [torch.zeros(t.shape, dtype=t.dtype) for t in state]
    with pytest.raises(RuntimeError, match="logits must be"):
        torch.ops.mplug_fast.beam_step(
            torch.zeros(B * K + 1, V), None, *cpu, 0, LP, T, 1, EOS, 0.6, False, False
        )

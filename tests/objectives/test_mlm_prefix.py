"""MLM masking statistics and loss; PrefixLM word split and loss; the decoder LM loss helper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mplug_fast.data import Tokenizer
from mplug_fast.objectives.losses import IGNORE, distilled_token_loss, lm_loss
from mplug_fast.objectives.mlm import mask_tokens, mlm_loss
from mplug_fast.objectives.prefix_lm import continuation_table, prefix_lm_loss, split_prefix

PAD, CLS, SEP, MASK, V = 0, 101, 102, 103, 30522


def _random_batch(B: int, L: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, V, (B, L), generator=g)
    lengths = torch.randint(3, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    ids[:, 0] = CLS
    ids[torch.arange(B), lengths - 1] = SEP
    return ids.masked_fill(~mask, PAD), mask


def test_mlm_masking_statistics_and_specials_never_masked():
    ids, mask = _random_batch(1024, 48)
    g = torch.Generator().manual_seed(1)
    out, labels = mask_tokens(ids, mask, mask_id=MASK, vocab_size=V, special_ids=(PAD, CLS, SEP), generator=g)
    selected = labels != IGNORE
    special = (ids == PAD) | (ids == CLS) | (ids == SEP)
    assert not (selected & special).any()
    assert torch.equal(out[special], ids[special])  # specials and pads untouched
    assert torch.equal(out[~selected], ids[~selected])  # nothing else changes
    assert torch.equal(labels[selected], ids[selected])
    n_cand = (mask & ~special).sum().item()
    n_sel = selected.sum().item()
    assert n_sel / n_cand == pytest.approx(0.15, abs=0.005)
    to_mask = (out == MASK) & selected
    unchanged = (out == ids) & selected
    replaced = selected & ~to_mask & ~unchanged
    assert to_mask.sum().item() / n_sel == pytest.approx(0.8, abs=0.01)
    assert unchanged.sum().item() / n_sel == pytest.approx(0.1, abs=0.01)  # (+ ~1/V random hits on itself)
    assert replaced.sum().item() / n_sel == pytest.approx(0.1, abs=0.01)
    assert out[replaced].min() >= 0 and out[replaced].max() < V


def test_mlm_probability_bounds():
    ids, mask = _random_batch(2, 5)
    with pytest.raises(ValueError, match="probability"):
        mask_tokens(ids, mask, mask_id=MASK, vocab_size=V, special_ids=(PAD,), probability=1.5)


class _ToyMLM:
    """encode_text = embedding; fuse adds the image mean; mlm_logits = linear: checks the plumbing."""

    def __init__(self, seed: int, D: int = 8, vocab: int = 50):
        g = torch.Generator().manual_seed(seed)
        self.E = torch.randn(vocab, D, generator=g, requires_grad=True)
        self.W = torch.randn(vocab, D, generator=g)

    def encode_text(self, ids, mask):
        return self.E[ids]

    def fuse(self, v, t, mask):
        return v, t + v.mean(1, keepdim=True)

    def mlm_logits(self, h):
        return h @ self.W.t()


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_mlm_loss_matches_hand_computation(alpha):
    B, L, Nv, D, Vt = 3, 6, 2, 8, 50
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, Vt, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    labels = torch.full((B, L), IGNORE)
    labels[0, 2], labels[1, 1], labels[1, 4] = 7, 8, 9
    v, v_m = torch.randn(B, Nv, D, generator=g), torch.randn(B, Nv, D, generator=g)
    model, momentum = _ToyMLM(1), _ToyMLM(2)
    loss = mlm_loss(model, v, ids, mask, labels, momentum=momentum, image_states_m=v_m, alpha=alpha)
    total = 0.0
    for b, pos in ((0, 2), (1, 1), (1, 4)):
        h = model.E[ids[b, pos]] + v[b].mean(0)
        logp = F.log_softmax(h @ model.W.t(), -1)
        soft = F.softmax((momentum.E[ids[b, pos]] + v_m[b].mean(0)) @ momentum.W.t(), -1)
        total += (1 - alpha) * -logp[labels[b, pos]] + alpha * -(soft * logp).sum()
    torch.testing.assert_close(loss, total / 3)
    loss.backward()
    assert model.E.grad is not None


def test_mlm_loss_with_nothing_masked_is_zero_not_nan():
    model = _ToyMLM(1)
    ids = torch.randint(5, 50, (2, 4))
    loss = mlm_loss(
        model, torch.zeros(2, 1, 8), ids, torch.ones(2, 4, dtype=torch.bool), torch.full((2, 4), IGNORE)
    )
    assert loss.item() == 0.0


def test_distillation_is_over_the_vocabulary_axis():
    logits = torch.randn(2, 3, 7)
    soft = torch.randn(2, 3, 7)
    targets = torch.tensor([[1, 2, IGNORE], [0, IGNORE, 6]])
    got = distilled_token_loss(logits, targets, soft, alpha=0.3)
    ce = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), ignore_index=IGNORE, reduction="none")
    kd = -(F.softmax(soft, -1) * F.log_softmax(logits, -1)).sum(-1).reshape(-1)
    want = (0.7 * ce + 0.3 * kd).masked_fill(targets.reshape(-1) == IGNORE, 0).reshape(2, 3)
    torch.testing.assert_close(got, want)


def test_lm_loss_mean_sequence_prompt_and_smoothing():
    N, L, Vt = 3, 5, 11
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, L, Vt, generator=g)
    ids = torch.randint(0, Vt, (N, L), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    per = [
        [-F.log_softmax(logits[n, t], -1)[ids[n, t + 1]] for t in range(L - 1) if mask[n, t + 1]]
        for n in range(N)
    ]
    torch.testing.assert_close(lm_loss(logits, ids, mask), torch.stack([x for p in per for x in p]).mean())
    torch.testing.assert_close(
        lm_loss(logits, ids, mask, reduction="sequence"), torch.stack([sum(p) for p in per])
    )
    # prompt of 2 tokens after [CLS]: the first 2 targets are ignored
    kept = [p[2:] for p in per]
    torch.testing.assert_close(
        lm_loss(logits, ids, mask, ignore_prefix=2), torch.stack([x for p in kept for x in p]).mean()
    )
    eps = 0.1
    smooth = []
    for n in range(N):
        for t in range(L - 1):
            if mask[n, t + 1]:
                lp = F.log_softmax(logits[n, t], -1)
                smooth.append(-(1 - eps) * lp[ids[n, t + 1]] - eps * lp.mean())
    torch.testing.assert_close(lm_loss(logits, ids, mask, label_smoothing=eps), torch.stack(smooth).mean())


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


def test_split_prefix_splits_at_word_boundaries_uniformly(tokenizer):
    texts = ["the tokenizer handles embeddings nicely", "a red circle", "squares"]
    enc = tokenizer(texts, padding="longest")
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()
    table = continuation_table(tokenizer.get_vocab(), tokenizer.vocab_size)
    words = [t.split() for t in texts]
    counts = [[0] * len(w) for w in words]
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        p_ids, p_mask, t_ids, t_mask = split_prefix(
            ids, mask, continuation=table, cls_id=CLS, sep_id=SEP, pad_id=PAD, generator=g
        )
        for b in range(len(texts)):
            prefix = tokenizer.decode(p_ids[b][p_mask[b]].tolist(), skip_special_tokens=True)
            target = tokenizer.decode(t_ids[b][t_mask[b]].tolist(), skip_special_tokens=True)
            assert p_ids[b, 0] == CLS and t_ids[b, 0] == CLS
            assert p_ids[b][p_mask[b]][-1] == SEP and t_ids[b][t_mask[b]][-1] == SEP
            assert (p_ids[b][~p_mask[b]] == PAD).all() and (t_ids[b][~t_mask[b]] == PAD).all()
            k = len(prefix.split())
            assert prefix.split() == words[b][:k] and target.split() == words[b][k:]
            assert target  # never empty
            counts[b][k] += 1
    for b, c in enumerate(counts):  # k uniform in [0, n - 1]
        n = len(words[b])
        for x in c:
            assert x / 300 == pytest.approx(1 / n, abs=0.09)


def test_prefix_lm_loss_matches_decoder_ce():
    class Toy:
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.E, self.W = torch.randn(40, 4, generator=g), torch.randn(40, 4, generator=g)

        def encode_text(self, ids, mask):
            return self.E[ids]

        def fuse(self, v, t, mask):
            return v, t

        def decode(self, ids, mask, memory, memory_mask):
            ctx = (memory * memory_mask[..., None]).sum(1, keepdim=True) / memory_mask.sum(1)[:, None, None]
            return (self.E[ids] + ctx) @ self.W.t()

    toy = Toy()
    v = torch.randn(2, 3, 4)
    p_ids = torch.tensor([[1, 5, 2, 0], [1, 2, 0, 0]])
    p_mask = p_ids != 0
    t_ids = torch.tensor([[1, 7, 8, 2], [1, 9, 2, 0]])
    t_mask = t_ids != 0
    loss = prefix_lm_loss(toy, v, (p_ids, p_mask, t_ids, t_mask))
    memory = torch.cat([v, toy.E[p_ids]], 1)
    mm = torch.cat([torch.ones(2, 3, dtype=torch.bool), p_mask], 1)
    logits = toy.decode(t_ids, t_mask, memory, mm)
    want = F.cross_entropy(
        logits[:, :-1].reshape(-1, 40), t_ids[:, 1:].masked_fill(~t_mask[:, 1:], -100).reshape(-1)
    )
    torch.testing.assert_close(loss, want)

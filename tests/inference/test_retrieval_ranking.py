"""Retrieval rerank vs brute-force ITM over all pairs; VQA answer ranking vs exhaustive scoring."""

from __future__ import annotations

import pytest
import torch

from mplug_fast.generation import sequence_log_probs
from mplug_fast.inference import retrieval_scores, vqa_rank
from mplug_fast.inference.retrieval import UNSCORED


@torch.no_grad()
@pytest.mark.parametrize("k, batch_size", [(2, 3), (3, 64), (10, 4)])
def test_retrieval_rerank_matches_brute_force(models, tokenizer, k, batch_size):
    model = models["retrieval"]
    Ni, Nt = 4, 5
    images = torch.randn(Ni, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    batch = tokenizer(["a dog", "two red squares", "a cat on a mat", "blue", "the sky at night"])
    ids, mask = batch.input_ids, batch.attention_mask
    out = retrieval_scores(model, images, ids, mask, k=k, batch_size=batch_size)
    # brute force: every pair through the fusion + ITM head, one pair at a time
    v = model.encode_image(images)
    t = model.encode_text(ids, mask)
    itc = model.image_features(v) @ model.text_features(t).t()
    itm = torch.empty(Ni, Nt)
    for i in range(Ni):
        for j in range(Nt):
            itm[i, j] = model.itm_logits(v[i : i + 1], t[j : j + 1], mask[j : j + 1])[0, 1]
    torch.testing.assert_close(out.itc, itc, atol=1e-5, rtol=0)
    for i in range(Ni):
        top = set(itc[i].topk(min(k, Nt)).indices.tolist())
        for j in range(Nt):
            expected = itm[i, j] if j in top else torch.tensor(UNSCORED)
            torch.testing.assert_close(out.i2t[i, j], expected, atol=1e-4, rtol=0)
    for j in range(Nt):
        top = set(itc[:, j].topk(min(k, Ni)).indices.tolist())
        for i in range(Ni):
            expected = itm[i, j] if i in top else torch.tensor(UNSCORED)
            torch.testing.assert_close(out.t2i[j, i], expected, atol=1e-4, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("double_count_first", [True, False])
def test_vqa_answer_ranking_matches_exhaustive_scoring(models, tokenizer, double_count_first):
    model = models["vqa"]
    answers = ["yes", "no", "two", "red square", "a blue circle", "3", "left"]
    a = tokenizer([x + "[SEP]" for x in answers])
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    q = tokenizer(["what is it?", "how many squares are there"])
    k = 4
    ranked = vqa_rank(
        model,
        images,
        q.input_ids,
        q.attention_mask,
        a.input_ids,
        a.attention_mask,
        k=k,
        double_count_first=double_count_first,
    )
    memory, memory_mask = model.fused_memory(images, q.input_ids, q.attention_mask)
    for b in range(2):
        first = model.decode(a.input_ids[:1, :1], None, memory[b : b + 1], memory_mask[b : b + 1])
        first_lp = torch.log_softmax(first[0, 0], -1)[a.input_ids[:, 1]]  # [A]
        m = memory[b : b + 1].expand(len(answers), -1, -1)  # tiled, no sharing
        mm = memory_mask[b : b + 1].expand(len(answers), -1)
        full = sequence_log_probs(model.decoder, m, mm, a.input_ids, a.attention_mask)  # [A]
        score = full + first_lp if double_count_first else full
        top = first_lp.topk(k).indices
        expected = sorted(top.tolist(), key=lambda i: -float(score[i]))
        assert ranked.indices[b].tolist() == expected
        torch.testing.assert_close(ranked.scores[b], score[expected], atol=1e-4, rtol=0)

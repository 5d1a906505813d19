"""Each task's ``evaluate`` against the inference and metric functions called by hand on the same inputs,
with oracle predictions (patched inference) that must score perfectly, and the baselines by hand."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import pytest
import torch

import mplug_fast.inference as inference
import mplug_fast.tasks.caption as caption_task
import mplug_fast.tasks.grounding as grounding_task
import mplug_fast.tasks.vqa as vqa_task
from mplug_fast.generation import GenerationOutput
from mplug_fast.metrics import caption_scores, grounding_accuracy, retrieval_recall, vqa_accuracy
from mplug_fast.metrics.vqa import exact_match
from mplug_fast.tasks import TASKS, get_task
from mplug_fast.tasks.retrieval import chance_recall
from mplug_fast.tasks.vqa import score_questions
from tests.tasks.conftest import WORLD, micro_model


def _samples(dataset):
    return [dataset[i] for i in range(len(dataset))]


def _ids_output(tokenizer, texts: list[str], start: torch.Tensor) -> GenerationOutput:
    """A GenerationOutput whose best hypothesis is start + ``texts[i]`` + [SEP]."""
    enc = tokenizer([t + "" for t in texts], padding="longest")
    body = enc.input_ids[:, 1:]  # drop [CLS]; keeps [SEP] and padding
    ids = torch.cat([start, body], 1)[:, None]
    B = len(texts)
    return GenerationOutput(ids=ids, scores=torch.zeros(B, 1), lengths=torch.full((B, 1), ids.shape[-1]))


def test_get_task_errors():
    with pytest.raises(ValueError, match="available"):
        get_task("no_such_task")


# ---- VQA -------------------------------------------------------------------------------------------------


def test_vqa_generate_matches_manual(tokenizer, tmp_path):
    spec = TASKS["vqa"]
    model = micro_model("vqa")
    data = spec.synthetic_dataset("test", **WORLD)
    out = spec.evaluate(model, data, tokenizer, batch_size=4, beam_size=2, output=tmp_path / "r.json")
    batch = get_task("vqa").collate(tokenizer)(_samples(data))
    gen = inference.vqa_generate(
        model, batch["images"], batch["question_ids"], batch["question_mask"], beam_size=2
    )
    manual = {
        q: tokenizer.decode(row[1:].tolist(), skip_special_tokens=True).strip()
        for q, row in zip(batch["question_id"], gen.ids[:, 0])
    }
    assert out["predictions"] == manual
    gold = {q: a for q, a in zip(batch["question_id"], batch["answers"])}
    types = dict(zip(batch["question_id"], batch["type"]))
    hits = {q: exact_match(manual[q], gold[q]) for q in manual}  # single-answer data: exact match
    assert out["vqa_acc"] == pytest.approx(100 * sum(hits.values()) / len(hits)) and out["count"] == len(data)
    assert out["vqa_acc_kind"] == "exact"
    by_type: dict[str, list[float]] = {}
    for q, h in hits.items():
        by_type.setdefault(types[q], []).append(h)
    assert {k: v for k, v in out.items() if k.startswith("vqa_acc/")} == {
        f"vqa_acc/{t}": pytest.approx(100 * sum(v) / len(v)) for t, v in by_type.items()
    }
    rows = json.loads((tmp_path / "r.json").read_text())  # EvalAI format
    assert rows == [{"question_id": q, "answer": a} for q, a in manual.items()]


def test_vqa_rank_and_oracle(tokenizer, monkeypatch):
    spec = TASKS["vqa"]
    model = micro_model("vqa")
    data = spec.synthetic_dataset("test", **WORLD)
    answers = ["yes", "no", "red", "two", "circle", "left"]
    out = spec.evaluate(model, data, tokenizer, batch_size=3, method="rank", answer_list=answers, k=4)
    batch = get_task("vqa").collate(tokenizer)(_samples(data))
    enc = tokenizer([a + "[SEP]" for a in answers], padding="longest")
    ranked = inference.vqa_rank(
        model,
        batch["images"],
        batch["question_ids"],
        batch["question_mask"],
        enc.input_ids,
        enc.attention_mask,
        k=4,
    )
    manual = {q: answers[int(i)] for q, i in zip(batch["question_id"], ranked.indices[:, 0])}
    assert out["predictions"] == manual
    gold = {q: a for q, a in zip(batch["question_id"], batch["answers"])}
    assert out["vqa_acc"] == pytest.approx(
        100 * sum(exact_match(manual[q], gold[q]) for q in gold) / len(gold)
    )

    # oracle generation: every gold answer -> 100
    def oracle(model, images, q_ids, q_mask, **kw):
        return _ids_output(
            tokenizer, [a[0] for a in batch["answers"]], torch.full((len(batch["answers"]), 1), 101)
        )

    monkeypatch.setattr(vqa_task, "vqa_generate", oracle)
    assert spec.evaluate(model, data, tokenizer, batch_size=len(data))["vqa_acc"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="answer_list"):
        spec.evaluate(model, data, tokenizer, method="rank")


def test_score_questions_official_on_ten_answers():
    gold = {1: ["two"] * 2 + ["three"] * 8, 2: ["yes"] * 10, 3: ["red"] * 4 + ["blue"] * 6}
    preds = {1: "two", 2: "no", 3: "Red."}
    types = {1: "number", 2: "yes/no", 3: "other"}
    overall, per_type, kind = score_questions(preds, gold, types)
    official = vqa_accuracy(preds, gold, types)
    assert kind == "official" and overall == pytest.approx(official.overall)
    assert per_type == pytest.approx(official.per_type)
    mixed = score_questions({**preds, 4: "cube"}, {**gold, 4: ["cube"]})
    assert mixed[2] == "mixed" and mixed[0] == pytest.approx((3 * official.overall + 100) / 4)


def test_vqa_baseline_by_hand():
    spec = TASKS["vqa"]
    train, test = spec.synthetic_dataset("train", **WORLD), spec.synthetic_dataset("test", **WORLD)
    majority = Counter(train[i]["answers"][0] for i in range(len(train))).most_common(1)[0][0]
    hits = sum(test[i]["answers"][0] == majority for i in range(len(test)))
    base = spec.baseline(train, test)
    assert base.metric == "vqa_acc" and majority in base.description
    assert base.value == pytest.approx(100.0 * hits / len(test))


# ---- captioning ------------------------------------------------------------------------------------------


def test_caption_matches_manual_and_oracle(tokenizer, tmp_path, monkeypatch):
    spec = TASKS["caption"]
    model = micro_model("caption")
    data = spec.synthetic_dataset("test", **WORLD)
    out = spec.evaluate(
        model,
        data,
        tokenizer,
        batch_size=4,
        beam_size=2,
        max_length=10,
        min_length=2,
        output=tmp_path / "c.json",
    )
    samples = _samples(data)
    images = torch.stack([s["image"] for s in samples])
    gen = inference.caption_generate(model, images, beam_size=2, max_length=10, min_length=2)
    manual = {
        s["image_id"]: tokenizer.decode(row[1:].tolist(), skip_special_tokens=True).strip()
        for s, row in zip(samples, gen.ids[:, 0])
    }
    assert out["predictions"] == manual
    gold = {s["image_id"]: s["captions"] for s in samples}
    scores, _ = caption_scores(gold, {k: [v] for k, v in manual.items()})
    for key, value in scores.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key
    assert json.loads((tmp_path / "c.json").read_text()) == [
        {"image_id": k, "caption": v} for k, v in manual.items()
    ]

    def oracle(model, images, prompt_ids=None, prompt_mask=None, **kw):
        B = images.shape[0]
        return _ids_output(tokenizer, [s["captions"][0] for s in samples[:B]], torch.full((B, 1), 101))

    monkeypatch.setattr(caption_task, "caption_generate", oracle)
    perfect = spec.evaluate(model, data, tokenizer, batch_size=len(data))
    assert perfect["BLEU_1"] == pytest.approx(1.0)
    base = spec.baseline(spec.synthetic_dataset("train", **WORLD), data)
    assert perfect["CIDEr"] > base.value > 0


def test_caption_needs_test_split(tokenizer):
    spec = TASKS["caption"]
    train = spec.synthetic_dataset("train", **{**WORLD, "num_scenes": 1})
    with pytest.raises(ValueError, match="captions"):
        spec.evaluate(micro_model("caption"), train, tokenizer, beam_size=1, max_length=4, min_length=1)


# ---- retrieval -------------------------------------------------------------------------------------------


def test_retrieval_matches_manual(tokenizer, tmp_path):
    spec = TASKS["retrieval"]
    model = micro_model("retrieval")
    data = spec.synthetic_dataset("test", **WORLD)
    out = spec.evaluate(model, data, tokenizer, batch_size=4, k=3, output=tmp_path / "t.json")
    images = torch.stack([data.image(j) for j in range(len(data.img2txt))])
    enc = tokenizer(data.texts, padding="longest", max_length=30, truncation=True)
    scores = inference.retrieval_scores(model, images, enc.input_ids, enc.attention_mask.bool(), k=3)
    manual = retrieval_recall(scores.i2t, scores.t2i, data.img2txt, data.txt2img)
    itc = retrieval_recall(scores.itc, scores.itc.t(), data.img2txt, data.txt2img)
    for key, value in manual.items():
        assert out[key] == pytest.approx(value), key
        assert out[f"itc/{key}"] == pytest.approx(itc[key]), key
    top = json.loads((tmp_path / "t.json").read_text())
    assert len(top["i2t"]) == len(data.img2txt) and len(top["t2i"]) == len(data.texts)
    assert top["i2t"][0][0] == int(scores.i2t[0].argmax())


def test_chance_recall_is_the_mean_over_all_rankings():
    img2txt, txt2img = [[0, 1], [2], [3, 4]], [0, 0, 1, 2, 2]
    Ni, Nt = 3, 5
    sums: dict[str, float] = {}
    perms_t, perms_i = list(itertools.permutations(range(Nt))), list(itertools.permutations(range(Ni)))
    for pt, pi in zip(perms_t, itertools.cycle(perms_i)):  # 120 text orders; image orders cycle (6 | 120)
        i2t = torch.tensor([[-float(pt.index(j)) for j in range(Nt)]] * Ni)
        t2i = torch.tensor([[-float(pi.index(j)) for j in range(Ni)]] * Nt)
        for key, value in retrieval_recall(i2t, t2i, img2txt, txt2img).items():
            sums[key] = sums.get(key, 0.0) + value
    chance = chance_recall(img2txt, Nt)
    for key, value in chance.items():
        assert value == pytest.approx(sums[key] / len(perms_t)), key
    assert chance["txt_r1"] == pytest.approx(100 * (2 / 5 + 1 / 5 + 2 / 5) / 3)
    assert math.isclose(chance["img_r10"], 100.0)


# ---- grounding -------------------------------------------------------------------------------------------


def test_grounding_matches_manual_and_oracle(tokenizer, tmp_path, monkeypatch):
    spec = TASKS["grounding"]
    model = micro_model("grounding")
    data = spec.synthetic_dataset("test", **WORLD)
    out = spec.evaluate(model, data, tokenizer, batch_size=4, output=tmp_path / "g.json")
    batch = get_task("grounding").collate(tokenizer)(_samples(data))
    prefix, coords = inference.coordinate_token_ids(tokenizer)
    tokens = inference.ground_tokens(
        model, batch["images"], batch["text_ids"], batch["text_mask"], prefix, coords
    )
    boxes = (tokens - coords[0]).double() / 336
    assert torch.equal(out["boxes"], boxes)
    assert out["acc@0.5"] == pytest.approx(100 * grounding_accuracy(boxes, batch["boxes"].double()))
    rows = json.loads((tmp_path / "g.json").read_text())
    assert [r["box"] for r in rows] == boxes.tolist() and rows[0]["expression"] == data[0]["expression"]

    def oracle(model, images, text_ids, text_mask, prefix_id, coord_ids):
        bins = torch.floor(batch["boxes"][: images.shape[0]] * 336).long()
        return coord_ids[bins]

    monkeypatch.setattr(grounding_task, "ground_tokens", oracle)
    perfect = spec.evaluate(model, data, tokenizer, batch_size=len(data))
    assert perfect["acc@0.5"] == pytest.approx(100.0) and perfect["miou"] > 90

    def oracle_32(model, images, text_ids, text_mask, prefix_id, coord_ids):  # a model trained on 32 bins
        assert coord_ids.numel() == 33
        return coord_ids[torch.floor(batch["boxes"][: images.shape[0]] * 32).long()]

    monkeypatch.setattr(grounding_task, "ground_tokens", oracle_32)
    coarse = spec.evaluate(model, data, tokenizer, batch_size=len(data), num_bins=32)
    want = torch.floor(batch["boxes"].double() * 32) / 32
    assert torch.equal(coarse["boxes"], want) and coarse["miou"] > 50


def test_grounding_baseline_by_hand():
    spec = TASKS["grounding"]
    train, test = spec.synthetic_dataset("train", **WORLD), spec.synthetic_dataset("test", **WORLD)
    mean = torch.stack([train[i]["box"].double() for i in range(len(train))]).mean(0)
    gold = torch.stack([test[i]["box"].double() for i in range(len(test))])
    base = spec.baseline(train, test)
    assert base.value == pytest.approx(100 * grounding_accuracy(mean.expand_as(gold).clone(), gold))


def test_item_text_fast_paths_match_the_samples(tmp_path):
    """``item_text`` skips rendering / image loading; it must give what the full sample has."""
    from PIL import Image

    from mplug_fast.data.official import KarpathyCaptionDataset, VQAJsonDataset
    from mplug_fast.tasks.evaluation import item_text

    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "a.png")
    caps = [{"image": "a.png", "caption": ["A Cat", "two dogs"], "image_id": 3}]
    vqa = [
        {"image": "a.png", "question": "what?", "answer": ["x"] * 4 + ["y"] * 6, "question_id": 7},
        {"image": "a.png", "question": "who?", "answer": ["z"] * 10, "question_id": 8},
    ]
    cases = [
        (TASKS["vqa"].synthetic_dataset("train", **WORLD), ["question", "answers", "gt_answers"]),
        (TASKS["caption"].synthetic_dataset("train", **WORLD), ["caption"]),
        (TASKS["caption"].synthetic_dataset("test", **WORLD), ["captions"]),
        (TASKS["retrieval"].synthetic_dataset("test", **WORLD), ["caption"]),
        (
            KarpathyCaptionDataset(caps, tmp_path, split="train", image_size=8, prompt="a picture of "),
            ["caption"],
        ),
        (KarpathyCaptionDataset(caps, tmp_path, split="test", image_size=8), ["captions"]),
        (VQAJsonDataset(vqa, tmp_path, split="val", image_size=8), ["gt_answers"]),
    ]
    for dataset, keys in cases:
        for i in range(min(len(dataset), 6)):
            sample = dataset[i]
            for key in keys:
                want = sample.get(key, sample.get("answers")) if key == "gt_answers" else sample[key]
                assert item_text(dataset, i, key) == want, (type(dataset).__name__, i, key)


def test_evaluation_batches_show_a_progress_bar_on_a_terminal_only(monkeypatch, capsys):
    import io
    import sys

    from mplug_fast.tasks.evaluation import batches

    def collate(xs):
        return {"x": torch.tensor(xs)}

    got = [b["x"].tolist() for b in batches(list(range(5)), collate, 2, "cpu")]
    assert got == [[0, 1], [2, 3], [4]]
    assert capsys.readouterr().err == ""  # not a terminal (a log, a pipe): no bar, no per-batch lines

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert len(list(batches(list(range(5)), collate, 2, "cpu"))) == 3
    assert "evaluate" in sys.stderr.getvalue() and "/3" in sys.stderr.getvalue()

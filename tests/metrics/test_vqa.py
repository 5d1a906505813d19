"""Official VQA accuracy: leave-one-out formula, normalisation and its quirks, EvalAI writer."""

from __future__ import annotations

import json
import os
import random
import stat

import pytest

from mplug_fast.metrics.vqa import (
    CONTRACTIONS,
    exact_match,
    normalize_answer,
    process_punctuation,
    vqa_accuracy,
    vqa_score,
    write_vqa_results,
)


def brute_force_score(pred: str, gts: list[str]) -> float:
    """The formula written the long way: for each left-out annotator, count matches among the others."""
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        accs.append(min(1.0, sum(g == pred for g in others) / 3))
    return sum(accs) / len(accs)


@pytest.mark.parametrize(
    ("n_match", "expected"),
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_leave_one_out_values(n_match, expected):
    # k of 10 match: a matching annotator left out leaves k-1, another leaves k:
    # acc = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10
    gts = ["yes"] * n_match + ["no"] * (10 - n_match)
    if n_match == 10:
        gts = ["yes"] * 10
    assert vqa_score("yes", gts) == pytest.approx(expected, abs=1e-12)
    assert vqa_score("yes", gts) == pytest.approx(brute_force_score("yes", gts), abs=1e-12)


def test_normalisation_rules():
    assert normalize_answer("Two") == "2"
    assert normalize_answer("  the Dog\n") == "dog"
    assert normalize_answer("none") == "0"
    assert normalize_answer("dont") == "don't" and normalize_answer("whats up") == "what's up"
    assert normalize_answer("yes.") == "yes"
    assert normalize_answer("3.5") == "3.5"  # a period before a digit stays
    assert normalize_answer("t-shirt") == "t shirt"  # '-' not touching a space -> space
    assert normalize_answer("red - blue") == "red blue"  # touching a space -> deleted
    assert normalize_answer("1,000 and a/b") == "1000 and ab"  # a digit,digit comma -> every mark deleted
    assert normalize_answer("a.m.") == "am"


def test_official_quirks():
    # capitalised contraction keys never match (text lower-cased first); reversed entry
    assert "Im" in CONTRACTIONS and normalize_answer("Im") == "im"
    assert normalize_answer("somebody'd") == "somebodyd"
    # only the first 32 periods are removed (re.UNICODE passed as count)
    assert process_punctuation("." * 40) == "." * 8
    # unanimous GT answers are not normalised, the prediction is: "two" vs ten "two" -> 0
    assert vqa_score("two", ["two"] * 10) == 0.0
    assert vqa_score("two", ["two"] * 10, official=False) == 1.0
    assert vqa_score("2", ["two"] * 10) == 0.0
    # with disagreement the GT gets punctuation only (no number words / articles)
    assert vqa_score("dog", ["the dog"] * 9 + ["cat"]) == 0.0
    assert vqa_score("hot dog", ["hot-dog"] * 9 + ["cat"]) == 1.0
    # ... and a mark not touching a space becomes a space, never stripped: GT "dog!" -> "dog " != "dog"
    assert vqa_score("dog", ["dog!"] * 9 + ["cat"]) == 0.0
    # a single answer: leave-one-out set empty -> always 0 (use exact_match)
    assert vqa_score("yes", ["yes"]) == 0.0 and exact_match("Yes", ["yes"]) == 1.0


def official_loop_score(pred: str, gts: list[str]) -> float:
    """The official evaluation's per-question steps written out literally: the prediction is cleaned of
    newlines/tabs, stripped and fully normalised; the ground truths are used raw, with punctuation processing
    only when the raw answers disagree; annotator i is left out by position."""
    res = normalize_answer(pred)
    answers = [process_punctuation(a) for a in gts] if len(set(gts)) > 1 else list(gts)
    accs = []
    for i in range(len(answers)):
        others = [a for j, a in enumerate(answers) if j != i]
        accs.append(min(1.0, sum(a == res for a in others) / 3))
    return sum(accs) / len(accs)


def test_official_gold_whitespace_is_not_stripped():
    # padded gold answers never match in the official evaluation: only the prediction is stripped
    assert vqa_score("2", ["2 "] * 10) == 0.0
    assert vqa_score(" 2 ", [" 2"] * 10) == 0.0
    assert vqa_score("2", ["2\n"] * 10) == 0.0
    # mixed padding: raw answers disagree -> punctuation processing only, "2 " stays "2 "; 4 exact "2" remain
    gts = ["2 "] * 6 + ["2"] * 4
    assert vqa_score("2", gts) == pytest.approx(brute_force_score("2", gts))
    assert vqa_score("2", gts) == pytest.approx(1.0)
    gts = ["2 "] * 8 + ["2"] * 2
    assert vqa_score("2", gts) == pytest.approx(0.6)  # 2 matches: 8 * (2/3) + 2 * (1/3), over 10
    # the symmetric normalisation strips both sides
    assert vqa_score("2", ["2 "] * 10, official=False) == 1.0
    assert vqa_score("2", ["2 "] * 8 + ["2"] * 2, official=False) == 1.0


def test_official_matches_literal_loop_on_adversarial_answers():
    rng = random.Random(0)
    base = ["2", "two", "yes", "Yes", "dog", "the dog", "hot-dog", "dog!", "red", "t-shirt", "1,000", "dont"]
    pads = ["", " ", "  ", "\t", "\n", " \n"]

    def noisy() -> str:
        return rng.choice(pads) + rng.choice(base) + rng.choice(pads)

    n_padded_gold = 0
    for _ in range(2000):
        gts = [noisy() for _ in range(10)] if rng.random() < 0.5 else [noisy()] * 10
        pred = noisy()
        n_padded_gold += any(g != g.strip() for g in gts)
        assert vqa_score(pred, gts) == pytest.approx(official_loop_score(pred, gts), abs=1e-12), (pred, gts)
    assert n_padded_gold > 500  # the quirk is exercised


def test_vqa_accuracy_aggregate_and_types():
    preds = {1: "yes", 2: "2", 3: "red"}
    gts = {1: ["yes"] * 10, 2: ["2"] * 3 + ["3"] * 7, 3: ["blue"] * 10}
    acc = vqa_accuracy(preds, gts, types={1: "yes/no", 2: "number", 3: "other"})
    assert acc.overall == pytest.approx(100 * (1.0 + 0.9 + 0.0) / 3)
    assert acc.per_type == pytest.approx({"yes/no": 100.0, "number": 90.0, "other": 0.0})
    with pytest.raises(KeyError, match="no ground truth"):
        vqa_accuracy({9: "x"}, gts)


def test_write_vqa_results(tmp_path):
    path = write_vqa_results({3: "yes", 1: "two"}, tmp_path / "sub" / "res.json")
    assert json.loads(path.read_text()) == [
        {"question_id": 3, "answer": "yes"},
        {"question_id": 1, "answer": "two"},
    ]
    with pytest.raises(ValueError, match="duplicate"):
        write_vqa_results([(1, "a"), (1, "b")], tmp_path / "x.json")
    with pytest.raises(TypeError, match="answer"):
        write_vqa_results([(1, 2)], tmp_path / "x.json")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_write_vqa_results_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = write_vqa_results({1: "yes"}, tmp_path / f"res_{umask:o}.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as open() creates files, not mkstemp's 0o600
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind

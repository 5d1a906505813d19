"""Caption metrics: hand-computed cases and equality with pycocoevalcap's scorers on the same tokens."""

from __future__ import annotations

import math
import random

import pytest

from mplug_fast.metrics.caption import (
    CiderD,
    bleu,
    caption_scores,
    cider_d,
    java_available,
    lcs_length,
    meteor,
    ptb_tokenize_sentence,
    rouge_l,
    spice,
)

WORDS = "a an the man woman dog cat red blue small big on in of with near riding sitting table".split()


def random_corpus(seed: int, n_images: int = 300) -> tuple[dict, dict]:
    rng = random.Random(seed)
    words = WORDS[: rng.randint(6, len(WORDS))]

    def sent() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 14)))

    gts = {i: [sent() for _ in range(rng.randint(1, 5))] for i in range(n_images)}
    res = {i: [sent() if rng.random() < 0.7 else rng.choice(gts[i])] for i in range(n_images)}
    return gts, res


# ---- hand-computed -----------------------------------------------------------------------------------------


def test_bleu_hand_case():
    r = bleu({0: ["a b c e"]}, {0: ["a b c d"]})
    p = [3 / 4, 2 / 3, 1 / 2]
    assert r.scores[0] == pytest.approx(p[0], abs=1e-8)
    assert r.scores[1] == pytest.approx(math.sqrt(p[0] * p[1]), abs=1e-8)
    assert r.scores[2] == pytest.approx((p[0] * p[1] * p[2]) ** (1 / 3), abs=1e-8)
    assert r.scores[3] < 1e-3  # no 4-gram match: (1e-15 / 1)^(1/4) * ...


def test_bleu_brevity_and_closest_ref():
    # hyp of 2 words; refs of 3 and 5 words: closest is 3 -> BP = exp(1 - 3/2)
    r = bleu({0: ["a b c", "a b x y z"]}, {0: ["a b"]})
    assert r.scores[0] == pytest.approx(math.exp(1 - 3 / 2), abs=1e-8)
    # tie (refs of 1 and 3 words around a 2-word hyp): the shorter reference wins -> no penalty (the longer
    # one would give exp(1 - 3/2)); both hyp words are matched (clipping uses the max count over refs)
    r = bleu({0: ["a", "a b c"]}, {0: ["a b"]})
    assert r.scores[0] == pytest.approx(1.0, abs=1e-8)


def test_rouge_l_hand_case():
    assert lcs_length("a c d e f".split(), "a b c d".split()) == 3
    P, R = 3 / 4, 3 / 5
    expect = (1 + 1.44) * P * R / (R + 1.44 * P)
    score, per = rouge_l({0: ["a c d e f", "x"]}, {0: ["a b c d"]})
    assert score == pytest.approx(expect, abs=1e-12) and per == [score]
    assert rouge_l({0: ["x y"]}, {0: ["a b"]})[0] == 0.0


def test_cider_d_hand_case_and_bigram_length_quirk():
    # n=1, two images -> log(2) idf for every word; lengths count bigrams (0 here) -> no length penalty
    gts, res = {0: ["a b"], 1: ["c d"]}, {0: ["a b"], 1: ["c"]}
    score, per = cider_d(gts, res, n=1)
    assert per[0] == pytest.approx(10.0, abs=1e-12)
    assert per[1] == pytest.approx(10.0 / math.sqrt(2), abs=1e-12)
    # n=2: image 1 now has a bigram length 1 vs 0 -> penalty exp(-1/72); its bigram part is 0
    _, per2 = cider_d(gts, res, n=2)
    assert per2[1] == pytest.approx(10.0 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 2, abs=1e-12)


def test_cider_fixed_df_independent_of_batch():
    gts, res = random_corpus(1, 40)
    scorer = CiderD(list(gts.values()))
    keys = list(gts)
    full = scorer.score([res[k][0] for k in keys], [gts[k] for k in keys])
    part = scorer.score([res[k][0] for k in keys[:7]], [gts[k] for k in keys[:7]])
    assert part == full[:7]


def test_bad_input_errors():
    with pytest.raises(ValueError, match="same image keys"):
        bleu({0: ["a"]}, {1: ["a"]})
    with pytest.raises(ValueError, match="exactly one hypothesis"):
        cider_d({0: ["a"]}, {0: ["a", "b"]})
    with pytest.raises(ValueError, match="one reference list per hypothesis"):
        CiderD([["a"]]).score(["a"], [])


# ---- equality with pycocoevalcap ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_equal_to_pycocoevalcap(seed):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = random_corpus(seed)
    ref_b, ref_b_img = Bleu(4).compute_score(gts, res, verbose=0)
    ours = bleu(gts, res)
    assert max(abs(a - b) for a, b in zip(ours.scores, ref_b)) <= 1e-9
    for k in range(4):
        assert max(abs(ours.per_image[i][k] - ref_b_img[k][i]) for i in range(len(gts))) <= 1e-9
    ref_r, ref_r_img = Rouge().compute_score(gts, res)
    r, r_img = rouge_l(gts, res)
    assert abs(r - ref_r) <= 1e-9 and max(abs(a - b) for a, b in zip(r_img, ref_r_img)) <= 1e-9
    ref_c, ref_c_img = Cider().compute_score(gts, res)
    c, c_img = cider_d(gts, res)
    assert abs(c - ref_c) <= 1e-9 and max(abs(a - b) for a, b in zip(c_img, ref_c_img)) <= 1e-9


def test_fixed_df_equals_pycocoevalcap_scorer_with_that_table():
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    train_gts, _ = random_corpus(5, 120)
    gts, res = random_corpus(6, 30)
    ours = CiderD(list(train_gts.values())).score([res[k][0] for k in gts], [gts[k] for k in gts])
    ref = CiderScorer(n=4, sigma=6.0)
    for k in gts:
        ref += (res[k][0], gts[k])
    for _ in range(len(train_gts) - len(gts)):  # compute_cider takes log(#docs) from len(crefs): pad to 120
        ref += ("x", ["x"])
    df_scorer = CiderScorer(n=4, sigma=6.0)
    for k in train_gts:
        df_scorer += (None, train_gts[k])
    df_scorer.compute_doc_freq()
    ref.document_frequency = df_scorer.document_frequency
    expect = ref.compute_cider()[: len(gts)]
    assert max(abs(a - b) for a, b in zip(ours, expect)) <= 1e-9


# ---- tokenizer ---------------------------------------------------------------------------------------------

TOKENIZER_CASES = {
    "A man riding a wave on top of a surfboard.": "a man riding a wave on top of a surfboard",
    "A man's hat is on the table.": "a man 's hat is on the table",
    "Two dogs' toys are on the floor!": "two dogs toys are on the floor",
    "The T-shirt is red -- and blue.": "the t-shirt is red and blue",
    "It's a 2-story building, isn't it?": "it 's a 2-story building is n't it",
    "He can't go; she won't go. They cannot go.": "he ca n't go she wo n't go they can not go",
    "A picture of (a) cat [in] {a} box.": "a picture of -lrb- a -rrb- cat -lsb- in -rsb- -lcb- a -rcb- box",
    '"Hello," she said.': "hello she said",
    "A clock shows 3.5 hours at 10:30 a.m. in St. Louis.": (
        "a clock shows 3.5 hours at 10:30 a.m. in st. louis"
    ),
    "A sign that says and/or $5 50% off & more...": "a sign that says and/or $ 5 50 % off & more",
    "There are 1,000 birds.": "there are 1,000 birds",
    "The man is wearing a tie w/ stripes.": "the man is wearing a tie w / stripes",
    "a dog laying on a bed with it's head on a pillow": "a dog laying on a bed with it 's head on a pillow",
    "Bananas, apples, and oranges in a bowl.": "bananas apples and oranges in a bowl",
    "A shelf full of books,magazines and DVDs.": "a shelf full of books magazines and dvds",
    "People are waiting at the bus stop in N.Y.": "people are waiting at the bus stop in n.y.",
    "A 1950's style car on display.": "a 1950 's style car on display",
    "what?!  no...": "what ?! no",
}


@pytest.mark.parametrize("raw", list(TOKENIZER_CASES))
def test_ptb_tokenizer_cases(raw):
    """Expected outputs are what pycocoevalcap's Java PTBTokenizer printed for these captions."""
    assert ptb_tokenize_sentence(raw) == TOKENIZER_CASES[raw]


COCO_LIKE = [
    "A kitchen with a stove, sink, and refrigerator.",
    "Two giraffes standing next to each other in a field.",
    "A man in a black shirt is playing a guitar.",
    "The cat is sleeping on the couch; it looks comfortable.",
    "A group of people standing around a table with food on it",
    "A plate of food that includes broccoli, rice & chicken.",
    "there is a man that is riding a skateboard down the street",
    "A bathroom with a toilet and a sink in it.",
    "A large jetliner flying through a blue sky.",
    "An image of a man's face with a beard.",
    "Someone's laptop is sitting on a desk.",
    "A child's toy is on the floor.",
    'A sign that reads "STOP" at an intersection.',
    "A bus that says 'Out of Service' on it.",
    "A red double-decker bus drives down the road.",
    "A 10-year-old boy plays baseball.",
    "A woman holding an umbrella in the rain...",
    "The clock reads 12:45 on the tower.",
    "A train at the station (platform 3).",
    "Two men playing Wii in a living room",
    "A pizza with pepperoni, olives, and cheese!",
    "What a cute dog!",
    "Is that a horse?",
    "A man wearing a hat & sunglasses",
    'A cake that says "Happy Birthday".',
    "There are 2 zebras grazing.",
    "A plane is parked at the airport, waiting for passengers.",
    "A surfer rides a wave at sunset",
    "A living room filled with furniture and a flat screen TV.",
    "A bear walking through the woods - looking for food.",
    "The man is holding a Nintendo Wii controller.",
    "An orange cat laying on top of a black car.",
    "A vase of flowers sitting on a window sill.",
    "Several people are skiing down a snowy slope",
    "a motorcycle parked on the side of a road",
    "A person on a snowboard in mid-air.",
    "A young girl eating a slice of pizza.",
    "An old fashioned train engine on the tracks.",
    "a dog laying on a bed with it's head on a pillow",
    "a boy and girl are flying kites on the beach.",
    "The man is wearing a tie w/ stripes.",
    "A close up of a sandwich on a plate",
    "People are waiting at the bus stop in N.Y.",
    "A 1950's style car on display.",
    "a cat sitting on a toilet seat lid.",
    "It is a bright sunny day at the park",
    "Bananas, apples, and oranges in a bowl.",
    "A shelf full of books,magazines and DVDs.",
    "A stop sign at the corner of 5th St. and Main.",
    "A woman's hand holding a cell-phone.",
]


@pytest.mark.skipif(not java_available(), reason="java not on PATH: cannot run pycocoevalcap's PTBTokenizer")
def test_ptb_tokenizer_matches_java_on_synthetic_and_coco_like_captions():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from mplug_fast.data.synthetic import SyntheticWorld

    world = SyntheticWorld(seed=0)
    caps = [c for s in world.scenes(0, 40) for c in s.captions]
    caps += [c[0].upper() + c[1:] + "." for c in caps[:50]] + list(TOKENIZER_CASES)
    caps += ["A woman's and a man's shoes.", "A 'no parking' sign.", "Don't walk!", "An old-fashioned clock"]
    caps += COCO_LIKE
    java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(caps)})
    bad = [
        (c, java[i][0], ptb_tokenize_sentence(c))
        for i, c in enumerate(caps)
        if java[i][0] != ptb_tokenize_sentence(c)
    ]
    assert not bad, bad[:5]


# ---- Java metrics ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not java_available(), reason="java not on PATH: METEOR needs it")
def test_meteor_runs():
    score, note = meteor(
        {0: ["a man riding a horse"], 1: ["a red car"]}, {0: ["a man riding a horse"], 1: ["a dog"]}
    )
    assert score is not None and 0.0 < score < 1.0, note


def test_spice_never_downloads_and_notes_why():
    from mplug_fast.metrics.caption import spice_jars_present

    if spice_jars_present() and java_available():
        pytest.skip("SPICE jars present: this checks the skip path only")
    score, note = spice({0: ["a b"]}, {0: ["a b"]})
    assert score is None and "skipped" in note


def test_caption_scores_end_to_end_no_java():
    out, notes = caption_scores({0: ["A dog runs.", "The dog is running."]}, {0: ["A dog runs."]})
    with pytest.raises(ValueError, match="tokenize"):
        caption_scores({0: ["a"]}, {0: ["a"]}, tokenize="nltk")
    assert set(out) == {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr"}
    assert out["ROUGE_L"] == pytest.approx(1.0) and notes

"""Synthetic world: determinism, rendering, vocabulary, answers and boxes re-derived from the scene graph.

Oracles: small independent interpreters written here (regexes over the question / expression + the scene
graph) and the rendered pixels themselves (palette colours are exact: no anti-aliasing).
"""

import re
from collections import Counter

import numpy as np
import pytest
import torch

from mplug_fast.data import Tokenizer
from mplug_fast.data.synthetic import (
    COLORS,
    NUMBER_WORDS,
    QA,
    QA_TYPES,
    SHAPES,
    CaptionDataset,
    GroundingDataset,
    PretrainDataset,
    RetrievalDataset,
    SyntheticWorld,
    VQADataset,
    box_to_bins,
    majority_baseline,
    world_majority_baseline,
)
from mplug_fast.data.transforms import CLIP_MEAN, CLIP_STD


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(image_size=64, max_objects=4, seed=0)


@pytest.fixture(scope="module")
def scenes(world):
    return [world.scene(i) for i in range(200)]


# ---- determinism and rendering -----------------------------------------------------------------------------


def test_deterministic_by_seed_and_index():
    a, b = SyntheticWorld(64, seed=3), SyntheticWorld(64, seed=3)
    for i in (0, 1, 17, 10_000):
        sa, sb = a.scene(i), b.scene(i)
        assert np.array_equal(np.asarray(sa.image()), np.asarray(sb.image()))
        assert (sa.captions, sa.qa, sa.referring, sa.objects) == (
            sb.captions,
            sb.qa,
            sb.referring,
            sb.objects,
        )
        assert np.array_equal(np.asarray(sa.image()), np.asarray(sa.image()))  # rendering is pure
    assert a.scene(0).objects != a.scene(1).objects
    assert not np.array_equal(np.asarray(a.scene(0).image()), np.asarray(a.scene(1).image()))
    assert SyntheticWorld(64, seed=4).scene(0).objects != a.scene(0).objects
    with pytest.raises(IndexError):
        a.scene(-1)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticWorld(8)
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticWorld(64, max_objects=9)


@pytest.mark.parametrize("kw", [dict(max_objects=4), dict(max_objects=1, object_scale=2.0)])
def test_scene_graph_without_texts_is_the_same_scene(kw):
    """``scene(i, texts=False)`` (the pair datasets' scenes): the same objects, background and pixels as the
    full scene, and no texts."""
    world = SyntheticWorld(32, seed=5, **kw)
    for i in range(40):
        full, graph = world.scene(i), world.scene(i, texts=False)
        assert full.captions and full.qa and full.referring
        assert (graph.captions, graph.qa, graph.referring) == ([], [], [])
        assert (graph.index, graph.background, graph.objects) == (full.index, full.background, full.objects)
        assert np.array_equal(np.asarray(graph.image()), np.asarray(full.image()))


@pytest.mark.parametrize("R", [32, 64, 224])
def test_any_resolution_boxes_inside_and_tight(R):
    world = SyntheticWorld(R, max_objects=5, seed=1)
    for i in range(40):
        scene = world.scene(i)
        img = scene.image()
        assert img.size == (R, R) and img.mode == "RGB"
        a = np.asarray(img)
        assert len(scene.objects) >= 1
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= R and 0 <= y0 < y1 <= R
            assert x1 - x0 >= R / 8 and y1 - y0 >= R / 8  # learnable at any resolution
            mask = (a == COLORS[o.color]).all(-1)  # [R, R] exact colour match
            inside = mask[y0:y1, x0:x1]
            ys, xs = np.nonzero(inside)
            assert (ys.min(), xs.min(), ys.max(), xs.max()) == (0, 0, y1 - y0 - 1, x1 - x0 - 1), o  # tight
            assert inside.mean() > 0.4, o  # a filled shape (triangle/diamond ~ 0.5)
            ring = mask[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1].sum() - inside.sum()
            assert ring == 0, o  # nothing of its colour touches the box from outside
            cx, cy, w, h = scene.box_cxcywh(o)
            assert (cx - w / 2) * R == pytest.approx(x0) and (cy + h / 2) * R == pytest.approx(y1)
        # background is never an object colour
        assert tuple(scene.background) not in set(COLORS.values())


def test_objects_unique_and_non_overlapping(scenes):
    for s in scenes:
        kinds = [(o.color, o.shape) for o in s.objects]
        assert len(set(kinds)) == len(kinds)
        for i, a in enumerate(s.objects):
            for b in s.objects[i + 1 :]:
                assert (
                    a.box[2] <= b.box[0]
                    or b.box[2] <= a.box[0]
                    or a.box[3] <= b.box[1]
                    or b.box[3] <= a.box[1]
                )


# ---- texts -------------------------------------------------------------------------------------------------


def test_every_word_is_a_single_wordpiece(world, scenes):
    tok = Tokenizer()
    vocab = set(world.vocabulary())
    for w in vocab:
        assert len(tok.tokenize(w)) == 1 and tok.tokenize(w)[0] == w, w
    texts = set(world.answer_list())
    for s in scenes:
        texts.update(s.captions)
        texts.update(q.question for q in s.qa)
        texts.update(q.answer for q in s.qa)
        texts.update(r.expression for r in s.referring)
    for text in texts:
        pieces = tok.tokenize(text)
        assert "[UNK]" not in pieces and not any(p.startswith("##") for p in pieces), (text, pieces)
        words = re.findall(r"[a-z]+", text)
        assert set(words) <= vocab, (text, set(words) - vocab)
        assert len([p for p in pieces if p.isalpha()]) == len(words)


def test_captions_describe_the_scene(scenes):
    for s in scenes:
        assert len(s.captions) >= 4
        first = s.captions[0]  # all objects, left to right
        for o in s.objects:
            assert f"{o.size} {o.color} {o.shape}" in first
        n_shapes = Counter(o.shape for o in s.objects)
        for shape, k in n_shapes.items():
            word = shape if k == 1 else shape + "s"
            assert f"{NUMBER_WORDS[k]} {word}" in s.captions[2]


def _matches(o, words):
    """Objects matching a descriptor like ['large', 'red', 'circle'] or ['red', 'object']."""
    return all(w in (o.size, o.color, o.shape, "object") for w in words)


def _left_of(a, b):
    return a.box[2] <= b.box[0]


def _above(a, b):
    return a.box[3] <= b.box[1]


RELATION_CHECK = {
    "to the left of": _left_of,
    "to the right of": lambda a, b: _left_of(b, a),
    "above": _above,
    "below": lambda a, b: _above(b, a),
}


def _resolve(scene, words):
    found = [o for o in scene.objects if _matches(o, words)]
    assert len(found) == 1, (words, scene.objects)
    return found[0]


def _answer(scene, question):
    """An independent interpreter of the question templates."""
    objs = scene.objects
    if m := re.fullmatch(r"what color is the (.+)\?", question):
        return _resolve(scene, m.group(1).split()).color
    if m := re.fullmatch(r"what shape is the (.+)\?", question):
        return _resolve(scene, m.group(1).split()).shape
    if m := re.fullmatch(r"how many objects are there\?", question):
        return NUMBER_WORDS[len(objs)]
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        return NUMBER_WORDS[sum(o.color == m.group(1) for o in objs)]
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        return NUMBER_WORDS[sum(o.shape == m.group(1) for o in objs)]
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any(o.color == m.group(1) and o.shape == m.group(2) for o in objs) else "no"
    rel = "|".join(RELATION_CHECK)
    if m := re.fullmatch(rf"is the (\w+ \w+) ({rel}) the (\w+ \w+)\?", question):
        a, b = _resolve(scene, m.group(1).split()), _resolve(scene, m.group(3).split())
        if RELATION_CHECK[m.group(2)](a, b):
            return "yes"
        assert RELATION_CHECK[m.group(2)](b, a), "spatial questions only about separated pairs"
        return "no"
    raise AssertionError(f"unknown question template: {question!r}")


def test_answers_match_the_scene_graph(world, scenes):
    answers = set(world.answer_list())
    types = Counter()
    for s in scenes:
        for q in s.qa:
            assert q.type in QA_TYPES and q.answer in answers
            assert _answer(s, q.question) == q.answer, (q, s.objects)
            types[q.type] += 1
    assert all(types[t] > 50 for t in QA_TYPES), types


def test_yes_no_balanced(world):
    yn = [q.answer for s in world.scenes(0, 300) for q in s.qa if q.type in ("exist", "spatial")][:500]
    assert len(yn) == 500
    assert 0.45 <= yn.count("yes") / 500 <= 0.55
    sampled = VQADataset(world, 500, start=1000, types=("exist", "spatial"))
    yes = sum(sampled.question(i)[1].answer == "yes" for i in range(500))
    assert 0.4 <= yes / 500 <= 0.6


def test_referring_expressions_unambiguous(scenes):
    spatial = {
        "on the left": (0, True),
        "on the right": (0, False),
        "at the top": (1, True),
        "at the bottom": (1, False),
    }
    seen_spatial = 0
    for s in scenes:
        for r in s.referring:
            o = s.objects[r.object_index]
            assert r.box_xyxy == o.box and r.box_cxcywh == s.box_cxcywh(o)
            text = r.expression
            assert text.startswith("the ")
            words = text[4:]
            pos = next((p for p in spatial if words.endswith(" " + p)), None)
            if pos is None:
                assert _resolve(s, words.split()) is o, text
                continue
            seen_spatial += 1
            cands = [p for p in s.objects if _matches(p, words[: -len(pos) - 1].split())]
            axis, first = spatial[pos]
            picked = [
                c
                for c in cands
                if all(
                    (c.box[axis + 2] <= d.box[axis]) if first else (d.box[axis + 2] <= c.box[axis])
                    for d in cands
                    if d is not c
                )
            ]
            assert picked == [o], (text, s.objects)
    assert seen_spatial > 5


# ---- datasets ----------------------------------------------------------------------------------------------


def test_datasets_return_tensors(world):
    R = world.image_size
    pre = PretrainDataset(world, 6)
    item = pre[0]
    assert item["image"].shape == (3, R, R) and item["image"].dtype == torch.float32
    assert isinstance(item["caption"], str) and item["image_id"] == 0
    assert pre[0]["caption"] == item["caption"] and len(pre) == 6 and pre[-1]["image_id"] == 5
    with pytest.raises(IndexError):
        pre[6]
    # the image is the CLIP-normalised rendering
    raw = torch.from_numpy(np.asarray(world.scene(0).image()).copy()).permute(2, 0, 1).float() / 255
    expected = (raw - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(item["image"], expected)  # resize to the same size is the identity

    cap = CaptionDataset(world, 3, start=10, captions_per_scene=4)
    assert len(cap) == 12 and cap[5]["image_id"] == 11 and cap[5]["caption"] == world.scene(11).captions[1]
    test = CaptionDataset(world, 3, start=10, split="test")
    assert len(test) == 3 and test[0]["captions"] == world.scene(10).captions

    only_count = VQADataset(world, 20, types=["count"])
    assert all(only_count[i]["type"] == "count" for i in range(5))

    ret = RetrievalDataset(world, 5, captions_per_scene=2)
    assert len(ret) == 10 and ret.img2txt[3] == [6, 7] and ret.txt2img[7] == 3
    assert ret[7]["caption"] == ret.texts[7] and ret.image(3).shape == (3, R, R)

    gr = GroundingDataset(world, 5)
    g = gr[2]
    assert g["box"].shape == (4,) and g["box_xyxy"].shape == (4,) and g["box_bins"].dtype == torch.long
    assert ((g["box"] > 0) & (g["box"] <= 1)).all()
    torch.testing.assert_close(g["box_bins"], torch.floor(g["box"].double() * 336).long())


def test_box_to_bins_matches_spec():
    tok = Tokenizer()
    bins = box_to_bins([0.0, 0.5, 1.0, 1.2])
    assert bins.tolist() == [0, 168, 336, 336]
    assert [tok.unused_token_id(340 + b) for b in bins.tolist()] == [345, 513, 681, 681]
    assert tok.unused_token_id(339) == 344


def test_majority_baseline(world):
    qa = [
        QA("q1", "yes", "exist"),
        QA("q2", "yes", "exist"),
        QA("q3", "no", "exist"),
        ("q4", "red", "color"),
        ("q5", "blue", "color"),
        ("q6", "blue", "color"),
        ("q7", "blue", "color"),
    ]
    b = majority_baseline(qa)
    assert b.answer == "blue" and b.accuracy == pytest.approx(3 / 7) and b.count == 7
    assert b.per_type == {"exist": ("yes", pytest.approx(2 / 3)), "color": ("blue", pytest.approx(3 / 4))}
    assert b.prior_accuracy == pytest.approx(5 / 7)
    with pytest.raises(ValueError):
        majority_baseline([])
    wb = world_majority_baseline(world, 100)
    assert wb.per_type["exist"][1] == pytest.approx(0.5) and wb.per_type["spatial"][1] == pytest.approx(0.5)
    assert wb.prior_accuracy >= wb.accuracy and wb.prior_accuracy < 0.6  # the image is needed
    assert set(world.answer_list()) == {*COLORS, *SHAPES, *NUMBER_WORDS[:5], "yes", "no"}


def test_object_scale_and_from_config():
    """object_scale multiplies the object sides (boxes stay tight and inside); from_config reads a run
    config's data.synthetic section (dataclass or mapping) and ignores its non-world keys."""
    from mplug_fast.train.config import SyntheticSection

    big = SyntheticWorld(image_size=32, max_objects=2, seed=3, object_scale=1.5)
    assert big.sides == {"small": 8, "large": 14}  # round(0.17 * 1.5 * 32), round(0.30 * 1.5 * 32)
    assert SyntheticWorld(image_size=32).sides == {"small": 5, "large": 10}
    for i in range(30):
        for o in big.scene(i).objects:
            side = o.box[2] - o.box[0]
            assert side == o.box[3] - o.box[1] == big.sides[o.size]
            assert 0 <= o.box[0] and o.box[2] <= 32 and 0 <= o.box[1] and o.box[3] <= 32
    section = SyntheticSection(image_size=32, max_objects=2, seed=3, object_scale=1.5, num_scenes=7)
    for cfg in (section, vars(section)):
        same = SyntheticWorld.from_config(cfg)
        assert repr(same) == repr(big) and same.scene(5) == big.scene(5)
    with pytest.raises(ValueError, match="object_scale"):
        SyntheticWorld(image_size=32, object_scale=5.0)

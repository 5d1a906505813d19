"""Synthetic VE / NLVR data, their collators and the official-format readers (NLVR2, SNLI-VE).

Oracle for the labels: a small interpreter written here (regexes over the sentence + the scene graph), as in
``tests/data/test_synthetic.py``; the readers are checked on tiny JSON / JSON-lines files and PNGs made here.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from PIL import Image

from mplug_fast.data import Tokenizer
from mplug_fast.data.annotations import load_annotations
from mplug_fast.data.official_pairs import NLVR2JsonDataset, SNLIVEJsonDataset
from mplug_fast.data.synthetic import SyntheticWorld
from mplug_fast.data.synthetic.pairs import (
    NEUTRAL_ATTRIBUTES,
    NLVR_TYPES,
    VE_TYPES,
    NLVRDataset,
    VEDataset,
    pair_vocabulary,
)
from mplug_fast.data.transforms import test_transform
from mplug_fast.tasks import get_task

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(image_size=32, max_objects=4, seed=3)


# ---- an independent interpreter ------------------------------------------------------------------------


def _singular(word: str) -> str:
    return word[:-1] if word.endswith("s") else word


def _holds(a, b, relation: str) -> bool:
    """Boxes separated on the relation's axis (x1_A <= x0_B for "left of"), as world.py defines them."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
    return {
        "to the left of": ax1 <= bx0,
        "to the right of": bx1 <= ax0,
        "above": ay1 <= by0,
        "below": by1 <= ay0,
    }[relation]


def ve_truth(scene, sentence: str) -> str:
    """contradiction / neutral / entailment of ``sentence`` about ``scene``, from the scene graph."""
    objs = scene.objects
    kinds = {(o.color, o.shape): o for o in objs}
    if m := re.fullmatch(r"there is an? (\w+) object", sentence):
        return "entailment" if any(o.color == m[1] for o in objs) else "contradiction"
    if m := re.fullmatch(r"there is an? (\w+) (\w+)", sentence):
        return "entailment" if (m[1], m[2]) in kinds else "contradiction"
    if m := re.fullmatch(r"there (?:is|are) (\w+) (\w+)", sentence):
        n, have = NUMBERS.index(m[1]), sum(o.shape == _singular(m[2]) for o in objs)
        assert n >= have, f"{sentence!r}: fewer than drawn would be ambiguous ({have} drawn)"
        return "entailment" if n == have else "contradiction"
    rel = r"(to the left of|to the right of|above|below)"
    if m := re.fullmatch(rf"the (\w+) (\w+) is {rel} the (\w+) (\w+)", sentence):
        a, b = kinds[(m[1], m[2])], kinds[(m[4], m[5])]  # both objects must be drawn
        return "entailment" if _holds(a, b, m[3]) else "contradiction"
    if m := re.fullmatch(r"the (\w+) (\w+) is (\w+)", sentence):
        assert (m[1], m[2]) in kinds, f"{sentence!r}: a neutral statement about an absent object"
        assert m[3] in NEUTRAL_ATTRIBUTES
        return "neutral"
    raise AssertionError(f"unparsed hypothesis {sentence!r}")


def nlvr_truth(left, right, sentence: str) -> bool:
    scenes = {"left": left, "right": right}
    colors = {k: {o.color for o in s.objects} for k, s in scenes.items()}
    if m := re.fullmatch(r"the (left|right) image contains an? (\w+) object", sentence):
        return m[2] in colors[m[1]]
    if m := re.fullmatch(r"both images contain an? (\w+) object", sentence):
        return m[1] in colors["left"] and m[1] in colors["right"]
    if m := re.fullmatch(r"the (left|right) image has more objects than the (left|right) image", sentence):
        assert m[1] != m[2]
        return len(scenes[m[1]].objects) > len(scenes[m[2]].objects)
    raise AssertionError(f"unparsed statement {sentence!r}")


# ---- synthetic datasets ----------------------------------------------------------------------------------


def test_ve_labels_follow_the_scene_graph(world):
    ds = VEDataset(world, 240, start=100)
    types = Counter()
    for i in range(len(ds)):
        scene, st = ds.statement(i)
        assert ve_truth(scene, st.sentence) == ("contradiction", "neutral", "entailment")[st.label], st
        assert st.label == ds.label(i)
        types[st.type] += 1
    assert set(types) == {*VE_TYPES, "neutral"} and types["neutral"] == 80, types


def test_nlvr_labels_follow_the_scene_graph(world):
    ds = NLVRDataset(world, 240, start=100)
    types = Counter()
    for i in range(len(ds)):
        left, right, st = ds.statement(i)
        assert nlvr_truth(left, right, st.sentence) == bool(st.label), st
        assert st.label == ds.label(i) and left.index == 100 + i
        assert 100 <= right.index < 340 and right.index != left.index  # never outside the split's scenes
        types[(st.type, st.label)] += 1
    assert {t for t, _ in types} == set(NLVR_TYPES), types
    assert all(types[(t, lab)] > 10 for t in NLVR_TYPES for lab in (0, 1)), types  # no type gives the label


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda w: VEDataset(w, 301), {0: 101, 1: 100, 2: 100}),
        (
            lambda w: VEDataset(w, 300, types=("color",), labels=("contradiction", "entailment")),
            {0: 150, 2: 150},
        ),
        (lambda w: NLVRDataset(w, 301), {0: 151, 1: 150}),
        (lambda w: NLVRDataset(w, 300, types=("both_color",)), {0: 150, 1: 150}),
    ],
)
def test_labels_are_balanced(world, make, expected):
    ds = make(world)
    assert Counter(ds.label(i) for i in range(len(ds))) == expected
    for i in range(0, len(ds), 37):  # label(i) (cheap) agrees with the item
        assert ds[i]["label"] == ds.label(i)


def test_both_color_pairs_do_not_give_the_label_away():
    """True and False both_color items alike pair images that share a colour (with one object per scene:
    the same colour), so "the two images look alike" says nothing about the label; only the named colour
    does."""
    one = SyntheticWorld(image_size=32, max_objects=1, object_scale=2.0)
    ds = NLVRDataset(one, 400, types=("both_color",))
    same = Counter()
    for i in range(len(ds)):
        left, right, st = ds.statement(i)
        assert st.type == "both_color"
        same[st.label] += left.objects[0].color == right.objects[0].color
    assert same == {0: 200, 1: 200}


def test_every_word_is_a_single_wordpiece(world):
    tok = Tokenizer()
    vocab = set(pair_vocabulary(world))
    for w in vocab:
        assert tok.tokenize(w) == [w], w
    texts = set()
    for ds in (VEDataset(world, 150), NLVRDataset(world, 150)):
        texts.update(ds.statement(i)[-1].sentence for i in range(len(ds)))
    for text in texts:
        pieces = tok.tokenize(text)
        assert "[UNK]" not in pieces and not any(p.startswith("##") for p in pieces), (text, pieces)
        assert set(text.split()) <= vocab, (text, set(text.split()) - vocab)


def test_items_are_deterministic_tensors(world):
    ve, nlvr = VEDataset(world, 20, start=7), NLVRDataset(world, 20, start=7)
    a, b = ve[3], VEDataset(world, 20, start=7)[3]
    assert a["image"].shape == (3, 32, 32) and torch.equal(a["image"], b["image"])
    assert (
        a["sentence"] == b["sentence"]
        and a["label_name"] == ("contradiction", "neutral", "entailment")[a["label"]]
    )
    item = nlvr[5]
    left, right, st = nlvr.statement(5)
    transform = test_transform(32)
    assert item["images"].shape == (2, 3, 32, 32) and item["sentence"] == st.sentence
    assert torch.equal(item["images"][0], transform(left.image()))
    assert torch.equal(item["images"][1], transform(right.image()))
    assert (item["image_id"], item["right_image_id"]) == (left.index, right.index)


def test_options_are_checked(world):
    with pytest.raises(ValueError, match="types must be a non-empty subset"):
        VEDataset(world, 5, types=("colour",))
    with pytest.raises(ValueError, match="labels must be a non-empty subset"):
        VEDataset(world, 5, labels=())
    with pytest.raises(ValueError, match="types must be a non-empty subset"):
        NLVRDataset(world, 5, types=("color",))
    with pytest.raises(IndexError):
        VEDataset(world, 5)[5]
    one = SyntheticWorld(image_size=32, max_objects=1)  # spatial / count fall back to always-possible types
    ds = VEDataset(one, 30, types=("spatial",), labels=("contradiction", "entailment"))
    assert {ds.statement(i)[1].type for i in range(30)} == {"object"}
    nl = NLVRDataset(one, 30, types=("count",))
    assert {nl.statement(i)[2].type for i in range(30)} == {"side_color"}


# ---- collators ---------------------------------------------------------------------------------------------


def test_collators(world):
    tok = Tokenizer()
    ve = VEDataset(world, 6)
    batch = get_task("ve").collate(tok)([ve[i] for i in range(4)])
    assert batch["images"].shape == (4, 3, 32, 32) and batch["labels"].tolist() == [0, 1, 2, 0]
    assert batch["text_ids"].shape == batch["text_mask"].shape and batch["text_mask"].dtype == torch.bool
    assert tok.decode(batch["text_ids"][1], skip_special_tokens=True) == ve[1]["sentence"]
    assert batch["type"] == [ve[i]["type"] for i in range(4)] and "sentence" not in batch
    nl = NLVRDataset(world, 6)
    batch = get_task("nlvr2").collate(tok, max_length=6)([nl[i] for i in range(3)])
    assert batch["images"].shape == (3, 2, 3, 32, 32) and batch["labels"].tolist() == [0, 1, 0]
    assert batch["text_ids"].shape[1] <= 6 and batch["right_image_id"] == [
        nl[i]["right_image_id"] for i in range(3)
    ]

    samples = [nl[i] for i in range(2)]
    unlabelled = [{k: v for k, v in s.items() if k != "label"} for s in samples]
    assert "labels" not in get_task("nlvr2").collate(tok)(unlabelled)
    with pytest.raises(ValueError, match="some samples have a 'label'"):
        get_task("nlvr2").collate(tok)([samples[0], unlabelled[1]])
    with pytest.raises(TypeError, match=r"must be a \[2, 3, R, R\] tensor"):
        get_task("nlvr2").collate(tok)([{**samples[0], "images": samples[0]["images"][0]}])
    with pytest.raises(KeyError, match="lacks"):
        get_task("ve").collate(tok)([{"image": ve[0]["image"]}])


# ---- official-format readers -------------------------------------------------------------------------------


def _png(path, color) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 12), color).save(path)
    return path.name


def test_nlvr2_reader(tmp_path):
    root = tmp_path / "images"
    for name, color in (("a", (255, 0, 0)), ("b", (0, 255, 0)), ("c", (0, 0, 255))):
        _png(root / "dev" / f"{name}.png", color)
    entries = [
        {
            "images": ["dev/a.png", "dev/b.png"],
            "sentence": "The LEFT image has a dog.",
            "label": "True",
            "identifier": "dev-1-0-0",
        },
        {"images": ["dev/c.png", "dev/a.png"], "sentence": "Both images, no dogs!", "label": "False"},
        {"images": ["dev/b.png", "dev/c.png"], "sentence": "One image.", "label": True},
    ]
    (tmp_path / "nlvr_dev.json").write_text(json.dumps(entries))
    (tmp_path / "nlvr_dev.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    for ann in ("nlvr_dev.json", "nlvr_dev.jsonl"):
        ds = NLVR2JsonDataset(tmp_path / ann, root, split="val", image_size=16)
        assert len(ds) == 3 and [ds.label(i) for i in range(3)] == [1, 0, 1] and ds.num_distinct_images == 3
        s = ds[0]
        assert (
            s["images"].shape == (2, 3, 16, 16)
            and s["label_name"] == "True"
            and s["identifier"] == "dev-1-0-0"
        )
        assert s["sentence"] == "the left image has a dog"  # official pre_caption
        ref = test_transform(16)
        assert torch.equal(s["images"][0], ref(Image.open(root / "dev" / "a.png").convert("RGB")))
        assert torch.equal(s["images"][1], ref(Image.open(root / "dev" / "b.png").convert("RGB")))
        batch = get_task("nlvr2").collate()([ds[i] for i in range(3)])
        assert batch["images"].shape == (3, 2, 3, 16, 16) and batch["labels"].tolist() == [1, 0, 1]


def test_snli_ve_reader(tmp_path):
    root = tmp_path / "flickr"
    _png(root / "100.jpg", (200, 10, 10))
    _png(root / "200.jpg", (10, 200, 10))
    entries = [
        {"image": "100", "sentence": "A man is sleeping.", "label": "contradiction"},
        {"image": "200", "sentence": "Someone outside", "label": "Entailment"},
        {"image": "100.jpg", "sentence": "A person", "label": "neutral"},
    ]
    ds = SNLIVEJsonDataset(entries, root, split="test", image_size=16)
    assert [ds.label(i) for i in range(3)] == [0, 2, 1]
    samples = [ds[i] for i in range(3)]
    assert [s["image_id"] for s in samples] == [0, 1, 0]  # "100" and "100.jpg" are the same file
    assert samples[0]["sentence"] == "a man is sleeping" and samples[1]["label_name"] == "entailment"
    batch = get_task("ve").collate()(samples)
    assert batch["images"].shape == (3, 3, 16, 16) and batch["labels"].tolist() == [0, 2, 1]

    unlabelled = SNLIVEJsonDataset([{"image": "200", "sentence": "x"}], root, split="test", image_size=16)
    assert unlabelled.label(0) is None and "label" not in unlabelled[0]
    with pytest.raises(ValueError, match="has no 'label'"):
        SNLIVEJsonDataset([{"image": "200", "sentence": "x"}], root, split="train", image_size=16)
    with pytest.raises(ValueError, match="is not one of"):
        SNLIVEJsonDataset([{"image": "200", "sentence": "x", "label": "maybe"}], root, split="test")
    with pytest.raises(KeyError, match="lacks"):
        SNLIVEJsonDataset([{"image": "200"}], root, split="test")


def test_missing_images_are_replaced_then_refused(tmp_path):
    root = tmp_path / "img"
    for name in ("a", "b", "c"):
        _png(root / f"{name}.png", (9, 9, 9))
    entries = [
        {"images": ["a.png", "missing.png"], "sentence": "first", "label": "True"},
        {"images": ["b.png", "c.png"], "sentence": "second", "label": "False"},
    ]
    ds = NLVR2JsonDataset(entries, root, split="val", image_size=16, max_bad_fraction=0.5)
    with pytest.warns(RuntimeWarning, match="missing.png"):
        s = ds[0]
    assert s["sentence"] == "second" and ds.num_replaced == 1  # both images of an item must load
    assert ds.check_images() == [str(root / "missing.png")]
    strict = NLVR2JsonDataset(entries, root, split="val", image_size=16, max_bad_fraction=0.0)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="max_bad_fraction"):
        strict[0]
    with pytest.raises(ValueError, match=r"must be a list \[left, right\]"):
        NLVR2JsonDataset([{"images": ["a.png"], "sentence": "x", "label": "True"}], root)


def test_annotation_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="neither a JSON list nor JSON lines"):
        load_annotations(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        load_annotations(tmp_path / "absent.json")
    (tmp_path / "one.jsonl").write_text('{"image": "1", "sentence": "s", "label": "neutral"}\n')
    (tmp_path / "two.json").write_text('[{"image": "2", "sentence": "t", "label": "neutral"}]')
    assert [e["image"] for e in load_annotations([tmp_path / "one.jsonl", tmp_path / "two.json"])] == [
        "1",
        "2",
    ]

"""Official-format readers: every JSON / split format on tiny files, text cleaning, bad-image handling."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image

from mplug_fast.data.official import (
    KarpathyCaptionDataset,
    PretrainJsonDataset,
    VQAJsonDataset,
    pre_caption,
    pre_question,
    vqa_answer_weights,
)
from mplug_fast.data.official_grounding import RefCocoDataset
from mplug_fast.data.official_retrieval import RetrievalJsonDataset
from mplug_fast.data.transforms import test_transform

R = 32


def make_image(path, size=(40, 20), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def root(tmp_path):
    for k in range(4):
        make_image(tmp_path / "img" / f"{k}.png", color=(60 * k, 10, 10))
    (tmp_path / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    return tmp_path


# ---- text --------------------------------------------------------------------------------------------------


def test_pre_caption_and_pre_question():
    assert (
        pre_caption("A Man's T-shirt, (red)/blue!!  <person>  here.\n")
        == "a mans t shirt red blue person here"
    )
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert (
        pre_question("What's  the man-made thing?") == "whats  the man made thing"
    )  # no whitespace collapse
    assert pre_question("a  b c", max_words=2) == "a "  # the empty word counts (official split(' '))


def test_vqa_answer_weights():
    answers, weights = vqa_answer_weights(["yes"] * 7 + ["no"] * 2 + ["maybe"])
    assert answers == ["yes", "no", "maybe"] and weights == pytest.approx([0.7, 0.2, 0.1])
    with pytest.raises(ValueError):
        vqa_answer_weights("yes")


# ---- each format -------------------------------------------------------------------------------------------


def test_pretrain_list(root):
    ann = write_json(
        root / "pre.json",
        [{"image": "img/0.png", "caption": "A Dog!"}, {"image": "img/1.png", "caption": ["x y", "z w"]}],
    )
    ds = PretrainJsonDataset(ann, root, image_size=R, seed=3)
    s = ds[0]
    assert s["image"].shape == (3, R, R) and s["caption"] == "a dog" and s["image_id"] == 0
    first = ds[1]["caption"]
    assert first in ("x y", "z w") and ds[1]["caption"] == first
    picks = set()
    for e in range(8):
        ds.set_epoch(e)
        picks.add(ds[1]["caption"])
    assert picks == {"x y", "z w"}


def test_karpathy_caption_formats(root):
    (root / "coco" / "val2014_img").mkdir(parents=True)
    make_image(root / "coco" / "val2014_img" / "a.jpg")
    make_image(root / "coco" / "val2014_img" / "b.jpg")
    mplug = [
        {
            "filename": "a.jpg",
            "filepath": "val2014",
            "cocoid": 11,
            "sentences": [{"raw": "A Cat."}, {"raw": "Cat sits"}],
        },
        {"filename": "b.jpg", "filepath": "val2014", "cocoid": 12, "sentences": [{"raw": "A dog"}]},
    ]
    ann = write_json(root / "cap.json", mplug)
    train = KarpathyCaptionDataset(ann, root / "coco", split="train", image_size=R, prompt="a picture of ")
    assert len(train) == 3
    assert train[1]["caption"] == "a picture of cat sits" and train[2]["image_id"] == 12
    test = KarpathyCaptionDataset(ann, root / "coco", split="test", image_size=R)
    assert len(test) == 2 and test[0]["captions"] == ["a cat.", "cat sits"] and test[0]["image_id"] == 11
    assert torch.equal(
        test[0]["image"], test_transform(R)(Image.open(root / "coco" / "val2014_img" / "a.jpg"))
    )
    albef = write_json(root / "cap2.json", [{"image": "img/0.png", "caption": ["One", "Two"], "image_id": 5}])
    assert KarpathyCaptionDataset(albef, root, split="test", image_size=R)[0]["captions"] == ["one", "two"]
    full = write_json(
        root / "dataset_coco.json",
        {"images": [dict(mplug[0], split="test"), dict(mplug[1], split="restval")]},
    )
    only = KarpathyCaptionDataset(
        full, root / "coco", split="train", image_size=R, karpathy_splits=["train", "restval"]
    )
    assert len(only) == 1 and only[0]["image_id"] == 12


def test_vqa_formats(root):
    make_image(root / "vg" / "v.png")
    train_ann = [
        {
            "dataset": "vqa",
            "image": "img/0.png",
            "question": "What COLOR is it?",
            "answer": ["red"] * 6 + ["pink"] * 4,
            "ocr": [[0, "Stop"], [1, "Sign!"]],
            "object_label": "car&&tree",
        },
        {"dataset": "vg", "image": "v.png", "question": "Where?", "answer": "on the table"},
    ]
    ann = write_json(root / "vqa_train.json", train_ann)
    ds = VQAJsonDataset(
        ann, root, split="train", roots={"vg": root / "vg"}, image_size=R, add_ocr=True, add_object=True
    )
    s0, s1 = ds[0], ds[1]
    assert s0["question"] == "what color is it [SEP] stop sign [SEP] car tree"
    assert s0["answers"] == ["red", "pink"] and s0["weights"] == pytest.approx([0.6, 0.4])
    assert s1["answers"] == ["on the table"] and s1["weights"] == [0.5] and s1["question"] == "where"
    with pytest.raises(KeyError, match="roots"):
        VQAJsonDataset(ann, root, split="train", image_size=R)
    test_ann = write_json(
        root / "vqa_test.json", [{"image": "img/1.png", "question": "Is it?", "question_id": 77}]
    )
    t = VQAJsonDataset(test_ann, root, split="test", image_size=R)[0]
    assert t["question_id"] == 77 and "answers" not in t
    val_ann = write_json(
        root / "vqa_val.json",
        [{"image": "img/1.png", "question": "Is it?", "question_id": 78, "answer": ["yes"] * 10}],
    )
    v = VQAJsonDataset(val_ann, root, split="val", image_size=R)[0]
    assert v["gt_answers"] == ["yes"] * 10 and v["answers"] == ["yes"]
    with pytest.raises(KeyError, match="lacks"):
        VQAJsonDataset(test_ann, root, split="train", image_size=R)


def test_retrieval_formats(root):
    train = write_json(
        root / "re_train.json",
        [
            {"image": "img/0.png", "caption": "A red box.", "image_id": "coco_9"},
            {"image": "img/1.png", "caption": "Blue thing", "image_id": "coco_3"},
            {"image": "img/0.png", "caption": "Red square", "image_id": "coco_9"},
        ],
    )
    ds = RetrievalJsonDataset(train, root, split="train", image_size=R)
    assert [ds[i]["image_id"] for i in range(3)] == [0, 1, 0] and ds[0]["caption"] == "a red box"
    test = write_json(
        root / "re_test.json",
        [
            {"image": "img/2.png", "caption": ["c one", "c two"]},
            {"image": "img/3.png", "caption": ["c three"]},
        ],
    )
    ev = RetrievalJsonDataset(test, root, split="test", image_size=R)
    assert (
        ev.texts == ["c one", "c two", "c three"] and ev.txt2img == [0, 0, 1] and ev.img2txt == [[0, 1], [2]]
    )
    assert ev.num_images == 2 and ev.image(1).shape == (3, R, R) and len(ev) == 3


@pytest.mark.parametrize("dataset", ["unc", "referit"])
def test_refcoco_split_file(root, dataset):
    box = [4.0, 2.0, 10.0, 6.0] if dataset == "unc" else [4.0, 2.0, 14.0, 8.0]  # xywh vs xyxy, same box
    split = root / f"{dataset}_val.pth"
    torch.save([("img/0.png", "mask", box, "The LEFT dog", ["dog"])], split)
    ds = RefCocoDataset(split, root, dataset=dataset, image_size=R)
    s = ds[0]
    # eval: long side 40 -> 32 (x0.8), image 32 x 16, centred vertically at top = round(8 - 0.1) = 8
    expect = torch.tensor([4 * 0.8, 2 * 0.8 + 8, 14 * 0.8, 8 * 0.8 + 8])
    assert torch.allclose(s["box_xyxy"], expect, atol=1e-4)
    assert torch.allclose(
        s["box"], torch.tensor([(3.2 + 11.2) / 2, (9.6 + 14.4) / 2, 8.0, 4.8]) / R, atol=1e-5
    )
    assert s["expression"] == "the left dog" and s["image"].shape == (3, R, R) and s["box_bins"].shape == (4,)
    assert s["image_mask"].sum() == 32 * 16


def test_refcoco_bad_record(root):
    with pytest.raises(ValueError, match="fields"):
        RefCocoDataset([("img/0.png", [1, 2, 3, 4])], root)


# ---- bad images --------------------------------------------------------------------------------------------


def _pretrain_with_bad(root, frac):
    ann = [
        {"image": f"img/{n}", "caption": f"cap {k}"}
        for k, n in enumerate(["0.png", "missing.png", "corrupt.jpg", "1.png", "2.png", "3.png"])
    ]
    return PretrainJsonDataset(ann, root, image_size=R, max_bad_fraction=frac)


def test_bad_images_are_skipped_and_replaced(root):
    ds = _pretrain_with_bad(root, frac=0.5)
    with pytest.warns(RuntimeWarning) as record:
        s = ds[1]
    assert [("missing.png" in str(w.message), "corrupt.jpg" in str(w.message)) for w in record] == [
        (True, False),
        (False, True),
    ]
    assert s["caption"] == "cap 3"  # missing -> corrupt (also bad) -> index 3, deterministically
    assert set(ds.bad_images) == {str(root / "img" / "missing.png"), str(root / "img" / "corrupt.jpg")}
    assert ds[2]["caption"] == "cap 3" and ds.num_replaced == 2  # known-bad files are not retried
    assert ds[0]["caption"] == "cap 0"


def test_too_many_bad_images_is_an_error_naming_them(root):
    ds = _pretrain_with_bad(root, frac=0.2)  # 6 images: at most 1.2 bad
    with pytest.warns(RuntimeWarning):
        with pytest.raises(RuntimeError, match=r"(?s)2 of 6 images.*missing\.png.*corrupt\.jpg"):
            ds[1]


def test_check_images_scans_up_front(root):
    ds = _pretrain_with_bad(root, frac=0.5)
    with pytest.warns(RuntimeWarning):
        assert ds.check_images() == [str(root / "img" / "missing.png")]
    with pytest.warns(RuntimeWarning):
        assert len(ds.check_images(decode=True)) == 2


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file"):
        PretrainJsonDataset(tmp_path / "nope.json", tmp_path, image_size=R)


def test_train_transform_is_default_for_training(root):
    ann = write_json(root / "pre.json", [{"image": "img/0.png", "caption": "x"}])
    random.seed(0)
    a = PretrainJsonDataset(ann, root, image_size=R)[0]["image"]
    b = PretrainJsonDataset(ann, root, image_size=R, transform=test_transform(R))[0]["image"]
    assert a.shape == b.shape == (3, R, R)

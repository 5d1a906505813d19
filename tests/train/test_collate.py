"""The shared batch protocol produced by ``mplug_fast.data.collate``."""

from __future__ import annotations

import pytest
import torch

from mplug_fast.data.collate import move_to
from mplug_fast.data.synthetic import (
    CaptionDataset,
    GroundingDataset,
    PretrainDataset,
    RetrievalDataset,
    SyntheticWorld,
)
from mplug_fast.tasks import get_task
from tests.train.helpers import tokenizer

WORLD = SyntheticWorld(image_size=16, max_objects=2)


def _image():
    return torch.zeros(3, 16, 16)


def test_vqa_flattens_answers():
    tok = tokenizer()
    samples = [
        {
            "image": _image(),
            "question": "what color is it?",
            "answers": ["red", "dark red"],
            "weights": [0.7, 0.3],
        },
        {"image": _image(), "question": "is there a circle?", "answers": ["yes"], "question_id": 5},
    ]
    samples[0]["question_id"] = 4
    b = get_task("vqa").collate(tok)(samples)
    assert b["images"].shape == (2, 3, 16, 16)
    assert b["question_mask"].dtype == torch.bool and b["answer_mask"].dtype == torch.bool
    assert b["answer_index"].tolist() == [0, 0, 1] and b["answer_weights"].tolist() == pytest.approx(
        [0.7, 0.3, 1.0]
    )
    cls, sep = tok.cls_token_id, tok.sep_token_id
    red = tok.convert_tokens_to_ids("red")
    assert b["answer_ids"][0, :4].tolist() == [cls, red, sep, sep] and not b["answer_mask"][0, 4:].any()
    assert b["question_ids"].tolist()[1][: b["question_mask"][1].sum()] == tok.encode("is there a circle?")
    assert b["question_id"] == [4, 5] and b["answers"] == [["red", "dark red"], ["yes"]]
    long_q = {"image": _image(), "question": " ".join(["word"] * 40), "answers": ["yes"]}
    assert get_task("vqa").collate(tok)([long_q])["question_ids"].shape[1] == 25  # official truncation


def test_other_tasks():
    tok = tokenizer()
    p = get_task("pretrain").collate(tok)([PretrainDataset(WORLD, 3)[i] for i in range(3)])
    assert set(p) >= {"images", "text_ids", "text_mask"} and p["text_mask"].dtype == torch.bool
    assert (p["text_ids"][:, 0] == tok.cls_token_id).all()
    c = get_task("caption").collate(tok, prompt="a picture of ")(
        [CaptionDataset(WORLD, 2)[i] for i in range(2)]
    )
    n = int(c["caption_mask"][0].sum())
    ids = c["caption_ids"][0, :n].tolist()
    assert ids[-2:] == [tok.sep_token_id] * 2 and ids[1:4] == tok.encode(
        "a picture of", add_special_tokens=False
    )
    test = get_task("caption").collate(tok)([CaptionDataset(WORLD, 2, split="test")[i] for i in range(2)])
    assert "caption_ids" not in test and len(test["captions"][0]) >= 4
    r = get_task("retrieval").collate(tok)([RetrievalDataset(WORLD, 2)[i] for i in range(4)])
    assert r["image_ids"].tolist() == [0, 0, 1, 1] and r["image_ids"].dtype == torch.long
    g = get_task("grounding").collate(tok)([GroundingDataset(WORLD, 2)[i] for i in range(2)])
    assert g["text_ids"].shape == (2, 20) and g["boxes"].shape == (2, 4) and g["boxes"].dtype == torch.float32
    assert move_to(g, "cpu")["boxes"] is not None


def test_errors():
    tok = tokenizer()
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope").collate(tok)
    with pytest.raises(ValueError, match="empty batch"):
        get_task("pretrain").collate(tok)([])
    with pytest.raises(KeyError, match=r"lacks \['caption'\]"):
        get_task("pretrain").collate(tok)([{"image": _image()}])
    with pytest.raises(TypeError, match=r"must be a \[3, R, R\] tensor"):
        get_task("pretrain").collate(tok)([{"image": "file.jpg", "caption": "x"}])
    with pytest.raises(ValueError, match="2 answers but 1 weights"):
        get_task("vqa").collate(tok)(
            [{"image": _image(), "question": "q", "answers": ["a", "b"], "weights": [1.0]}]
        )

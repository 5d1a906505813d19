"""Official zero-shot video formats (MSRVTT-QA jsonl, MSRVTT retrieval jsonl, VATEX json): the readers find
frame folders, drop missing videos under the bad-fraction policy, build the retrieval gallery, and their
items run through the video tasks' evaluate functions."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mplug_fast.data.annotations import load_annotations
from mplug_fast.data.official_video import (
    VATEXCaptionDataset,
    VideoQAJsonlDataset,
    VideoRetrievalJsonlDataset,
)
from mplug_fast.data.video import load_video
from mplug_fast.tasks import get_task

R = 16


def _frames(root, name: str, n: int, color: tuple[int, int, int]) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    for t in range(n):
        Image.new("RGB", (24, 20), tuple(min(255, c + 10 * t) for c in color)).save(folder / f"frame_{t}.png")


@pytest.fixture
def videos(tmp_path):
    root = tmp_path / "videos"
    _frames(root, "video7", 10, (200, 0, 0))
    _frames(root, "video9", 5, (0, 0, 200))
    return root


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_annotation_files(tmp_path):
    rows = [{"a": 1}, {"a": 2}]
    assert load_annotations(_jsonl(tmp_path / "x.jsonl", rows)) == rows
    (tmp_path / "y.json").write_text(json.dumps(rows))
    assert load_annotations(tmp_path / "y.json") == rows
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        load_annotations(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_annotations(tmp_path / "missing.jsonl")


def test_video_qa_reader_and_missing_policy(tmp_path, videos, tokenizer):
    rows = [
        {"video_id": "video7", "question": "What color is it?", "answer": "red"},
        {"video_id": "video9", "question": "what color is it", "answer": "blue"},
        {"video_id": "video404", "question": "what is it?", "answer": "cat"},
    ]
    ann = _jsonl(tmp_path / "msrvtt_qa_test.jsonl", rows)
    with pytest.raises(FileNotFoundError, match="1 of 3 questions have no video"):
        VideoQAJsonlDataset(ann, videos, num_frames=4, image_size=R)
    ds = VideoQAJsonlDataset(ann, videos, num_frames=4, image_size=R, max_bad_fraction=0.5)
    assert len(ds) == 2
    item = ds[0]
    assert (
        item["video"].shape == (4, 3, R, R) and item["question"] == "what color is it"
    )  # pre_question drops the "?"
    assert item["answers"] == ["red"] and item["video_id"] == "video7"
    torch.testing.assert_close(item["video"], load_video(videos / "video7", 4, R))
    from tests.inference.test_video import _micro

    result = get_task("video_qa").evaluate(
        _micro("vqa"), ds, tokenizer, batch_size=2, answer_list=["red", "blue"]
    )
    assert result["count"] == 2 and set(result["predictions"].values()) <= {"red", "blue"}
    via_task = get_task("video_qa").official_dataset(
        "test",
        ann=str(ann),
        video_root=str(videos),
        num_frames=2,
        image_size=R,
        max_bad_fraction=0.5,
    )
    assert isinstance(via_task, VideoQAJsonlDataset) and len(via_task) == 2
    with pytest.raises(ValueError, match="do not fit"):
        get_task("video_qa").official_dataset("test", ann=str(ann), video_root=str(videos), no_such_option=1)


def test_msrvtt_retrieval_gallery(tmp_path, videos, tokenizer):
    rows = [
        {"clip_name": "video7", "caption": "A red video."},
        {"clip_name": "video9", "caption": "a blue video"},
        {"clip_name": "video7", "caption": "red again"},
    ]
    ds = VideoRetrievalJsonlDataset(
        _jsonl(tmp_path / "msrvtt_test.jsonl", rows), videos, num_frames=3, image_size=R
    )
    assert ds.texts == ["a red video", "a blue video", "red again"]
    assert ds.txt2vid == [0, 1, 0] and ds.vid2txt == [[0, 2], [1]] and ds.num_videos == 2
    assert ds[2]["video_id"] == 0 and ds.video(1).shape == (3, 3, R, R)
    from tests.inference.test_video import _micro

    result = get_task("video_retrieval").evaluate(_micro("retrieval"), ds, tokenizer, k=2)
    assert result["num_videos"] == 2 and result["num_texts"] == 3 and 0 <= result["r_mean"] <= 100


def test_vatex_caption_reader(tmp_path, videos):
    rows = [{"videoID": "video9", "enCap": ["A blue clip.", "something blue"]}]
    (tmp_path / "vatex_test.json").write_text(json.dumps(rows))
    ds = VATEXCaptionDataset(tmp_path / "vatex_test.json", videos, num_frames=2, image_size=R)
    item = ds[0]
    assert item["captions"] == ["a blue clip", "something blue"] and item["video"].shape == (2, 3, R, R)
    with pytest.raises(ValueError, match="enCap"):
        VATEXCaptionDataset([{"videoID": "video9", "enCap": []}], videos)

"""Bad input at the readers' boundary: wrong field types, errors in joined files, empty annotation files and
images over PIL's decompression-bomb limit each give a one-line error naming the file (and the record and
field), or follow the dataset's skip-bad-image policy."""

from __future__ import annotations

import json
import pickle
import warnings

import pytest
from PIL import Image

from mplug_fast.data.annotations import AnnotationError, load_annotations
from mplug_fast.data.official import KarpathyCaptionDataset, PretrainJsonDataset, VQAJsonDataset
from mplug_fast.data.official_pairs import NLVR2JsonDataset
from mplug_fast.data.official_retrieval import RetrievalJsonDataset
from mplug_fast.data.official_video import VATEXCaptionDataset, VideoQAJsonlDataset
from mplug_fast.data.transforms import load_image


def _json(path, data):
    path.write_text(json.dumps(data))
    return path


def _one_line(message: str) -> bool:
    return "\n" not in message


@pytest.mark.parametrize(
    "reader, good, bad_field, bad_value, expected",
    [
        (
            VQAJsonDataset,
            {"image": "a.png", "question": "q?", "answer": ["yes"]},
            "question",
            7,
            "a string, got int",
        ),
        (
            VQAJsonDataset,
            {"image": "a.png", "question": "q?", "answer": ["yes"]},
            "answer",
            3,
            "list of strings, got int",
        ),
        (PretrainJsonDataset, {"image": "a.png", "caption": "c"}, "caption", 5, "list of strings, got int"),
        (
            KarpathyCaptionDataset,
            {"image": "a.png", "caption": "c"},
            "image",
            ["a.png"],
            "a string, got list",
        ),
        (
            RetrievalJsonDataset,
            {"image": "a.png", "caption": "c"},
            "caption",
            ["c", "d"],
            "a string, got list",
        ),
        (NLVR2JsonDataset, {"images": ["a", "b"], "sentence": "s", "label": 1}, "images", "ab", "got str"),
    ],
)
def test_a_field_of_the_wrong_type_names_file_record_and_field(
    tmp_path, reader, good, bad_field, bad_value, expected
):
    ann = _json(tmp_path / "train_ann.json", [good, good, {**good, bad_field: bad_value}])
    with pytest.raises(AnnotationError) as info:
        reader(ann, tmp_path)  # every reader's default split is "train"
    message = str(info.value)
    assert (
        message.startswith(f'train_ann.json record 2: field "{bad_field}" must be ') and expected in message
    )
    assert _one_line(message) and isinstance(
        info.value, ValueError
    )  # the CLI reports a ValueError in one line


def test_a_string_where_a_caption_list_belongs_fails_at_read_time(tmp_path):
    ann = _json(tmp_path / "vatex_test.json", [{"videoID": "v1", "enCap": "a dog runs"}])
    with pytest.raises(
        AnnotationError, match=r'^vatex_test\.json record 0: field "enCap" must be a non-empty list'
    ):
        VATEXCaptionDataset(ann, tmp_path)
    rows = tmp_path / "qa.jsonl"
    rows.write_text(
        '{"video_id": "v1", "question": "what?", "answer": "dog"}\n{"video_id": "v1", "question": 4}\n'
    )
    with pytest.raises(
        AnnotationError, match=r'^qa\.jsonl record 1: field "question" must be a string, got int$'
    ):
        VideoQAJsonlDataset(rows, tmp_path)


def test_errors_in_joined_files_name_the_file_and_its_own_record(tmp_path):
    first = _json(tmp_path / "vqa_train.json", [{"image": "a.png", "question": "q?", "answer": ["yes"]}] * 3)
    second = _json(
        tmp_path / "vg_qa.json", [{"image": "b.png", "question": "q?", "answer": "no"}, {"image": "c.png"}]
    )
    records = load_annotations([first, second])
    assert [r.origin for r in records] == [f"vqa_train.json record {i}" for i in range(3)] + [
        "vg_qa.json record 0",
        "vg_qa.json record 1",
    ]
    assert [r.origin for r in pickle.loads(pickle.dumps(records))] == [r.origin for r in records]  # workers
    with pytest.raises(KeyError, match=r'^vg_qa\.json record 1 lacks field "question"'):  # not "record 4"
        VQAJsonDataset([first, second], tmp_path)


@pytest.mark.parametrize("name, text", [("empty.json", "[]"), ("empty.jsonl", ""), ("blank.jsonl", "\n  \n")])
def test_an_empty_annotation_file_is_an_error_naming_it(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(AnnotationError, match=f"annotation file .*{name}.* is empty"):
        load_annotations(tmp_path / name)
    with pytest.raises(AnnotationError, match=name):
        PretrainJsonDataset(tmp_path / name, tmp_path)
    with pytest.raises(AnnotationError, match="empty list"):
        PretrainJsonDataset([], tmp_path)


@pytest.fixture
def small_bomb_limit(monkeypatch):
    """PIL's decompression-bomb limit lowered to 1000 pixels: a 100 x 100 image is over twice the limit
    (DecompressionBombError), a 40 x 40 one over the limit only (DecompressionBombWarning)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)


@pytest.mark.parametrize("side", [100, 40])
def test_load_image_over_the_bomb_limit_is_a_one_line_value_error(tmp_path, small_bomb_limit, side):
    path = tmp_path / "huge.png"
    Image.new("RGB", (side, side), (1, 2, 3)).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # 40 x 40: the warning, as an error
        with pytest.raises(ValueError, match=r"huge\.png.*decompression-bomb limit") as info:
            load_image(path)
    assert _one_line(str(info.value))


def test_a_dataset_skips_an_image_over_the_bomb_limit(tmp_path, small_bomb_limit):
    Image.new("RGB", (100, 100), (1, 2, 3)).save(tmp_path / "huge.png")
    Image.new("RGB", (20, 20), (4, 5, 6)).save(tmp_path / "small.png")
    ann = [{"image": "huge.png", "caption": "big"}, {"image": "small.png", "caption": "small"}]
    ds = PretrainJsonDataset(ann, tmp_path, image_size=16, max_bad_fraction=0.5)
    with pytest.warns(RuntimeWarning, match=r"huge\.png.*decompression-bomb"):
        sample = ds[0]
    assert sample["caption"] == "small" and ds.num_replaced == 1  # the documented substitution
    assert list(ds.bad_images) == [str(tmp_path / "huge.png")]

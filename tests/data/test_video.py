"""Video input (``mplug_fast.data.video``) and the moving-shapes world (``data.synthetic.video``)."""

from __future__ import annotations

import re
from fractions import Fraction
from math import floor

import numpy as np
import pytest
import torch
from PIL import Image

from mplug_fast.data import Tokenizer
from mplug_fast.data.synthetic.video import (
    DIRECTIONS,
    VIDEO_QA_TYPES,
    SyntheticVideoWorld,
    VideoCaptionDataset,
    VideoQADataset,
    VideoRetrievalDataset,
)
from mplug_fast.data.synthetic.world import COLORS, SyntheticWorld
from mplug_fast.data.transforms import test_transform
from mplug_fast.data.video import (
    VideoTransform,
    collate_videos,
    frame_files,
    load_video,
    read_video_file,
    resample_frames,
    sample_frame_indices,
)
from mplug_fast.tasks import get_task

# ---- frame sampling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 3, 7, 8, 16, 17, 30, 100, 301])
@pytest.mark.parametrize("num_frames", [1, 4, 8, 16])
def test_sampling_matches_exact_segment_positions(length, num_frames):
    official = sample_frame_indices(length, num_frames)
    middle = sample_frame_indices(length, num_frames, "middle")
    # oracle: exact rationals, segment start i*L/T and midpoint (i + 1/2) * L / T, floored
    assert official == [floor(Fraction(i * length, num_frames)) for i in range(num_frames)]
    assert middle == [floor((i + Fraction(1, 2)) * length / num_frames) for i in range(num_frames)]
    for index in (official, middle):
        assert len(index) == num_frames and all(0 <= i < length for i in index)
        assert index == sorted(index)
        if length >= num_frames:  # no frame is taken twice
            assert len(set(index)) == num_frames
    assert official[0] == 0


@pytest.mark.parametrize("length", [16, 100, 150, 301, 1000])
@pytest.mark.parametrize("num_frames", [8, 12, 16])
def test_official_sampling_equals_the_official_arange(length, num_frames):
    """The official reader's float expression, at video-like lengths where it has no rounding quirk."""
    expected = np.arange(0, length, length / num_frames).astype(int).tolist()
    assert sample_frame_indices(length, num_frames) == expected


def test_sampling_examples_and_errors():
    assert sample_frame_indices(10, 4) == [0, 2, 5, 7]
    assert sample_frame_indices(10, 4, "middle") == [1, 3, 6, 8]
    assert sample_frame_indices(3, 5) == [0, 0, 1, 1, 2]  # fewer frames than asked: repeats
    assert len(np.arange(0, 17, 17 / 7)) == 8 and len(sample_frame_indices(17, 7)) == 7  # float quirk avoided
    with pytest.raises(ValueError, match="num_frames must be an int >= 1"):
        sample_frame_indices(10, 0)
    with pytest.raises(ValueError, match="length must be"):
        sample_frame_indices(0, 4)
    with pytest.raises(ValueError, match="available: official, middle"):
        sample_frame_indices(10, 4, "random")


# ---- loading -------------------------------------------------------------------------------------------


def _frames_uint8(n: int = 12, h: int = 10, w: int = 14) -> np.ndarray:
    """n distinct frames [n, h, w, 3] uint8: frame k is a gradient plus k (so every frame differs)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 200, size=(h, w, 3))
    return np.stack([(base + 4 * k).astype(np.uint8) for k in range(n)])


def test_folder_natural_order_and_sampling(tmp_path):
    frames = _frames_uint8(12)
    for k in range(12):  # frame_0 .. frame_11: plain sorting would put frame_10 before frame_2
        Image.fromarray(frames[k]).save(tmp_path / f"frame_{k}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    assert [p.name for p in frame_files(tmp_path)] == [f"frame_{k}.png" for k in range(12)]
    video = load_video(tmp_path, num_frames=4, image_size=16)
    tf = test_transform(16)
    expected = torch.stack([tf(Image.fromarray(frames[i])) for i in sample_frame_indices(12, 4)])
    assert video.shape == (4, 3, 16, 16) and video.dtype == torch.float32
    assert torch.equal(video, expected)
    middle = load_video(tmp_path, num_frames=4, image_size=16, mode="middle")
    assert torch.equal(middle[0], tf(Image.fromarray(frames[1])))  # [1, 4, 7, 10]


def test_tensor_layouts_and_lists_agree():
    frames = _frames_uint8(6)
    thwc = torch.from_numpy(frames)  # [T, H, W, 3] uint8
    tchw = thwc.permute(0, 3, 1, 2).float() / 255  # [T, 3, H, W] float in [0, 1]
    tf = test_transform(16)
    expected = torch.stack([tf(Image.fromarray(frames[i])) for i in sample_frame_indices(6, 3)])
    for source in (thwc, frames, tchw, [Image.fromarray(f) for f in frames]):
        assert torch.allclose(load_video(source, 3, 16), expected, atol=1e-6), type(source)
    assert torch.equal(load_video(thwc, 3, 16), expected)
    assert VideoTransform(16)(thwc).shape == (6, 3, 16, 16)


def test_resample_and_collate():
    videos = torch.arange(2 * 8, dtype=torch.float32).view(2, 8, 1, 1, 1).expand(2, 8, 3, 4, 4)
    picked = resample_frames(videos, 3)
    assert picked[:, :, 0, 0, 0].tolist() == [[0, 2, 5], [8, 10, 13]]
    assert resample_frames(videos, 8) is videos
    batch = collate_videos(
        [{"video": videos[0], "question": "a", "id": 1}, {"video": videos[1], "question": "b"}]
    )
    assert batch["videos"].shape == (2, 8, 3, 4, 4) and batch["question"] == ["a", "b"] and "id" not in batch
    with pytest.raises(ValueError, match="share T and R"):
        collate_videos([{"video": videos[0]}, {"video": videos[1, :4]}])
    with pytest.raises(KeyError, match="lack 'video'"):
        collate_videos([{"image": videos[0, 0]}])


def test_input_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\] or \[T, H, W, 3\]"):
        load_video(torch.zeros(3, 8, 8), 2, 16)
    with pytest.raises(ValueError, match="cannot tell the channel dim"):
        load_video(torch.zeros(2, 5, 8, 8), 2, 16)
    with pytest.raises(ValueError, match="holds no image files"):
        load_video(tmp_path, 2, 16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_video(tmp_path / "missing.mp4", 2, 16)
    with pytest.raises(ValueError, match="values must lie in"):
        load_video(torch.full((2, 3, 8, 8), 2.0), 2, 16)


def test_video_file_needs_decord(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00" * 16)
    try:
        import decord  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs decord"):
            read_video_file(path, 4, 16)
        with pytest.raises(ImportError, match="extract its frames to a folder"):
            load_video(path, 4, 16)
    else:
        pytest.skip("decord is installed: the missing-decord message cannot be shown")


# ---- the moving-shapes world ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> SyntheticVideoWorld:
    return SyntheticVideoWorld(image_size=32, max_objects=3, seed=0, num_frames=6)


@pytest.fixture(scope="module")
def videos(world):
    return [world.scene(i) for i in range(60)]


def test_deterministic_by_seed_and_index(world):
    again = SyntheticVideoWorld(image_size=32, max_objects=3, seed=0, num_frames=6)
    other = SyntheticVideoWorld(image_size=32, max_objects=3, seed=1, num_frames=6)
    for i in (0, 7):
        a, b = world.scene(i), again.scene(i)
        assert a.objects == b.objects and a.captions == b.captions and a.qa == b.qa
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.frames(), b.frames()))
    assert any(world.scene(i).objects != other.scene(i).objects for i in range(5))
    ds = VideoQADataset(world, 4)
    assert torch.equal(ds[2]["video"], VideoQADataset(again, 4)[2]["video"])


def _pixel_centroid(img: Image.Image, rgb: tuple[int, int, int]) -> tuple[float, float]:
    a = np.asarray(img)
    ys, xs = np.nonzero((a == np.array(rgb)).all(axis=2))
    assert len(xs) > 0, f"colour {rgb} not drawn"
    return float(xs.mean()), float(ys.mean())


def test_motion_matches_the_drawn_pixels(videos):
    """The direction word is the way the object's pixels move: the colour centroid shifts by speed per
    frame along the direction (y grows downward: "up" is -y)."""
    for v in videos[:20]:
        frames = v.frames()
        for o in v.objects:
            if any(p.start.color == o.start.color for p in v.objects if p is not o):
                continue  # two objects of one colour: the centroid mixes them
            dx, dy = DIRECTIONS[o.direction]
            x0, y0 = _pixel_centroid(frames[0], COLORS[o.start.color])
            for t in range(1, v.num_frames):
                x, y = _pixel_centroid(frames[t], COLORS[o.start.color])
                assert (x - x0, y - y0) == pytest.approx((dx * o.speed * t, dy * o.speed * t), abs=1e-6)


def test_objects_inside_and_apart_in_every_frame(world, videos):
    R, gap = world.image_size, world.gap
    for v in videos:
        for t in range(v.num_frames):
            boxes = [o.at(t).box for o in v.objects]
            for x0, y0, x1, y1 in boxes:
                assert gap <= x0 < x1 <= R - gap and gap <= y0 < y1 <= R - gap, (v.index, t, boxes)
            for i, a in enumerate(boxes):
                for b in boxes[i + 1 :]:
                    assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (v.index, t)
        assert all(o.speed >= 1 for o in v.objects)
        assert len({(o.start.color, o.start.shape) for o in v.objects}) == len(v.objects)


def test_texts_are_true_and_single_wordpieces(world, videos):
    tok = Tokenizer()
    vocab = set(world.vocabulary())
    for w in vocab:
        assert tok.tokenize(w) == [w], w
    answers = set(world.answer_list())
    for v in videos:
        by_name = {f"the {o.start.color} {o.start.shape}": o for o in v.objects}
        for o in v.objects:  # the motion caption names every object with its direction
            assert f"{o.start.shape} moving {o.direction}" in v.captions[1]
        for q in v.qa:
            assert q.type in VIDEO_QA_TYPES and q.answer in answers
            m = re.fullmatch(r"is (the \w+ \w+) moving (\w+)\?", q.question)
            if q.type == "motion":
                assert m is not None
                assert q.answer == ("yes" if by_name[m.group(1)].direction == m.group(2) else "no")
            m = re.fullmatch(r"which direction is (the \w+ \w+) moving\?", q.question)
            if q.type == "direction":
                assert m is not None and q.answer == by_name[m.group(1)].direction
        assert sorted(q.answer for q in v.qa if q.type == "motion") == ["no", "yes"]
        for text in [*v.captions, *(q.question for q in v.qa)]:
            pieces = tok.tokenize(text)
            assert "[UNK]" not in pieces and not any(p.startswith("##") for p in pieces), text
            assert set(re.findall(r"[a-z]+", text)) <= vocab, text


def test_static_answers_hold_in_every_frame(videos):
    """Colour / count answers are the scene graph's in every frame (nothing appears or disappears)."""
    for v in videos[:10]:
        for q in v.qa:
            m = re.fullmatch(r"how many (\w+) objects are there\?", q.question)
            if m:
                n = sum(o.start.color == m.group(1) for o in v.objects)
                assert q.answer == ["zero", "one", "two", "three"][n]
        for t in range(v.num_frames):
            assert [o.shape for o in v.scene_at(t).objects] == [o.start.shape for o in v.objects]


def test_datasets(world):
    qa = VideoQADataset(world, 5, start=3, types=("motion", "direction"))
    item = qa[1]
    assert item["video"].shape == (6, 3, 32, 32) and item["type"] in ("motion", "direction")
    assert item["video_id"] == 4 and item["answers"][0] in qa.answer_list()
    cap = VideoCaptionDataset(world, 3, split="test")
    assert cap[0]["captions"] == world.scene(0).captions and len(cap) == 3
    assert len(VideoCaptionDataset(world, 3, split="train")) == 12
    ret = VideoRetrievalDataset(world, 3)
    assert len(ret.texts) == 6 and ret.txt2vid == [0, 0, 1, 1, 2, 2] and ret.vid2txt[1] == [2, 3]
    assert torch.equal(ret[3]["video"], ret.video(1)) and ret[3]["caption"] == ret.texts[3]
    ds = get_task("video_qa").synthetic_dataset(
        "test", image_size=16, num_scenes=10, eval_scenes=2, vqa_types=["color", "spatial"]
    )
    assert isinstance(ds, VideoQADataset) and ds.types == ("color",) and ds.start == 10 and len(ds) == 2
    with pytest.raises(ValueError, match="available: .*video_qa"):
        get_task("video_grounding")
    with pytest.raises(ValueError, match="num_frames must be an int >= 2"):
        SyntheticVideoWorld(num_frames=1)
    with pytest.raises(ValueError, match="use num_frames <= 10"):
        SyntheticVideoWorld(image_size=16, num_frames=11)
    scaled = SyntheticVideoWorld(image_size=32, num_frames=4, object_scale=1.5)
    assert scaled.world.sides == SyntheticWorld(image_size=32, object_scale=1.5).sides
    longest = SyntheticVideoWorld(image_size=16, max_objects=4, num_frames=10)
    assert all(len(longest.scene(i).objects) >= 1 for i in range(30))
    with pytest.raises(ValueError, match="subset of"):
        VideoQADataset(world, 2, types=("spatial",))

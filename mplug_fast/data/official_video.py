"""Readers for the official zero-shot video annotation formats (fidelity §8), for the evaluate-only
tasks ``video_qa``, ``video_retrieval`` and ``video_caption`` (``mplug_fast.tasks.video``).

    VideoQAJsonlDataset       MSRVTT-QA / MSVD-QA jsonl   {"video_id", "question", "answer"}
    VideoRetrievalJsonlDataset MSRVTT 1k-A test jsonl      {"clip_name", "caption"}  (one caption per clip)
    VATEXCaptionDataset       VATEX json list             {"videoID", "enCap": [...]}

A video id names either a folder of frame images ``video_root/<id>/`` (natural filename order) or a file
``video_root/<id><video_ext>`` read with decord (optional; ``mplug_fast.data.video.load_video``). Ids whose
video is missing are counted and dropped with a warning; more than ``max_bad_fraction`` of them is an error.
Items carry the same keys as the synthetic video datasets (``mplug_fast.data.synthetic.video``), so the
video tasks' evaluate functions read both: ``video`` float32 [T, 3, R, R] and the texts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from mplug_fast.data.annotations import (
    TEXT,
    TEXT_OR_INT,
    TEXT_OR_TEXTS,
    TEXTS,
    AnnotationSource,
    Kind,
    PathLike,
    Record,
    field,
    load_annotations,
)
from mplug_fast.data.official import DEFAULT_MAX_BAD_FRACTION, pre_caption, pre_question
from mplug_fast.data.video import SamplingMode, load_video

logger = logging.getLogger(__name__)


class _VideoFiles(Dataset):
    """Shared plumbing: where each video id's frames are, the frame sampling, the missing-video policy."""

    def __init__(
        self,
        video_root: PathLike,
        num_frames: int,
        image_size: int,
        video_ext: str,
        frame_sampling: SamplingMode,
        max_bad_fraction: float,
    ):
        if num_frames < 1 or image_size < 1:
            raise ValueError(f"need num_frames >= 1 and image_size >= 1, got {num_frames}, {image_size}")
        self.video_root, self.num_frames, self.image_size = Path(video_root), num_frames, image_size
        self.video_ext, self.frame_sampling = video_ext, frame_sampling
        self.max_bad_fraction = max_bad_fraction

    def source(self, video_id: Any) -> Path | None:
        """The frame folder or video file of ``video_id`` (None when neither exists)."""
        folder = self.video_root / str(video_id)
        if folder.is_dir():
            return folder
        file = self.video_root / f"{video_id}{self.video_ext}"
        return file if file.is_file() else None

    def present_rows(self, ann: AnnotationSource, fields: Mapping[str, Kind], what: str) -> list[Record]:
        """The records of ``ann`` (checked to have ``fields``, the first the video id) whose video exists;
        warns about the missing ones, raises past ``max_bad_fraction``."""
        rows = load_annotations(ann)
        for row in rows:
            for name, kind in fields.items():
                field(row, name, kind)
        id_key = next(iter(fields))
        found = [self.source(r[id_key]) is not None for r in rows]
        missing = [r[id_key] for r, ok in zip(rows, found, strict=True) if not ok]
        if missing:
            message = (
                f"{len(missing)} of {len(rows)} {what} have no video under {self.video_root} (a folder <id>/ "
                f"or a file <id>{self.video_ext}), e.g. {missing[:3]}"
            )
            if len(missing) / len(rows) > self.max_bad_fraction:
                raise FileNotFoundError(f"{message}: more than max_bad_fraction={self.max_bad_fraction}")
            logger.warning("%s: skipped", message)
        return [r for r, ok in zip(rows, found, strict=True) if ok]

    def load(self, video_id: Any) -> Tensor:
        """float32 [T, 3, R, R]: ``num_frames`` uniformly sampled, test-transformed frames."""
        source = self.source(video_id)
        if source is None:
            raise FileNotFoundError(f"video {video_id!r} disappeared from {self.video_root}")
        return load_video(source, self.num_frames, self.image_size, self.frame_sampling)


class VideoQAJsonlDataset(_VideoFiles):
    """MSRVTT-QA / MSVD-QA: one item per question (official: exact-match accuracy, answers ranked over the
    training answer list). Items: video, question, answers ([answer]), weights ([1.0]), question_id,
    video_id."""

    def __init__(
        self,
        ann: AnnotationSource,
        video_root: PathLike,
        num_frames: int = 16,
        image_size: int = 384,
        video_ext: str = ".mp4",
        frame_sampling: SamplingMode = "official",
        max_words: int = 50,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
        split: str = "test",
    ):
        super().__init__(video_root, num_frames, image_size, video_ext, frame_sampling, max_bad_fraction)
        fields = {"video_id": TEXT_OR_INT, "question": TEXT, "answer": TEXT_OR_INT}
        self.rows = self.present_rows(ann, fields, "questions")
        self.max_words, self.split = max_words, split

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        return {
            "video": self.load(row["video_id"]),
            "question": pre_question(row["question"], self.max_words),
            "answers": [str(row["answer"])],
            "weights": [1.0],
            "question_id": row.get("question_id", i),
            "video_id": row["video_id"],
        }


class VideoRetrievalJsonlDataset(_VideoFiles):
    """MSRVTT retrieval (1k-A test ``msrvtt_test.jsonl``): rows {clip_name, caption}; a clip may appear in
    several rows (one text each). Gallery like the synthetic ``VideoRetrievalDataset``: ``texts``,
    ``txt2vid[t]``, ``vid2txt[k]``, ``video(k)``; item i = (video of text i, text i, video index)."""

    def __init__(
        self,
        ann: AnnotationSource,
        video_root: PathLike,
        num_frames: int = 12,
        image_size: int = 224,
        video_ext: str = ".mp4",
        frame_sampling: SamplingMode = "official",
        max_words: int = 35,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
        split: str = "test",
    ):
        super().__init__(video_root, num_frames, image_size, video_ext, frame_sampling, max_bad_fraction)
        rows = self.present_rows(ann, {"clip_name": TEXT_OR_INT, "caption": TEXT_OR_TEXTS}, "texts")
        self.clips: list[str] = []
        self.texts: list[str] = []
        self.txt2vid: list[int] = []
        self.vid2txt: list[list[int]] = []
        index: dict[str, int] = {}
        for row in rows:
            captions = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
            k = index.setdefault(row["clip_name"], len(self.clips))
            if k == len(self.clips):
                self.clips.append(row["clip_name"])
                self.vid2txt.append([])
            for caption in captions:
                self.vid2txt[k].append(len(self.texts))
                self.txt2vid.append(k)
                self.texts.append(pre_caption(caption, max_words))
        self.split = split

    @property
    def num_videos(self) -> int:
        return len(self.clips)

    def video(self, k: int) -> Tensor:
        """Video k of the gallery: float32 [T, 3, R, R]."""
        return self.load(self.clips[k])

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = self.txt2vid[i]
        return {"video": self.video(k), "caption": self.texts[i], "video_id": k}


class VATEXCaptionDataset(_VideoFiles):
    """VATEX captioning, evaluation form: one item per video with all its English captions as gold.
    Items: video, captions, video_id."""

    def __init__(
        self,
        ann: AnnotationSource,
        video_root: PathLike,
        num_frames: int = 8,
        image_size: int = 448,
        video_ext: str = ".mp4",
        frame_sampling: SamplingMode = "official",
        max_words: int = 30,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
        split: str = "test",
    ):
        super().__init__(video_root, num_frames, image_size, video_ext, frame_sampling, max_bad_fraction)
        self.rows = self.present_rows(ann, {"videoID": TEXT_OR_INT, "enCap": TEXTS}, "videos")
        self.max_words, self.split = max_words, split

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        return {
            "video": self.load(row["videoID"]),
            "captions": [pre_caption(c, self.max_words) for c in row["enCap"]],
            "video_id": row["videoID"],
        }

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
from pathlib import Path
from typing import Any, ClassVar

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
from mplug_fast.data.official import DEFAULT_MAX_BAD_FRACTION, gallery, pre_caption, pre_question
from mplug_fast.data.video import SamplingMode, load_video

logger = logging.getLogger(__name__)


class _VideoFiles(Dataset):
    """Shared plumbing: the checked records whose video exists, where each video id's frames are, the frame
    sampling and the missing-video policy. A subclass names its record ``fields`` (the video id first), what
    a record is (``what``, for messages) and its official ``defaults`` (num_frames, image_size, max_words)
    for the arguments left None."""

    fields: ClassVar[dict[str, Kind]]
    what: ClassVar[str]
    defaults: ClassVar[tuple[int, int, int]]

    def __init__(
        self,
        ann: AnnotationSource,
        video_root: PathLike,
        num_frames: int | None = None,
        image_size: int | None = None,
        video_ext: str = ".mp4",
        frame_sampling: SamplingMode = "official",
        max_words: int | None = None,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
        split: str = "test",
    ):
        given = (num_frames, image_size, max_words)
        num_frames, image_size, max_words = (d if v is None else v for v, d in zip(given, self.defaults))
        if num_frames < 1 or image_size < 1:
            raise ValueError(f"need num_frames >= 1 and image_size >= 1, got {num_frames}, {image_size}")
        self.video_root, self.num_frames, self.image_size = Path(video_root), num_frames, image_size
        self.video_ext, self.frame_sampling = video_ext, frame_sampling
        self.max_words, self.max_bad_fraction, self.split = max_words, max_bad_fraction, split
        self.rows = self.present_rows(ann)

    def source(self, video_id: Any) -> Path | None:
        """The frame folder or video file of ``video_id`` (None when neither exists)."""
        folder = self.video_root / str(video_id)
        if folder.is_dir():
            return folder
        file = self.video_root / f"{video_id}{self.video_ext}"
        return file if file.is_file() else None

    def present_rows(self, ann: AnnotationSource) -> list[Record]:
        """The records of ``ann`` (checked to have ``fields``) whose video exists; warns about the missing
        ones, raises past ``max_bad_fraction``."""
        rows = load_annotations(ann)
        for row in rows:
            for name, kind in self.fields.items():
                field(row, name, kind)
        id_key = next(iter(self.fields))
        found = [self.source(r[id_key]) is not None for r in rows]
        missing = [r[id_key] for r, ok in zip(rows, found, strict=True) if not ok]
        if missing:
            message = (
                f"{len(missing)} of {len(rows)} {self.what} have no video under {self.video_root} (a folder "
                f"<id>/ or a file <id>{self.video_ext}), e.g. {missing[:3]}"
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

    def __len__(self) -> int:
        return len(self.rows)


class VideoQAJsonlDataset(_VideoFiles):
    """MSRVTT-QA / MSVD-QA: one item per question (official: exact-match accuracy, answers ranked over the
    training answer list; 16 frames at 384 px, questions of at most 50 words). Items: video, question,
    answers ([answer]), weights ([1.0]), question_id, video_id."""

    fields = {"video_id": TEXT_OR_INT, "question": TEXT, "answer": TEXT_OR_INT}
    what = "questions"
    defaults = (16, 384, 50)

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
    """MSRVTT retrieval (1k-A test ``msrvtt_test.jsonl``; official: 12 frames at 224 px, captions of at most
    35 words): rows {clip_name, caption}; a clip may appear in several rows (one text each). Gallery like
    the synthetic ``VideoRetrievalDataset``: ``texts``, ``txt2vid[t]``, ``vid2txt[k]``, ``video(k)``; item
    i = (video of text i, text i, video index)."""

    fields = {"clip_name": TEXT_OR_INT, "caption": TEXT_OR_TEXTS}
    what = "texts"
    defaults = (12, 224, 35)

    def __init__(self, ann: AnnotationSource, video_root: PathLike, **kwargs: Any):
        super().__init__(ann, video_root, **kwargs)
        items = []  # (clip, clip, captions): the rows of one clip are one video
        for row in self.rows:
            captions = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
            clip = row["clip_name"]
            items.append((clip, clip, [pre_caption(c, self.max_words) for c in captions]))
        self.clips, self.texts, self.txt2vid, self.vid2txt = gallery(items)

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
    """VATEX captioning, evaluation form (official: 8 frames at 448 px, captions of at most 30 words): one
    item per video with all its English captions as gold. Items: video, captions, video_id."""

    fields = {"videoID": TEXT_OR_INT, "enCap": TEXTS}
    what = "videos"
    defaults = (8, 448, 30)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        return {
            "video": self.load(row["videoID"]),
            "captions": [pre_caption(c, self.max_words) for c in row["enCap"]],
            "video_id": row["videoID"],
        }

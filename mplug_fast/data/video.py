"""Video input for zero-shot video tasks (docs/fidelity.md §5.8): uniform frame sampling, frame loading and
the per-frame test transform.

    sample_frame_indices(length, num_frames, mode)   which frames of a clip of any length
    load_video(source, num_frames, image_size)       folder / tensor / array / list / file -> [T, 3, R, R]
    VideoTransform(image_size)                       frames -> float32 [T, 3, R, R] (test transform per frame)
    collate_videos(samples)                          {"video": [T, 3, R, R]} -> {"videos": [B, T, 3, R, R]}

Frame sampling, two modes (the frame count T is fixed, the clip length L is anything >= 1):

    "official"  i * L / T floored, i = 0..T-1: the start of each of T equal segments. This is the official
                mPLUG reader's ``np.arange(0, L, L / T).astype(int)`` computed in exact integer arithmetic.
                The float original has two rounding quirks we do not copy: for some (L, T) it returns T + 1
                indices (L=17, T=7: 17.0 is the 8th), and where i * L / T is an integer it can floor
                one below it (L=30, T=22, i=11 gives 14, not 15).
    "middle"    (2i + 1) * L / (2T) floored: the middle of each segment (the "uniform middle" sampling of
                ClipBERT / ALPRO / BLIP-style video readers, up to their integer-interval rounding).

Both give T indices in 0..L-1, non-decreasing; when L < T frames repeat (as the official reader does).

Frames go through ``test_transform(R)`` one by one (bicubic resize to R x R, CLIP normalisation). The official
reader asks decord to decode at R x R (``VideoReader(width=R, height=R)``: square, aspect distorted, decoder's
own scaler) and then normalises; for video files we do the same, so the per-frame resize is a no-op there.
decord is optional: it is imported only when a video file is read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mplug_fast.data.collate import metadata, stack_tensors
from mplug_fast.data.transforms import TestTransform, load_image

SamplingMode = Literal["official", "middle"]
SAMPLING_MODES: tuple[str, ...] = ("official", "middle")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
VideoSource = str | Path | Tensor | np.ndarray | Sequence[Any]


# ---- frame sampling ------------------------------------------------------------------------------------


def sample_frame_indices(length: int, num_frames: int, mode: SamplingMode = "official") -> list[int]:
    """T = ``num_frames`` uniformly spaced frame indices of a clip of ``length`` frames (see the module doc).

    Example: ``sample_frame_indices(10, 4)`` -> [0, 2, 5, 7]; ``mode="middle"`` -> [1, 3, 6, 8].
    """
    for name, value in (("length", length), ("num_frames", num_frames)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if mode == "official":
        return [i * length // num_frames for i in range(num_frames)]
    if mode == "middle":
        return [(2 * i + 1) * length // (2 * num_frames) for i in range(num_frames)]
    raise ValueError(f"unknown frame sampling mode {mode!r}; available: {', '.join(SAMPLING_MODES)}")


# ---- frames from tensors -------------------------------------------------------------------------------


def _frame_list(frames: Tensor | np.ndarray) -> list[Tensor]:
    """A [T, C, H, W] / [T, H, W, C] stack (channels, 1 or 3, in dim 1, else in dim 3) -> T CHW tensors (uint8
    or float in [0, 1]) for ``load_image``."""
    t = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    shape = tuple(t.shape)
    if len(shape) != 4:
        raise ValueError(f"a video tensor must be 4-D, [T, 3, H, W] or [T, H, W, 3], got shape {list(shape)}")
    if shape[0] == 0:
        raise ValueError("the video has no frames (T = 0)")
    if shape[1] in (1, 3):
        return list(t.detach().cpu())
    if shape[3] in (1, 3):
        return list(t.permute(0, 3, 1, 2).detach().cpu())  # [T, C, H, W] view
    raise ValueError(
        f"cannot tell the channel dim of video shape {list(shape)}: expected [T, 3, H, W] or [T, H, W, 3] "
        "(1 or 3 channels)"
    )


# ---- folders and video files ---------------------------------------------------------------------------


def _natural_key(name: str) -> list[Any]:
    """ "frame_10.jpg" sorts after "frame_9.jpg": digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_files(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` in natural order (digit runs as numbers: ``2.jpg`` before ``10.jpg``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"frame folder {str(folder)!r} is not a directory")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"frame folder {str(folder)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(files, key=lambda p: _natural_key(p.name))


def read_video_file(
    path: str | Path, num_frames: int, image_size: int, mode: SamplingMode = "official"
) -> Tensor:
    """``num_frames`` frames of a video file, decoded at R x R by decord (official) -> uint8 [T, R, R, 3]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file {str(path)!r} does not exist")
    try:
        import decord
    except ImportError as e:
        raise ImportError(
            f"reading the video file {str(path)!r} needs decord (pip install decord), which is not installed "
            f"({e}); or extract its frames to a folder of images, or pass the frames as a tensor"
        ) from e
    reader = decord.VideoReader(str(path), width=image_size, height=image_size)
    index = sample_frame_indices(len(reader), num_frames, mode)
    return torch.from_numpy(reader.get_batch(index).asnumpy())  # [T, R, R, 3] uint8


# ---- the transform -------------------------------------------------------------------------------------


class VideoTransform(TestTransform):
    """The official test transform on every frame: frames -> float32 [T, 3, R, R].

    Accepts a [T, 3, H, W] / [T, H, W, 3] tensor or array (uint8, or float in [0, 1]) or a list of images
    (paths, PIL images, arrays, tensors: anything ``load_image`` reads)."""

    def __call__(self, frames: Tensor | np.ndarray | Sequence[Any]) -> Tensor:  # type: ignore[override]
        items = _frame_list(frames) if isinstance(frames, (Tensor, np.ndarray)) else list(frames)
        if not items:
            raise ValueError("the video has no frames")
        frame = super().__call__  # the test transform of one frame
        return torch.stack([frame(f) for f in items])  # [T, 3, R, R]


def load_video(
    source: VideoSource,
    num_frames: int,
    image_size: int,
    mode: SamplingMode = "official",
) -> Tensor:
    """``num_frames`` uniformly sampled frames of a video, test-transformed -> float32 [T, 3, R, R].

    Args:
        source: a folder of frame images (natural filename order), a video file (decord, optional), a tensor /
            array [L, 3, H, W] or [L, H, W, 3] (uint8, or float in [0, 1]), or a list of L images.
        num_frames: T, the frames sampled from the L available (``sample_frame_indices``).
        image_size: R.
        mode: "official" (segment starts) or "middle" (segment midpoints).
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            frames: list[Any] = frame_files(path)
        elif not path.exists():
            raise FileNotFoundError(
                f"video source {str(path)!r} does not exist (expected a folder or a file)"
            )
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            frames = [load_image(path)]  # a still image as a video: its one frame, sampled T times
        else:
            return VideoTransform(image_size)(read_video_file(path, num_frames, image_size, mode))
    elif isinstance(source, (Tensor, np.ndarray)):
        frames = _frame_list(source)
    elif isinstance(source, Sequence) and not isinstance(source, (bytes, str)):
        frames = list(source)
    elif isinstance(source, Image.Image):
        raise TypeError("load_video got a single PIL image; pass a list of frames (or [image] * T)")
    else:
        raise TypeError(
            f"unsupported video source {type(source).__name__}; pass a folder, a video file, a 4-D tensor / "
            "array or a list of frames"
        )
    if not frames:
        raise ValueError("the video has no frames")
    index = sample_frame_indices(len(frames), num_frames, mode)
    return VideoTransform(image_size)([frames[i] for i in index])


def resample_frames(videos: Tensor, num_frames: int, mode: SamplingMode = "official") -> Tensor:
    """Uniformly sample ``num_frames`` of the T frames of already-transformed videos: [..., T, 3, R, R] ->
    [..., num_frames, 3, R, R] (an index, shared by the batch)."""
    if videos.dim() < 4:
        raise ValueError(f"videos must be [..., T, 3, R, R], got shape {list(videos.shape)}")
    T = videos.shape[-4]
    if num_frames == T:  # both modes pick every frame
        return videos
    index = torch.tensor(sample_frame_indices(T, num_frames, mode), device=videos.device)
    return videos.index_select(videos.dim() - 4, index)


# ---- collation -----------------------------------------------------------------------------------------


def collate_videos(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Video samples -> {"videos": float [B, T, 3, R, R]} plus every other key as a list (keys missing from
    some samples are dropped)."""
    if not samples:
        raise ValueError("collate_videos got an empty batch")
    missing = [i for i, s in enumerate(samples) if "video" not in s]
    if missing:
        raise KeyError(f"collate_videos: samples {missing} lack 'video'; the first has {sorted(samples[0])}")
    videos = stack_tensors(
        samples, "video", "[T, 3, R, R]", "collate_videos", "apply VideoTransform", "T and R"
    )
    return {"videos": videos, **metadata(samples, {"video"})}

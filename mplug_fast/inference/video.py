"""Zero-shot video with image models (docs/fidelity.md §5.8): the official video scripts run the image VQA,
captioning and retrieval models unchanged on T frames.

    frames [B, T, 3, R, R] --ViT, frames batched as B*T--> [B*T, Nv, D] --view--> [B, T, Nv, D]
    QA / captioning / ITM   visual tokens concatenated over frames: [B, T*Nv, D] (no temporal embedding)
    ITC                     per-frame CLS -> vision_proj -> mean over frames -> normalise: [B, E]

    encode_video(model, videos)                               [B, T, Nv, D]
    video_fused_memory(model, videos, ids, mask)              [v'; t'] over T*Nv + Lq tokens (QA memory)
    video_qa_rank                                             answer-list ranking
    video_caption_generate                                    decoder over the raw frame tokens
    video_features, video_retrieval_scores                    ITC top-k then ITM rerank (score = ITM + ITC)

With T = 1 every function gives exactly its image counterpart (``fused_memory``, ``vqa_rank``,
``caption_generate``, ``image_features``); tested in ``tests/inference/test_video.py``. The
connected-attention fusion layers and the decoder cross-attention grow with T*Nv (official video QA: 16
frames x 901 tokens = 14,416 keys).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mplug_fast.generation import GenerationOutput, RankedAnswers, rank_answers
from mplug_fast.inference.generate import caption_from_memory
from mplug_fast.inference.retrieval import RetrievalScores, rerank
from mplug_fast.modeling import MPlug


def _check_videos(videos: Tensor) -> tuple[int, int]:
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(
            f"videos must be [B, T, 3, R, R] (B videos of T frames; an image is T = 1), "
            f"got {list(videos.shape)}"
        )
    if videos.shape[1] < 1:
        raise ValueError("videos have no frames (T = 0)")
    return videos.shape[0], videos.shape[1]


def encode_video(model: MPlug, videos: Tensor, frame_batch_size: int | None = None) -> Tensor:
    """Every frame through the ViT (+ adapter), independently: videos [B, T, 3, R, R] -> [B, T, Nv, D].

    ``frame_batch_size`` caps the frames per ViT call (None: all B*T at once)."""
    B, T = _check_videos(videos)
    frames = videos.flatten(0, 1)  # [B*T, 3, R, R] view
    if frame_batch_size is None or frame_batch_size >= B * T:
        states = model.encode_image(frames)  # [B*T, Nv, D]
    else:
        chunks = frames.split(frame_batch_size)
        states = torch.cat([model.encode_image(c) for c in chunks])  # copy: [B*T, Nv, D]
    return states.view(B, T, *states.shape[1:])  # [B, T, Nv, D]


def video_fused_memory(
    model: MPlug, videos: Tensor, ids: Tensor, mask: Tensor | None, *, frame_batch_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """The VQA decoder memory of a video: fuse(T*Nv frame tokens, question) -> ([v'; t'] [B, T*Nv + Lt, D],
    mask bool [B, T*Nv + Lt]); ``MPlug.fused_memory`` with the frames' tokens in place of one image's."""
    v = encode_video(model, videos, frame_batch_size).flatten(1, 2)  # [B, T*Nv, D]
    return model.fused_memory_from_states(v, ids, mask)


@torch.no_grad()
def video_qa_rank(
    model: MPlug,
    videos: Tensor,
    question_ids: Tensor,
    question_mask: Tensor | None,
    answer_ids: Tensor,
    answer_mask: Tensor | None,
    *,
    frame_batch_size: int | None = None,
    **options: Any,
) -> RankedAnswers:
    """Video QA by answer-list ranking (official ``videoqa_mplug.py``: ``rank_answer`` with a VQA model).

    Args: videos [B, T, 3, R, R]; question_ids / mask [B, Lq]; answer_ids / mask [A, La]
    ("[CLS] answer [SEP] [SEP]"); options: `rank_answers`'s (k: candidates kept after the first-token
    filter, official 128; double_count_first).
    Returns: `RankedAnswers` (indices [B, k] into the answer list, best first)."""
    memory, memory_mask = video_fused_memory(
        model, videos, question_ids, question_mask, frame_batch_size=frame_batch_size
    )
    return rank_answers(model.decoder, memory, memory_mask, answer_ids, answer_mask, **options)


@torch.no_grad()
def video_caption_generate(
    model: MPlug,
    videos: Tensor,
    prompt_ids: Tensor | None = None,
    prompt_mask: Tensor | None = None,
    *,
    frame_batch_size: int | None = None,
    **options: Any,
) -> GenerationOutput:
    """Video captioning (official ``videocap_mplug.py``): the caption decoder reads the raw concatenated frame
    tokens [B, T*Nv, D], from [CLS] or a left-padded prompt [B, Lp] (official VATEX: "a picture of", beam 10,
    min 15, max 25; options: `caption_from_memory`'s). Returns `GenerationOutput` (ids start with the
    prompt)."""
    memory = encode_video(model, videos, frame_batch_size).flatten(1, 2)  # [B, T*Nv, D]
    return caption_from_memory(model, memory, prompt_ids, prompt_mask, **options)


def video_features(model: MPlug, frame_states: Tensor) -> Tensor:
    """Video ITC feature (official ``retrieval_vid_mplug.py``): normalize(mean_t vision_proj(CLS_t)).

    frame_states: [B, T, Nv, D] (``encode_video``). Returns [B, embed_dim]. With T = 1 this is
    ``model.image_features``."""
    proj = model._require("vision_proj")
    return F.normalize(proj(frame_states[:, :, 0]).mean(dim=1), dim=-1)  # [B, T, E] -> [B, E]


@torch.no_grad()
def video_retrieval_scores(
    model: MPlug,
    videos: Tensor,
    text_ids: Tensor,
    text_mask: Tensor | None,
    *,
    k: int = 128,
    batch_size: int = 16,
    add_itc: bool = True,
) -> RetrievalScores:
    """Scores every video against every text: ITC similarities, then ITM on each query's top-k.

    Args:
        model: a retrieval (or pretraining) image model.
        videos: [Nv_, T, 3, R, R]; text_ids / text_mask: [Nt, L].
        k: ITM-reranked candidates per query (official video k_test 128; clamped to the gallery).
        batch_size: videos per ViT call and pairs per ITM call.
        add_itc: score = ITM class-1 logit + ITC similarity (the official video variant; the image
            retrieval score is the ITM logit alone).
    Returns:
        `RetrievalScores` with i2t [N, Nt] video -> text, t2i [Nt, N], itc [N, Nt]; -100 outside the top-k.
    """
    N, T = _check_videos(videos)
    Nt = text_ids.shape[0]
    if N == 0 or Nt == 0:
        raise ValueError(f"need at least one video and one text, got {N} videos and {Nt} texts")
    states = torch.cat([encode_video(model, videos[s : s + batch_size]) for s in range(0, N, batch_size)])
    t = model.encode_text(text_ids, text_mask)  # [Nt, L, D]
    itc = (video_features(model, states) @ model.text_features(t).t()).float()  # [N, Nt]
    return rerank(model, itc, states.flatten(1, 2), t, text_mask, k=k, batch_size=batch_size, add_itc=add_itc)

"""Zero-shot video tasks (docs/fidelity.md §5.8): image models evaluated on videos, never trained on them.

    task             loads the checkpoint of  inference (mplug_fast.inference.video)     metric
    video_qa         vqa                      answer-list ranking over T*Nv + Lq tokens  vqa_acc (exact match)
    video_caption    caption                  beam search over T*Nv frame tokens         CIDEr, BLEU, ROUGE-L
    video_retrieval  retrieval                mean-frame ITC top-k, ITM rerank (+ ITC)   r_mean, median ranks

``mplug-fast evaluate --task video_qa --checkpoint <a vqa run>`` builds the image task's model from the
checkpoint (the task's ``image_task``) and evaluates it on the video split (synthetic: moving-shapes videos
of the run's world, ``mplug_fast.data.synthetic.video``). ``train`` refuses these tasks (``trainable``
False): the paper reports them zero-shot and the official code has no video training.

Every evaluate takes ``num_frames`` (None: all the dataset's frames; else that many, uniformly sampled with
``frame_sampling`` "official" or "middle", ``mplug_fast.data.video.sample_frame_indices``).
"""

from __future__ import annotations

import abc
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mplug_fast.config import MPlugConfig
from mplug_fast.data.official_video import (
    VATEXCaptionDataset,
    VideoQAJsonlDataset,
    VideoRetrievalJsonlDataset,
)
from mplug_fast.data.synthetic.video import (
    VIDEO_QA_TYPES,
    SyntheticVideoWorld,
    VideoCaptionDataset,
    VideoQADataset,
    VideoRetrievalDataset,
)
from mplug_fast.data.video import SAMPLING_MODES, collate_videos, resample_frames
from mplug_fast.inference.video import video_caption_generate, video_qa_rank, video_retrieval_scores
from mplug_fast.io import atomic_write_json
from mplug_fast.metrics.retrieval import ranks_image_to_text, ranks_text_to_image
from mplug_fast.modeling import MPlug
from mplug_fast.tasks import caption as caption_task
from mplug_fast.tasks import retrieval as retrieval_task
from mplug_fast.tasks import vqa as vqa_task
from mplug_fast.tasks.evaluation import batches, eval_mode
from mplug_fast.tasks.protocol import Task
from mplug_fast.tasks.sources import SyntheticScenes, synthetic_scenes


def _frame_sampler(num_frames: int | None, frame_sampling: str) -> Callable[[Tensor], Tensor]:
    """Checks the frame options; returns videos [B, T, 3, R, R] -> [B, num_frames, 3, R, R] (None: as is)."""
    if num_frames is not None and (
        isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1
    ):
        raise ValueError(f"num_frames must be an int >= 1 or None (all frames), got {num_frames!r}")
    if frame_sampling not in SAMPLING_MODES:
        raise ValueError(f"frame_sampling must be one of {SAMPLING_MODES}, got {frame_sampling!r}")
    if num_frames is None:
        return lambda videos: videos
    return lambda videos: resample_frames(videos, num_frames, frame_sampling)  # type: ignore[arg-type]


def _video_batches(
    dataset: Dataset,
    batch_size: int,
    device: torch.device | str,
    frames: Callable[[Tensor], Tensor],
    seen: dict[str, int],
) -> Iterator[dict[str, Any]]:
    """The collated video batches, their frames resampled by ``frames`` (`_frame_sampler`);
    ``seen["num_frames"]``: the frames of the last batch."""
    for batch in batches(dataset, collate_videos, batch_size, device):
        batch["videos"] = frames(batch["videos"])
        seen["num_frames"] = int(batch["videos"].shape[1])
        yield batch


# ---- video QA ------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_qa(
    model: nn.Module,
    dataset: Dataset,
    tokenizer: Any,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    answer_list: Sequence[str] | None = None,
    k: int = 128,
    max_question_length: int = 25,
    num_frames: int | None = None,
    frame_sampling: str = "official",
    output: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Video QA accuracy of ``model`` (a vqa model) by answer-list ranking (official ``videoqa_mplug.py``).

    Args:
        dataset: video QA samples (``video`` [T, 3, R, R], ``question``, ``answers``; ``type``,
            ``question_id`` when present).
        answer_list: the candidates (official: the training answer vocabulary); None: the dataset's
            ``answer_list()``, else the distinct answers of the dataset.
        k: candidates kept after the first-token filter (official k_test 128).
    Returns:
        {"vqa_acc" (percent; exact match for one gold answer, VQA accuracy for several), "vqa_acc_kind",
         "vqa_acc/<type>", "count", "num_frames", "predictions": {question_id: answer}}.
    """
    frames = _frame_sampler(num_frames, frame_sampling)
    if answer_list is None:
        answer_list = (
            dataset.answer_list() if hasattr(dataset, "answer_list") else vqa_task.answer_list_from(dataset)
        )
    if not answer_list:
        raise ValueError("video QA ranking needs a non-empty answer_list")
    names, a_ids, a_mask = vqa_task.answer_tokens(tokenizer, answer_list, device)

    def answer(batch: dict[str, Any]) -> list[str]:
        q = tokenizer(batch["question"], padding="longest", max_length=max_question_length, truncation=True)
        q_ids, q_mask = q.input_ids.to(device), q.attention_mask.bool().to(device)
        ranked = video_qa_rank(model, batch["videos"], q_ids, q_mask, a_ids, a_mask.bool(), k=k)
        return [names[best] for best in ranked.indices[:, 0].tolist()]

    seen = {"num_frames": 0}
    with eval_mode(model):
        batch_iter = _video_batches(dataset, batch_size, device, frames, seen)
        result = vqa_task.answer_accuracy(batch_iter, answer, "video QA")
    if output is not None:
        atomic_write_json(output, [{"question_id": q, "answer": a} for q, a in result["predictions"].items()])
    return {**result, **seen}


# ---- video captioning ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_caption(
    model: nn.Module,
    dataset: Dataset,
    tokenizer: Any,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    prompt: str = "",
    beam_size: int = 5,
    max_length: int = 25,
    min_length: int = 8,
    num_frames: int | None = None,
    frame_sampling: str = "official",
    output: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Video caption metrics of ``model`` (a caption model) on test-form samples (``video``, ``captions`` =
    all gold captions, ``video_id``). The prompt's tokens are cut from the generated text (official VATEX:
    prompt "a picture of", beam 10, min 15, max 25).

    Returns: {"BLEU_1".."BLEU_4", "ROUGE_L", "CIDEr", "count", "num_frames", "notes", "predictions"}.
    """
    frames = _frame_sampler(num_frames, frame_sampling)
    options = dict(beam_size=beam_size, max_length=max_length, min_length=min_length)
    seen = {"num_frames": 0}
    with eval_mode(model):
        result = caption_task.caption_evaluation(
            _video_batches(dataset, batch_size, device, frames, seen),
            tokenizer,
            lambda batch, prompt: video_caption_generate(model, batch["videos"], prompt, **options),
            prompt,
            max_length,
            device,
            id_key="video_id",
            output=output,
        )
    return {**result, **seen}


# ---- video-text retrieval ------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_retrieval(
    model: nn.Module,
    dataset: Dataset,
    tokenizer: Any,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    k: int = 128,
    max_length: int = 35,
    add_itc: bool = True,
    num_frames: int | None = None,
    frame_sampling: str = "official",
    output: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Video-text recall of ``model`` (a retrieval model) over the whole gallery (official
    ``retrieval_vid_mplug.py``: texts up to 35 tokens, k_test 128, score = ITM logit + ITC similarity).

    Returns:
        {"txt_r1".."txt_r10", "txt_r_mean", "img_r1".., "img_r_mean", "r_mean" (percent; "txt" = video ->
         text, "img" = text -> video, the image-retrieval names), "txt_medr", "img_medr" (median rank,
         1 = first), the recalls prefixed "itc/" (mean-frame ITC alone), "num_videos", "num_texts",
         "num_frames"}.
    """
    frames = _frame_sampler(num_frames, frame_sampling)
    texts, txt2vid, vid2txt = retrieval_task.gallery(dataset, "video")
    # [N, T, 3, R, R]
    videos = frames(torch.stack([dataset.video(j) for j in range(len(vid2txt))]).to(device))
    enc = tokenizer(list(texts), padding="longest", max_length=max_length, truncation=True)
    ids, mask = enc.input_ids.to(device), enc.attention_mask.bool().to(device)
    with eval_mode(model):
        scores = video_retrieval_scores(model, videos, ids, mask, k=k, batch_size=batch_size, add_itc=add_itc)
    result = retrieval_task.recall_result(scores, vid2txt, txt2vid, output, ("v2t", "t2v"))
    r_v = ranks_image_to_text(scores.i2t.double().cpu(), vid2txt)
    r_t = ranks_text_to_image(scores.t2i.double().cpu(), txt2vid)
    result["txt_medr"] = float((r_v + 1).double().median())
    result["img_medr"] = float((r_t + 1).double().median())
    result.update(num_videos=len(vid2txt), num_texts=len(texts), num_frames=videos.shape[1])
    return result


# ---- the tasks -------------------------------------------------------------------------------------------


class _VideoTask(Task):
    """A zero-shot video task: the model (and checkpoint) of ``image_task``, evaluated on videos."""

    trainable = False
    image_task: ClassVar[Task]
    eval_options = {"k": 128}

    @property
    def model_class(self) -> type[MPlug]:  # type: ignore[override]
        return self.image_task.model_class

    @property
    def checkpoint_task(self) -> Task:
        return self.image_task

    def new_model(self, config: MPlugConfig) -> MPlug:
        """The image task's model (a video task loads that task's checkpoints)."""
        return self.image_task.new_model(config)

    def not_trainable_reason(self) -> str:
        image = self.image_task.name
        return (
            f"task {self.name} is zero-shot (evaluate only): finetune the image task instead "
            f"(mplug-fast train --task {image} ...), then run mplug-fast evaluate --task {self.name} "
            f"--checkpoint <that {image} run>"
        )

    def collate(self, tokenizer: Any = None, **options: Any) -> Callable[[list], dict[str, Any]]:
        """Videos are collated without text processing (`collate_videos`); tokenizer and options unused."""
        return collate_videos

    def synthetic_dataset(self, split: str = "train", **world: Any) -> Dataset:
        """Moving-shapes videos of the run's synthetic world (``mplug_fast.data.synthetic.video``)."""
        s = synthetic_scenes(split, **world)
        keys = ("image_size", "max_objects", "min_objects", "seed", "object_scale")  # the same objects
        video_world = SyntheticVideoWorld(**{k: getattr(s.world, k) for k in keys})
        return self._videos(video_world, s, split)

    @abc.abstractmethod
    def _videos(self, world: SyntheticVideoWorld, scenes: SyntheticScenes, split: str) -> Dataset:
        """The task's video dataset over ``scenes``."""


class VideoQATask(_VideoTask):
    name = "video_qa"
    metric = "vqa_acc"
    image_task = vqa_task.VQATask()
    predictions_file = "video_qa_result.json"
    reader = VideoQAJsonlDataset
    evaluate = staticmethod(evaluate_qa)
    baseline = staticmethod(vqa_task.baseline)  # the majority training answer (reads texts, not videos)

    def _videos(self, world: SyntheticVideoWorld, scenes: SyntheticScenes, split: str) -> Dataset:
        types = [t for t in (scenes.vqa_types or VIDEO_QA_TYPES) if t in VIDEO_QA_TYPES] or list(
            VIDEO_QA_TYPES
        )
        return VideoQADataset(world, scenes.count, scenes.start, types=types)


class VideoCaptionTask(_VideoTask):
    name = "video_caption"
    metric = "CIDEr"
    image_task = caption_task.CaptionTask()
    # official zero-shot VATEX prompt (fidelity §5; it also uses beam 10 / min 15 for its long captions)
    eval_options = {"prompt": "a picture of", "beam_size": 5, "min_length": 8, "max_length": 25}
    predictions_file = "video_caption_result.json"
    reader = VATEXCaptionDataset
    evaluate = staticmethod(evaluate_caption)
    baseline = staticmethod(caption_task.baseline)  # the most frequent training caption for every video

    def _videos(self, world: SyntheticVideoWorld, scenes: SyntheticScenes, split: str) -> Dataset:
        form = "train" if split == "train" else "test"
        return VideoCaptionDataset(world, scenes.count, scenes.start, split=form)


class VideoRetrievalTask(_VideoTask):
    name = "video_retrieval"
    metric = "r_mean"
    image_task = retrieval_task.RetrievalTask()
    predictions_file = "video_retrieval_top10.json"
    reader = VideoRetrievalJsonlDataset
    evaluate = staticmethod(evaluate_retrieval)
    baseline = staticmethod(functools.partial(retrieval_task.baseline, item="video"))  # chance recall

    def _videos(self, world: SyntheticVideoWorld, scenes: SyntheticScenes, split: str) -> Dataset:
        return VideoRetrievalDataset(world, scenes.count, scenes.start)

"""`mplug_fast.pipeline(task, checkpoint)`: one call from images and text to answers, captions, boxes, scores.

    >>> vqa = mplug_fast.pipeline("vqa", "mplug_base_vqa.pth")          # an official checkpoint
    >>> vqa.answer("cat.jpg", "what animal is this?")
    'cat'
    >>> cap = mplug_fast.pipeline("caption", "runs/caption_tiny_synthetic")  # a run folder (its model/)
    >>> cap.caption(["a.jpg", "b.png"])
    ['a dog on a couch', 'two people on a beach']
    >>> mplug_fast.pipeline("grounding", config="tiny").ground(img, "the red square")  # random weights
    [12.0, 30.5, 40.1, 55.0]

Checkpoints (told apart by `mplug_fast.checkpoint.resolve_checkpoint`; `Pipeline.source` says which was
loaded): a run folder of `mplug-fast train` (its final `model/`), a folder written by `save_pretrained`
(`from_pretrained`; a model saved for another task lends the components this task shares), an official
`.pth` (`load_official_checkpoint`), a trainer checkpoint `step-*.pt`, or None with a preset name /
`MPlugConfig` / config file as `config=` (random weights, with a logged warning: tests and demos only).

Preprocessing is the official evaluation transform: bicubic resize to the model's resolution + CLIP
mean/std (`mplug_fast.data.test_transform`); grounding uses the TransVG eval transform (long side to the
resolution, centred zero padding; CLIP statistics by default, `grounding_normalization="imagenet"`
reproduces the official evaluation's mismatch) and maps the box back to pixels of the original image.
Every method takes one input or a batch (a list, or a 4-D array / tensor) and returns one result or a
list; a single text or image is paired with every item of the other's batch. Large batches run in
chunks of `batch_size`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mplug_fast.checkpoint import CheckpointSource, resolve_checkpoint
from mplug_fast.config import MPlugConfig, get_config
from mplug_fast.data.grounding_transform import IMAGENET_MEAN, IMAGENET_STD, GroundingTransform
from mplug_fast.data.tokenizer import Tokenizer
from mplug_fast.data.transforms import CLIP_MEAN, CLIP_STD, TestTransform
from mplug_fast.inference.generate import caption_generate
from mplug_fast.inference.grounding import PadGeometry, coordinate_token_ids, ground_tokens, tokens_to_box
from mplug_fast.inference.inputs import (
    ImageInput,
    broadcast,
    image_list,
    prompt_ids,
    text_list,
    tokenize,
)
from mplug_fast.inference.layout import LAYOUTS, pack_decoder, resolve_layout
from mplug_fast.inference.precision import auto_dtype, quantize_decoder
from mplug_fast.inference.retrieval import RetrievalScores, retrieval_scores
from mplug_fast.modeling import (
    MPlug,
    MPlugForCaption,
    MPlugForGrounding,
    MPlugForPretraining,
    MPlugForRetrieval,
    MPlugForVQA,
)
from mplug_fast.tasks import TASKS, from_pretrained, get_task, load_official_checkpoint, task_name
from mplug_fast.tasks.vqa import AnswerList, answer_batch, answer_tokens
from mplug_fast.train.distributed import check_device
from mplug_fast.train.evaluation import load_for_evaluation
from mplug_fast.train.precision import DTYPES as PRECISIONS

logger = logging.getLogger(__name__)

METHOD_MODELS: dict[str, tuple[type[MPlug], ...]] = {  # pipeline method -> the models that own what it runs
    "answer": (MPlugForVQA, MPlugForPretraining),
    "caption": (MPlugForCaption,),
    "ground": (MPlugForGrounding,),
    "rank": (MPlugForRetrieval, MPlugForPretraining),
}


def _first(*values):
    """The first value that is not None (call argument > pipeline default > official setting)."""
    return next(v for v in values if v is not None)


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype | None:
    """'bf16' / 'bfloat16' / 'half' / torch.bfloat16 / None -> torch dtype (None: keep the checkpoint's);
    'auto': chosen from the machine for `device` (`mplug_fast.inference.precision.auto_dtype`)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto_dtype(device)
    found = PRECISIONS.get(dtype, getattr(torch, str(dtype), None))  # training's short names, torch's names
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ValueError(
            f"unknown dtype {dtype!r}; use auto, float32, bfloat16, float16 (or fp32, bf16, fp16)"
        )
    return found


def resolve_config(config: str | os.PathLike | MPlugConfig) -> MPlugConfig:
    """A preset name ('tiny', 'base', ...), a `.json` / `.yaml` config file, or an `MPlugConfig`."""
    if isinstance(config, MPlugConfig):
        return config
    path = Path(config)
    if path.suffix in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        return MPlugConfig.from_json(path) if path.suffix == ".json" else MPlugConfig.from_yaml(path)
    return get_config(str(config))


def _load(
    task: str, checkpoint: str | os.PathLike | None, config: str | os.PathLike | MPlugConfig | None
) -> tuple[MPlug, CheckpointSource | None]:
    """(the `task` model, what was loaded: None for random weights)."""
    if checkpoint is None:
        if config is None:
            raise ValueError(
                "give a checkpoint (a run folder, save_pretrained folder, official .pth or step-*.pt), or "
                "config= a preset name for a randomly initialised model"
            )
        logger.warning(
            "no checkpoint: the %s model has RANDOM weights (config %s); outputs are meaningless "
            "(use this for tests and demos only)",
            task,
            config if isinstance(config, (str, Path)) else "given",
        )
        return get_task(task).build_model(resolve_config(config)), None
    source = resolve_checkpoint(checkpoint)
    if source.kind in ("run", "pretrained"):
        model = from_pretrained(source.path, task=task)
    elif source.kind == "trainer":
        model = load_for_evaluation(source, task)[0]
    else:
        image_res = None if config is None else resolve_config(config).vision.image_size
        model = load_official_checkpoint(source.state, task, image_res=image_res)
    logger.info("loaded the %s model from %s", task, source)
    return model, source


class Pipeline:
    """Inference on one model; see the module docstring. Build it with `mplug_fast.pipeline`.

    Args:
        model: the task model.  tokenizer: None = the shipped bert-base-uncased tokenizer.
        beam_size / max_length / min_length: generation defaults (None: the official settings of the
            task: VQA beam 5, max 10, min 1; captioning beam 5, max 25, min 8).
        prompt: captioning prompt ('' = none; VATEX used 'a picture of').
        answer_list: VQA by ranking these answers (official `rank_answer`) instead of generating.
        k_test: candidates of the answer ranking (128) and of the ITM rerank in retrieval (256).
        double_count_first: answer ranking with the official double-counted first token.
        max_text_length: longest text in tokens before truncation (None: the task's training length).
        batch_size: images per model call.
        grounding_normalization: "clip" (the training statistics) or "imagenet" (the official eval).
        progress: a tqdm progress bar on stderr (None: when an input needs more than one model call;
            never for a single image).
        source: what the model was loaded from (`mplug_fast.checkpoint.resolve_checkpoint`), kept as
            `self.source` (None: random weights or a model built in code).
    """

    def __init__(
        self,
        model: MPlug,
        tokenizer: Tokenizer | None = None,
        *,
        beam_size: int | None = None,
        max_length: int | None = None,
        min_length: int | None = None,
        prompt: str = "",
        answer_list: Sequence[str] | None = None,
        k_test: int | None = None,
        double_count_first: bool = True,
        max_text_length: int | None = None,
        batch_size: int = 16,
        grounding_normalization: str = "clip",
        progress: bool | None = None,
        source: CheckpointSource | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if grounding_normalization not in ("clip", "imagenet"):
            raise ValueError(
                f"grounding_normalization must be 'clip' or 'imagenet', got {grounding_normalization!r}"
            )
        self.model = model.eval()
        self.task = model.task
        self.tokenizer = tokenizer or Tokenizer()
        self.beam_size, self.max_length, self.min_length = beam_size, max_length, min_length
        self.prompt = prompt
        self.k_test = k_test
        self.double_count_first = double_count_first
        # the official training text length of the model's task (30 when the task is not registered)
        self.max_text_length = max_text_length or getattr(TASKS.get(task_name(model.task)), "text_length", 30)
        self.batch_size = batch_size
        self.progress, self.source = progress, source
        self.image_size = model.config.vision.image_size
        self.test_transform = TestTransform(self.image_size)
        mean, std = (
            (CLIP_MEAN, CLIP_STD) if grounding_normalization == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
        )
        self.grounding_transform = GroundingTransform(self.image_size, train=False, mean=mean, std=std)
        self._answers: AnswerList | None = None
        self.set_answer_list(answer_list)

    # --------------------------------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _require(self, method: str) -> None:
        if not isinstance(self.model, METHOD_MODELS[method]):
            wanted = next(t.name for t in TASKS.values() if t.pipeline_method == method)
            raise TypeError(
                f"{method}() needs a {wanted!r} model; this pipeline holds a {self.task!r} model "
                f"(build mplug_fast.pipeline({wanted!r}, ...))"
            )

    def _pixels(self, images: list) -> Tensor:
        """RGB PIL images -> [b, 3, R, R] on the model's device / dtype (official test transform)."""
        x = torch.stack([self.test_transform(im) for im in images])
        return x.to(device=self.device, dtype=self.dtype)

    def _chunks(self, n: int):
        """Slices of `batch_size` items over `n` inputs, with the progress bar (see `progress`)."""
        show = n > 1 and (n > self.batch_size if self.progress is None else self.progress)
        with tqdm(total=n, desc=self.task, unit="image", disable=not show, dynamic_ncols=True) as bar:
            for start in range(0, n, self.batch_size):
                yield slice(start, min(n, start + self.batch_size))
                bar.update(min(n, start + self.batch_size) - start)

    def set_answer_list(self, answers: Sequence[str] | None) -> None:
        """Rank these answers in `answer` (None: generate). Tokenized once as "[CLS] answer [SEP] [SEP]"."""
        answers = None if answers is None else text_list(list(answers), "answer")[0]
        self._answers = None if answers is None else answer_tokens(self.tokenizer, answers, self.device)

    # --------------------------------------------------------------------------------------- tasks
    @torch.inference_mode()
    def answer(
        self,
        image: ImageInput | Sequence[ImageInput],
        question: str | Sequence[str],
        *,
        beam_size: int | None = None,
        max_length: int | None = None,
        min_length: int | None = None,
        cuda_graph: bool = False,
    ) -> str | list[str]:
        """Answers a question about an image (or a batch). Generates with beam search (official: beam 5,
        max 10), or ranks the pipeline's `answer_list`. Returns the answer string(s). `cuda_graph`: replay
        the decode steps as CUDA graphs (beam search on CUDA; docs/native.md)."""
        self._require("answer")
        images, images_batched = image_list(image)
        questions, questions_batched = text_list(question, "question")
        images, questions = broadcast(images, questions, "image", "question")
        ids, mask = tokenize(self.tokenizer, questions, self.max_text_length, "question")
        answers: list[str] = []
        for s in self._chunks(len(images)):
            answers += answer_batch(
                self.model,
                self.tokenizer,
                self._pixels(images[s]),
                ids[s].to(self.device),
                mask[s].to(self.device),
                answers=self._answers,
                k=_first(self.k_test, 128),
                double_count_first=self.double_count_first,
                beam_size=_first(beam_size, self.beam_size, 5),
                max_length=_first(max_length, self.max_length, 10),
                min_length=_first(min_length, self.min_length, 1),
                cuda_graph=cuda_graph,
            )
        return answers if images_batched or questions_batched else answers[0]

    @torch.inference_mode()
    def caption(
        self,
        image: ImageInput | Sequence[ImageInput],
        *,
        prompt: str | None = None,
        method: str = "beam",
        beam_size: int | None = None,
        max_length: int | None = None,
        min_length: int | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        seed: int | None = None,
        cuda_graph: bool = False,
    ) -> str | list[str]:
        """Captions an image (or a batch): beam search (official: beam 5, min 8, max 25), "greedy" or
        "sample" (top_k / top_p / temperature, `seed` for reproducible draws). The prompt is not repeated
        in the returned caption. `cuda_graph`: replay the beam-search decode steps as CUDA graphs."""
        self._require("caption")
        images, batched = image_list(image)
        prompt = self.prompt if prompt is None else prompt
        start_ids = prompt_ids(self.tokenizer, prompt, self.max_text_length)  # [1, Lp]: "[CLS] prompt"
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        captions: list[str] = []
        for s in self._chunks(len(images)):
            x = self._pixels(images[s])
            out = caption_generate(
                self.model,
                x,
                start_ids.expand(x.shape[0], -1).to(self.device),
                method=method,
                beam_size=_first(beam_size, self.beam_size, 5),
                max_length=_first(max_length, self.max_length, 25),
                min_length=_first(min_length, self.min_length, 8),
                top_k=top_k,
                top_p=top_p,
                temperature=temperature,
                generator=generator,
                cuda_graph=cuda_graph,
            )
            captions += [self.tokenizer.decode(row[start_ids.shape[1] :].tolist()) for row in out.ids[:, 0]]
        return captions if batched else captions[0]

    @torch.inference_mode()
    def ground(
        self, image: ImageInput | Sequence[ImageInput], expression: str | Sequence[str]
    ) -> list[float] | list[list[float]]:
        """Locates the referred object: box [x0, y0, x1, y1] in pixels of the original image (or a list)."""
        self._require("ground")
        images, images_batched = image_list(image)
        texts, texts_batched = text_list(expression, "expression")
        images, texts = broadcast(images, texts, "image", "expression")
        ids, mask = tokenize(self.tokenizer, texts, self.max_text_length, "expression")
        prefix_id, coord_ids = coordinate_token_ids(self.tokenizer)
        boxes: list[list[float]] = []
        for s in self._chunks(len(images)):
            chunk = images[s]
            x = torch.stack([self.grounding_transform(im, [0, 0, 0, 0]).image for im in chunk])
            x = x.to(device=self.device, dtype=self.dtype)
            tokens = ground_tokens(
                self.model, x, ids[s].to(self.device), mask[s].to(self.device), prefix_id, coord_ids
            ).cpu()
            for im, tok in zip(chunk, tokens):
                geometry = PadGeometry.of(im.width, im.height, self.image_size)
                boxes.append(tokens_to_box(tok, geometry, int(coord_ids[0])).tolist())
        return boxes if images_batched or texts_batched else boxes[0]

    @torch.inference_mode()
    def rank(
        self, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str], *, k: int | None = None
    ) -> RetrievalScores:
        """Scores every image against every text: ITC for all pairs, then the ITM logit on the top-k of
        each query (official k_test 256). Returns `RetrievalScores` (i2t [Ni, Nt], t2i [Nt, Ni], itc)."""
        self._require("rank")
        pil, _ = image_list(images)
        texts, _ = text_list(texts, "text")
        ids, mask = tokenize(self.tokenizer, texts, self.max_text_length, "text")
        x = torch.cat([self._pixels(pil[s]) for s in self._chunks(len(pil))])
        scores = retrieval_scores(
            self.model,
            x,
            ids.to(self.device),
            mask.to(self.device),
            k=_first(k, self.k_test, 256),
            batch_size=self.batch_size,
        )
        return RetrievalScores(i2t=scores.i2t.cpu(), t2i=scores.t2i.cpu(), itc=scores.itc.cpu())

    def __repr__(self) -> str:
        return (
            f"Pipeline(task={self.task!r}, source={str(self.source)!r}, image_size={self.image_size}, "
            f"device={self.device}, dtype={self.dtype})"
        )


def pipeline_task(name: str) -> str:
    """The registered task behind a pipeline name: a task with a `Task.pipeline_method`, by its name or by
    that method's name ("answer" -> "vqa", "ground" -> "grounding", ...)."""
    served = {t.name: t for t in TASKS.values() if t.pipeline_method is not None}
    for task in served.values():
        if name in (task.name, task.pipeline_method, *task.aliases):
            return task.name
    raise ValueError(f"unknown pipeline task {name!r}; available: {', '.join(served)}")


def pipeline(
    task: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = "auto",
    config: str | os.PathLike | MPlugConfig | None = None,
    quantize: str | None = None,
    layout: str = "auto",
    **options: Any,
) -> Pipeline:
    """A ready-to-use `Pipeline` for `task` ("vqa", "caption", "grounding", "retrieval"; aliases "answer",
    "ground", "rank"). `checkpoint`: a run folder, `save_pretrained` folder, official `.pth` or trainer
    `step-*.pt` (`pipe.source` says which was loaded), or None with `config=` (random weights). `dtype`:
    "auto" (bf16 on CPUs with native bf16, else fp32; on GPU the checkpoint's), a dtype, or None (the
    checkpoint's). `quantize="int8"`: int8 dynamic quantisation of the decoder (CPU fp32; opt-in, it changes
    the logits). `layout`: the decoder's weight layout, "auto" (packed panels on AVX2 CPUs in fp32, else
    plain; `mplug_fast.inference.layout`; plain with `quantize`), "packed" or "plain". `options` go to
    `Pipeline` (beam_size, max_length, prompt, answer_list, progress, ...)."""
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if quantize and layout == "packed":
        raise ValueError("quantize='int8' and layout='packed' exclude each other: int8 layers are not packed")
    name = pipeline_task(task)
    model, source = _load(name, checkpoint, config)
    device = check_device(device)
    dtype = torch.float32 if quantize else resolve_dtype(dtype, device)
    model = model.to(device=device, dtype=dtype)
    if quantize:
        quantize_decoder(model)
    elif resolve_layout(layout, model) == "packed":
        pack_decoder(model)
    return Pipeline(model, source=source, **options)

"""VQA and captioning inference on tensors (docs/fidelity.md §5.1, §5.2, §5.7).

    vqa_generate(model, images, question_ids, question_mask)     beam search over [v'; t'] (beam 5, max 10)
    vqa_rank(model, images, question_ids, question_mask, answers) answer-list ranking with shared K/V
    caption_generate(model, images, prompt_ids=None)             decoder over the image tokens
                                                                  (beam 5, min 8, max 25; greedy; sampling)
    caption_from_memory                                           the same from a decoder memory (videos)

Each function encodes once per image and hands the decoder memory to `mplug_fast.generation`, which
projects its cross-attention K/V once and shares it across beams / candidates / samples.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from mplug_fast.generation import (
    CLS_ID,
    GenerationOutput,
    RankedAnswers,
    beam_search,
    greedy,
    rank_answers,
    sample,
)
from mplug_fast.modeling import MPlug

Method = Literal["beam", "greedy", "sample"]


@torch.no_grad()
def vqa_generate(
    model: MPlug, images: Tensor, question_ids: Tensor, question_mask: Tensor | None, **options: Any
) -> GenerationOutput:
    """Open-ended VQA (official inference): beam search from [CLS] over the fused [image; question].

    Args: images [B, 3, R, R]; question_ids / question_mask [B, Lq] ("[CLS] question [SEP]", 1 = token);
    options: `beam_search`'s (beam_size 5, max_length 10, min_length 1, num_return 1, mode "official";
    `cuda_graph`: replay the decode steps as CUDA graphs).
    Returns: `GenerationOutput` (ids [B, R, L] start with [CLS]; decode with special tokens skipped).
    """
    memory, memory_mask = model.fused_memory(images, question_ids, question_mask)  # [B, Nv + Lq, D]
    start = torch.full((memory.shape[0], 1), CLS_ID, dtype=torch.long, device=memory.device)
    return beam_search(model.decoder, memory, memory_mask, start, **options)


@torch.no_grad()
def vqa_rank(
    model: MPlug,
    images: Tensor,
    question_ids: Tensor,
    question_mask: Tensor | None,
    answer_ids: Tensor,
    answer_mask: Tensor | None,
    **options: Any,
) -> RankedAnswers:
    """VQA by ranking an answer list (official `rank_answer`, §5.7): top-k answers by the probability of
    their first token, then their full log-likelihood, with the question's memory K/V shared by its k
    candidates.

    Args: answer_ids / answer_mask [A, La] ("[CLS] answer [SEP] [SEP]", right-padded); options:
    `rank_answers`'s (k 128; `double_count_first` True keeps the official score, first token counted twice).
    Returns: `RankedAnswers` (indices [B, k] into the answer list, best first).
    """
    memory, memory_mask = model.fused_memory(images, question_ids, question_mask)
    return rank_answers(model.decoder, memory, memory_mask, answer_ids, answer_mask, **options)


@torch.no_grad()
def caption_generate(
    model: MPlug,
    images: Tensor,
    prompt_ids: Tensor | None = None,
    prompt_mask: Tensor | None = None,
    **options: Any,
) -> GenerationOutput:
    """Captioning: the decoder reads the raw image tokens (official caption model) from [CLS] or a prompt.

    Args: images [B, 3, R, R]; the rest as `caption_from_memory`.
    Returns: `GenerationOutput` (ids start with the prompt).
    """
    memory = model.encode_image(images)  # [B, Nv, D]
    return caption_from_memory(model, memory, prompt_ids, prompt_mask, **options)


@torch.no_grad()
def caption_from_memory(
    model: MPlug,
    memory: Tensor,
    prompt_ids: Tensor | None = None,
    prompt_mask: Tensor | None = None,
    *,
    method: Method = "beam",
    beam_size: int = 5,
    max_length: int = 25,
    min_length: int = 8,
    num_return: int = 1,
    mode: Literal["official", "standard"] = "official",
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    cuda_graph: bool = False,
) -> GenerationOutput:
    """The caption decoder over visual tokens memory [B, N, D] (no mask), from [CLS] or a prompt.

    Args:
        prompt_ids / prompt_mask: [B, Lp] "[CLS] prompt" without the final [SEP], left-padded (mask 1 =
            token); None = [CLS].
        method: "beam" (official: beam 5, min 8, max 25; `cuda_graph`: replay the decode steps as CUDA
            graphs, see `beam_search`), "greedy" or "sample" (top_k / top_p / temperature / generator;
            `num_return` samples per image).
    Returns: `GenerationOutput` (ids start with the prompt).
    """
    if prompt_ids is None:
        prompt_ids = torch.full((memory.shape[0], 1), CLS_ID, dtype=torch.long, device=memory.device)
        prompt_mask = None
    if cuda_graph and method != "beam":
        raise ValueError(f"cuda_graph=True applies to method='beam', got method={method!r}")
    args = (model.decoder, memory, None, prompt_ids, prompt_mask)
    lengths = dict(max_length=max_length, min_length=min_length)
    if method == "beam":
        return beam_search(
            *args, beam_size=beam_size, num_return=num_return, mode=mode, cuda_graph=cuda_graph, **lengths
        )
    if method == "greedy":
        return greedy(*args, **lengths)
    if method == "sample":
        options = dict(top_k=top_k, top_p=top_p, temperature=temperature, generator=generator)
        return sample(*args, num_return=num_return, **options, **lengths)
    raise ValueError(f"method must be 'beam', 'greedy' or 'sample', got {method!r}")

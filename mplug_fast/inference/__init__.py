"""Inference on tensors: what each task's predict step runs (docs/fidelity.md §5). The one-line user API
is ``mplug_fast.pipeline``.

vqa_generate, vqa_rank, caption_generate                          generation on tensors
ground_tokens, tokens_to_box, box_to_tokens, PadGeometry          grounding tokens <-> pixel boxes
retrieval_scores, itm_scores                                      ITC top-k then ITM rerank
"""

from mplug_fast.inference.generate import caption_generate, vqa_generate, vqa_rank
from mplug_fast.inference.grounding import (
    PadGeometry,
    box_to_tokens,
    coordinate_token_ids,
    ground_tokens,
    tokens_to_box,
)
from mplug_fast.inference.retrieval import RetrievalScores, itm_scores, retrieval_scores

__all__ = [
    "PadGeometry",
    "RetrievalScores",
    "box_to_tokens",
    "caption_generate",
    "coordinate_token_ids",
    "ground_tokens",
    "itm_scores",
    "retrieval_scores",
    "tokens_to_box",
    "vqa_generate",
    "vqa_rank",
]

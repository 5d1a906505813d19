"""Evaluation metrics: VQA accuracy, caption metrics (BLEU, ROUGE-L, CIDEr-D, METEOR/SPICE wrappers),
retrieval recall, grounding box utilities and accuracy. Pure Python / torch; no network, Java optional."""

from mplug_fast.metrics.caption import caption_scores, cider_d
from mplug_fast.metrics.grounding import grounding_accuracy
from mplug_fast.metrics.retrieval import retrieval_recall
from mplug_fast.metrics.vqa import vqa_accuracy, write_vqa_results

__all__ = [
    "caption_scores",
    "cider_d",
    "grounding_accuracy",
    "retrieval_recall",
    "vqa_accuracy",
    "write_vqa_results",
]

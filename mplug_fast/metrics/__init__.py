"""Evaluation metrics: VQA accuracy, caption metrics (BLEU, ROUGE-L, CIDEr-D, METEOR/SPICE wrappers),
retrieval recall, grounding box utilities and accuracy. Pure Python / torch; no network, Java optional."""

from mplug_fast.metrics.boxes import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_iou_aligned,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    generalized_box_iou_aligned,
)
from mplug_fast.metrics.caption import (
    CiderD,
    bleu,
    caption_scores,
    cider_d,
    meteor,
    ptb_tokenize,
    ptb_tokenize_sentence,
    rouge_l,
    spice,
)
from mplug_fast.metrics.grounding import grounding_accuracy
from mplug_fast.metrics.retrieval import retrieval_recall
from mplug_fast.metrics.vqa import normalize_answer, vqa_accuracy, vqa_score, write_vqa_results

__all__ = [
    "CiderD",
    "bleu",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_iou_aligned",
    "box_xyxy_to_cxcywh",
    "caption_scores",
    "cider_d",
    "generalized_box_iou",
    "generalized_box_iou_aligned",
    "grounding_accuracy",
    "meteor",
    "normalize_answer",
    "ptb_tokenize",
    "ptb_tokenize_sentence",
    "retrieval_recall",
    "rouge_l",
    "spice",
    "vqa_accuracy",
    "vqa_score",
    "write_vqa_results",
]

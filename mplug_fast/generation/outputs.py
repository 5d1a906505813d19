"""What decoding returns, and the BERT token ids it uses by default."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

CLS_ID, SEP_ID, PAD_ID = 101, 102, 0


@dataclass
class GenerationOutput:
    """R hypotheses per sample, best first.

    ids: long [B, R, L] start ids + generated tokens (incl. the final [SEP] if emitted), then pad_id.
    scores: float [B, R]: beam search: cumulative log-prob / length penalty at the hypothesis' last step
        (official); greedy / sample: the sum of the model's log-probs of the generated tokens.
    lengths: long [B, R]: tokens in `ids` before the padding (start ids included).
    """

    ids: Tensor
    scores: Tensor
    lengths: Tensor


@dataclass
class RankedAnswers:
    """indices: long [Q, k] answer-list rows, best first; scores: float [Q, k] (see `rank_answers`);
    probs: float [Q, k] softmax of the scores over the k candidates (what the official code returns)."""

    indices: Tensor
    scores: Tensor
    probs: Tensor

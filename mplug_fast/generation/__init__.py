"""Decoding with the text decoder; the public names are re-exported here.

* `beam.py`: `beam_search`, docs/fidelity.md §5.6 ("official") or a standard beam search; its step is
  `beam_step.py` (native op or Python twin), replayed as CUDA graphs by `graphs.py`;
* `sampling.py`: `greedy` (grounding, §5.5, with `logit_bias`) and `sample` (temperature / top-k / top-p);
* `ranking.py`: `rank_answers` (answer-list ranking, §5.7), `sequence_log_probs` (teacher-forced);
* `state.py`: the decoder side of a batch being decoded; `outputs.py`: result types, token ids.

Every entry point takes `(decoder, memory, memory_mask, ...)`. `memory` is the decoder memory [B, M, D] (VQA
/ grounding: the fused [v'; t'] from `MPlug.fused_memory`; captioning: the image tokens from
`MPlug.encode_image`) or its per-layer cross-attention K/V from `TextDecoder.project_memory`; it is projected
once per sample and shared by every beam, sample and answer candidate, never tiled. `start_ids` [B, Lp] is
[CLS] (101) or a prompt ([CLS] + prompt tokens, without the final [SEP]); prompts of different lengths are
**left**-padded with `start_mask` (the last column must be a real token). Positions are column indices, as
in a full forward of the same padded batch.

`use_cache=False` re-runs the decoder over the whole prefix at every step (the official way, still with the
shared memory K/V): the results of the default incremental decoding (`KVCache`), kept as a baseline. A
finished sample leaves the batch (its rows, memory K/V rows and cache rows); the host synchronises once per
step (beam search: every `sync_every` steps) to count the open samples. No gradients flow through decoding
(`torch.no_grad`); for SCST, re-score the returned ids with `sequence_log_probs` (one teacher-forced forward
that keeps the graph).
"""

from mplug_fast.generation.beam import beam_search, gnmt_length_penalty
from mplug_fast.generation.outputs import CLS_ID, SEP_ID, GenerationOutput, RankedAnswers
from mplug_fast.generation.ranking import rank_answers, sequence_log_probs
from mplug_fast.generation.sampling import greedy, sample, token_bias

__all__ = [
    "CLS_ID",
    "SEP_ID",
    "GenerationOutput",
    "RankedAnswers",
    "beam_search",
    "gnmt_length_penalty",
    "greedy",
    "rank_answers",
    "sample",
    "sequence_log_probs",
    "token_bias",
]

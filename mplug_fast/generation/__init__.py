"""Decoding with the text decoder: beam search, greedy, sampling, answer-list ranking.

One concept per module: `beam.py` (official + standard beam search), `beam_step.py` (its step: native op
or Python twin), `graphs.py` (its steps replayed as CUDA graphs), `sampling.py` (greedy, sampling),
`ranking.py` (sequence log-likelihoods, answer-list ranking), `state.py` (the decoder side of a batch being
decoded), `outputs.py` (result types, token ids). The public names are re-exported here.

    beam_search(decoder, memory, memory_mask, start_ids, ...)    docs/fidelity.md §5.6 ("official") or
                                                                 a standard beam search ("standard")
    greedy(decoder, memory, memory_mask, start_ids, ...)         grounding (§5.5, with `logit_bias`)
    sample(decoder, memory, memory_mask, start_ids, ...)         temperature / top-k / top-p sampling
    rank_answers(decoder, memory, memory_mask, answer_ids, ...)  answer-list ranking (§5.7)
    sequence_log_probs(decoder, memory, memory_mask, ids, ...)   teacher-forced log-likelihoods

`memory` is the decoder memory [B, M, D] (VQA / grounding: the fused [v'; t'] from `MPlug.fused_memory`;
captioning: the image tokens from `MPlug.encode_image`) or its per-layer cross-attention K/V from
`TextDecoder.project_memory`. Either way the memory is projected once per sample and shared by every beam,
sample and answer candidate through `memory_index`; it is never tiled. `start_ids` [B, Lp] is [CLS] (101)
or a prompt ([CLS] + prompt tokens, without the final [SEP]); prompts of different lengths are
**left**-padded with `start_mask` (the last column must be a real token). Positions are column indices,
as in a full forward of the same padded batch. The prompt is run once per sample, then its self-attention
cache is copied to the beams.

Incremental decoding (default, `use_cache=True`) keeps a `KVCache`; `use_cache=False` re-runs the decoder
over the whole prefix at every step (the official way, still with the shared memory K/V): same results,
kept as a baseline for benchmarks and tests.

Finished samples leave the batch: when a sample closes (official beam search: its top beam emits
[SEP]; standard: no running beam can improve it; greedy / sampling: all of its rows emitted [SEP]) its rows,
its memory K/V rows and its cache rows are dropped before the next step, so the decoder only runs the
samples still open. Host synchronisation: one count of the open samples per step (beam search: every
`sync_every` steps) to stop, and to compact when it fell; everything else stays on the device
(`beam_search(cuda_graph=True)`: closed samples stay, frozen, and the steps replay as CUDA graphs). The
beam reorder of the self-attention cache
is a gather into a second preallocated buffer (swapped, `KVCache.reorder`), not an in-place advanced-index
copy.
No gradients flow through decoding (`torch.no_grad`); for SCST, re-score the returned ids with
`sequence_log_probs` (one teacher-forced forward that keeps the graph).
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

"""The decoder side of a batch being decoded (`DecodingState`), shared by beam search, greedy / sampling
and ranking (`as_memory_kv`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mplug_fast.modeling.decoder import MemoryKV, TextDecoder
from mplug_fast.modeling.kv_cache import KVCache
from mplug_fast.modeling.masks import as_bool_mask


def as_memory_kv(decoder: TextDecoder, memory: Tensor | MemoryKV) -> MemoryKV:
    """memory [B, M, D] -> per layer (k, v), each [B, H, M, Dh]; already projected K/V are checked."""
    if isinstance(memory, Tensor):
        return decoder.project_memory(memory)  # per layer: (k, v), each [B, H, M, Dh]
    if len(memory) != len(decoder.layers):
        raise ValueError(f"memory_kv has {len(memory)} layers, the decoder {len(decoder.layers)}")
    return memory


class DecodingState:
    """The decoder side of a batch being decoded: incremental (`KVCache`) or by recomputing the prefix
    (`use_cache=False`).

    `memory` [B, M, D] is projected once (`as_memory_kv`); room is kept for `max_length` new tokens (checked,
    with `min_length`, against each other and the decoder's position table). `start()` runs the prompts once;
    rows start as the B prompts (row b reads memory row b); `expand(index, group)` copies them to G rows
    per sample (beams / samples, contiguous: row n reads memory row n // G, passed to the decoder as the
    int `memory_index` G, so the memory K/V is never gathered per row); `advance(tokens, select)` reorders
    rows within their sample and appends a token.
    """

    def __init__(
        self,
        decoder: TextDecoder,
        memory: Tensor | MemoryKV,
        memory_mask: Tensor | None,
        start_ids: Tensor,
        start_mask: Tensor | None,
        max_length: int,
        min_length: int,
        use_cache: bool,
    ):
        B, Lp = start_ids.shape
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if min_length < 0:
            raise ValueError(f"min_length must be >= 0, got {min_length}")
        if Lp + max_length > decoder.embeddings.max_positions:
            raise ValueError(
                f"prompt ({Lp}) + max_length ({max_length}) = {Lp + max_length} tokens exceed "
                f"max_position_embeddings={decoder.embeddings.max_positions}"
            )
        memory_kv = as_memory_kv(decoder, memory)
        if memory_kv[0][0].is_cpu:
            # Each head's K/V rows contiguous (one copy per image): every step's cross-attention then reads
            # them as one stream instead of 64-float pieces of the fused K/V projection's rows.
            memory_kv = [(k.contiguous(), v.contiguous()) for k, v in memory_kv]
        memory_mask, start_mask = as_bool_mask(memory_mask), as_bool_mask(start_mask)
        if memory_mask is not None and bool(memory_mask.all()):
            memory_mask = None  # nothing masked: every step's cross-attention runs without a mask
        Bm = memory_kv[0][0].shape[0]
        if Bm != B:
            raise ValueError(
                f"start_ids has {B} rows but the memory has {Bm}; give one prompt per memory row"
            )
        if start_mask is not None:
            if start_mask.shape != start_ids.shape:
                raise ValueError(
                    f"start_mask must have the shape of start_ids {list(start_ids.shape)}, "
                    f"got {list(start_mask.shape)}"
                )
            if not bool(start_mask[:, -1].all()):
                raise ValueError("prompts must be left-padded: the last column of start_mask must be all 1")
        self.decoder = decoder
        self.memory_kv = memory_kv
        self.memory_mask = memory_mask
        self.memory_index: int | None = None  # None: rows are the B prompts; G: row n reads memory row n // G
        self.use_cache = use_cache
        self.ids = start_ids  # full prefix [N, L] (no-cache mode only)
        self.mask = start_mask  # bool [N, L] or None (no-cache mode only)
        self.cache: KVCache | None = decoder.new_cache(Lp + max_length) if use_cache else None

    def _last_logits(self, ids: Tensor, mask: Tensor | None) -> Tensor:
        kv = dict(memory_kv=self.memory_kv, memory_index=self.memory_index, cache=self.cache)
        return self.decoder(ids, mask, None, self.memory_mask, **kv, last_only=True).float()  # [N, V]

    def start(self) -> Tensor:
        """Run the prompts: next-token logits [B, V] (fp32)."""
        return self._last_logits(self.ids, self.mask)

    def expand(self, index: Tensor, group: int | None = None) -> None:
        """Rows become the old rows `index` [N']; `group`: G after copying each prompt to G rows (None: the
        rows stay in their sample, e.g. a beam reorder)."""
        if group is not None:
            self.memory_index = group
        if self.cache is not None:
            self.cache.reorder(index)
        else:
            self.ids = self.ids[index]
            self.mask = None if self.mask is None else self.mask[index]

    def keep_samples(self, keep: Tensor) -> None:
        """Drop finished samples: only the memory rows `keep` (long [B'], increasing) stay. The caller
        then selects their decoder rows with `advance(tokens, select)`."""
        self.memory_kv = [(k.index_select(0, keep), v.index_select(0, keep)) for k, v in self.memory_kv]
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask.index_select(0, keep)

    def advance(self, tokens: Tensor, select: Tensor | None = None) -> Tensor:
        """Reorder rows by `select` [N] (None = keep), append `tokens` [N]; next-token logits [N, V]."""
        if select is not None:
            self.expand(select)
        tokens = tokens[:, None]  # [N, 1]
        if self.cache is not None:
            return self._last_logits(tokens, None)
        self.ids = torch.cat([self.ids, tokens], dim=1)  # copy: [N, L + 1]
        if self.mask is not None:
            self.mask = F.pad(self.mask, (0, 1), value=True)  # copy: [N, L + 1]
        return self._last_logits(self.ids, self.mask)

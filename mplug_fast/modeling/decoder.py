"""The text decoder (official `BertLMHeadModel` / `BertPrefixModel`): 12 post-LN layers of
causal self-attention -> cross-attention to a memory -> FFN, and a tied LM head.

Memory per task: VQA / grounding / PrefixLM read the fused [image; text]; captioning reads the
raw image tokens. The cross-attention K/V of a memory can be projected once
(`project_memory`) and shared by every candidate, beam and step via `memory_index`.

Incremental decoding: `new_cache(max_length)` builds a `KVCache`; `forward(ids_new, ..., cache=cache)`
(or `step`) runs only the new tokens, at positions cache.length .. cache.length + l - 1, attending to the
cached keys (causal + the key-padding mask of every cached token, so left-padded prompts work) and
advances the cache. Positions are column indices, as in the uncached forward: a left-padded prompt gives
the logits of the same padded batch recomputed in full, not those of the unpadded prompt.
"""

from __future__ import annotations

from torch import Tensor, nn

from mplug_fast.config import MPlugConfig
from mplug_fast.modeling import native_decode
from mplug_fast.modeling.heads import LMHead
from mplug_fast.modeling.kv_cache import KVCache
from mplug_fast.modeling.layers import TransformerLayer
from mplug_fast.modeling.masks import as_bool_mask
from mplug_fast.modeling.text import BertEmbeddings, bert_layer_args
from mplug_fast.ops.registry import BackendCache

MemoryKV = list[tuple[Tensor, Tensor]]  # per layer: (k, v), each [Bm, H, M, Dh]


class TextDecoder(nn.Module):
    """Causal BERT decoder with cross-attention and an LM head tied to its word embeddings."""

    def __init__(self, config: MPlugConfig):
        super().__init__()
        text = config.text
        self.embeddings = BertEmbeddings(text)
        self.layers = nn.ModuleList(
            TransformerLayer(**bert_layer_args(config), cross_attention=True)
            for _ in range(config.decoder.layers)
        )
        self.head = LMHead(text.hidden_size, text.vocab_size, text.layer_norm_eps)
        self.native_plans = BackendCache()  # whether the native decoder layers apply, per static key

    def project_memory(self, memory: Tensor) -> MemoryKV:
        """memory: [Bm, M, D] -> per-layer cross-attention (k, v), each [Bm, H, M, Dh]."""
        return [layer.cross.project_kv(memory) for layer in self.layers]

    def new_cache(self, max_length: int) -> KVCache:
        """An empty self-attention cache for up to `max_length` positions (buffers allocated on first use)."""
        return KVCache(len(self.layers), max_length)

    def forward(
        self,
        ids: Tensor,
        mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        *,
        memory_kv: MemoryKV | None = None,
        memory_index: Tensor | int | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Next-token logits.

        Args:
            ids: long [N, L] decoder input (starts with [CLS]); with `cache`, only the new tokens.
            mask: [N, L] 1 = token (with `cache`: the new tokens' mask; the cache keeps the earlier ones).
            memory: [Bm, M, D] cross-attention memory, or its `memory_kv` from `project_memory`
                (required with `cache`).
            memory_mask: [Bm, M] 1 = attend (None = all).
            memory_index: long [N]: memory row of each sequence (None when Bm == N), or an int G: contiguous
                groups of G rows per memory row (see `CrossAttention.forward`).
            cache: a `KVCache` from `new_cache`: positions start at cache.length, the new keys/values are
                written into it and it is advanced by L.
            last_only: run the LM head on the last position only (decoding): logits [N, V].
        Returns:
            logits [N, L, V] ([N, V] with `last_only`)
        """
        if (memory is None) == (memory_kv is None):
            raise ValueError("TextDecoder needs exactly one of `memory` or `memory_kv`")
        N, L = ids.shape
        mask = as_bool_mask(mask, ids.shape)
        memory_mask = as_bool_mask(memory_mask)
        offset = 0
        if cache is not None:
            if memory_kv is None:
                # Projecting the memory at every step is what the cache exists to avoid.
                raise ValueError(
                    "incremental decoding needs `memory_kv` (TextDecoder.project_memory(memory))"
                )
            if cache.num_layers != len(self.layers):
                raise ValueError(f"the cache has {cache.num_layers} layers, the decoder {len(self.layers)}")
            offset = cache.length
            cache.append_mask(mask, N, L, ids.device)
            mask = cache.key_mask(L)  # [N, cache.length + L] over cached + new keys, or None
        x = self.embeddings(ids, position_offset=offset)  # [N, L, D]
        shared = dict(memory=memory, memory_mask=memory_mask, memory_index=memory_index, cache=cache)
        kvs = [None] * len(self.layers) if memory_kv is None else memory_kv
        params = None
        if cache is not None:
            params = native_decode.plan(
                self.layers, self.native_plans, x, mask, memory_kv, memory_mask, memory_index, cache
            )
        if params is not None:  # one native call for every layer (same kernels, same result)
            x = native_decode.run(self.layers, params, x, mask, memory_kv, memory_mask, cache)
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, mask, causal=True, memory_kv=kvs[i], layer=i, **shared)
        if cache is not None:
            cache.advance(L)
        return self.head(x[:, -1] if last_only else x, self.embeddings.word.weight)

    def step(
        self,
        ids: Tensor,
        cache: KVCache,
        memory_kv: MemoryKV,
        memory_mask: Tensor | None = None,
        memory_index: Tensor | int | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """One incremental call: ids long [N, l] new tokens (mask [N, l] 1 = token) -> logits [N, l, V]."""
        return self.forward(
            ids, mask, None, memory_mask, memory_kv=memory_kv, memory_index=memory_index, cache=cache
        )

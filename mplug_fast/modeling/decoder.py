"""The text decoder (official `BertLMHeadModel` / `BertPrefixModel`): 12 post-LN layers of
causal self-attention -> cross-attention to a memory -> FFN, and a tied LM head.

Memory per task: VQA / grounding / PrefixLM read the fused [image; text]; captioning reads the
raw image tokens. The cross-attention K/V of a memory can be projected once
(`project_memory`) and shared by every candidate, beam and step via `memory_index`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mplug_fast.config import MPlugConfig
from mplug_fast.modeling.heads import LMHead
from mplug_fast.modeling.layers import TransformerLayer
from mplug_fast.modeling.text import BertEmbeddings, as_bool_mask, bert_layer_args

MemoryKV = list[tuple[Tensor, Tensor]]  # per layer: (k, v), each [Bm, H, M, Dh]


class TextDecoder(nn.Module):
    """Causal BERT decoder with cross-attention and an LM head tied to its word embeddings."""

    def __init__(self, config: MPlugConfig):
        super().__init__()
        text = config.text
        self.embeddings = BertEmbeddings(text)
        self.layers = nn.ModuleList(
            TransformerLayer(**bert_layer_args(text), cross_attention=True, backend=config.attention_backend)
            for _ in range(config.decoder.layers)
        )
        self.head = LMHead(text.hidden_size, text.vocab_size, text.layer_norm_eps)

    def project_memory(self, memory: Tensor) -> MemoryKV:
        """memory: [Bm, M, D] -> per-layer cross-attention (k, v), each [Bm, H, M, Dh]."""
        return [layer.cross.project_kv(memory) for layer in self.layers]

    def hidden_states(
        self,
        ids: Tensor,
        mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        *,
        memory_kv: MemoryKV | None = None,
        memory_index: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states [N, L, D]; arguments as in `forward`."""
        if (memory is None) == (memory_kv is None):
            raise ValueError("TextDecoder needs exactly one of `memory` or `memory_kv`")
        mask = as_bool_mask(mask, ids.shape)
        if memory_mask is not None and memory_mask.dtype != torch.bool:
            memory_mask = memory_mask != 0
        x = self.embeddings(ids)  # [N, L, D]
        for i, layer in enumerate(self.layers):
            x = layer(
                x,
                mask,
                causal=True,
                memory=memory,
                memory_mask=memory_mask,
                memory_kv=None if memory_kv is None else memory_kv[i],
                memory_index=memory_index,
            )
        return x

    def forward(
        self,
        ids: Tensor,
        mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        *,
        memory_kv: MemoryKV | None = None,
        memory_index: Tensor | None = None,
    ) -> Tensor:
        """Next-token logits.

        Args:
            ids: long [N, L] decoder input (starts with [CLS]).  mask: [N, L] 1 = token.
            memory: [Bm, M, D] cross-attention memory, or its `memory_kv` from `project_memory`.
            memory_mask: [Bm, M] 1 = attend (None = all).
            memory_index: long [N]: memory row of each sequence (None when Bm == N).
        Returns:
            logits [N, L, V]
        """
        h = self.hidden_states(ids, mask, memory, memory_mask, memory_kv=memory_kv, memory_index=memory_index)
        return self.head(h, self.embeddings.word.weight)

"""`PackedEmbedding`: a word-embedding table stored as panels, so that the tied LM head streams it packed.

The decoder's LM head multiplies every step's rows by the whole word-embedding matrix [V, D] (the tied
weight: 94 MB at base). `PackedEmbedding` holds that matrix as panels [ceil(V/16), D, 16] (the rows past V
are zeros), the layout the native `packed_linear` op reads fastest; the embedding lookup reads a token's
vector across its panel (16 floats apart), which costs nothing next to the head. As for `PackedLinear`:

* `state_dict()` holds `weight` [V, D] as `nn.Embedding` does, and `load_state_dict` takes it;
* without autograd the lookup indexes the panels; with autograd it is `F.embedding` on the unpacked
  table (the padding row gets no gradient, as in nn.Embedding);
* `from_embedding` / `to_embedding` convert exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug_fast.modeling.packed_linear import pack_loaded
from mplug_fast.ops.packed_linear import PANEL, pack, unpack


class PackedEmbedding(nn.Module):
    """`nn.Embedding(num_embeddings, embedding_dim, padding_idx)` with its table as panels
    weight [ceil(num_embeddings / 16), embedding_dim, 16]."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        panels = -(-num_embeddings // PANEL)
        self.weight = nn.Parameter(torch.zeros(panels, embedding_dim, PANEL))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> PackedEmbedding:
        """The packed twin of `embedding` (same device, dtype and values; `requires_grad` kept)."""
        w = embedding.weight
        out = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx)
        out = out.to(w.device, w.dtype)
        out.weight = nn.Parameter(_pack_rows(w.detach()), requires_grad=w.requires_grad)
        return out.train(embedding.training)

    def to_embedding(self) -> nn.Embedding:
        """The `nn.Embedding` with the same table."""
        w = self.weight
        out = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx)
        out = out.to(w.device, w.dtype)
        out.weight = nn.Parameter(self.table().detach(), requires_grad=w.requires_grad)
        return out.train(self.training)

    def table(self) -> Tensor:
        """The table [num_embeddings, embedding_dim] (a new tensor; differentiable)."""
        return unpack(self.weight)[: self.num_embeddings]

    def forward(self, ids: Tensor) -> Tensor:
        """ids: long [...] -> [..., embedding_dim]."""
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return F.embedding(ids, self.table(), self.padding_idx)
        return self.weight[torch.div(ids, PANEL, rounding_mode="floor"), :, ids % PANEL]

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # nn.Embedding's entry: the table [V, D] (new; autograd-linked with keep_vars).
        destination[prefix + "weight"] = self.table() if keep_vars else self.table().detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        pack_loaded(state_dict, prefix + "weight", (self.num_embeddings, self.embedding_dim), _pack_rows)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, panel={PANEL}"


def _pack_rows(table: Tensor) -> Tensor:
    """table [V, D] -> panels [ceil(V/16), D, 16], the rows past V zero."""
    pad = -table.shape[0] % PANEL
    return pack(F.pad(table, (0, 0, 0, pad)) if pad else table)

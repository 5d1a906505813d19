"""BERT embeddings and the text encoder (official MM `BertModel` with 6 layers, no cross-attention).

Post-LN layers, erf GELU, LayerNorm eps 1e-12, absolute positions, token type 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mplug_fast.config import MPlugConfig, TextConfig
from mplug_fast.modeling.layers import TransformerLayer
from mplug_fast.modeling.masks import as_bool_mask


class BertEmbeddings(nn.Module):
    """word + position + token-type embeddings -> LayerNorm -> dropout."""

    def __init__(self, config: TextConfig):
        super().__init__()
        D = config.hidden_size
        self.max_positions = config.max_position_embeddings
        self.word = nn.Embedding(config.vocab_size, D, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, D)
        self.token_type = nn.Embedding(config.type_vocab_size, D)
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, ids: Tensor, token_type_ids: Tensor | None = None, position_offset: int = 0) -> Tensor:
        """ids: long [B, L] -> [B, L, D]; positions run position_offset .. position_offset + L - 1."""
        if ids.dim() != 2:
            raise ValueError(f"token ids must be [B, L], got {list(ids.shape)}")
        L = ids.shape[1]
        if position_offset + L > self.max_positions:
            raise ValueError(
                f"text of {position_offset + L} tokens is longer than max_position_embeddings="
                f"{self.max_positions}; truncate it (the tokenizer's max_length)"
            )
        positions = torch.arange(position_offset, position_offset + L, device=ids.device)  # [L]
        x = self.word(ids) + self.position(positions)  # [B, L, D]
        x = x + (self.token_type.weight[0] if token_type_ids is None else self.token_type(token_type_ids))
        return self.dropout(self.norm(x))


def bert_layer_args(config: MPlugConfig) -> dict:
    """The `TransformerLayer` arguments of a BERT layer: the text config's widths and dropouts, and the
    model's attention backend."""
    text = config.text
    return dict(
        dim=text.hidden_size,
        num_heads=text.heads,
        intermediate_dim=text.intermediate_size,
        layer_norm_eps=text.layer_norm_eps,
        dropout=text.hidden_dropout,
        attn_dropout=text.attention_dropout,
        backend=config.attention_backend,
    )


class TextEncoder(nn.Module):
    """Unimodal BERT text encoder: embeddings + `text.encoder_layers` self-attention layers."""

    def __init__(self, config: MPlugConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(config.text)
        self.layers = nn.ModuleList(
            TransformerLayer(**bert_layer_args(config)) for _ in range(config.text.encoder_layers)
        )

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """ids: long [B, L]; mask: [B, L] (1/True = token, 0/False = padding) -> [B, L, D]."""
        mask = as_bool_mask(mask, ids.shape)
        x = self.embeddings(ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x

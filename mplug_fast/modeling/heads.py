"""Output heads: the BERT LM head (decoder, MLM) with its weight tied to the word embeddings, and the
classifier MLP of the classification tasks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug_fast.ops.packed_linear import packed_linear
from mplug_fast.ops.small_linear import linear, small_linear, small_rows


class LMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> logits with the word-embedding matrix (tied) + a bias.

    The tied weight is passed at call time, so the state dict holds it once (the official
    `cls.predictions.decoder.weight` is the same tensor as the word embeddings).
    """

    def __init__(self, dim: int, vocab_size: int, layer_norm_eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, h: Tensor, word_embeddings: Tensor) -> Tensor:
        """h: [..., D]; word_embeddings: [V, D], or the panels [ceil(V/16), D, 16] of a `PackedEmbedding`
        -> logits [..., V]."""
        h = self.norm(F.gelu(linear(self.dense, h)))
        if word_embeddings.dim() == 3:  # packed: the padded vocabulary cut off, then the bias (its order)
            V = self.bias.shape[0]
            return packed_linear(h, word_embeddings, None)[..., :V] + self.bias
        if small_rows(h, word_embeddings):
            return small_linear(h, word_embeddings, self.bias)
        rows = h.numel() // h.shape[-1]
        eager = not torch.compiler.is_compiling() and not torch.is_grad_enabled()
        if eager and h.is_cpu and h.dtype == torch.float32 and 2 <= rows <= 64:
            return vocab_logits_blocked(h, word_embeddings, self.bias)
        return F.linear(h, word_embeddings, self.bias)


VOCAB_BLOCK = 1024


def vocab_logits_blocked(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """`F.linear(h, weight, bias)` as BLAS GEMMs over blocks of `VOCAB_BLOCK` vocabulary rows, written into
    one output (no autograd): the path of a decoding step on CPU without the native `small_linear`. The
    blocks keep the reused inputs in cache: 1.2-1.6x faster than one GEMM over the 30522-word matrix at 2-50
    rows, bit-identical (the reduction over D is the same). h: [..., D]; weight: [V, D]; bias: [V] ->
    [..., V]."""
    x = h.reshape(-1, h.shape[-1])  # [N, D]
    out = x.new_empty(x.shape[0], weight.shape[0])  # [N, V]
    for s in range(0, weight.shape[0], VOCAB_BLOCK):
        block = slice(s, s + VOCAB_BLOCK)
        torch.addmm(bias[block], x, weight[block].t(), out=out[:, block])
    return out.view(*h.shape[:-1], weight.shape[0])


class ClassifierHead(nn.Module):
    """fc1 -> ReLU -> fc2: [..., in_dim] -> [..., num_classes] (the ALBEF / BLIP `cls_head` shape)."""

    def __init__(self, in_dim: int, hidden_dim: int, num_classes: int):
        super().__init__()
        if min(in_dim, hidden_dim) < 1 or num_classes < 2:
            raise ValueError(
                f"need in_dim, hidden_dim >= 1, num_classes >= 2; got {in_dim}, {hidden_dim}, {num_classes}"
            )
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in_dim] -> logits [..., num_classes]."""
        return self.fc2(self.act(self.fc1(x)))

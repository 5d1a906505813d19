"""What the model tests share: the tiny-preset helpers (weights redrawn at a larger scale, images, token ids,
padding) and the oracle, the skip-connected fusion written out from the spec in float64 (post-LN BERT
layers of fidelity §3.1, attention as softmax(q k^T / sqrt(Dh) + additive mask) v)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug_fast.config import MPlugConfig, tiny
from mplug_fast.modeling.fusion import (
    SkipConnectedFusion,
)
from mplug_fast.tasks import TASKS

V_TINY = tiny().text.vocab_size
NV_TINY = tiny().vision.num_tokens  # 17

# task -> model class of every task that builds its own model (the zero-shot video tasks borrow theirs)
TASK_MODELS = {name: task.model_class for name, task in TASKS.items() if task.checkpoint_task is task}


# ---- helpers -----------------------------------------------------------------------------------------------


def assert_close(actual: Tensor, expected: Tensor, atol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    diff = (actual.double() - expected.double()).abs()
    assert diff.max().item() <= atol, (
        f"{what}: max |diff| {diff.max().item():.3e} > atol {atol:.0e} (mean |diff| {diff.mean().item():.3e})"
    )


def n_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@torch.no_grad()
def randomize(module: nn.Module, std: float = 0.08, seed: int = 0) -> nn.Module:
    """All parameters ~ N(0, std), LayerNorm weights ~ N(1, 0.1), biases ~ N(0, 0.1); eval mode."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        scale = 0.1 if name.endswith("bias") else std
        p.copy_(torch.randn(p.shape, generator=g) * scale)
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
    return module.eval()


def images(B: int, size: int | tuple[int, int] = 64, seed: int = 1) -> Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(B, 3, h, w, generator=torch.Generator().manual_seed(seed))


def token_ids(B: int, L: int, seed: int = 2) -> Tensor:
    """[CLS] + random word pieces; never the pad id 0."""
    ids = torch.randint(1000, V_TINY, (B, L), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 101
    return ids


def pad_right(ids: Tensor, mask: Tensor, extra: int) -> tuple[Tensor, Tensor]:
    """Append `extra` [PAD] (id 0) tokens with mask 0."""
    B = ids.shape[0]
    return (torch.cat([ids, ids.new_zeros(B, extra)], 1), torch.cat([mask, mask.new_zeros(B, extra)], 1))


def tiny_config(**overrides) -> MPlugConfig:
    return tiny().replace(**overrides) if overrides else tiny()


# ---- the fusion written out from the spec (float64) --------------------------------------------------------


def _lin(x: Tensor, layer: nn.Linear, rows: slice | None = None) -> Tensor:
    w, b = layer.weight.double(), layer.bias.double()
    if rows is not None:
        w, b = w[rows], b[rows]
    return x @ w.T + b


def _ln(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def _mha(q: Tensor, k: Tensor, v: Tensor, heads: int, key_mask: Tensor | None) -> Tensor:
    """q [B, Lq, D], k/v [B, Lk, D] (already projected); key_mask bool [B, Lk], True = attend."""
    B, Lq, D = q.shape
    Dh = D // heads

    def split(x):
        return x.reshape(B, -1, heads, Dh).transpose(1, 2)  # [B, H, L, Dh]

    scores = split(q) @ split(k).transpose(-2, -1) / math.sqrt(Dh)  # [B, H, Lq, Lk]
    if key_mask is not None:
        scores = scores + torch.where(key_mask, 0.0, -math.inf).double()[:, None, None, :]
    ctx = torch.softmax(scores, dim=-1) @ split(v)  # [B, H, Lq, Dh]
    return ctx.transpose(1, 2).reshape(B, Lq, D)


def bert_layer_by_hand(
    layer: nn.Module,
    x: Tensor,
    mask: Tensor | None,
    memory: Tensor | None = None,
    memory_mask: Tensor | None = None,
) -> Tensor:
    """§3.1: a = LN(x + SelfAttn(x)); c = LN(a + CrossAttn(a, memory)); out = LN(c + fc2(gelu(fc1(c))))."""
    D = x.shape[-1]
    heads = layer.attn.num_heads
    q, k, v = (_lin(x, layer.attn.qkv, slice(i * D, (i + 1) * D)) for i in range(3))  # fused rows: q, k, v
    a = _ln(x + _lin(_mha(q, k, v, heads, mask), layer.attn.out_proj), layer.norm_attn)
    if memory is not None:
        q = _lin(a, layer.cross.q_proj)
        k, v = (_lin(memory, layer.cross.kv_proj, slice(i * D, (i + 1) * D)) for i in range(2))  # rows: k, v
        a = _ln(a + _lin(_mha(q, k, v, heads, memory_mask), layer.cross.out_proj), layer.norm_cross)
    h = _lin(F.gelu(_lin(a, layer.mlp.fc1)), layer.mlp.fc2)
    return _ln(a + h, layer.norm_mlp)


def fusion_by_hand(fusion: SkipConnectedFusion, stride: int, v: Tensor, t: Tensor, t_mask: Tensor) -> tuple:
    """fidelity §3.3, in float64, with the layer kind decided by the rule (not by the module)."""
    v, t = v.double(), t.double()
    Nv = v.shape[1]
    v_mask = torch.ones(v.shape[:2], dtype=torch.bool)
    for j, layer in enumerate(fusion.layers):
        if j == 0 or j % stride != 0:  # asymmetric co-attention
            t = bert_layer_by_hand(layer, t, t_mask, memory=v, memory_mask=v_mask)
        else:  # connected attention: the layer's self-attention + FFN over [v; t], then v <- v + y_v
            y = bert_layer_by_hand(layer, torch.cat([v, t], 1), torch.cat([v_mask, t_mask], 1))
            v, t = v + y[:, :Nv], y[:, Nv:]
    return v, t

"""Token losses shared by the objectives: decoder LM cross-entropy with optional distillation."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100


def distilled_token_loss(
    logits: Tensor,
    targets: Tensor,
    soft_logits: Tensor | None = None,
    alpha: float = 0.0,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Per-token loss [...]: (1 − alpha)·CE(logits, targets) + alpha·KD, with
    KD = −Σ_v softmax(soft_logits)·log_softmax(logits).

    logits / soft_logits: [..., V]; targets: long [...] (IGNORE entries give 0). The distillation term is
    taken over the vocabulary axis (the official decoder takes its log-softmax over the sequence axis, a
    bug inherited from ALBEF, docs/fidelity.md §3.4: fixed here).
    """
    V = logits.shape[-1]
    flat = logits.reshape(-1, V).float()
    ce = F.cross_entropy(
        flat, targets.reshape(-1), ignore_index=IGNORE, reduction="none", label_smoothing=label_smoothing
    ).view(targets.shape)
    if soft_logits is None or alpha == 0.0:
        return ce
    soft = F.softmax(soft_logits.reshape(-1, V).float(), dim=-1)
    kd = -(soft * F.log_softmax(flat, dim=-1)).sum(-1).view(targets.shape)
    kd = kd.masked_fill(targets == IGNORE, 0.0)
    return (1.0 - alpha) * ce + alpha * kd


def lm_targets(ids: Tensor, mask: Tensor | None, ignore_prefix: int | Tensor = 0) -> Tensor:
    """Next-token targets [N, L-1] for logits[:, :-1]: ids[:, 1:] with padding (and, when given, the first
    `ignore_prefix` target positions, e.g. prompt tokens; int or long [N]) set to IGNORE."""
    targets = ids[:, 1:].clone()
    if mask is not None:
        targets = targets.masked_fill(~mask[:, 1:].bool(), IGNORE)
    if isinstance(ignore_prefix, Tensor) or ignore_prefix:
        pos = torch.arange(targets.shape[1], device=ids.device)
        limit = torch.as_tensor(ignore_prefix, device=ids.device).reshape(-1, 1)
        targets = targets.masked_fill(pos[None, :] < limit, IGNORE)
    return targets


def lm_loss(
    logits: Tensor,
    ids: Tensor,
    mask: Tensor | None,
    *,
    soft_logits: Tensor | None = None,
    alpha: float = 0.0,
    reduction: Literal["mean", "sequence"] = "mean",
    label_smoothing: float = 0.0,
    ignore_prefix: int | Tensor = 0,
) -> Tensor:
    """Causal LM loss of decoder logits [N, L, V] for ids [N, L] (mask [N, L], 1 = token).

    reduction "mean": mean over all target tokens of the batch (official `BertPrefixModel`) -> scalar;
    "sequence": summed per sequence (official `BertLMHeadModel` with reduction='none', VQA) -> [N].
    soft_logits: [N, L, V] momentum logits of the same inputs (distillation weight alpha).
    """
    targets = lm_targets(ids, mask, ignore_prefix)
    soft = None if soft_logits is None else soft_logits[:, :-1]
    tok = distilled_token_loss(logits[:, :-1], targets, soft, alpha, label_smoothing)  # [N, L-1]
    if reduction == "sequence":
        return tok.sum(1)
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sequence', got {reduction!r}")
    count = (targets != IGNORE).sum().clamp(min=1)
    return tok.sum() / count

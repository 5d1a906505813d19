"""Masked language modelling on the fusion output (docs/fidelity.md §4, ALBEF / TiMiX recipe).

Masking: each real token is selected with probability p (0.15); never [PAD], [CLS] or [SEP] (the inferred
official recipe can select [SEP]; predicting the fixed end marker teaches nothing, so it is excluded here).
Of the selected: 80 % -> [MASK], 10 % -> a uniform random id in [0, V), 10 % unchanged. Labels are the
original ids at selected positions and -100 elsewhere. The masked text goes through the text encoder and
the fusion with the same image; the MLM head (tied to the word embeddings) runs only at the selected
positions. Distillation: (1 − alpha)·CE + alpha·soft-CE against the momentum model's MLM logits.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from mplug_fast.objectives.losses import IGNORE, distilled_token_loss


def mask_tokens(
    ids: Tensor,
    mask: Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """ids long [B, L], mask bool [B, L] -> (masked ids [B, L], labels [B, L]; -100 where not selected)."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"mlm probability must be in [0, 1], got {probability}")
    dev = ids.device
    special = torch.as_tensor(sorted(set(special_ids)), dtype=ids.dtype, device=dev)
    candidate = mask.bool() & ~torch.isin(ids, special)

    def uniform() -> Tensor:
        return torch.rand(ids.shape, generator=generator, device=dev)

    selected = candidate & (uniform() < probability)
    labels = ids.masked_fill(~selected, IGNORE)
    u = uniform()
    to_mask = selected & (u < 0.8)
    to_random = selected & (u >= 0.8) & (u < 0.9)
    random_ids = torch.randint(0, vocab_size, ids.shape, generator=generator, device=dev, dtype=ids.dtype)
    out = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    out = torch.where(to_random, random_ids, out)
    return out, labels


def mlm_loss(
    model,
    image_states: Tensor,
    masked_ids: Tensor,
    text_mask: Tensor,
    labels: Tensor,
    *,
    momentum=None,
    image_states_m: Tensor | None = None,
    alpha: float = 0.0,
) -> Tensor:
    """Mean loss over the selected tokens (0 with a zero gradient when none is selected).

    model / momentum: objects with `encode_text`, `fuse`, `mlm_logits` (an `MPlug` and its `momentum_view`);
    image_states: [B, Nv, D]; masked_ids / labels: [B, L]; text_mask: bool [B, L].
    """
    t = model.encode_text(masked_ids, text_mask)
    _, t = model.fuse(image_states, t, text_mask)
    selected = labels != IGNORE
    logits = model.mlm_logits(t[selected])  # [M, V]
    soft = None
    if momentum is not None and alpha > 0.0:
        with torch.no_grad():
            t_m = momentum.encode_text(masked_ids, text_mask)
            _, t_m = momentum.fuse(image_states_m, t_m, text_mask)
            soft = momentum.mlm_logits(t_m[selected])
    tok = distilled_token_loss(logits, labels[selected], soft, alpha)
    return tok.sum() / selected.sum().clamp(min=1)

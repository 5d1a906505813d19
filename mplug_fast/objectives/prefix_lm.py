"""PrefixLM (fidelity §4, TiMiX): split each caption at a random *word*, encode the prefix with the image, and
let the decoder generate the rest.

For a caption of n words, k is uniform in [0, n − 1]: prefix = words[:k] (possibly empty), target =
words[k:]. The split is done on the token ids in one batched pass (a word starts at every WordPiece not
beginning with "##"), so the collated [CLS] caption [SEP] ids serve directly:

    prefix ids  [CLS] w_1 .. w_k [SEP]            -> text encoder -> fusion with the image -> memory [v'; t']
    target ids  [CLS] w_k+1 .. w_n [SEP]          -> decoder (causal) over the memory, token-mean CE

(the official targets end with a doubled [SEP], fidelity §10.7; here a single [SEP]). Both outputs keep the
input width L (no host sync to trim). Distillation: momentum decoder logits over the momentum memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mplug_fast.objectives.losses import lm_loss


def continuation_table(vocab: dict[str, int], vocab_size: int) -> Tensor:
    """bool [V]: True for WordPiece continuation tokens ("##...")."""
    table = torch.zeros(vocab_size, dtype=torch.bool)
    ids = [i for tok, i in vocab.items() if tok.startswith("##") and i < vocab_size]
    table[ids] = True
    return table


def split_prefix(
    ids: Tensor,
    mask: Tensor,
    *,
    continuation: Tensor,
    cls_id: int,
    sep_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ids long [B, L] ([CLS] tokens [SEP] pad), mask bool [B, L] ->
    (prefix_ids, prefix_mask, target_ids, target_mask), each [B, L]."""
    B, L = ids.shape
    dev = ids.device
    mask = mask.bool()
    real = mask & (ids != cls_id) & (ids != sep_id) & (ids != pad_id)
    starts = real & ~continuation.to(dev)[ids]
    n_words = starts.sum(1)  # [B]
    u = torch.rand(B, generator=generator, device=dev)
    k = torch.minimum((u * n_words).long(), (n_words - 1).clamp(min=0))  # uniform in [0, n - 1]
    word = torch.cumsum(starts.long(), 1) - 1  # word index of each token (-1 before the first word)
    in_prefix = real & (word < k[:, None])
    in_target = real & ~in_prefix

    def pack(keep: Tensor) -> tuple[Tensor, Tensor]:
        count = keep.sum(1)  # [B]
        pos = torch.cumsum(keep.long(), 1)  # 1-based position after [CLS]
        out = torch.full((B, L + 1), pad_id, dtype=ids.dtype, device=dev)
        idx = torch.where(keep, pos, torch.full_like(pos, L))  # dropped tokens land in the spare column
        out.scatter_(1, idx, ids)
        out = out[:, :L]
        out[:, 0] = cls_id
        out.scatter_(1, (count + 1).clamp(max=L - 1)[:, None], sep_id)
        width = torch.arange(L, device=dev)
        return out, width[None, :] <= (count + 1)[:, None]

    prefix_ids, prefix_mask = pack(in_prefix)
    target_ids, target_mask = pack(in_target)
    prefix_ids = prefix_ids.masked_fill(~prefix_mask, pad_id)
    target_ids = target_ids.masked_fill(~target_mask, pad_id)
    return prefix_ids, prefix_mask, target_ids, target_mask


def prefix_memory(
    model, image_states: Tensor, prefix_ids: Tensor, prefix_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """[v'; t'] [B, Nv + L, D] and its mask, reusing already-encoded image states [B, Nv, D]."""
    t = model.encode_text(prefix_ids, prefix_mask)
    v, t = model.fuse(image_states, t, prefix_mask)
    ones = torch.ones(v.shape[:2], dtype=torch.bool, device=v.device)
    return torch.cat([v, t], 1), torch.cat([ones, prefix_mask], 1)


def prefix_lm_loss(
    model,
    image_states: Tensor,
    prefix: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    momentum=None,
    image_states_m: Tensor | None = None,
    alpha: float = 0.0,
) -> Tensor:
    """Token-mean decoder CE of the targets given (image, prefix); `prefix` from `split_prefix`."""
    prefix_ids, prefix_mask, target_ids, target_mask = prefix
    memory, memory_mask = prefix_memory(model, image_states, prefix_ids, prefix_mask)
    logits = model.decode(target_ids, target_mask, memory, memory_mask)
    soft = None
    if momentum is not None and alpha > 0.0:
        with torch.no_grad():
            memory_m, _ = prefix_memory(momentum, image_states_m, prefix_ids, prefix_mask)
            soft = momentum.decode(target_ids, target_mask, memory_m, memory_mask)
    return lm_loss(logits, target_ids, target_mask, soft_logits=soft, alpha=alpha)

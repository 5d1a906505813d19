"""Image-text contrastive loss (ITC / ITA) with momentum keys, feature queues and soft targets (fidelity §4).

    keys      = [momentum features of the global batch ; queue]               [K', E], K' = W*B + Q
    sim_i2t   = image_feat @ text_keysᵀ / temp,  sim_t2i = text_feat @ image_keysᵀ / temp      [B, K']
    targets   = alpha * softmax(momentum sims) + (1 - alpha) * positives / #positives
    loss      = ( CE_soft(sim_i2t, targets_i2t) + CE_soft(sim_t2i, targets_t2i) ) / 2   (mean over rows)

Positives: the pair itself (no image ids) or every key with the same image id (retrieval's multi-positive
targets; the queue keeps the ids): the official semantics, right for real data where two images rarely
share a caption. With ``same_text_positive=True`` a key whose text is token-for-token identical to the
row's own text is a positive too (``text_identity`` hashes the tokens; the queue keeps the hashes): for
data where many images share one caption (a synthetic world of a few shapes and colours), where identical
texts labelled as negatives are contradictory targets. Differences from the official code, on purpose:
* the keys hold the momentum features of the *whole* global batch (all-gathered), not only the local one,
  so W ranks x B samples give exactly the loss of one process with W*B samples;
* the queue starts empty and unfilled slots are masked out (ALBEF fills it with random unit vectors that
  act as meaningless negatives until overwritten); to resume from a released checkpoint with its queue
  (and so get the official loss on the same weights and batch), load it with
  ``ITCLoss.load_official_queue(official_queue_state(checkpoint))``: every slot is then a key, as there;
* the temperature is clamped to [temp_min, temp_max] under no_grad before every forward (ALBEF / TiMiX; the
  official retrieval model does not clamp).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug_fast.objectives.distributed import all_gather, world

DEFAULT_QUEUE_SIZE = 65536


class FeatureQueue(nn.Module):
    """FIFO of momentum features and image ids, as buffers (saved in the state dict).

    Buffers: image [Q, E], text [Q, E] (unit rows), ids long [Q] (-1 = none), ptr long [] (next slot),
    filled long [] (number of valid slots), and with ``text_hashes`` text_hashes long [Q] (-1 = none).
    The write position is computed on the device, so enqueueing never synchronises with the host. Q must be
    a multiple of every global batch enqueued. With ``hold`` set (the trainer sets it) `enqueue` only records
    the features; `flush` writes them once the step is known to be finite, or drops them.
    """

    def __init__(self, size: int, dim: int, global_batch: int | None = None, text_hashes: bool = False):
        super().__init__()
        if size < 0 or dim < 1:
            raise ValueError(f"queue size must be >= 0 and dim >= 1, got size={size}, dim={dim}")
        self.size = size
        if global_batch is not None:
            self.check_batch(global_batch)
        self.register_buffer("image", torch.zeros(size, dim))
        self.register_buffer("text", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        # long [Q] text identities (same_text_positive), -1 = none; None (no buffer) otherwise
        hashes = torch.full((size,), -1, dtype=torch.long) if text_hashes else None
        self.register_buffer("text_hashes", hashes)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.hold, self.pending = False, []

    def check_batch(self, global_batch: int) -> None:
        """A queue of Q slots takes whole global batches only: Q % (W * B) == 0."""
        if self.size and self.size % global_batch:
            lower = self.size // global_batch * global_batch
            raise ValueError(
                f"queue_size {self.size} is not a multiple of the global batch {global_batch} "
                f"(world size x per-rank batch); use e.g. queue_size {lower or global_batch} or a batch that "
                f"divides {self.size}, and DataLoader(drop_last=True)"
            )

    def valid(self) -> Tensor:
        """bool [Q]: slots holding a feature."""
        return torch.arange(self.size, device=self.ids.device) < self.filled

    @torch.no_grad()
    def load_official(self, state: Mapping[str, Tensor]) -> None:
        """Take the official queue buffers, in their layout: ``image_queue`` / ``text_queue`` [E, Q] (features
        as columns; required), ``idx_queue`` [1, Q] (image ids; negative = none, official init -100),
        ``queue_ptr`` [1].

        The queue is resized to Q and every slot counts as filled (the official loss uses all Q columns).
        Without idx_queue (pretraining checkpoints) no slot has an image id: all queued keys are negatives.
        """
        missing = [k for k in ("image_queue", "text_queue") if k not in state]
        if missing:
            raise KeyError(f"official queue state lacks {missing}; keys given: {sorted(state)}")
        image_queue, text_queue = state["image_queue"], state["text_queue"]
        idx_queue, queue_ptr = state.get("idx_queue"), state.get("queue_ptr")
        dim = self.image.shape[1]
        if image_queue.dim() != 2 or image_queue.shape != text_queue.shape or image_queue.shape[0] != dim:
            raise ValueError(
                f"official queues must be [embed_dim={dim}, Q] each, got image_queue "
                f"{list(image_queue.shape)} and text_queue {list(text_queue.shape)}"
            )
        size = image_queue.shape[1]
        ids = torch.full((size,), -1, dtype=torch.long)
        if idx_queue is not None:
            if idx_queue.numel() != size:
                raise ValueError(f"idx_queue has {idx_queue.numel()} entries for a queue of {size} slots")
            ids = idx_queue.reshape(size).long().clamp(min=-1)  # any negative id = no image
        ptr = int(queue_ptr.reshape(-1)[0]) % size if queue_ptr is not None and size else 0
        device, dtype = self.image.device, self.image.dtype
        self.size = size
        self.image = image_queue.t().contiguous().to(device, dtype)
        self.text = text_queue.t().contiguous().to(device, dtype)
        self.ids = ids.to(device)
        if self.text_hashes is not None:  # the official queue has no text identities
            self.text_hashes = torch.full((size,), -1, dtype=torch.long, device=device)
        self.ptr = torch.tensor(ptr, dtype=torch.long, device=device)
        self.filled = torch.tensor(size, dtype=torch.long, device=device)

    @torch.no_grad()
    def enqueue(self, image: Tensor, text: Tensor, ids: Tensor, text_hashes: Tensor | None = None) -> None:
        """image, text: [N, E] (global batch, already gathered); ids, text_hashes: long [N]. Overwrites the
        oldest N (with ``hold``: recorded for `flush`)."""
        if self.size == 0:
            return
        if self.hold:
            self.pending.append((image, text, ids, text_hashes))
            return
        n = image.shape[0]
        self.check_batch(n)
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.image.index_copy_(0, slots, image.to(self.image.dtype))
        self.text.index_copy_(0, slots, text.to(self.text.dtype))
        self.ids.index_copy_(0, slots, ids)
        if self.text_hashes is not None:
            if text_hashes is None:
                text_hashes = torch.full_like(ids, -1)
            self.text_hashes.index_copy_(0, slots, text_hashes)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))

    @torch.no_grad()
    def flush(self, keep: bool) -> None:
        """Writes (``keep``) or drops the updates recorded under ``hold``, in their order."""
        pending, self.pending, hold = self.pending, [], self.hold
        self.hold = False
        try:
            for update in pending if keep else ():
                self.enqueue(*update)
        finally:
            self.hold = hold


_HASH_MODULI = ((2147483647, 16807), (2147483629, 48271))  # (prime < 2^31, base): products fit in int64


def text_identity(ids: Tensor, mask: Tensor) -> Tensor:
    """long [B] hash of each row's tokens (ids long [B, L], mask [B, L] 1 = token): equal for texts that are
    token-for-token identical whatever their padding, in [0, 2^62); two different texts collide with
    probability about 2^-62. Two polynomial hashes, sum over l of (token_l + 1) * base^(l + 1) mod p."""
    L = ids.shape[1]
    tokens = (ids.long() + 1) * mask.long()  # padding -> 0, every real token >= 1
    out = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    for j, (p, base) in enumerate(_HASH_MODULI):
        weights = torch.tensor([pow(base, l + 1, p) for l in range(L)], dtype=torch.long, device=ids.device)
        h = ((tokens % p) * weights % p).sum(1) % p
        out = out + (h << (31 * j))
    return out


def soft_cross_entropy(logits: Tensor, targets: Tensor, valid: Tensor | None = None) -> Tensor:
    """mean over rows of -Σ_k targets·log_softmax(logits); logits/targets [B, K]; valid bool [K] keys."""
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    logp = F.log_softmax(logits.float(), dim=1)
    if valid is not None:
        logp = logp.masked_fill(~valid, 0.0)
    return -(logp * targets).sum(1).mean()


def soft_targets(
    positives: Tensor, sim_m: Tensor | None, alpha: float, valid: Tensor | None = None
) -> Tensor:
    """alpha·softmax(sim_m) + (1 − alpha)·positives/#positives; positives bool [B, K], sim_m [B, K]."""
    hard = positives.float() / positives.sum(1, keepdim=True).clamp(min=1)
    if sim_m is None or alpha == 0.0:
        return hard
    if valid is not None:
        sim_m = sim_m.masked_fill(~valid, float("-inf"))
    return alpha * F.softmax(sim_m.float(), dim=1) + (1.0 - alpha) * hard


class ITCLoss(nn.Module):
    """ITC over [global momentum batch ; queue] with soft targets (see the module docstring).

    Args:
        embed_dim: E, the projection width.
        queue_size: Q slots (0 = no queue); must be a multiple of the global batch.
        global_batch: checked against Q at construction when given (else at the first forward).
        same_text_positive: False (official) = positives by image id only; True = a key whose text is
            identical to the row's text is a positive too (forward then needs ``text_hashes``).
    """

    def __init__(
        self,
        embed_dim: int,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        global_batch: int | None = None,
        same_text_positive: bool = False,
    ):
        super().__init__()
        self.same_text_positive = same_text_positive
        self.queue = FeatureQueue(queue_size, embed_dim, global_batch, text_hashes=same_text_positive)

    def load_official_queue(self, state: Mapping[str, Tensor]) -> None:
        """Resume with a released checkpoint's queue: `state` holds the official buffers ``image_queue``,
        ``text_queue`` (required), ``idx_queue``, ``queue_ptr`` (optional), e.g. from
        ``mplug_fast.checkpoint.official.official_queue_state``. Default (not called): an empty queue."""
        self.queue.load_official(state)

    def forward(
        self,
        image_feat: Tensor,
        text_feat: Tensor,
        image_feat_m: Tensor,
        text_feat_m: Tensor,
        temp: Tensor,
        alpha: float,
        image_ids: Tensor | None = None,
        enqueue: bool = True,
        text_hashes: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Local rows against global keys.

        Args:
            image_feat, text_feat: [B, E] unit online features (with grad).
            image_feat_m, text_feat_m: [B, E] unit momentum features (no grad).
            temp: the temperature (a scalar Parameter; gradients flow into it).
            alpha: distillation weight (0 = one-hot / multi-positive targets only).
            image_ids: long [B] or None (then only the pair itself is positive).
            enqueue: push the gathered momentum features into the queue after computing the loss.
            text_hashes: long [B] text identities (``text_identity(text_ids, text_mask)``); required with
                ``same_text_positive``, ignored otherwise.
        Returns:
            (loss, extras) with extras["sim_i2t"], ["sim_t2i"] [B, W*B] (online vs momentum batch keys,
            detached) and ["positives"] bool [B, W*B]: what ITM samples hard negatives from.
        """
        B = image_feat.shape[0]
        rank, size = world()
        gB = B * size
        self.queue.check_batch(gB)
        with torch.no_grad():
            img_m_all, txt_m_all = all_gather(image_feat_m), all_gather(text_feat_m)
            ids_all = all_gather(image_ids) if image_ids is not None else None
            q = self.queue
            image_keys = torch.cat([img_m_all, q.image.to(img_m_all.dtype)])  # [K', E]
            text_keys = torch.cat([txt_m_all, q.text.to(txt_m_all.dtype)])
            valid = torch.cat([torch.ones(gB, dtype=torch.bool, device=q.ids.device), q.valid()])
            valid = valid.to(image_feat.device)
            if image_ids is not None:
                key_ids = torch.cat([ids_all, q.ids.to(ids_all.device)])
                positives = (image_ids[:, None] == key_ids[None, :]) & valid
            else:
                positives = torch.zeros(B, gB + q.size, dtype=torch.bool, device=image_feat.device)
                rows = torch.arange(B, device=image_feat.device)
                positives[rows, rank * B + rows] = True
            hashes_all = None
            if self.same_text_positive:
                if text_hashes is None:
                    raise ValueError("ITCLoss(same_text_positive=True) needs text_hashes [B] in forward")
                hashes_all = all_gather(text_hashes)
                key_hashes = torch.cat([hashes_all, q.text_hashes.to(hashes_all.device)])
                positives = positives | ((text_hashes[:, None] == key_hashes[None, :]) & valid)
            t_det = temp.detach()
            t_i2t = soft_targets(positives, image_feat_m @ text_keys.t() / t_det, alpha, valid)
            t_t2i = soft_targets(positives, text_feat_m @ image_keys.t() / t_det, alpha, valid)
        sim_i2t = image_feat @ text_keys.t() / temp  # [B, K']
        sim_t2i = text_feat @ image_keys.t() / temp
        loss = (soft_cross_entropy(sim_i2t, t_i2t, valid) + soft_cross_entropy(sim_t2i, t_t2i, valid)) / 2
        if enqueue:
            fill = ids_all if ids_all is not None else torch.full((gB,), -1, device=img_m_all.device)
            self.queue.enqueue(img_m_all, txt_m_all, fill.long(), hashes_all)
        extras = {
            "sim_i2t": sim_i2t[:, :gB].detach(),
            "sim_t2i": sim_t2i[:, :gB].detach(),
            "positives": positives[:, :gB],
        }
        return loss, extras


@torch.no_grad()
def clamp_temperature(temp: Tensor, low: float = 0.001, high: float = 0.5) -> None:
    """In place, without gradient: temp <- clamp(temp, low, high) (ALBEF / TiMiX, every step)."""
    temp.clamp_(low, high)

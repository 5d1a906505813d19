"""Image-text matching with hard negatives sampled from the ITC similarities (docs/fidelity.md §4).

For each local text one negative image, for each local image one negative text, drawn from the *global*
batch with probability softmax(sim) over the non-positive entries (a positive — the pair itself or any
sample with the same image id, and with ``ITCLoss(same_text_positive=True)`` any sample with the identical
text — has weight exactly 0, so it is never drawn); with ``hard=False`` uniformly over the non-positive
entries instead (for a model that cannot yet tell the hardest negatives from the positive: they only add
label noise). All rows are sampled by one
`torch.multinomial` call per direction (the official code loops over samples with `.item()`). The
negatives' encoder states are all-gathered *with* gradient, so on W ranks the loss and the gradients equal
those of one process with the global batch. Positives and both kinds of negatives go through the fusion in
one batch of 3B pairs; the classifier reads the fused text token 0; labels [1]*B + [0]*2B; mean CE.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mplug_fast.objectives.distributed import gather_padded, global_max, world

Sampler = Callable[[Tensor], Tensor]  # weights [B, N] (rows need not sum to 1) -> long [B] column indices


def multinomial_sampler(generator: torch.Generator | None = None) -> Sampler:
    """One draw per row, all rows at once."""

    def sample(weights: Tensor) -> Tensor:
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)

    return sample


def negative_weights(sim: Tensor, positives: Tensor) -> Tensor:
    """softmax over the non-positive entries of each row; positives get weight 0.

    sim: [B, N] similarities; positives: bool [B, N]. A row with no negative is an error: there is no
    image (text) in the global batch to contrast with (e.g. every sample shows the same image).
    """
    no_negative = positives.all(dim=1)
    # The check is a host sync and a graph break: eager only (under torch.compile such a row would make
    # torch.multinomial fail on an all-zero row instead).
    if not torch.compiler.is_compiling() and bool(no_negative.any()):
        rows = no_negative.nonzero().flatten().tolist()
        raise ValueError(
            f"ITM cannot draw a hard negative for rows {rows[:8]}: every sample of the global batch shares "
            "their image id; use larger batches or fewer captions of one image per batch"
        )
    # A non-finite similarity (a step the trainer will skip) must not crash the draw: it counts as 0.
    sim = sim.float().nan_to_num(0.0, 0.0, 0.0)
    return F.softmax(sim.masked_fill(positives, float("-inf")), dim=1)


def sample_negatives(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    positives: Tensor,
    sampler: Sampler | None = None,
    hard: bool = True,
) -> tuple[Tensor, Tensor]:
    """Global indices (neg_image_for_text [B], neg_text_for_image [B]).

    sim_i2t / sim_t2i: [B, W*B] local rows vs the global batch; positives: bool [B, W*B].
    hard: draw by softmax(sim) (official); False: uniformly over the non-positives.
    """
    sample = sampler or multinomial_sampler()
    if not hard:
        sim_i2t, sim_t2i = torch.zeros_like(sim_i2t), torch.zeros_like(sim_t2i)
    with torch.no_grad():
        neg_image = sample(negative_weights(sim_t2i, positives))  # a text's negative image
        neg_text = sample(negative_weights(sim_i2t, positives))  # an image's negative text
    return neg_image, neg_text


def itm_loss(
    model,
    image_states: Tensor,
    text_states: Tensor,
    text_mask: Tensor,
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    positives: Tensor,
    sampler: Sampler | None = None,
    hard: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ITM loss on B positives + B (negative image, text) + B (image, negative text) pairs.

    Args:
        model: anything with `itm_logits(image_states, text_states, text_mask) -> [N, 2]`.
        image_states: [B, Nv, D] encoder output (with grad); text_states: [B, L, D] unimodal text states;
        text_mask: bool [B, L].
        sim_i2t, sim_t2i, positives: from `ITCLoss` ([B, W*B]).
        sampler: weights -> indices (default: `torch.multinomial`).
        hard: hard negatives by the ITC similarities (official); False: uniform over the non-positives.
    Returns:
        (loss, {"neg_image": [B], "neg_text": [B], "logits": [3B, 2]}).
    """
    B, L = text_mask.shape
    neg_image, neg_text = sample_negatives(sim_i2t, sim_t2i, positives, sampler, hard)
    Lg = global_max(L)
    distributed = world()[1] > 1
    if distributed:
        images_all = gather_padded(image_states, image_states.shape[1], 0.0, with_grad=True)
        texts_all = gather_padded(text_states, Lg, 0.0, with_grad=True)
        masks_all = gather_padded(text_mask, Lg, False, with_grad=False)
    else:
        images_all, texts_all, masks_all = image_states, text_states, text_mask
    if Lg > L:
        text_states = torch.cat([text_states, text_states.new_zeros(B, Lg - L, text_states.shape[2])], 1)
        text_mask = torch.cat([text_mask, text_mask.new_zeros(B, Lg - L)], 1)
    images = torch.cat([image_states, images_all[neg_image], image_states])  # [3B, Nv, D]
    texts = torch.cat([text_states, text_states, texts_all[neg_text]])  # [3B, Lg, D]
    masks = torch.cat([text_mask, text_mask, masks_all[neg_text]])
    logits = model.itm_logits(images, texts, masks)
    labels = torch.zeros(3 * B, dtype=torch.long, device=logits.device)
    labels[:B] = 1
    loss = F.cross_entropy(logits.float(), labels)
    return loss, {"neg_image": neg_image, "neg_text": neg_text, "logits": logits.detach()}

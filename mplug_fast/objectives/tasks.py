"""Downstream task objectives with the `PretrainObjective` interface (`forward(batch) -> dict`,
`after_optimizer_step()`), built by `build_objective(task, model, tokenizer, **options)`.

    vqa        weighted-answer decoder loss, answers share their question's memory (answer_index);
               distillation from momentum copies actually applied (see `VQAObjective`)
    caption    token-mean decoder CE (optional label smoothing, optional prompt exclusion)
    grounding  coordinate-token CE weighted per sample by L1 and 1 − GIoU of the argmax box (bug fixed)
    retrieval  ITC (queue, momentum, multi-positive by image id) + ITM (hard negatives)
    pretrain   `PretrainObjective`
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug_fast.objectives.itc import DEFAULT_QUEUE_SIZE, ITCLoss, clamp_temperature
from mplug_fast.objectives.itm import Sampler, itm_loss
from mplug_fast.objectives.losses import lm_loss
from mplug_fast.objectives.pretrain import (
    MomentumMixin,
    PretrainObjective,
    batch_image_ids,
    require_keys,
)

GROUNDING_NUM_BINS = 336  # official: image_res 336 -> bins 0..336 (spec §5.5)
GROUNDING_PREFIX_UNUSED = 339  # [unused339] starts the box; [unused340 + b] is bin b


def _momentum_copies(model: nn.Module, names: tuple[str, ...]) -> nn.ModuleDict:
    """Frozen EMA copies of the model's components `names` (those the model has)."""
    copies = nn.ModuleDict(
        {n: copy.deepcopy(getattr(model, n)) for n in names if getattr(model, n, None) is not None}
    )
    copies.requires_grad_(False)
    return copies


class VQAObjective(MomentumMixin, nn.Module):
    """VQA: loss = Σ_n weight_n · seqloss_n / B over the N answers of the B questions (spec §5.1).

    The question memory [v'; t'] is computed once per question; each answer's decoder rows read it through
    `answer_index` (no per-answer copies). seqloss = per-sequence summed token loss.

    Distillation (decision): the official code builds and updates a momentum model every step but never
    passes alpha to the decoder, so the branch costs a full forward and changes nothing (spec §10.2). Here
    `distill=True` (default, alpha 0.4 as the official yaml) really mixes in the momentum decoder's soft
    labels: seqloss = Σ_t (1 − alpha)·CE + alpha·soft-CE over the vocabulary. The EMA copies (vision,
    adapter, text encoder, fusion — never updated officially, a bug — and decoder) live in this objective,
    created from the model's weights at construction (load the weights first, or call `copy_to_momentum`).
    `distill=False` reproduces what the official run effectively optimises, at half the cost.
    """

    MOMENTUM = ("vision", "adapter", "text_encoder", "fusion", "decoder")

    def __init__(
        self,
        model: nn.Module,
        *,
        distill: bool = True,
        alpha: float = 0.4,
        momentum: float = 0.995,
        alpha_warmup_steps: int = 0,
    ):
        super().__init__()
        self.model = model
        self.alpha, self.distill, self.alpha_warmup_steps = alpha, distill, alpha_warmup_steps
        self.momentum = _momentum_copies(model, self.MOMENTUM) if distill else None
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._init_momentum(model, self.momentum, momentum)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """batch: images [B,3,R,R], question_ids/mask [B,Lq], answer_ids/mask [N,La], answer_index [N],
        answer_weights [N]. Returns {"loss", "vqa"}."""
        keys = ("images", "question_ids", "question_mask", "answer_ids", "answer_mask", "answer_index")
        require_keys(batch, (*keys, "answer_weights"), "VQAObjective")
        images, q_ids, q_mask, a_ids, a_mask, index = (batch[k] for k in keys)
        q_mask, a_mask = q_mask.bool(), a_mask.bool()
        weights = batch["answer_weights"].to(torch.float32)
        alpha = self.alpha_now()
        if self.training:
            self.step += 1
        memory, memory_mask = self.model.fused_memory(images, q_ids, q_mask)
        logits = self.model.decode(a_ids, a_mask, memory, memory_mask, memory_index=index)
        soft = None
        if self.momentum is not None and alpha > 0:
            from mplug_fast.modeling.mplug import MomentumView

            with torch.no_grad():
                m = MomentumView(self.momentum)
                memory_m, _ = m.fused_memory(images, q_ids, q_mask)
                soft = m.decode(a_ids, a_mask, memory_m, memory_mask, memory_index=index)
        seq = lm_loss(logits, a_ids, a_mask, soft_logits=soft, alpha=alpha, reduction="sequence")  # [N]
        loss = (weights * seq).sum() / images.shape[0]
        return {"loss": loss, "vqa": loss.detach()}


class CaptionObjective(MomentumMixin, nn.Module):
    """Captioning CE (spec §5.2): decoder over the image tokens, token-mean CE of caption_ids[1:].

    Official: no label smoothing, no distillation, and the prompt tokens are part of the target (labels are
    the ids with only padding ignored) — the defaults here. Options: `label_smoothing` (> 0 to smooth) and
    `prompt_length` (number of target tokens after [CLS] excluded from the loss, as BLIP does).
    """

    def __init__(self, model: nn.Module, *, label_smoothing: float = 0.0, prompt_length: int = 0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0 or prompt_length < 0:
            raise ValueError(
                "need 0 <= label_smoothing < 1 and prompt_length >= 0, "
                f"got {label_smoothing}, {prompt_length}"
            )
        self.model, self.label_smoothing, self.prompt_length = model, label_smoothing, prompt_length
        self.alpha, self.distill, self.alpha_warmup_steps = 0.0, False, 0
        self._init_momentum(model, None, 0.0)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """batch: images [B,3,R,R], caption_ids / caption_mask [B, L]. Returns {"loss", "caption"}."""
        require_keys(batch, ("images", "caption_ids", "caption_mask"), "CaptionObjective")
        ids, mask = batch["caption_ids"], batch["caption_mask"].bool()
        logits = self.model(batch["images"], ids, mask)
        loss = lm_loss(
            logits, ids, mask, label_smoothing=self.label_smoothing, ignore_prefix=self.prompt_length
        )
        return {"loss": loss, "caption": loss.detach()}


def box_cxcywh_to_xyxy(box: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> (x0, y0, x1, y1)."""
    cx, cy, w, h = box.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def generalized_iou(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise GIoU of boxes a, b [..., 4] in xyxy -> [...] (degenerate boxes give finite values)."""
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-9)
    lt_c, rb_c = torch.minimum(a[..., :2], b[..., :2]), torch.maximum(a[..., 2:], b[..., 2:])
    hull = (rb_c - lt_c).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-9)


def grounding_weights(
    pred_bins: Tensor, target: Tensor, num_bins: int = GROUNDING_NUM_BINS
) -> tuple[Tensor, Tensor]:
    """(weight_bbox [B, 4] = |pred − target| clamped to [0, 5], weight_giou [B] = 1 − GIoU) of the argmax
    box (bins / num_bins, cxcywh) against the normalised target boxes [B, 4]."""
    pred = pred_bins.float() / num_bins
    w_box = (pred - target).abs().clamp(0, 5)
    w_giou = 1.0 - generalized_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))
    return w_box, w_giou


class GroundingObjective(MomentumMixin, nn.Module):
    """Grounding as coordinate tokens (spec §5.5): decoder input [unused339] + 4 bin tokens over the fused
    [image; expression]; CE over the 337 coordinate tokens only (the official prob mask adds −10000 to every
    other logit: the same softmax); per-token CE weighted (no grad) by the argmax box's L1 error per
    coordinate and its 1 − GIoU per sample:

        loss = mean_{i,k} CE[i, k] · w_box[i, k] · w_giou[i]

    Official bug fixed: there the CE [B, 1, 4] times w_box [B, 4] times w_giou [B, 1] broadcasts to
    [B, B, 4], i.e. every sample's CE is weighted by the batch-mean weights and the per-sample focus is lost.

    ``box_weighting=False`` (ours, not official) drops both weights: plain token CE. The weights are
    |error| (normalised, ~0.1 once roughly placed) times 1 − GIoU, so they shrink the coordinate gradients
    ~10x; from pretrained mPLUG weights that refines boxes, from scratch (the synthetic demo) it stalls
    position learning.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        prefix_id: int,
        coord_ids: Tensor,
        num_bins: int = GROUNDING_NUM_BINS,
        box_weighting: bool = True,
    ):
        super().__init__()
        self.box_weighting = box_weighting
        coord_ids = torch.as_tensor(coord_ids, dtype=torch.long)
        if coord_ids.numel() != num_bins + 1:
            raise ValueError(
                f"need {num_bins + 1} coordinate token ids (bins 0..{num_bins}), got {coord_ids.numel()}"
            )
        self.model, self.prefix_id, self.num_bins = model, prefix_id, num_bins
        self.register_buffer("coord_ids", coord_ids, persistent=False)
        self.alpha, self.distill, self.alpha_warmup_steps = 0.0, False, 0
        self._init_momentum(model, None, 0.0)

    @classmethod
    def from_tokenizer(cls, model: nn.Module, tokenizer, **options: Any) -> GroundingObjective:
        bins = options.pop("num_bins", GROUNDING_NUM_BINS)
        ids = [tokenizer.unused_token_id(GROUNDING_PREFIX_UNUSED + 1 + b) for b in range(bins + 1)]
        prefix = tokenizer.unused_token_id(GROUNDING_PREFIX_UNUSED)
        return cls(model, prefix_id=prefix, coord_ids=torch.tensor(ids), num_bins=bins, **options)

    def box_ids(self, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """boxes [B, 4] normalised cxcywh -> (decoder ids [B, 5], target bins [B, 4])."""
        bins = torch.floor(boxes.clamp(0, 1) * self.num_bins).long()
        prefix = torch.full_like(bins[:, :1], self.prefix_id)
        return torch.cat([prefix, self.coord_ids[bins]], 1), bins

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """batch: images, text_ids / text_mask [B, L], boxes [B, 4] (cx, cy, w, h in [0, 1]).
        Returns {"loss", "grounding", "ce" (unweighted token mean)}."""
        require_keys(batch, ("images", "text_ids", "text_mask", "boxes"), "GroundingObjective")
        boxes = batch["boxes"].float()
        ids, bins = self.box_ids(boxes)
        logits = self.model(batch["images"], batch["text_ids"], batch["text_mask"].bool(), ids)  # [B, 5, V]
        coord_logits = logits[:, :-1].index_select(-1, self.coord_ids).float()  # [B, 4, 337]
        ce = F.cross_entropy(coord_logits.transpose(1, 2), bins, reduction="none")  # [B, 4]
        if self.box_weighting:
            with torch.no_grad():
                w_box, w_giou = grounding_weights(coord_logits.argmax(-1), boxes, self.num_bins)
            loss = (ce * w_box * w_giou[:, None]).mean()
        else:
            loss = ce.mean()
        return {"loss": loss, "grounding": loss.detach(), "ce": ce.mean().detach()}


class RetrievalObjective(MomentumMixin, nn.Module):
    """Retrieval finetuning (spec §5.4): ITC with the queue, momentum distillation and multi-positive targets
    by image id, + ITM with hard negatives (never an image with the same id). The temperature is clamped
    (the official retrieval model does not: a documented deviation)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        momentum: float = 0.995,
        alpha: float = 0.4,
        distill: bool = True,
        alpha_warmup_steps: int = 0,
        temp_range: tuple[float, float] = (0.001, 0.5),
        global_batch: int | None = None,
        sampler: Sampler | None = None,
    ):
        super().__init__()
        if getattr(model, "momentum", None) is None:
            raise ValueError(
                "RetrievalObjective needs a model with momentum copies (build_model(config, 'retrieval'))"
            )
        self.model = model
        self.alpha, self.distill, self.alpha_warmup_steps = alpha, distill, alpha_warmup_steps
        self.temp_range, self.sampler = temp_range, sampler
        self.itc = ITCLoss(model.config.embed_dim, queue_size, global_batch)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._init_momentum(model, model.momentum, momentum)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """batch: images, text_ids / text_mask [B, L], image_ids [B]. Returns {"loss", "itc", "itm"}."""
        require_keys(batch, ("images", "text_ids", "text_mask"), "RetrievalObjective")
        model = self.model
        ids, mask = batch["text_ids"], batch["text_mask"].bool()
        image_ids = batch_image_ids(batch, ids.device)
        if image_ids is None:
            raise KeyError(
                "RetrievalObjective needs 'image_ids' [B] (captions of one image are all positives)"
            )
        alpha = self.alpha_now()
        if self.training:
            self.step += 1
        clamp_temperature(model.temp, *self.temp_range)
        v = model.encode_image(batch["images"])
        t = model.encode_text(ids, mask)
        with torch.no_grad():
            m = model.momentum_view()
            img_m = m.image_features(m.encode_image(batch["images"]))
            txt_m = m.text_features(m.encode_text(ids, mask))
        itc, extras = self.itc(
            model.image_features(v),
            model.text_features(t),
            img_m,
            txt_m,
            model.temp,
            alpha,
            image_ids,
            enqueue=self.training,
        )
        itm, _ = itm_loss(
            model, v, t, mask, extras["sim_i2t"], extras["sim_t2i"], extras["positives"], self.sampler
        )
        return {"loss": itc + itm, "itc": itc.detach(), "itm": itm.detach()}


OBJECTIVES = ("pretrain", "vqa", "caption", "grounding", "retrieval", "nlvr", "ve", "scst")


def build_objective(task: str, model: nn.Module, tokenizer=None, **options: Any) -> nn.Module:
    """The training objective of `task` around its task model (`build_model(config, task)`).

    `tokenizer` (a `mplug_fast.data.Tokenizer`) is needed by pretrain (special ids, "##" table) and grounding
    (coordinate tokens). `options` go to the objective's constructor.
    """
    if task not in OBJECTIVES:
        raise ValueError(f"unknown objective {task!r}; available: {list(OBJECTIVES)}")
    model_task = getattr(model, "task", None)
    if model_task != task:
        raise ValueError(f"the {task!r} objective needs the {task!r} model, got a {model_task!r} model")
    if task in ("pretrain", "grounding") and tokenizer is None:
        raise ValueError(f"the {task!r} objective needs the tokenizer")
    if task == "pretrain":
        return PretrainObjective.from_tokenizer(model, tokenizer, **options)
    if task == "grounding":
        return GroundingObjective.from_tokenizer(model, tokenizer, **options)
    if task in ("nlvr", "ve"):  # cross-entropy on the classification head (objectives/classification.py)
        from mplug_fast.objectives.classification import ClassificationObjective

        return ClassificationObjective(model, **options)
    if task == "scst":  # CIDEr-D self-critical training (objectives/scst.py); a data spec gives the DF table
        from mplug_fast.objectives.scst import SCSTObjective, references_from_data

        refs = options.pop("references_df", None)
        if refs is None:
            raise ValueError("the 'scst' objective needs references_df (the training references)")
        refs = references_from_data(refs) if isinstance(refs, Mapping) else refs
        return SCSTObjective(model, tokenizer, references_df=refs, **options)
    return {"vqa": VQAObjective, "caption": CaptionObjective, "retrieval": RetrievalObjective}[task](
        model, **options
    )

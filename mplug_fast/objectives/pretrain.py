"""The pretraining objective: ITC + ITM + MLM + PrefixLM with momentum distillation (docs/fidelity.md §4).

    objective = PretrainObjective(model, tokenizer)        # model: MPlugForPretraining
    out = objective(batch)                                 # {"loss", "itc", "itm", "mlm", "prefix_lm"}
    out["loss"].backward(); optimizer.step()
    objective.after_optimizer_step()                       # EMA of the momentum encoders

One step: the image and the text are encoded once; ITC compares their projections with the momentum
keys and the queue; ITM fuses positives and hard negatives (sampled from the ITC similarities); MLM
re-encodes the masked text and fuses it with the same image states; PrefixLM encodes a random word prefix,
fuses it with the image and decodes the rest. The momentum model (`model.momentum_view()`) encodes the
image and the text once for the ITC keys and then gives the soft targets of MLM and PrefixLM.

Alpha warm-up (fidelity §4): alpha_t = alpha * min(1, step / alpha_warmup_steps), with `step` the number of
training forwards done so far (a buffer, so it resumes); the official runs warm up over the first epoch
(alpha_warmup_steps = iterations per epoch); 0 = no warm-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mplug_fast.modeling.momentum import MomentumCopies, check_frozen, momentum_update, parameter_pairs
from mplug_fast.modeling.mplug import MomentumView
from mplug_fast.objectives.base import Objective
from mplug_fast.objectives.itc import DEFAULT_QUEUE_SIZE, ITCLoss, clamp_temperature, text_identity
from mplug_fast.objectives.itm import Sampler, itm_loss
from mplug_fast.objectives.mlm import mask_tokens, mlm_loss
from mplug_fast.objectives.prefix_lm import continuation_table, prefix_lm_loss, split_prefix

LOSSES = ("itc", "itm", "mlm", "prefix_lm")


def batch_image_ids(batch: Mapping[str, Any], device: torch.device) -> Tensor | None:
    """long [B] image ids from "image_ids" (tensor) or the pass-through "image_id" list; None if absent."""
    ids = batch.get("image_ids", batch.get("image_id"))
    if ids is None:
        return None
    return torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1)


def require_keys(batch: Mapping[str, Any], keys: tuple[str, ...], who: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{who} needs batch keys {list(keys)}; missing {missing} (got {sorted(batch)})")


def warm_alpha(alpha: float, step: Tensor, warmup_steps: int) -> float:
    """alpha * min(1, step / warmup_steps) (alpha itself when warmup_steps == 0)."""
    if warmup_steps <= 0:
        return alpha
    return alpha * min(1.0, int(step) / warmup_steps)


class MomentumMixin:
    """Shared bookkeeping: the EMA pairs, the alpha warm-up counter."""

    def _init_momentum(
        self, online: nn.Module, momentum: Mapping[str, nn.Module] | None, decay: float
    ) -> None:
        if momentum is not None:
            check_frozen(momentum)
        # Plain references (not registered: the modules already live under self.model / self.momentum).
        self.__dict__["_online"], self.__dict__["_momentum_modules"] = online, momentum
        self.momentum_decay = decay

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """p_m <- m·p_m + (1 − m)·p over every (online, momentum) parameter pair, by foreach ops."""
        if not self._momentum_modules:
            return
        src, dst = parameter_pairs(self._online, self._momentum_modules)
        momentum_update(src, dst, self.momentum_decay)

    @torch.no_grad()
    def copy_to_momentum(self) -> None:
        """Reset every momentum copy to the online weights (after loading weights into the model)."""
        if self._momentum_modules:
            src, dst = parameter_pairs(self._online, self._momentum_modules)
            torch._foreach_copy_(dst, src)

    def next_alpha(self) -> float:
        """This forward's distillation weight (0 without distillation); a training forward counts a step."""
        alpha = warm_alpha(self.alpha, self.step, self.alpha_warmup_steps) if self.distill else 0.0
        if self.training:
            self.step += 1
        return alpha


@dataclass(frozen=True)
class ContrastiveOptions:
    """`ContrastiveObjective` options: the retrieval task's, and the first of pretraining's (official: queue
    65536, momentum 0.995, alpha 0.4, distillation on)."""

    queue_size: int = DEFAULT_QUEUE_SIZE  # ITC queue slots (a multiple of the global batch)
    momentum: float = 0.995  # EMA decay of the momentum copies
    alpha: float = 0.4  # distillation weight
    distill: bool = True  # use the momentum soft targets
    alpha_warmup_steps: int = 0  # alpha warm-up length in training forwards (0 = none)
    temp_range: tuple[float, float] = (0.001, 0.5)  # the temperature clamp
    global_batch: int | None = None  # checked against queue_size at construction when given
    # False (official): ITC positives by image id only; True: identical texts are positives too, for ITC and
    # as never-drawn ITM negatives (data where images share captions)
    same_text_positive: bool = False
    # True (official): ITM negatives drawn by the ITC similarities; False: uniformly among the non-positives
    # (a small model whose ITC ranks first the look-alikes it cannot tell apart from the positive, e.g. the
    # same colour in the synthetic world, learns nothing from those)
    hard_negatives: bool = True


class ContrastiveObjective(MomentumMixin, Objective):
    """ITC (momentum keys and queue, distillation) + ITM (negatives drawn by the ITC similarities) on a model
    with momentum copies: the retrieval finetuning loss and the first two losses of pretraining. Batch keys:
    images, text_ids, text_mask and optionally image_ids (captions of the same image are then positives for
    ITC and never ITM negatives).

    Args:
        model: the pretrain or retrieval task model (with momentum copies).
        sampler: ITM hard-negative sampler (default `torch.multinomial`).
        options: `ContrastiveOptions`.
    """

    def __init__(self, model: nn.Module, *, sampler: Sampler | None = None, **options: Any):
        super().__init__()
        if getattr(model, "momentum", None) is None:
            name = type(self).__name__
            raise ValueError(
                f"{name} needs a model with momentum copies (the pretrain or retrieval task model)"
            )
        o = ContrastiveOptions(**options)
        self.model = model
        self.alpha, self.distill, self.alpha_warmup_steps = o.alpha, o.distill, o.alpha_warmup_steps
        self.temp_range, self.sampler, self.hard_negatives = o.temp_range, sampler, o.hard_negatives
        self.itc = ITCLoss(model.config.embed_dim, o.queue_size, o.global_batch, o.same_text_positive)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._init_momentum(model, model.momentum, o.momentum)
        self.weights = {"itc": 1.0, "itm": 1.0}

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """batch: images [B, 3, R, R], text_ids long [B, L], text_mask bool [B, L] (+ image_ids [B]).
        Returns {"loss": the weighted sum (backward this), and each computed part, detached}."""
        require_keys(batch, ("images", "text_ids", "text_mask"), type(self).__name__)
        model, w = self.model, self.weights
        images, ids = batch["images"], batch["text_ids"]
        mask = batch["text_mask"].bool()
        image_ids = batch_image_ids(batch, ids.device)
        alpha = self.next_alpha()
        clamp_temperature(model.temp, *self.temp_range)
        momentum = MomentumView(self._momentum_modules)

        v = model.encode_image(images)  # [B, Nv, D]
        t = model.encode_text(ids, mask)  # [B, L, D]
        with torch.no_grad():
            v_m = momentum.encode_image(images)
        out: dict[str, Tensor] = {}
        if w["itc"] or w["itm"]:
            with torch.no_grad():
                t_m = momentum.encode_text(ids, mask)
                img_m, txt_m = momentum.image_features(v_m), momentum.text_features(t_m)
            out["itc"], extras = self.itc(
                model.image_features(v),
                model.text_features(t),
                img_m,
                txt_m,
                model.temp,
                alpha,
                image_ids,
                enqueue=self.training,
                text_hashes=text_identity(ids, mask) if self.itc.same_text_positive else None,
            )
            if w["itm"]:
                sims = extras["sim_i2t"], extras["sim_t2i"], extras["positives"]
                out["itm"], _ = itm_loss(model, v, t, mask, *sims, self.sampler, self.hard_negatives)
        out.update(self.text_losses(v, ids, mask, momentum, v_m, alpha))
        loss = sum(w[name] * out[name] for name in w if name in out and w[name])
        return {"loss": loss, **{name: part.detach() for name, part in out.items()}}

    def text_losses(
        self, v: Tensor, ids: Tensor, mask: Tensor, momentum: MomentumView, v_m: Tensor, alpha: float
    ) -> dict[str, Tensor]:
        """The losses after ITC and ITM (none here; pretraining's MLM and PrefixLM)."""
        return {}


class PretrainObjective(ContrastiveObjective):
    """ITC + ITM (`ContrastiveObjective`) + MLM + PrefixLM on a `MPlugForPretraining`.

    Args:
        model: the pretraining model (with momentum copies).
        mask_id, pad_id, cls_id, sep_id, vocab_size: tokenizer special ids (see `from_tokenizer`).
        continuation: bool [V] WordPiece "##" table for the PrefixLM word split.
        mlm_probability: 0.15.
        weights: per-loss weights (default 1 each); a weight of 0 skips that loss.
        contrastive: ``sampler`` and the `ContrastiveOptions`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mask_id: int,
        pad_id: int,
        cls_id: int,
        sep_id: int,
        vocab_size: int,
        continuation: Tensor | None = None,
        mlm_probability: float = 0.15,
        weights: Mapping[str, float] | None = None,
        **contrastive: Any,
    ):
        super().__init__(model, **contrastive)
        unknown = set(weights or {}) - set(LOSSES)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; available: {list(LOSSES)}")
        self.mask_id, self.pad_id, self.cls_id, self.sep_id = mask_id, pad_id, cls_id, sep_id
        self.vocab_size, self.mlm_probability = vocab_size, mlm_probability
        if continuation is None:
            continuation = torch.zeros(vocab_size, dtype=torch.bool)
        self.register_buffer("continuation", continuation.bool(), persistent=False)
        # MLM distillation needs momentum MLM logits (ALBEF: text_encoder_m is a BertForMaskedLM). The model
        # momentum copies stop at the encoders / decoder (the official checkpoint layout), so the EMA copy of
        # the MLM head lives here; the tied word embeddings come from the momentum text encoder.
        heads = ["mlm_head"] if "mlm_head" not in model.momentum and model.mlm_head is not None else []
        self.momentum_heads = MomentumCopies(model, heads)
        self._momentum_all = {**dict(model.momentum.items()), **dict(self.momentum_heads.items())}
        self._init_momentum(model, self._momentum_all, self.momentum_decay)
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in LOSSES}

    @classmethod
    def from_tokenizer(cls, model: nn.Module, tokenizer, **options: Any) -> PretrainObjective:
        """Special ids and the "##" table from a `mplug_fast.data.Tokenizer`."""
        return cls(
            model,
            mask_id=tokenizer.mask_token_id,
            pad_id=tokenizer.pad_token_id,
            cls_id=tokenizer.cls_token_id,
            sep_id=tokenizer.sep_token_id,
            vocab_size=model.config.text.vocab_size,
            continuation=continuation_table(tokenizer.get_vocab(), model.config.text.vocab_size),
            **options,
        )

    def text_losses(
        self, v: Tensor, ids: Tensor, mask: Tensor, momentum: MomentumView, v_m: Tensor, alpha: float
    ) -> dict[str, Tensor]:
        """MLM and PrefixLM (those of nonzero weight) of image states v [B, Nv, D] (momentum: v_m) and text
        ids / mask bool [B, L]."""
        out: dict[str, Tensor] = {}
        if self.weights["mlm"]:
            masked, labels = mask_tokens(
                ids,
                mask,
                mask_id=self.mask_id,
                vocab_size=self.vocab_size,
                special_ids=(self.pad_id, self.cls_id, self.sep_id),
                probability=self.mlm_probability,
            )
            out["mlm"] = mlm_loss(
                self.model, v, masked, mask, labels, momentum=momentum, image_states_m=v_m, alpha=alpha
            )
        if self.weights["prefix_lm"]:
            split = split_prefix(
                ids,
                mask,
                continuation=self.continuation,
                cls_id=self.cls_id,
                sep_id=self.sep_id,
                pad_id=self.pad_id,
            )
            out["prefix_lm"] = prefix_lm_loss(
                self.model, v, split, momentum=momentum, image_states_m=v_m, alpha=alpha
            )
        return out

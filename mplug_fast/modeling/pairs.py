"""Classification heads on the fusion output: visual entailment (SNLI-VE) and two-image reasoning (NLVR2).

The official mPLUG release reports SNLI-VE and NLVR2 results but ships no model code for them
(docs/fidelity.md §8); these heads follow the recipe its peers use (ALBEF / BLIP / UNITER: a 2-layer MLP,
Linear -> ReLU -> Linear, on the fused text [CLS]). Written here from that description.

    VE:    image [B,3,R,R] + hypothesis [B,L] -> fusion -> t'[:, 0] [B,D] -> MLP -> logits [B,3]
    NLVR:  images [B,2,3,R,R] + statement [B,L]
               -> ViT on the 2B images at once, text encoder once on the B statements
               -> fusion once on 2B (image, statement) pairs -> t'[:, 0] [2B,D]
               -> [cls_left ; cls_right] [B,2D] -> MLP -> logits [B,2]

Class order: VE (contradiction, neutral, entailment) = 0, 1, 2 (the ALBEF / BLIP SNLI-VE label ids);
NLVR (False, True) = 0, 1.

NLVR design (decision): each image is fused with the statement separately and the two fused [CLS] vectors
are concatenated in (left, right) order (UNITER's "pair" setting). ALBEF / BLIP instead split the cross-
attention of every fusion layer between the two images, which needs a different fusion module and an extra
pretraining stage for it (ALBEF's text-assignment task); mPLUG's skip-connected fusion reads one image per
text, so the pair setting reuses the pretrained fusion unchanged and only the head is new. The order of the
concatenation is what lets the head tell "the left image" from "the right image". Cost: the text encoder runs
once per statement; the fusion runs once on a 2B batch (the statement states are copied per image because
the fusion updates them).

Both models load from a pretraining (or any vision + text + fusion) checkpoint; `cls_head` is the only new
part (`new_head_prefixes`), freshly initialised by `init_weights`.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from mplug_fast.modeling.heads import ClassifierHead
from mplug_fast.modeling.mplug import MPlug

VE_LABELS: tuple[str, ...] = ("contradiction", "neutral", "entailment")
NLVR_LABELS: tuple[str, ...] = ("False", "True")


def _check_text(text_ids: Tensor, batch: int, who: str) -> None:
    if text_ids.dim() != 2 or text_ids.shape[0] != batch:
        raise ValueError(f"{who}: text_ids must be [B={batch}, L], got {list(text_ids.shape)}")


class _FusedCLSClassifier(MPlug):
    """Logits from the fused text [CLS] with each of `images_per_text` images, concatenated ([n * D])."""

    components = ("text_encoder", "fusion")
    labels: ClassVar[tuple[str, ...]] = ()
    images_per_text: ClassVar[int] = 1
    new_head_prefixes: ClassVar[tuple[str, ...]] = ("cls_head.",)

    def __init__(self, config, *, task: str | None = None):
        super().__init__(config, task=task)
        D = config.text.hidden_size
        self.cls_head = ClassifierHead(self.images_per_text * D, D, len(self.labels))


class MPlugForVE(_FusedCLSClassifier):
    """Visual entailment: does the image entail, contradict or leave open the hypothesis? (3 classes)."""

    labels = VE_LABELS

    def forward(self, images: Tensor, text_ids: Tensor, text_mask: Tensor | None) -> Tensor:
        """images [B, 3, R, R]; text_ids / text_mask [B, L] (mask 1/True = token). Returns logits [B, 3]."""
        if images.dim() != 4:
            raise ValueError(f"MPlugForVE: images must be [B, 3, R, R], got {list(images.shape)}")
        _check_text(text_ids, images.shape[0], "MPlugForVE")
        v = self.encode_image(images)  # [B, Nv, D]
        t = self.encode_text(text_ids, text_mask)  # [B, L, D]
        _, t = self.fuse(v, t, text_mask)
        return self.cls_head(t[:, 0])  # [B, 3]


class MPlugForNLVR(_FusedCLSClassifier):
    """NLVR2: is the statement true of the (left, right) image pair? (2 classes; design in the module doc)."""

    labels = NLVR_LABELS
    images_per_text = 2

    def pair_features(self, images: Tensor, text_ids: Tensor, text_mask: Tensor | None) -> Tensor:
        """The fused statement [CLS] with each image: images [B, 2, 3, R, R], text [B, L] -> [B, 2, D]."""
        if images.dim() != 5 or images.shape[1] != 2:
            raise ValueError(
                f"MPlugForNLVR: images must be [B, 2, 3, R, R] (left, right), got {list(images.shape)}"
            )
        B = images.shape[0]
        _check_text(text_ids, B, "MPlugForNLVR")
        flat = images.transpose(0, 1).reshape(2 * B, *images.shape[2:])  # copy: [2B, 3, R, R], lefts first
        v = self.encode_image(flat)  # [2B, Nv, D]
        t = self.encode_text(text_ids, text_mask)  # [B, L, D]: once per statement
        t2 = t.repeat(2, 1, 1)  # copy: [2B, L, D], row b and B + b are statement b
        m2 = None if text_mask is None else text_mask.repeat(2, 1)  # [2B, L]
        _, t2 = self.fuse(v, t2, m2)
        cls = t2[:, 0].view(2, B, -1)  # [2, B, D]
        return cls.transpose(0, 1)  # [B, 2, D]: (left, right)

    def forward(self, images: Tensor, text_ids: Tensor, text_mask: Tensor | None) -> Tensor:
        """images [B, 2, 3, R, R] (left, right); text_ids / text_mask [B, L]. Returns logits [B, 2]."""
        cls = self.pair_features(images, text_ids, text_mask)  # [B, 2, D]
        return self.cls_head(cls.flatten(1))  # [B, 2D] = [left; right] -> [B, 2]

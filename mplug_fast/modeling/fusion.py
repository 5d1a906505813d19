"""The cross-modal skip-connected fusion (paper §3.2; official MM `FusionEncoder`).

Fusion layer j (0-based) is *connected* iff `j != 0 and j % S == 0`, otherwise *asymmetric*:

* asymmetric co-attention: text self-attention -> text-to-image cross-attention -> FFN; the image
  states are read, never written;
* connected attention: the layer's self-attention over the concatenation [image; text] (both
  padding masks, bidirectional) -> FFN over both; then `image <- image + image_out` (the extra
  residual of the released code: image_out already contains a post-LN residual of image) and
  `text <- text_out`.

Base (S=3, 6 layers) has one connected layer (j=3); large (S=6) has none, so its image states come
back unchanged. A connected layer owns no cross-attention weights (the official slot has them, unused).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mplug_fast.config import MPlugConfig
from mplug_fast.modeling.layers import TransformerLayer
from mplug_fast.modeling.text import bert_layer_args


class AsymmetricCoAttentionLayer(TransformerLayer):
    """Text queries attend to image keys/values; the image is not updated."""

    def __init__(self, config: MPlugConfig):
        super().__init__(**bert_layer_args(config), cross_attention=True)

    def forward(
        self, v: Tensor, t: Tensor, v_mask: Tensor | None, t_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """v: [B, Nv, D] image; t: [B, Lt, D] text; masks bool, True = attend. Returns (v unchanged, t')."""
        return v, super().forward(t, t_mask, memory=v, memory_mask=v_mask)


class ConnectedAttentionLayer(TransformerLayer):
    """Joint self-attention + FFN over [image; text]; the image gets an extra residual."""

    def __init__(self, config: MPlugConfig):
        super().__init__(**bert_layer_args(config), cross_attention=False)

    def forward(
        self, v: Tensor, t: Tensor, v_mask: Tensor | None, t_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """v: [B, Nv, D]; t: [B, Lt, D]; masks bool (True = attend). Returns (v + y[:, :Nv], y[:, Nv:])."""
        Nv = v.shape[1]
        x = torch.cat([v, t], dim=1)  # copy: [B, Nv + Lt, D]
        mask = joint_mask(v, t, v_mask, t_mask)  # [B, Nv + Lt] or None
        y = super().forward(x, mask)  # [B, Nv + Lt, D]
        return v + y[:, :Nv], y[:, Nv:]


def joint_mask(v: Tensor, t: Tensor, v_mask: Tensor | None, t_mask: Tensor | None) -> Tensor | None:
    """[v_mask; t_mask] as bool [B, Nv + Lt] (None when neither side has padding)."""
    if v_mask is None and t_mask is None:
        return None
    B, Nv, Lt = v.shape[0], v.shape[1], t.shape[1]
    if v_mask is None:
        v_mask = torch.ones(B, Nv, dtype=torch.bool, device=v.device)
    if t_mask is None:
        t_mask = torch.ones(B, Lt, dtype=torch.bool, device=t.device)
    return torch.cat([v_mask, t_mask], dim=1)


class SkipConnectedFusion(nn.Module):
    """`fusion.layers` layers, connected at j != 0 and j % S == 0, asymmetric elsewhere.

    Every asymmetric layer projects the image K/V with its own `cross.kv_proj` (one GEMM per layer, as the
    official code): one wide GEMM over the weights of a run of asymmetric layers (the image does not change
    inside a run) measured no faster at inference and 2-10 % slower in training on CPU (docs/experiments.md),
    since its weights must be concatenated on every call.
    """

    def __init__(self, config: MPlugConfig):
        super().__init__()
        self.config = config.fusion
        self.layers = nn.ModuleList(
            ConnectedAttentionLayer(config)
            if config.fusion.is_connected(j)
            else AsymmetricCoAttentionLayer(config)
            for j in range(config.fusion.layers)
        )

    def forward(
        self, v: Tensor, t: Tensor, t_mask: Tensor | None = None, v_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """v: [B, Nv, D] image states; t: [B, Lt, D] text states; t_mask / v_mask: bool [B, Lt] / [B, Nv],
        True = attend (None = no padding). Returns (image states [B, Nv, D], text states [B, Lt, D])."""
        if v.shape[0] != t.shape[0] or v.shape[-1] != t.shape[-1]:
            raise ValueError(
                f"image states {list(v.shape)} and text states {list(t.shape)} disagree on B or D"
            )
        for layer in self.layers:
            v, t = layer(v, t, v_mask, t_mask)
        return v, t

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
import torch.nn.functional as F
from torch import Tensor, nn

from mplug_fast.config import MPlugConfig
from mplug_fast.modeling.layers import TransformerLayer
from mplug_fast.modeling.text import bert_layer_args


class AsymmetricCoAttentionLayer(TransformerLayer):
    """Text queries attend to image keys/values; the image is not updated."""

    def __init__(self, config: MPlugConfig):
        super().__init__(**bert_layer_args(config), cross_attention=True)

    def forward(
        self,
        v: Tensor,
        t: Tensor,
        v_mask: Tensor | None,
        t_mask: Tensor | None,
        image_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """v: [B, Nv, D] image; t: [B, Lt, D] text; masks bool, True = attend; image_kv: this layer's
        cross-attention (k, v) of `v` when already projected, each [B, H, Nv, Dh].
        Returns (v unchanged, t')."""
        memory = v if image_kv is None else None
        return v, super().forward(t, t_mask, memory=memory, memory_mask=v_mask, memory_kv=image_kv)


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

    The image states do not change between two connected layers, so the cross-attention K/V of a run
    of consecutive asymmetric layers come from one wide GEMM ([B*Nv, D] x [D, run * 2D]) instead of one
    GEMM per layer. The weights stay per layer (`layers[j].cross.kv_proj`, the official key mapping); the
    GEMM concatenates them on the fly.
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
        # first layer of each run of consecutive asymmetric layers -> the run's layer indices
        self.asymmetric_runs: dict[int, tuple[int, ...]] = {}
        run: list[int] = []
        for j in range(config.fusion.layers + 1):
            if j < config.fusion.layers and not config.fusion.is_connected(j):
                run.append(j)
            elif run:
                self.asymmetric_runs[run[0]] = tuple(run)
                run = []

    def project_image_kv(self, v: Tensor, run: tuple[int, ...]) -> dict[int, tuple[Tensor, Tensor]]:
        """Cross-attention (k, v) of the image for every layer of `run`, from one GEMM.

        v: [B, Nv, D] -> {layer index: (k, v)}, each [B, H, Nv, Dh] (strided views of one buffer)."""
        crosses = [self.layers[j].cross for j in run]
        if len(run) == 1:
            return {run[0]: crosses[0].project_kv(v)}
        weight = torch.cat([c.kv_proj.weight for c in crosses])  # copy: [run * 2D, D]
        bias = torch.cat([c.kv_proj.bias for c in crosses])  # [run * 2D]
        B, Nv, _ = v.shape
        H, Dh = crosses[0].num_heads, crosses[0].head_dim
        kv = F.linear(v, weight, bias).view(B, Nv, len(run), 2, H, Dh)  # [B, Nv, run, 2, H, Dh]
        kv = kv.permute(2, 3, 0, 4, 1, 5)  # [run, 2, B, H, Nv, Dh] (view)
        return {j: (kv[r, 0], kv[r, 1]) for r, j in enumerate(run)}

    def forward(
        self, v: Tensor, t: Tensor, t_mask: Tensor | None = None, v_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """v: [B, Nv, D] image states; t: [B, Lt, D] text states; t_mask / v_mask: bool [B, Lt] / [B, Nv],
        True = attend (None = no padding). Returns (image states [B, Nv, D], text states [B, Lt, D])."""
        if v.shape[0] != t.shape[0] or v.shape[-1] != t.shape[-1]:
            raise ValueError(
                f"image states {list(v.shape)} and text states {list(t.shape)} disagree on B or D"
            )
        image_kv: dict[int, tuple[Tensor, Tensor]] = {}
        for j, layer in enumerate(self.layers):
            if isinstance(layer, ConnectedAttentionLayer):
                v, t = layer(v, t, v_mask, t_mask)
                continue
            if j in self.asymmetric_runs:
                image_kv = self.project_image_kv(v, self.asymmetric_runs[j])  # v is fixed within the run
            v, t = layer(v, t, v_mask, t_mask, image_kv.get(j))
        return v, t

"""The two conventional fusion designs the paper compares against (Fig. 1), at equal width and depth,
an end-to-end model with a swappable fusion, and closed-form FLOP counts of all of them.

Styles (`build_fusion(style, config)`, each `forward(v, t, t_mask=None, v_mask=None) -> (v', t')`):

    skip        `mplug_fast.modeling.fusion.SkipConnectedFusion`: layer j connected iff j != 0 and j % S == 0,
                asymmetric co-attention otherwise (S = config.fusion.stride)
    connected   `AllConnectedFusion`: one stream over [image; text], self-attention + FFN at every layer
    coattn      `CoAttentionFusion`: two streams; at every layer both self-attend, then each cross-attends
                to the other's (self-attended) states, then each runs its FFN

All built from `mplug_fast.modeling.layers` (post-LN BERT sub-blocks, the width / heads / FFN / dropout of
`config.text`), `config.fusion.layers` layers each. FLOPs count the GEMMs and the two attention matmuls
(QK^T, PV) as 2 x multiply-adds, per sample: exactly what `torch.utils.flop_counter.FlopCounterMode` counts
(LayerNorm, softmax, GELU, residual adds are not counted by either).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mplug_fast.config import MPlugConfig
from mplug_fast.modeling.decoder import TextDecoder
from mplug_fast.modeling.fusion import SkipConnectedFusion, joint_mask
from mplug_fast.modeling.layers import MLP, CrossAttention, SelfAttention, TransformerLayer
from mplug_fast.modeling.text import TextEncoder, bert_layer_args
from mplug_fast.modeling.vision import VisionTransformer, build_adapter

STYLES = ("skip", "connected", "coattn")


class AllConnectedFusion(nn.Module):
    """Single-stream fusion: `config.fusion.layers` BERT layers over the concatenation [image; text]."""

    def __init__(self, config: MPlugConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(**bert_layer_args(config)) for _ in range(config.fusion.layers)
        )

    def forward(
        self, v: Tensor, t: Tensor, t_mask: Tensor | None = None, v_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """v: [B, Nv, D]; t: [B, Lt, D]; masks bool [B, Lt] / [B, Nv], True = attend (None = no padding).
        Returns (image states [B, Nv, D], text states [B, Lt, D]) split from the joint stream."""
        _check_streams(v, t)
        Nv = v.shape[1]
        x = torch.cat([v, t], dim=1)  # copy: [B, Nv + Lt, D]
        mask = joint_mask(v, t, v_mask, t_mask)  # [B, Nv + Lt] or None
        for layer in self.layers:
            x = layer(x, mask)
        return x[:, :Nv], x[:, Nv:]


class CoAttentionLayer(nn.Module):
    """Two-stream co-attention layer (post-LN, each sub-block `LN(x + dropout(f(x)))`):

    v1 = SA_v(v),  t1 = SA_t(t)                     self-attention in each stream
    v2 = CA_v(v1 <- t1),  t2 = CA_t(t1 <- v1)        each stream cross-attends to the other
    v3 = FFN_v(v2),  t3 = FFN_t(t2)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        intermediate_dim: int,
        *,
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        backend: str | None = None,
    ):
        super().__init__()
        self.attn_v = SelfAttention(dim, num_heads, attn_dropout, backend)
        self.attn_t = SelfAttention(dim, num_heads, attn_dropout, backend)
        self.cross_v = CrossAttention(dim, dim, num_heads, attn_dropout, backend)  # image queries, text K/V
        self.cross_t = CrossAttention(dim, dim, num_heads, attn_dropout, backend)  # text queries, image K/V
        self.mlp_v = MLP(dim, intermediate_dim, "gelu")
        self.mlp_t = MLP(dim, intermediate_dim, "gelu")
        self.norms = nn.ModuleDict(
            {name: nn.LayerNorm(dim, eps=layer_norm_eps) for name in ("v1", "t1", "v2", "t2", "v3", "t3")}
        )
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, v: Tensor, t: Tensor, v_mask: Tensor | None, t_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """v: [B, Nv, D]; t: [B, Lt, D]; masks bool (True = attend) or None. Returns (v', t'), same shapes."""
        n, drop = self.norms, self.dropout
        v1 = n["v1"](v + drop(self.attn_v(v, v_mask)))
        t1 = n["t1"](t + drop(self.attn_t(t, t_mask)))
        v2 = n["v2"](v1 + drop(self.cross_v(v1, t1, t_mask)))
        t2 = n["t2"](t1 + drop(self.cross_t(t1, v1, v_mask)))
        return n["v3"](v2 + drop(self.mlp_v(v2))), n["t3"](t2 + drop(self.mlp_t(t2)))


class CoAttentionFusion(nn.Module):
    """`config.fusion.layers` two-stream co-attention layers (`CoAttentionLayer`)."""

    def __init__(self, config: MPlugConfig):
        super().__init__()
        args = bert_layer_args(config)
        self.layers = nn.ModuleList(
            CoAttentionLayer(
                args["dim"],
                args["num_heads"],
                args["intermediate_dim"],
                layer_norm_eps=args["layer_norm_eps"],
                dropout=args["dropout"],
                attn_dropout=args["attn_dropout"],
                backend=config.attention_backend,
            )
            for _ in range(config.fusion.layers)
        )

    def forward(
        self, v: Tensor, t: Tensor, t_mask: Tensor | None = None, v_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """v: [B, Nv, D]; t: [B, Lt, D]; masks bool [B, Lt] / [B, Nv] (True = attend). Returns (v', t')."""
        _check_streams(v, t)
        for layer in self.layers:
            v, t = layer(v, t, v_mask, t_mask)
        return v, t


def _check_streams(v: Tensor, t: Tensor) -> None:
    if v.dim() != 3 or t.dim() != 3 or v.shape[0] != t.shape[0] or v.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"image states {list(v.shape)} and text states {list(t.shape)} must be [B, Nv, D] and [B, Lt, D]"
        )


def build_fusion(style: str, config: MPlugConfig) -> nn.Module:
    """'skip' (stride = config.fusion.stride), 'connected' or 'coattn', `config.fusion.layers` layers deep."""
    if style == "skip":
        return SkipConnectedFusion(config)
    if style == "connected":
        return AllConnectedFusion(config)
    if style == "coattn":
        return CoAttentionFusion(config)
    raise ValueError(f"unknown fusion style {style!r}; choose one of {STYLES}")


class EndToEnd(nn.Module):
    """ViT (+ adapter) -> text encoder -> fusion -> decoder over [v'; t'] (the VQA / PrefixLM forward).

    forward(images [B, 3, R, R], ids [B, Lt], answer_ids [B, La]) -> logits [B, La, V].
    """

    def __init__(self, config: MPlugConfig, style: str):
        super().__init__()
        self.vision = VisionTransformer(config.vision, config.attention_backend)
        self.adapter = build_adapter(config)
        self.text_encoder = TextEncoder(config)
        self.fusion = build_fusion(style, config)
        self.decoder = TextDecoder(config)

    def forward(self, images: Tensor, ids: Tensor, answer_ids: Tensor) -> Tensor:
        v = self.adapter(self.vision(images))  # [B, Nv, D]
        t = self.text_encoder(ids)  # [B, Lt, D]
        v, t = self.fusion(v, t)
        memory = torch.cat([v, t], dim=1)  # [B, Nv + Lt, D]
        return self.decoder(answer_ids, None, memory)  # [B, La, V]


# ------------------------------------------------------------------------------------------ FLOP formulas
# Per sample, forward. n = tokens, d = width, f = FFN width; attention over all heads costs 4 * lq * lk * d.


def linear_flops(n: int, d_in: int, d_out: int) -> int:
    return 2 * n * d_in * d_out


def self_attention_flops(n: int, d: int) -> int:
    """Fused QKV projection, QK^T and PV, output projection."""
    return linear_flops(n, d, 3 * d) + 4 * n * n * d + linear_flops(n, d, d)


def cross_attention_flops(lq: int, m: int, d: int, d_mem: int | None = None) -> int:
    """Q projection of lq queries, K/V projection of m memory tokens, QK^T and PV, output projection."""
    return (
        linear_flops(lq, d, d) + linear_flops(m, d_mem or d, 2 * d) + 4 * lq * m * d + linear_flops(lq, d, d)
    )


def mlp_flops(n: int, d: int, f: int) -> int:
    return linear_flops(n, d, f) + linear_flops(n, f, d)


def asymmetric_layer_flops(nv: int, lt: int, d: int, f: int) -> int:
    """Text self-attention, text-to-image cross-attention, text FFN."""
    return self_attention_flops(lt, d) + cross_attention_flops(lt, nv, d) + mlp_flops(lt, d, f)


def connected_layer_flops(nv: int, lt: int, d: int, f: int) -> int:
    """Self-attention and FFN over nv + lt tokens."""
    return self_attention_flops(nv + lt, d) + mlp_flops(nv + lt, d, f)


def coattention_layer_flops(nv: int, lt: int, d: int, f: int) -> int:
    """Both streams: self-attention, cross-attention to the other stream, FFN."""
    return (
        self_attention_flops(nv, d)
        + self_attention_flops(lt, d)
        + cross_attention_flops(nv, lt, d)
        + cross_attention_flops(lt, nv, d)
        + mlp_flops(nv, d, f)
        + mlp_flops(lt, d, f)
    )


def fusion_flops(style: str, nv: int, lt: int, d: int, f: int, layers: int, stride: int = 3) -> int:
    """Forward FLOPs per sample of a fusion stack (skip: the released rule j != 0 and j % stride == 0)."""
    if style == "skip":
        return sum(
            connected_layer_flops(nv, lt, d, f)
            if (j != 0 and j % stride == 0)
            else asymmetric_layer_flops(nv, lt, d, f)
            for j in range(layers)
        )
    if style == "connected":
        return layers * connected_layer_flops(nv, lt, d, f)
    if style == "coattn":
        return layers * coattention_layer_flops(nv, lt, d, f)
    raise ValueError(f"unknown fusion style {style!r}; choose one of {STYLES}")


def end_to_end_flops(config: MPlugConfig, style: str, lt: int, la: int) -> dict[str, int]:
    """Forward FLOPs per sample of `EndToEnd`, by component, and the training FLOPs (forward + backward).

    Backward = 2 x forward for every GEMM / attention matmul (input and weight gradients; no recomputation),
    except the patch-embedding convolution, whose input (the image) needs no gradient: 1 x.
    """
    vc, tc = config.vision, config.text
    W, D, F, V = vc.width, tc.hidden_size, tc.intermediate_size, tc.vocab_size
    nv, patches = vc.num_tokens, vc.grid_size**2
    vit_block = self_attention_flops(nv, W) + mlp_flops(nv, W, int(W * vc.mlp_ratio))
    patch = 2 * patches * 3 * vc.patch_size**2 * W
    memory = nv + lt
    decoder_layer = self_attention_flops(la, D) + cross_attention_flops(la, memory, D) + mlp_flops(la, D, F)
    parts = {
        "vision": patch + vc.layers * vit_block + (linear_flops(nv, W, D) if config.has_adapter else 0),
        "text": tc.encoder_layers * connected_layer_flops(0, lt, D, F),
        "fusion": fusion_flops(style, nv, lt, D, F, config.fusion.layers, config.fusion.stride),
        "decoder": config.decoder.layers * decoder_layer + linear_flops(la, D, D) + linear_flops(la, D, V),
    }
    parts["forward"] = sum(parts.values())
    parts["train"] = 3 * parts["forward"] - patch
    return parts

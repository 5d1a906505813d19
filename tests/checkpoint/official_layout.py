"""An independent model of the official mPLUG checkpoint, for the loader tests.

`make_official_state_dict` writes random tensors under the official key names and shapes of
fidelity §2 (the whole CLIP with its text tower, 12 fusion slots, tied decoder head, momentum
copies, queues, grounding buffers). `official_forward_*` compute the official forward (§3) directly
from those raw keys with additive -10000 masks, sequence-first CLIP attention with `in_proj_weight`, and
the fusion loop of §3.3. Nothing here uses mplug_fast's modules or key maps: it is the oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class OfficialDims:
    width: int = 64  # ViT width W
    vision_layers: int = 2
    patch: int = 8
    grid: int = 4  # stored position grid (pretraining resolution / patch)
    hidden: int = 64  # BERT width D
    heads: int = 4
    intermediate: int = 64
    vocab: int = 120
    max_pos: int = 40
    text_layers: int = 2
    slots: int = 6  # num_hidden_layers of the fusion (released: 12)
    fusion_layers: int = 3  # the last `fusion_layers` slots run (released: 6)
    decoder_layers: int = 2
    clip_text_width: int = 16
    embed_dim: int = 16


def _bert_layer(prefix: str, d: OfficialDims, cross: bool, gen: torch.Generator) -> dict[str, Tensor]:
    D, I = d.hidden, d.intermediate
    shapes = {}
    blocks = ["attention"] + (["crossattention"] if cross else [])
    for block in blocks:
        for name in ("query", "key", "value"):
            shapes[f"{block}.self.{name}.weight"], shapes[f"{block}.self.{name}.bias"] = (D, D), (D,)
        shapes[f"{block}.output.dense.weight"], shapes[f"{block}.output.dense.bias"] = (D, D), (D,)
        shapes[f"{block}.output.LayerNorm.weight"], shapes[f"{block}.output.LayerNorm.bias"] = (D,), (D,)
    shapes["intermediate.dense.weight"], shapes["intermediate.dense.bias"] = (I, D), (I,)
    shapes["output.dense.weight"], shapes["output.dense.bias"] = (D, I), (D,)
    shapes["output.LayerNorm.weight"], shapes["output.LayerNorm.bias"] = (D,), (D,)
    return {prefix + k: _rand(s, gen, layer_norm=k.endswith("LayerNorm.weight")) for k, s in shapes.items()}


def _rand(shape, gen: torch.Generator, layer_norm: bool = False) -> Tensor:
    x = torch.randn(shape, generator=gen) * 0.2
    return 1.0 + x if layer_norm else x


def _bert_embeddings(prefix: str, d: OfficialDims, gen: torch.Generator) -> dict[str, Tensor]:
    D = d.hidden
    return {
        prefix + "position_ids": torch.arange(d.max_pos)[None],
        prefix + "word_embeddings.weight": _rand((d.vocab, D), gen),
        prefix + "position_embeddings.weight": _rand((d.max_pos, D), gen),
        prefix + "token_type_embeddings.weight": _rand((2, D), gen),
        prefix + "LayerNorm.weight": _rand((D,), gen, True),
        prefix + "LayerNorm.bias": _rand((D,), gen),
    }


def _clip(prefix: str, d: OfficialDims, gen: torch.Generator) -> dict[str, Tensor]:
    W, C = d.width, d.clip_text_width
    sd = {
        "visual.class_embedding": _rand((W,), gen),
        "visual.positional_embedding": _rand((d.grid**2 + 1, W), gen),
        "visual.proj": _rand((W, C), gen),
        "visual.conv1.weight": _rand((W, 3, d.patch, d.patch), gen),
        "visual.ln_pre.weight": _rand((W,), gen, True),
        "visual.ln_pre.bias": _rand((W,), gen),
        "visual.ln_post.weight": _rand((W,), gen, True),
        "visual.ln_post.bias": _rand((W,), gen),
        # the CLIP text tower (dead in mPLUG)
        "positional_embedding": _rand((7, C), gen),
        "text_projection": _rand((C, C), gen),
        "logit_scale": torch.tensor(4.6),
        "token_embedding.weight": _rand((50, C), gen),
        "ln_final.weight": _rand((C,), gen, True),
        "ln_final.bias": _rand((C,), gen),
    }
    for tower, width, layers in (("visual.transformer", W, d.vision_layers), ("transformer", C, 1)):
        for i in range(layers):
            p = f"{tower}.resblocks.{i}."
            sd |= {
                p + "attn.in_proj_weight": _rand((3 * width, width), gen),
                p + "attn.in_proj_bias": _rand((3 * width,), gen),
                p + "attn.out_proj.weight": _rand((width, width), gen),
                p + "attn.out_proj.bias": _rand((width,), gen),
                p + "ln_1.weight": _rand((width,), gen, True),
                p + "ln_1.bias": _rand((width,), gen),
                p + "ln_2.weight": _rand((width,), gen, True),
                p + "ln_2.bias": _rand((width,), gen),
                p + "mlp.c_fc.weight": _rand((4 * width, width), gen),
                p + "mlp.c_fc.bias": _rand((4 * width,), gen),
                p + "mlp.c_proj.weight": _rand((width, 4 * width), gen),
                p + "mlp.c_proj.bias": _rand((width,), gen),
            }
    return {prefix + k: v for k, v in sd.items()}


def make_official_state_dict(
    d: OfficialDims,
    *,
    seed: int = 0,
    pretrain_layout: bool = False,
    momentum: bool = False,
    queues: bool = False,
    grounding_buffers: bool = False,
) -> dict[str, Tensor]:
    """A full official-layout state dict (fine-tuned spelling unless `pretrain_layout`)."""
    gen = torch.Generator().manual_seed(seed)
    text = "text_encoder.bert." if pretrain_layout else "text_encoder."
    fusion = "fusion_encoder.fusion." if pretrain_layout else "fusion_encoder."
    sd: dict[str, Tensor] = _clip("visual_encoder.", d, gen)
    if d.width != d.hidden:
        sd |= {
            "visn_fc.weight": _rand((d.hidden, d.width), gen),
            "visn_fc.bias": _rand((d.hidden,), gen),
            "visn_layer_norm.weight": _rand((d.hidden,), gen, True),
            "visn_layer_norm.bias": _rand((d.hidden,), gen),
        }
    sd |= _bert_embeddings(text + "embeddings.", d, gen)
    for i in range(d.text_layers):
        sd |= _bert_layer(f"{text}encoder.layer.{i}.", d, False, gen)
    sd |= _bert_embeddings(fusion + "embeddings.", d, gen)
    for i in range(d.slots):
        sd |= _bert_layer(f"{fusion}encoder.layer.{i}.", d, True, gen)
    sd |= _bert_embeddings("text_decoder.bert.embeddings.", d, gen)
    for i in range(d.decoder_layers):
        sd |= _bert_layer(f"text_decoder.bert.encoder.layer.{i}.", d, True, gen)
    head = "text_decoder.cls.predictions."
    sd |= {
        head + "bias": _rand((d.vocab,), gen),
        head + "transform.dense.weight": _rand((d.hidden, d.hidden), gen),
        head + "transform.dense.bias": _rand((d.hidden,), gen),
        head + "transform.LayerNorm.weight": _rand((d.hidden,), gen, True),
        head + "transform.LayerNorm.bias": _rand((d.hidden,), gen),
    }
    sd[head + "decoder.weight"] = sd["text_decoder.bert.embeddings.word_embeddings.weight"]  # tied
    sd[head + "decoder.bias"] = sd[head + "bias"]
    E = d.embed_dim
    sd |= {
        "vision_proj.weight": _rand((E, d.hidden), gen),
        "vision_proj.bias": _rand((E,), gen),
        "text_proj.weight": _rand((E, d.hidden), gen),
        "text_proj.bias": _rand((E,), gen),
        "itm_head.weight": _rand((2, d.hidden), gen),
        "itm_head.bias": _rand((2,), gen),
        "temp": torch.tensor(0.07),
    }
    if momentum:
        for key in list(sd):
            for name in (
                "visual_encoder",
                "text_encoder",
                "fusion_encoder",
                "text_decoder",
                "vision_proj",
                "text_proj",
                "visn_fc",
                "visn_layer_norm",
            ):
                if key.startswith(name + "."):
                    sd[name + "_m" + key[len(name) :]] = sd[key].clone() + 0.01
    if queues:
        sd |= {
            "image_queue": F.normalize(torch.randn(E, 8, generator=gen), dim=0),
            "text_queue": F.normalize(torch.randn(E, 8, generator=gen), dim=0),
            "idx_queue": torch.full((1, 8), -100),
            "queue_ptr": torch.zeros(1, dtype=torch.long),
        }
    if grounding_buffers:
        sd |= {
            "prefix_ids": torch.tensor([344]),
            "target_ids": torch.arange(345, 682),
            "bbox_prob_mask": torch.zeros(30522),
        }
    return sd


# ------------------------------------------------------------------------------------ the official forward
def _ln(x: Tensor, sd: dict, p: str, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _lin(x: Tensor, sd: dict, p: str) -> Tensor:
    return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])


def official_vision(sd: dict, d: OfficialDims, images: Tensor) -> Tensor:
    """CLIP VisualTransformer (sequence-first nn.MultiheadAttention math) + adapter when W != D."""
    v = "visual_encoder.visual."
    x = F.conv2d(images, sd[v + "conv1.weight"], stride=d.patch)  # [B, W, g, g]
    B, W = x.shape[:2]
    x = x.reshape(B, W, -1).permute(0, 2, 1)
    cls = sd[v + "class_embedding"] + torch.zeros(B, 1, W)
    x = torch.cat([cls, x], dim=1)
    x = x + sd[v + "positional_embedding"][: x.shape[1]]
    x = _ln(x, sd, v + "ln_pre", 1e-5).permute(1, 0, 2)  # LND
    heads = W // 64 if W >= 64 else 1
    for i in range(d.vision_layers):
        p = f"{v}transformer.resblocks.{i}."
        h = _ln(x, sd, p + "ln_1", 1e-5)
        L = h.shape[0]
        qkv = F.linear(h, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"])  # [L, B, 3W]
        # [L, B, W] -> [B*h, L, dh] for each of q, k, v
        q, k, vv = (t.reshape(L, B * heads, W // heads).transpose(0, 1) for t in qkv.chunk(3, dim=-1))
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(W // heads), dim=-1) @ vv  # [B*h, L, dh]
        a = a.transpose(0, 1).reshape(L, B, W)
        x = x + _lin(a, sd, p + "attn.out_proj")
        h = _ln(x, sd, p + "ln_2", 1e-5)
        h = _lin(h, sd, p + "mlp.c_fc")
        x = x + _lin(h * torch.sigmoid(1.702 * h), sd, p + "mlp.c_proj")
    x = _ln(x.permute(1, 0, 2), sd, v + "ln_post", 1e-5)
    if "visn_fc.weight" in sd:
        x = _ln(_lin(x, sd, "visn_fc"), sd, "visn_layer_norm", 1e-12)
    return x


def _additive(mask: Tensor) -> Tensor:
    return (1.0 - mask.float()) * -10000.0


def _bert_attention(sd, p, h, kv, mask_add, heads):
    B, Lq, D = h.shape
    dh = D // heads
    q = _lin(h, sd, p + ".self.query").view(B, Lq, heads, dh).transpose(1, 2)
    k = _lin(kv, sd, p + ".self.key").view(B, -1, heads, dh).transpose(1, 2)
    v = _lin(kv, sd, p + ".self.value").view(B, -1, heads, dh).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh) + mask_add
    ctx = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, Lq, D)
    return _ln(_lin(ctx, sd, p + ".output.dense") + h, sd, p + ".output.LayerNorm", 1e-12)


def official_bert_layer(sd, p, h, self_mask_add, heads, memory=None, memory_mask_add=None):
    a = _bert_attention(sd, p + "attention", h, h, self_mask_add, heads)
    if memory is not None:
        a = _bert_attention(sd, p + "crossattention", a, memory, memory_mask_add, heads)
    ffn = _lin(F.gelu(_lin(a, sd, p + "intermediate.dense")), sd, p + "output.dense")
    return _ln(ffn + a, sd, p + "output.LayerNorm", 1e-12)


def _embed(sd, p, ids):
    L = ids.shape[1]
    x = sd[p + "word_embeddings.weight"][ids] + sd[p + "position_embeddings.weight"][:L]
    x = x + sd[p + "token_type_embeddings.weight"][0]
    return _ln(x, sd, p + "LayerNorm", 1e-12)


def official_vqa_logits(
    sd: dict,
    d: OfficialDims,
    stride: int,
    images: Tensor,
    q_ids: Tensor,
    q_mask: Tensor,
    a_ids: Tensor,
    a_mask: Tensor,
) -> Tensor:
    """ViT -> text encoder -> fusion (§3.3) -> decoder over [v; t] -> LM logits [B, La, V]."""
    v = official_vision(sd, d, images)
    t = official_text_encoder(sd, d, q_ids, q_mask)
    v_mask = torch.ones(v.shape[:2])
    v, t = official_fusion(sd, d, stride, v, t, q_mask)
    memory = torch.cat([v, t], dim=1)
    memory_add = _additive(torch.cat([v_mask, q_mask.float()], dim=1))[:, None, None, :]
    return official_decoder_logits(sd, d, a_ids, a_mask, memory, memory_add)


def official_text_encoder(sd: dict, d: OfficialDims, ids: Tensor, mask: Tensor) -> Tensor:
    """The text encoder: embeddings + `d.text_layers` BERT layers -> [B, L, D]."""
    t_add = _additive(mask)[:, None, None, :]
    t = _embed(sd, "text_encoder.embeddings.", ids)
    for i in range(d.text_layers):
        t = official_bert_layer(sd, f"text_encoder.encoder.layer.{i}.", t, t_add, d.heads)
    return t


def official_fusion(
    sd: dict, d: OfficialDims, stride: int, v: Tensor, t: Tensor, t_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """The fusion loop of §3.3 over the last `d.fusion_layers` slots (image unmasked) -> (v, t)."""
    t_add = _additive(t_mask)[:, None, None, :]
    v_add = _additive(torch.ones(v.shape[:2]))[:, None, None, :]
    start = d.slots - d.fusion_layers
    for j in range(d.fusion_layers):
        p = f"fusion_encoder.encoder.layer.{start + j}."
        if j == 0 or j % stride != 0:
            t = official_bert_layer(sd, p, t, t_add, d.heads, memory=v, memory_mask_add=v_add)
        else:
            joint_add = torch.cat([v_add, t_add], dim=-1)
            y = official_bert_layer(sd, p, torch.cat([v, t], dim=1), joint_add, d.heads)
            Nv = v.shape[1]
            v, t = v + y[:, :Nv], y[:, Nv:]
    return v, t


def official_decoder_logits(sd, d, ids, mask, memory, memory_add):
    L = ids.shape[1]
    causal = torch.tril(torch.ones(L, L))
    self_add = _additive(causal[None, None] * mask[:, None, None, :].float())
    x = _embed(sd, "text_decoder.bert.embeddings.", ids)
    for i in range(d.decoder_layers):
        x = official_bert_layer(
            sd, f"text_decoder.bert.encoder.layer.{i}.", x, self_add, d.heads, memory, memory_add
        )
    h = "text_decoder.cls.predictions."
    x = _ln(F.gelu(_lin(x, sd, h + "transform.dense")), sd, h + "transform.LayerNorm", 1e-12)
    return F.linear(x, sd[h + "decoder.weight"], sd[h + "bias"])


def official_caption_logits(sd, d, images, ids, mask):
    v = official_vision(sd, d, images)
    return official_decoder_logits(sd, d, ids, mask, v, torch.zeros(v.shape[0], 1, 1, v.shape[1]))

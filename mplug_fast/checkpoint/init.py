"""Initialisation from public weights, as the official code starts training (docs/fidelity.md §1.2-1.5).

    vision        <- OpenAI CLIP's visual tower (`clip.load(...)` state dict) or a Hugging Face CLIP
    text encoder  <- bert-base-uncased embeddings + layers 0..E-1
    fusion j      <- BERT layer E + j: self-attention and FFN (cross-attention stays as initialised)
    decoder       <- embeddings + BERT layers 0..N-1 + the MLM head `cls.predictions` when present
                     (cross-attention stays as initialised: official `BertLMHeadModel.from_pretrained`)
    mlm_head      <- the same MLM head

    model = build_model(config, "pretrain")       # fresh weights for what stays random
    report = init_from_public_weights(model, clip_state_dict, bert_state_dict)

Formats are detected by a telltale key: `visual.conv1.weight` (OpenAI CLIP), `conv1.weight` (a bare
OpenAI visual tower), `[vision_model.]embeddings.class_embedding` (HF `CLIPModel` / `CLIPVisionModel`),
`[bert.]embeddings.word_embeddings.weight` (HF `BertModel` / `BertFor*`; legacy LayerNorm gamma/beta ok).
The CLIP position table is really resampled to the model's grid (the official `initialize_clip` leaves
it at zeros, §1.2). Dropped on purpose (`ignored`): the CLIP text tower, `visual.proj`, `position_ids`,
BERT's pooler and NSP head, the tied copy `cls.predictions.decoder.*`, BERT layers the config does not use.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from mplug_fast.checkpoint.io import CheckpointError, unwrap_state_dict
from mplug_fast.checkpoint.keymap import (
    CLIP_BLOCK_KEYS,
    CLIP_VISUAL_KEYS,
    ConversionReport,
    KeyPairs,
    bert_names,
    clip_names,
    import_tensors,
    strict_error,
)
from mplug_fast.config import VisionConfig
from mplug_fast.modeling import MPlug
from mplug_fast.modeling.vision import VisionTransformer, resize_pos_embed

logger = logging.getLogger(__name__)

# Hugging Face CLIP vision tower (under `vision_model.` in a CLIPModel) -> ours
HF_CLIP_VISUAL_KEYS: dict[str, tuple[str, ...]] = {
    "patch_embed.weight": ("embeddings.patch_embedding.weight",),
    "cls_token": ("embeddings.class_embedding",),
    "pos_embed": ("embeddings.position_embedding.weight",),
    "norm_pre": ("pre_layrnorm",),
    "norm_post": ("post_layernorm",),
}
HF_CLIP_BLOCK_KEYS: dict[str, tuple[str, ...]] = {  # under `encoder.layers.{i}.` -> `blocks.{i}.`
    "attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.out_proj": ("self_attn.out_proj",),
    "norm1": ("layer_norm1",),
    "norm2": ("layer_norm2",),
    "mlp.fc1": ("mlp.fc1",),
    "mlp.fc2": ("mlp.fc2",),
}
_OPENAI = (CLIP_VISUAL_KEYS, "transformer.resblocks.{}.", CLIP_BLOCK_KEYS, {"proj"})
_HF = (HF_CLIP_VISUAL_KEYS, "encoder.layers.{}.", HF_CLIP_BLOCK_KEYS, {"embeddings.position_ids"})
# telltale key -> (format, prefix of the visual tower, (top table, block prefix, block table, dropped))
_CLIP_FORMATS = {
    "visual.conv1.weight": ("OpenAI CLIP", "visual.", _OPENAI),
    "conv1.weight": ("OpenAI CLIP visual tower", "", _OPENAI),
    "vision_model.embeddings.class_embedding": ("Hugging Face CLIP", "vision_model.", _HF),
    "embeddings.class_embedding": ("Hugging Face CLIP vision tower", "", _HF),
}
_CLIP_OUTSIDE_VISUAL = re.compile(  # keys beside the visual tower: text tower, projections, JIT metadata
    r"^(positional_embedding|token_embedding\.|transformer\.resblocks\.|ln_final\.|text_projection"
    r"|logit_scale|input_resolution|context_length|vocab_size|text_model\.|visual_projection\.)"
)
_BERT_IGNORED = re.compile(r"^(pooler\.|cls\.|embeddings\.(position_ids|token_type_ids)$)")
_LEGACY_LN = re.compile(r"\.LayerNorm\.(gamma|beta)$")  # the original bert-base-uncased weights
_LEFT_RANDOM = re.compile(r"\.(cross|norm_cross)\.|^(decoder\.head|mlm_head)\.")  # may lack a source


def _load(module: nn.Module, tensors: Mapping[str, Tensor], what: str) -> None:
    """Copy `tensors` (keys of `module.state_dict()`) in, cast to the module's dtypes; a module on the
    meta device is filled by assignment, which needs every tensor."""
    state = module.state_dict()
    meta = any(t.is_meta for t in state.values())
    if meta and set(state) - set(tensors):
        raise CheckpointError(
            f"{what} is on the meta device and {len(set(state) - set(tensors))} of its tensors have no "
            "source; materialise it first (`module.to_empty(device=...)`, then `init_weights()`)"
        )
    cast = {k: v.detach().to(dtype=state[k].dtype, copy=meta) for k, v in tensors.items()}
    result = module.load_state_dict(cast, strict=False, assign=meta)
    assert not result.unexpected_keys, f"internal: keys outside {what}: {result.unexpected_keys}"


# --------------------------------------------------------------------------------------------- CLIP
def _clip_format(state: Mapping[str, Tensor]) -> tuple[str, str, tuple]:
    for telltale, (name, prefix, tables) in _CLIP_FORMATS.items():
        if telltale in state:
            return name, prefix, tables
    mplug = "visual_encoder.visual.conv1.weight" in state
    hint = " (an mPLUG checkpoint: use load_official_checkpoint)" if mplug else ""
    raise CheckpointError(
        f"not a CLIP state dict{hint}: none of the telltale keys {list(_CLIP_FORMATS)} is present; "
        f"top-level prefixes found: {sorted({k.split('.')[0] for k in state})[:12]}"
    )


def vision_config_from_clip(state_dict: Mapping[str, Any], image_size: int | None = None) -> VisionConfig:
    """The `VisionConfig` of a CLIP state dict (any format above): width, depth, heads (= width // 64, as
    CLIP), patch, MLP ratio; `image_size` defaults to the stored grid * patch (224 for OpenAI ViT-B/16)."""
    state = unwrap_state_dict(state_dict)
    _, prefix, (top, block_prefix, blocks, _) = _clip_format(state)
    conv, pos = state[prefix + top["patch_embed.weight"][0]], state[prefix + top["pos_embed"][0]]
    fc1 = prefix + block_prefix.format(0) + blocks["mlp.fc1"][0] + ".weight"
    pattern = re.compile(re.escape(prefix + block_prefix).replace(r"\{\}", r"(\d+)"))
    layers = len({m.group(1) for k in state if (m := pattern.match(k))})
    width, patch, grid = conv.shape[0], conv.shape[-1], math.isqrt(pos.shape[0] - 1)
    ratio = state[fc1].shape[0] / width if fc1 in state else 4.0
    dims = dict(width=width, layers=layers, heads=width // 64, patch_size=patch, mlp_ratio=ratio)
    return VisionConfig(**dims, image_size=image_size or grid * patch)


def load_clip_visual(
    vision: VisionTransformer, clip_state_dict: Mapping[str, Any], *, strict: bool = True
) -> ConversionReport:
    """Fill `vision` from a CLIP state dict (OpenAI full / bare visual, HF CLIPModel / CLIPVisionModel).

    The position table is resampled to the model's grid (class row kept); q/k/v are fused.
    Raises `CheckpointError` on a shape mismatch (naming both keys), and when strict on missing or
    unexpected keys. Returns the report (`missing` in our names, the others in the source's).
    """
    state = unwrap_state_dict(clip_state_dict)
    fmt, prefix, (top, block_prefix, blocks, dropped) = _clip_format(state)
    pairs: KeyPairs = []
    for key in vision.state_dict():
        names = clip_names(key, top, block_prefix, blocks)
        assert names is not None, f"internal: no CLIP name for {key!r}"
        pairs.append((key, tuple(prefix + n for n in names)))
    shapes = {k: v for k, v in vision.state_dict().items() if k != "pos_embed"}  # pos_embed: resized below
    ours, missing, consumed = import_tensors(state, pairs, shapes)
    if "pos_embed" in ours and ours["pos_embed"].shape[0] != vision.config.num_tokens:
        old, new = math.isqrt(ours["pos_embed"].shape[0] - 1), vision.config.grid_size
        logger.info("resizing the CLIP position table from a %dx%d to a %dx%d grid", old, old, new, new)
        ours["pos_embed"] = resize_pos_embed(ours["pos_embed"], new)
    report = ConversionReport(missing=missing)
    for key in sorted(set(state) - consumed):
        inside = key.startswith(prefix)
        drop = key[len(prefix) :] in dropped if inside else bool(_CLIP_OUTSIDE_VISUAL.match(key))
        (report.ignored if drop else report.unexpected).append(key)
    if strict and (report.missing or report.unexpected):
        raise strict_error(f"{fmt} state dict", report.missing, report.unexpected)
    _load(vision, ours, "the vision tower")
    logger.info("vision <- %s: %d tensors, %d source keys ignored", fmt, len(ours), len(report.ignored))
    return report


# --------------------------------------------------------------------------------------------- BERT
def _normalize_bert(state_dict: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors under HF `BertModel` names, those names -> the source's): the `bert.` prefix of the
    `BertFor*` models stripped, legacy `LayerNorm.gamma/beta` renamed to weight/bias."""
    state = unwrap_state_dict(state_dict)
    strip = "bert." if "bert.embeddings.word_embeddings.weight" in state else ""
    if not strip and "embeddings.word_embeddings.weight" not in state:
        raise CheckpointError(
            "not a Hugging Face BERT state dict: neither 'embeddings.word_embeddings.weight' nor "
            f"'bert.embeddings.word_embeddings.weight' is present; top-level prefixes found: "
            f"{sorted({k.split('.')[0] for k in state})[:12]} (official mPLUG: use load_official_checkpoint)"
        )
    legacy = {"gamma": "weight", "beta": "bias"}
    names = {_LEGACY_LN.sub(lambda m: f".LayerNorm.{legacy[m[1]]}", k.removeprefix(strip)): k for k in state}
    return {name: state[k] for name, k in names.items()}, names


def _bert_pairs(model: MPlug, include_cross_attention: bool) -> tuple[KeyPairs, list[str], set[int]]:
    """(pairs, our cross-attention keys left as initialised, BERT layers read)."""
    E = model.config.text.encoder_layers
    pairs: KeyPairs = []
    fresh: list[str] = []
    used: set[int] = set()
    for name, offset in (("text_encoder", 0), ("fusion", E), ("decoder", 0), ("mlm_head", 0)):
        for key in getattr(model, name).state_dict() if getattr(model, name) is not None else ():
            full = f"{name}.{key}"
            if key.startswith("layers."):  # our layer i <- BERT layer i + offset
                _, i, sub = key.split(".", 2)
                if sub.startswith(("cross.", "norm_cross.")) and not include_cross_attention:
                    fresh.append(full)
                    continue
                used.add(int(i) + offset)
            names = bert_names(key, offset)
            assert names is not None, f"internal: no BERT name for {full!r}"
            pairs.append((full, names))
    return pairs, fresh, used


def load_bert_weights(
    model: MPlug,
    bert_state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
    include_cross_attention: bool = False,
) -> ConversionReport:
    """Fill the model's BERT parts from a Hugging Face BERT state dict (see the module docstring).

    Components the model lacks are skipped; their momentum copies are refreshed. Args:
        include_cross_attention: also read `crossattention.*` (a HF `BertLMHeadModel` checkpoint with
            cross-attention); by default it stays as initialised, as in the official code.
    Returns the report: `missing` = our tensors left as initialised (cross-attention, the LM heads when
    the source has no `cls.predictions`): expected, not an error. Raises `CheckpointError` when the BERT
    is too shallow, on a shape mismatch, and (strict) on unexpected keys or other missing tensors.
    """
    state, source_names = _normalize_bert(bert_state_dict)
    pairs, fresh, used = _bert_pairs(model, include_cross_attention)
    available = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    if used - available:
        c = model.config
        raise CheckpointError(
            f"the BERT has {len(available)} layers but the model needs {max(used) + 1}: text encoder "
            f"{c.text.encoder_layers} (BERT layers 0..E-1), fusion {c.fusion.layers} (layers E..E+F-1), "
            f"decoder {c.decoder.layers} (0..N-1); use a deeper BERT or lower text.encoder_layers / "
            "fusion.layers / decoder.layers"
        )
    ours, missing, consumed = import_tensors(state, pairs, model.state_dict())
    report = ConversionReport(missing=sorted(fresh + missing))
    for key in sorted(set(state) - consumed):
        layer = re.match(r"encoder\.layer\.(\d+)\.", key)
        unused = layer is not None and (int(layer.group(1)) not in used or ".crossattention." in key)
        drop = unused or _BERT_IGNORED.match(key)
        (report.ignored if drop else report.unexpected).append(source_names[key])
    not_random = [k for k in missing if not _LEFT_RANDOM.search(k)]
    if strict and (not_random or report.unexpected):
        raise strict_error("BERT state dict", not_random, report.unexpected)
    if any(".crossattention." in k for k in report.ignored) and not include_cross_attention:
        logger.warning("the BERT has cross-attention weights; pass include_cross_attention=True to load them")
    if any(k.startswith(("decoder.head.", "mlm_head.")) for k in missing):
        logger.warning("the BERT has no MLM head (cls.predictions): the LM heads keep their initialisation")
    names = [n for n in ("text_encoder", "fusion", "decoder", "mlm_head") if getattr(model, n) is not None]
    for name in names:
        tensors = {k[len(name) + 1 :]: v for k, v in ours.items() if k.startswith(name + ".")}
        _load(getattr(model, name), tensors, name)
        if model.momentum is not None and name in model.momentum:
            model.momentum[name].load_state_dict(getattr(model, name).state_dict())
    logger.info(
        "%s <- BERT: %d tensors, %d as initialised", ", ".join(names), len(ours), len(fresh + missing)
    )
    return report


def init_from_public_weights(
    model: MPlug,
    clip_state_dict: Mapping[str, Any],
    bert_state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
) -> ConversionReport:
    """`load_clip_visual(model.vision)`, `load_bert_weights`, momentum <- online; `missing` in model keys."""
    vision = load_clip_visual(model.vision, clip_state_dict, strict=strict)
    bert = load_bert_weights(model, bert_state_dict, strict=strict)
    model.copy_to_momentum()
    return ConversionReport(
        missing=[f"vision.{k}" for k in vision.missing] + bert.missing,
        unexpected=vision.unexpected + bert.unexpected,
        ignored=vision.ignored + bert.ignored,
    )

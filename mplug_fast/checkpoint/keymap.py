"""Key maps between our parameter names and the official / OpenAI CLIP / Hugging Face BERT names.

A map is a table `our suffix -> official suffixes`; more than one official suffix means the tensors
are concatenated along dim 0 into ours (fused q/k/v, fused k/v) and split back on export.
`import_tensors` / `export_tensors` apply a list of `(our key, official keys)` pairs in either direction;
the format-specific modules build those pair lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mplug_fast.checkpoint.io import CheckpointError

# BERT layer, official / HF suffix under `encoder.layer.{i}.` -> ours under `layers.{i}.`
BERT_LAYER_KEYS: dict[str, tuple[str, ...]] = {
    "attn.qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "attn.out_proj": ("attention.output.dense",),
    "norm_attn": ("attention.output.LayerNorm",),
    "cross.q_proj": ("crossattention.self.query",),
    "cross.kv_proj": ("crossattention.self.key", "crossattention.self.value"),
    "cross.out_proj": ("crossattention.output.dense",),
    "norm_cross": ("crossattention.output.LayerNorm",),
    "mlp.fc1": ("intermediate.dense",),
    "mlp.fc2": ("output.dense",),
    "norm_mlp": ("output.LayerNorm",),
}

# BERT embeddings, under `embeddings.`
BERT_EMBEDDING_KEYS: dict[str, tuple[str, ...]] = {
    "word": ("word_embeddings",),
    "position": ("position_embeddings",),
    "token_type": ("token_type_embeddings",),
    "norm": ("LayerNorm",),
}

# BERT LM head (`BertOnlyMLMHead`), under `cls.predictions.`; the decoder weight is tied to the word
# embeddings and `decoder.bias` is the same tensor as `bias` (both checked, not stored twice).
LM_HEAD_KEYS: dict[str, tuple[str, ...]] = {
    "dense": ("transform.dense",),
    "norm": ("transform.LayerNorm",),
}

# OpenAI CLIP visual tower, under `visual.` (official mPLUG: `visual_encoder.visual.`)
CLIP_VISUAL_KEYS: dict[str, tuple[str, ...]] = {
    "patch_embed.weight": ("conv1.weight",),
    "cls_token": ("class_embedding",),
    "pos_embed": ("positional_embedding",),
    "norm_pre": ("ln_pre",),
    "norm_post": ("ln_post",),
}
CLIP_BLOCK_KEYS: dict[str, tuple[str, ...]] = {  # under `transformer.resblocks.{i}.` -> `blocks.{i}.`
    "attn.qkv.weight": ("attn.in_proj_weight",),
    "attn.qkv.bias": ("attn.in_proj_bias",),
    "attn.out_proj": ("attn.out_proj",),
    "norm1": ("ln_1",),
    "norm2": ("ln_2",),
    "mlp.fc1": ("mlp.c_fc",),
    "mlp.fc2": ("mlp.c_proj",),
}

KeyPairs = list[tuple[str, tuple[str, ...]]]  # (our key, official keys)


def translate(suffix: str, table: Mapping[str, tuple[str, ...]]) -> tuple[str, ...] | None:
    """Map one of our key suffixes (e.g. `attn.qkv.weight`) through a table; None if no entry matches.

    Table entries name either a full key (`cls_token`) or a module (`norm1`), in which case the
    parameter name (`.weight` / `.bias`) carries over.
    """
    if suffix in table:
        return table[suffix]
    module, _, param = suffix.rpartition(".")
    if module in table:
        return tuple(f"{name}.{param}" for name in table[module])
    return None


def clip_names(
    key: str,
    top: Mapping[str, tuple[str, ...]] = CLIP_VISUAL_KEYS,
    block_prefix: str = "transformer.resblocks.{}.",
    blocks: Mapping[str, tuple[str, ...]] = CLIP_BLOCK_KEYS,
) -> tuple[str, ...] | None:
    """The names under a CLIP visual tower of one of our vision keys: ``blocks.{i}.*`` through `blocks`
    under ``block_prefix.format(i)``, the rest through `top` (default: OpenAI CLIP); None if no entry."""
    if key.startswith("blocks."):
        _, i, sub = key.split(".", 2)
        names, at = translate(sub, blocks), block_prefix.format(i)
    else:
        names, at = translate(key, top), ""
    return names and tuple(at + n for n in names)


def bert_names(key: str, offset: int = 0) -> tuple[str, ...] | None:
    """The names under a BERT of one of our text-encoder / fusion / decoder / LM-head keys (relative to the
    component): ``layers.{i}.*`` -> ``encoder.layer.{i + offset}.*``, ``embeddings.*``, and the LM head
    (``head.*`` of the decoder, the keys of an MLM head) -> ``cls.predictions.*``; None if no entry."""
    if key.startswith("layers."):
        _, i, sub = key.split(".", 2)
        names, at = translate(sub, BERT_LAYER_KEYS), f"encoder.layer.{int(i) + offset}."
    elif key.startswith("embeddings."):
        names, at = translate(key[len("embeddings.") :], BERT_EMBEDDING_KEYS), "embeddings."
    else:
        sub = key.removeprefix("head.")
        names, at = ("bias",) if sub == "bias" else translate(sub, LM_HEAD_KEYS), "cls.predictions."
    return names and tuple(at + n for n in names)


@dataclass
class ConversionReport:
    """What a conversion used and left over. Keys are in the *source* naming of each direction."""

    missing: list[str] = field(default_factory=list)  # target keys whose sources were absent
    unexpected: list[str] = field(default_factory=list)  # source keys nobody consumed, not allowlisted
    ignored: list[str] = field(default_factory=list)  # source keys dropped on purpose (allowlisted)


def import_tensors(
    source: Mapping[str, Tensor], pairs: KeyPairs, expected: Mapping[str, Tensor] | None = None
) -> tuple[dict[str, Tensor], list[str], set[str]]:
    """official -> ours: concatenate each pair's sources along dim 0.

    With `expected` (our state dict, or its meta twin) each source tensor's shape is checked first (its
    share of our tensor for a fused q/k/v or k/v); a key `expected` lacks is not checked. A mismatch raises
    CheckpointError naming our key, the source key and both shapes.
    Returns (our tensors, our keys without a source, consumed source keys)."""
    out: dict[str, Tensor] = {}
    missing: list[str] = []
    consumed: set[str] = set()
    bad: list[str] = []
    for ours, theirs in pairs:
        present = [k for k in theirs if k in source]
        if len(present) != len(theirs):
            missing.append(ours)
            continue
        tensors = [source[k] for k in theirs]
        consumed.update(theirs)
        if expected is not None and ours in expected:
            full = list(expected[ours].shape)
            part = [full[0] // len(theirs), *full[1:]] if full else full
            wrong = [
                f"{ours} {full} <- {k} {list(t.shape)}"
                for k, t in zip(theirs, tensors)
                if list(t.shape) != part
            ]
            if wrong and len(theirs) > 1:
                wrong = [f"{w} (each of the {len(theirs)} fused parts must be {part})" for w in wrong]
            bad += wrong
            if wrong:
                continue
        out[ours] = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
    if bad:
        raise CheckpointError(
            "shape mismatch (our key [shape] <- checkpoint key [shape]; wrong config?):\n  "
            + "\n  ".join(bad[:20])
        )
    return out, missing, consumed


def export_tensors(state: Mapping[str, Tensor], pairs: KeyPairs) -> dict[str, Tensor]:
    """ours -> official: split fused tensors back into equal chunks along dim 0."""
    out: dict[str, Tensor] = {}
    for ours, theirs in pairs:
        tensor = state[ours]
        if len(theirs) == 1:
            out[theirs[0]] = tensor
            continue
        if tensor.shape[0] % len(theirs):
            raise ValueError(f"{ours} of shape {list(tensor.shape)} cannot be split into {len(theirs)} parts")
        for name, part in zip(theirs, tensor.chunk(len(theirs), dim=0), strict=True):
            out[name] = part.clone()
    return out


def group_keys(keys: Iterable[str], depth: int = 2, limit: int = 6) -> str:
    """Summarise many keys by their first `depth` components: 'text_encoder.encoder (96 keys: ...)'."""
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        groups.setdefault(".".join(key.split(".")[:depth]), []).append(key)
    lines = []
    for prefix, members in groups.items():
        shown = ", ".join(members[:limit]) + (", ..." if len(members) > limit else "")
        lines.append(f"  {prefix} ({len(members)} keys: {shown})")
    return "\n".join(lines)


def strict_error(what: str, missing: list[str], unexpected: list[str]) -> CheckpointError:
    """The error of a strict load: `what` does not fit, with the missing and unexpected keys by group."""
    parts = [f"the {what} does not fit the model"]
    if missing:
        parts.append(f"missing ({len(missing)} of our tensors have no source):\n" + group_keys(missing))
    if unexpected:
        parts.append(f"unexpected ({len(unexpected)} source keys):\n" + group_keys(unexpected))
    return CheckpointError("\n".join(parts + ["Pass strict=False to load anyway and get the lists."]))

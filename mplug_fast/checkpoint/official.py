"""Official mPLUG checkpoints (X-PLUG/mPLUG, AliceMind/mPLUG) <-> our models.

    model = load_official("mplug_base.pth", new_model, bert_config="config_bert_stride3.json", image_res=384)
    # new_model: config -> the task model; by task name: mplug_fast.load_official_checkpoint(path, "vqa", ...)
    state = to_official_state_dict(model)          # the fine-tuned task layout, for going back

Formats read (docs/fidelity.md §2): a dict with `model` / `module` or a bare state dict; the
pretraining layout (`text_encoder.bert.*`, `fusion_encoder.fusion.*` or `fusion_encoder.bert.*`) and
the fine-tuned task layout (`text_encoder.*`, `fusion_encoder.*`). The fusion is stored with
`num_hidden_layers` slots of which the last `fusion_layers` run: our fusion layer j is slot
j + offset, offset = slots - fusion_layers (6 in the released configs, read from the weights).

Dropped on purpose, listed in the report's `ignored`: the CLIP text tower and `visual.proj`, fusion
slots 0..offset-1, the fusion embeddings, the cross-attention of connected layers, `position_ids`,
grounding buffers (rebuilt from the vocabulary), ITC queues (owned by the objective: a fresh run starts
with an empty queue; `official_queue_state` returns them for `ITCLoss.load_official_queue`), components the
task does not run, and `_m` momentum copies of tasks that train without them. Anything else that
does not map is an error (strict) or returned in `unexpected` (strict=False).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from mplug_fast.checkpoint.init import vision_config_from_clip
from mplug_fast.checkpoint.io import CheckpointError, ModelFactory, read_checkpoint, unwrap_state_dict
from mplug_fast.checkpoint.keymap import (
    ConversionReport,
    KeyPairs,
    bert_names,
    clip_names,
    export_tensors,
    group_keys,
    import_tensors,
    strict_error,
)
from mplug_fast.config import (
    DecoderConfig,
    FusionConfig,
    MPlugConfig,
    TextConfig,
    load_bert_config,
)
from mplug_fast.modeling import MPlug
from mplug_fast.modeling.vision import resize_pos_embed

logger = logging.getLogger(__name__)

# Pretraining spellings -> the fine-tuned layout (what the official task scripts do by string surgery).
_PRETRAIN_RENAMES = (
    (re.compile(r"^text_encoder(_m)?\.bert\."), r"text_encoder\1."),
    (re.compile(r"^fusion_encoder(_m)?\.(fusion|bert)\."), r"fusion_encoder\1."),
    # inferred (pretraining code unreleased): an MLM head stored beside the fusion is the text MLM head
    (re.compile(r"^fusion_encoder(_m)?\.cls\."), r"text_encoder\1.cls."),
)
_RELEASED_NUM_HIDDEN_LAYERS = 12  # the fusion slots of the released configs (num_hidden_layers)
_DEFAULT_FUSION_LAYERS = 6
_ADAPTER_MODULES = {"fc": "visn_fc", "norm": "visn_layer_norm"}
_QUEUE_KEYS = {"image_queue", "text_queue", "idx_queue", "queue_ptr"}
_GROUNDING_BUFFERS = {"prefix_ids", "target_ids", "bbox_prob_mask"}
_MOMENTUM_COPY = re.compile(  # an official momentum copy: a component name with `_m`
    r"^(visual_encoder|text_encoder|fusion_encoder|text_decoder|visn_fc|visn_layer_norm|vision_proj"
    r"|text_proj)_m\."
)


# --------------------------------------------------------------------------------------------- key pairs
def _official_names(key: str, offset: int) -> tuple[str, ...]:
    """Official key(s) that make up our key `key` (several = concatenated along dim 0)."""
    momentum = key.startswith("momentum.")
    if momentum:
        key = key[len("momentum.") :]
    m = "_m" if momentum else ""
    component, _, rest = key.partition(".")
    names: tuple[str, ...] | None = None
    if component == "vision":
        names, prefix = clip_names(rest), f"visual_encoder{m}.visual."
    elif component == "adapter":
        module, _, param = rest.partition(".")
        official_module = _ADAPTER_MODULES.get(module)
        names, prefix = (official_module and (f"{official_module}{m}.{param}",)), ""
    elif component in ("text_encoder", "fusion", "decoder"):
        names = bert_names(rest, offset if component == "fusion" else 0)
        prefix = {
            "text_encoder": f"text_encoder{m}.",
            "fusion": f"fusion_encoder{m}.",
            "decoder": f"text_decoder{m}." + ("" if rest.startswith("head.") else "bert."),  # head beside
        }[component]
    elif component == "mlm_head":
        names, prefix = bert_names(rest), f"text_encoder{m}."
    elif component in ("vision_proj", "text_proj", "itm_head", "temp"):
        names, prefix = (f"{component}{m}" + (f".{rest}" if rest else ""),), ""
    elif component == "cls_head" and not momentum:  # NLVR / VE classifier: no official model has one,
        names, prefix = (rest,), "cls_head."  # so it keeps our name (round trip; absent -> fresh init)
    if not names:
        raise KeyError(f"no official name for our key {key!r}")
    return tuple(prefix + n for n in names)


def official_key_pairs(model: MPlug, offset: int) -> KeyPairs:
    """(our key, official keys) for every tensor of `model`'s state dict."""
    return [(key, _official_names(key, offset)) for key in model.state_dict()]


def _layer_indices(state: Mapping[str, Tensor], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


# --------------------------------------------------------------------------------------------- config
def infer_official_config(
    state: Mapping[str, Tensor],
    *,
    bert_config: Mapping[str, Any] | str | os.PathLike | None = None,
    image_res: int | None = None,
    stride: int | None = None,
) -> tuple[MPlugConfig, int]:
    """(config, fusion slot offset) from what the weights say plus `bert_config` and the arguments.

    From the weights: ViT width, depth, patch and stored grid; BERT width, vocab, positions, MLP width,
    text / decoder depth, fusion slots. From `bert_config` (else released defaults, logged): heads,
    eps, dropouts, `fusion_layers`, `stride_layer`. `image_res` defaults to the stored grid.
    """
    bert = load_bert_config(bert_config) if bert_config is not None else {}
    if "visual_encoder.visual.conv1.weight" not in state:
        raise CheckpointError(
            "not an mPLUG checkpoint: 'visual_encoder.visual.conv1.weight' is missing; "
            "top-level prefixes found: "
            f"{sorted({k.split('.')[0] for k in state})[:12]}"
        )
    visual = {
        k.removeprefix("visual_encoder."): v for k, v in state.items() if k.startswith("visual_encoder.")
    }
    vision = vision_config_from_clip(visual, image_res)  # the official visual encoder is OpenAI CLIP's
    width = vision.width
    if image_res is None:
        logger.info("image_res not given: using the checkpoint's %d px", vision.image_size)

    word, positions, token_types = (  # the text encoder's tables, else the decoder's
        state.get(
            f"text_encoder.embeddings.{n}.weight", state.get(f"text_decoder.bert.embeddings.{n}.weight")
        )
        for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    )
    fc1 = next((v for k, v in state.items() if k.endswith("intermediate.dense.weight")), None)
    hidden = word.shape[1] if word is not None else bert.get("hidden_size", 768)
    if "num_attention_heads" not in bert:
        logger.info("no bert_config: %d attention heads (hidden / 64, as in bert-base)", hidden // 64)
    text_layers = _layer_indices(state, "text_encoder.encoder.layer.")
    text = TextConfig(
        vocab_size=word.shape[0] if word is not None else bert.get("vocab_size", 30522),
        hidden_size=hidden,
        heads=bert.get("num_attention_heads", hidden // 64),
        intermediate_size=fc1.shape[0] if fc1 is not None else bert.get("intermediate_size", 4 * hidden),
        max_position_embeddings=(
            positions.shape[0] if positions is not None else bert.get("max_position_embeddings", 512)
        ),
        type_vocab_size=token_types.shape[0] if token_types is not None else bert.get("type_vocab_size", 2),
        layer_norm_eps=bert.get("layer_norm_eps", 1e-12),
        hidden_dropout=bert.get("hidden_dropout_prob", 0.1),
        attention_dropout=bert.get("attention_probs_dropout_prob", 0.1),
        pad_token_id=bert.get("pad_token_id", 0),
        encoder_layers=len(text_layers) if text_layers else bert.get("text_encoder_layers", 6),
    )

    slots = _layer_indices(state, "fusion_encoder.encoder.layer.")
    num_slots = slots[-1] + 1 if slots else bert.get("num_hidden_layers", _RELEASED_NUM_HIDDEN_LAYERS)
    if "num_hidden_layers" in bert and slots and bert["num_hidden_layers"] != num_slots:
        raise CheckpointError(
            f"bert_config says num_hidden_layers={bert['num_hidden_layers']} but the checkpoint "
            f"has {num_slots} fusion slots"
        )
    fusion_layers = bert.get("fusion_layers", min(_DEFAULT_FUSION_LAYERS, num_slots))
    offset = num_slots - fusion_layers
    if offset < 0:
        raise CheckpointError(
            f"fusion_layers={fusion_layers} but the checkpoint has only {num_slots} fusion slots"
        )
    if stride is None:
        stride = bert.get("stride_layer")
    if stride is None:
        stride = 3 if width == 768 else 6
        logger.warning(
            "stride_layer cannot be read from the weights and no bert_config/stride was given: "
            "using S=%d (released default for ViT width %d). Pass the official config_bert*.json.",
            stride,
            width,
        )
    fusion = FusionConfig(layers=fusion_layers, stride=stride)

    decoder_layers = _layer_indices(state, "text_decoder.bert.encoder.layer.")
    decoder = DecoderConfig(
        layers=len(decoder_layers) if decoder_layers else bert.get("text_decode_layers", 12)
    )
    proj = state.get("vision_proj.weight")
    embed_dim = proj.shape[0] if proj is not None else bert.get("embed_dim", 256)
    return MPlugConfig(vision=vision, text=text, fusion=fusion, decoder=decoder, embed_dim=embed_dim), offset


# --------------------------------------------------------------------------------------------- conversion
def _ignored_reason(key: str, model: MPlug, offset: int) -> str | None:
    """Why an unconsumed official key is dropped on purpose; None = unexpected."""
    base, is_momentum = _MOMENTUM_COPY.subn(r"\1.", key)
    if key in _QUEUE_KEYS:
        return "ITC queue (owned by the objective; see official_queue_state)"
    if key in _GROUNDING_BUFFERS:
        return "grounding buffer (rebuilt from the vocabulary)"
    if base.startswith("visual_encoder.") and not base.startswith("visual_encoder.visual."):
        return "CLIP text tower (unused by mPLUG)"
    if base == "visual_encoder.visual.proj":
        return "CLIP visual projection (unused by mPLUG)"
    if base.endswith("embeddings.position_ids"):
        return "position_ids buffer"
    if base.startswith("fusion_encoder.embeddings."):
        return "fusion embeddings (never run)"
    if m := re.match(r"fusion_encoder\.encoder\.layer\.(\d+)\.(\w+)", base):
        j = int(m.group(1)) - offset
        if j < 0:
            return f"dead fusion slot (only slots {offset}.. run)"
        connected = j < model.config.fusion.layers and model.config.fusion.is_connected(j)
        if connected and m.group(2) == "crossattention":
            return f"cross-attention of connected fusion layer {j} (unused)"
    if base.startswith(("text_encoder.cls.", "fusion_encoder.cls.")) and model.mlm_head is None:
        return "MLM head (pretraining only)"
    if is_momentum:
        if model.momentum is None:
            return f"momentum copy (the {model.task!r} model trains without one)"
        owner = _official_component(base)
        if owner is not None and owner not in model.momentum:
            return f"momentum copy of {owner!r} (not used by the {model.task!r} objective)"
        return None
    owner = _official_component(base)
    if owner is not None and getattr(model, owner) is None:
        return f"{owner} (not run by the {model.task!r} model)"
    return None


def _official_component(key: str) -> str | None:
    prefixes = {
        "text_encoder.": "text_encoder",
        "fusion_encoder.": "fusion",
        "text_decoder.": "decoder",
        "vision_proj.": "vision_proj",
        "text_proj.": "text_proj",
        "itm_head.": "itm_head",
        "temp": "temp",
    }
    return next((name for p, name in prefixes.items() if key.startswith(p)), None)


def _tied_heads() -> Iterator[tuple[str, str]]:
    """(LM-head prefix, the word-embedding weight it is tied to) of the online and momentum models."""
    for m in ("", "_m"):
        yield f"text_decoder{m}.cls.predictions.", f"text_decoder{m}.bert.embeddings.word_embeddings.weight"
        yield f"text_encoder{m}.cls.predictions.", f"text_encoder{m}.embeddings.word_embeddings.weight"


def convert_official_state_dict(
    state: Mapping[str, Tensor], model: MPlug, offset: int
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Official (fine-tuned layout) tensors -> our state dict for `model`; shapes are checked, the
    position tables resized to the model's grid. The report lists missing / unexpected / ignored keys."""
    state = dict(state)
    grid = model.config.vision.grid_size
    for key in ("visual_encoder.visual.positional_embedding", "visual_encoder_m.visual.positional_embedding"):
        if key in state and state[key].shape[0] != model.config.vision.num_tokens:
            old = math.isqrt(state[key].shape[0] - 1)
            logger.info("resizing %s from a %dx%d to a %dx%d grid", key, old, old, grid, grid)
            state[key] = resize_pos_embed(state[key], grid)
    pairs = official_key_pairs(model, offset)
    ours, missing, consumed = import_tensors(state, pairs, model.state_dict())

    for head, word in _tied_heads():  # the official state dict stores the tied LM-head weights twice
        for copy_key, source_key in ((head + "decoder.weight", word), (head + "decoder.bias", head + "bias")):
            if copy_key in state and source_key in state:
                if not torch.equal(state[copy_key], state[source_key]):
                    logger.warning(
                        "%s differs from %s: the LM head is tied here, %s is used",
                        copy_key,
                        source_key,
                        source_key,
                    )
                consumed.add(copy_key)

    report = ConversionReport(missing=missing)
    for key in sorted(set(state) - consumed):
        reason = _ignored_reason(key, model, offset)
        (report.ignored if reason else report.unexpected).append(key)

    return ours, report


def _read_state(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, Tensor]:
    """The state dict in a checkpoint file (read weights-only) or an already loaded checkpoint object."""
    source = path_or_state_dict
    return unwrap_state_dict(read_checkpoint(source) if isinstance(source, str | os.PathLike) else source)


def load_official(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    new_model: ModelFactory,
    bert_config: Mapping[str, Any] | str | os.PathLike | None = None,
    image_res: int | None = None,
    stride: int | None = None,
    strict: bool = True,
    *,
    dtype: torch.dtype = torch.float32,
) -> MPlug | tuple[MPlug, ConversionReport]:
    """Build a task model (``new_model(config)``) from an official mPLUG checkpoint.

    Args:
        path_or_state_dict: a `.pth` file, or the loaded object (a dict with `model`/`module`,
            or a state dict).
        new_model: config -> the task model with default init (``mplug_fast.tasks.get_task(name).new_model``;
            ``mplug_fast.load_official_checkpoint`` takes the task name instead).
        bert_config: the official `config_bert*.json` (dict or path): heads, `fusion_layers`, `stride_layer`.
        image_res: input resolution; the position table is resized to it (default: the checkpoint's).
        stride: overrides `stride_layer` (S); without it and without `bert_config`: 3 for ViT-B, 6 for ViT-L.
        strict: raise when a key is missing or unexpected (listed by group). False: return
            `(model, report)` with the lists; missing tensors keep fresh initialisation.
        dtype: floating tensors are cast to it.
    Returns:
        the model in eval mode (strict), or `(model, report)` (strict=False).
    """
    state = _read_state(path_or_state_dict)
    for pattern, repl in _PRETRAIN_RENAMES:  # pretraining spellings -> the fine-tuned task layout
        state = {pattern.sub(repl, k): v for k, v in state.items()}
    config, offset = infer_official_config(state, bert_config=bert_config, image_res=image_res, stride=stride)
    with torch.device("meta"):
        model = new_model(config)
    task = model.task
    ours, report = convert_official_state_dict(state, model, offset)

    momentum_missing = [k for k in report.missing if k.startswith("momentum.")]
    fresh = tuple(getattr(model, "new_head_prefixes", ()))  # task heads no released checkpoint has
    new_keys = [k for k in report.missing if fresh and k.startswith(fresh)]
    report.missing = [k for k in report.missing if not k.startswith("momentum.") and k not in new_keys]
    if strict and (report.missing or report.unexpected):
        what = (
            f"official checkpoint (as the {task!r} model: fusion layers {config.fusion.layers} at slots "
            f"{offset}.., stride {config.fusion.stride})"
        )
        raise strict_error(what, report.missing, report.unexpected)

    if new_keys:
        logger.info("new %r task head, freshly initialised (%d tensors): %s", task, len(new_keys), new_keys)
    ours = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ours.items()}
    if report.missing or momentum_missing or new_keys:
        model = new_model(config)  # materialised with fresh weights for what the file lacks
        model.init_weights()
        model.load_state_dict(ours, strict=False)
        if momentum_missing:
            logger.info("the checkpoint has no momentum copies: initialised from the online weights")
            model.copy_to_momentum()
    else:
        model.load_state_dict(ours, assign=True, strict=True)
    if report.ignored:
        logger.info(
            "dropped %d checkpoint keys on purpose:\n%s", len(report.ignored), group_keys(report.ignored)
        )
    model.eval()
    return model if strict else (model, report)


def to_official_state_dict(
    model: MPlug, num_hidden_layers: int = _RELEASED_NUM_HIDDEN_LAYERS
) -> dict[str, Tensor]:
    """Our weights in the official fine-tuned task layout (fusion layer j -> slot j + num_hidden_layers -
    fusion_layers; tied LM-head weights written as in the official state dict). Dead weights we never build
    (CLIP text tower, `visual.proj`, fusion slots below the offset, connected-layer cross-attention) are
    not written: the official loader (`strict=False`) leaves them at their initialisation."""
    offset = num_hidden_layers - model.config.fusion.layers
    if offset < 0:
        raise ValueError(
            f"num_hidden_layers={num_hidden_layers} < fusion layers {model.config.fusion.layers}"
        )
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out = export_tensors(state, official_key_pairs(model, offset))
    for head, word in _tied_heads():
        if head + "bias" in out:
            out[head + "decoder.weight"] = out[word]
            out[head + "decoder.bias"] = out[head + "bias"]
    return out


def official_queue_state(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, Tensor]:
    """The ITC queue buffers of an official checkpoint, official layout: `image_queue`, `text_queue` [E, Q],
    and when present `idx_queue` [1, Q] (retrieval) and `queue_ptr` [1]. For resuming official retrieval or
    pretraining with its queue: ``objective.itc.load_official_queue(official_queue_state(path))``."""
    state = _read_state(path_or_state_dict)
    queue = {k: state[k] for k in sorted(_QUEUE_KEYS) if k in state}
    if "image_queue" not in queue or "text_queue" not in queue:
        where = f" in {path_or_state_dict}" if isinstance(path_or_state_dict, str | os.PathLike) else ""
        raise CheckpointError(
            f"no ITC queue (image_queue / text_queue){where}: not a pretrain/retrieval checkpoint"
        )
    return queue

"""Official checkpoint loading: key mapping, the official forward as oracle, strictness, round trips."""

from __future__ import annotations

import logging

import pytest
import torch

from mplug_fast import get_config
from mplug_fast.checkpoint import (
    CheckpointError,
    save_pretrained,
    to_official_state_dict,
)
from mplug_fast.tasks import TASKS, build_model, from_pretrained, load_official_checkpoint
from tests.checkpoint.official_layout import (
    OfficialDims,
    make_official_state_dict,
    official_caption_logits,
    official_vqa_logits,
)

BASE_LIKE = OfficialDims()  # W == D: no adapter
LARGE_LIKE = OfficialDims(width=128, hidden=64, heads=4)  # W != D: visn_fc adapter, 2 ViT heads
BERT = {"num_attention_heads": 4, "fusion_layers": 3, "num_hidden_layers": 6}

# every task that builds its own model (the zero-shot video tasks borrow theirs)
TASK_MODELS = [name for name, task in TASKS.items() if task.checkpoint_task is task]


def _inputs(d: OfficialDims, image_res: int, B: int = 2):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, image_res, image_res, generator=g)
    q_ids = torch.randint(5, d.vocab, (B, 7), generator=g)
    q_mask = torch.ones(B, 7, dtype=torch.long)
    q_mask[1, 4:] = 0
    a_ids = torch.randint(5, d.vocab, (B, 5), generator=g)
    a_mask = torch.ones(B, 5, dtype=torch.long)
    a_mask[0, 3:] = 0
    return images, q_ids, q_mask, a_ids, a_mask


def _max_diff(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    diff = (a - b).abs()
    if valid is not None:
        diff = diff[valid.bool()]
    return diff.max().item()


@pytest.mark.parametrize("dims", [BASE_LIKE, LARGE_LIKE], ids=["base_like", "large_like"])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_vqa_logits_equal_the_official_forward(dims: OfficialDims, stride: int) -> None:
    sd = make_official_state_dict(dims)
    model = load_official_checkpoint(sd, "vqa", bert_config={**BERT, "stride_layer": stride})
    assert model.config.fusion.stride == stride and model.config.has_adapter == (dims.width != dims.hidden)
    images, q_ids, q_mask, a_ids, a_mask = _inputs(dims, dims.grid * dims.patch)
    with torch.no_grad():
        ours = model(images, q_ids, q_mask, a_ids, a_mask)
        ref = official_vqa_logits(sd, dims, stride, images, q_ids, q_mask, a_ids, a_mask)
    diff = _max_diff(ours, ref, a_mask)
    assert diff < 1e-4, f"max abs diff {diff:.2e} (logit scale {ref.abs().max():.1f})"


def test_caption_logits_equal_the_official_forward_at_a_new_resolution() -> None:
    d = BASE_LIKE
    sd = make_official_state_dict(d)
    model = load_official_checkpoint(sd, "caption", bert_config=BERT, image_res=48)  # 4x4 -> 6x6 grid
    assert model.vision.pos_embed.shape[0] == 37
    from mplug_fast.modeling.vision import resize_pos_embed

    resized = dict(sd)
    resized["visual_encoder.visual.positional_embedding"] = resize_pos_embed(
        sd["visual_encoder.visual.positional_embedding"], 6
    )
    images, _, _, ids, mask = _inputs(d, 48)
    with torch.no_grad():
        diff = _max_diff(
            model(images, ids, mask), official_caption_logits(resized, d, images, ids, mask), mask
        )
    assert diff < 1e-4, f"max abs diff {diff:.2e}"
    assert torch.equal(model.vision.pos_embed[0], sd["visual_encoder.visual.positional_embedding"][0])


def test_key_mapping_fusion_slots_and_fused_qkv() -> None:
    sd = make_official_state_dict(BASE_LIKE)
    model = load_official_checkpoint(sd, "pretrain", bert_config=BERT, strict=False)[0]
    for j in range(3):
        slot = f"fusion_encoder.encoder.layer.{3 + j}.attention.self."
        qkv = torch.cat([sd[slot + n + ".weight"] for n in ("query", "key", "value")])
        assert torch.equal(model.fusion.layers[j].attn.qkv.weight, qkv)
    blk = "visual_encoder.visual.transformer.resblocks.1."
    assert torch.equal(model.vision.blocks[1].attn.qkv.weight, sd[blk + "attn.in_proj_weight"])
    assert torch.equal(model.decoder.head.bias, sd["text_decoder.cls.predictions.bias"])


@pytest.mark.parametrize("task", sorted(TASK_MODELS))
def test_every_task_loads_strictly_and_reports_what_it_dropped(task: str, caplog) -> None:
    sd = make_official_state_dict(BASE_LIKE, momentum=True, queues=True, grounding_buffers=True)
    if task == "pretrain":  # the MLM head of the pretraining checkpoint (inferred spelling)
        for k in [k for k in sd if k.startswith("text_decoder.cls.predictions.")]:
            sd["text_encoder.cls.predictions." + k.split("predictions.")[1]] = sd[k].clone()
        sd["text_encoder.cls.predictions.decoder.weight"] = sd[
            "text_encoder.embeddings.word_embeddings.weight"
        ]
    model, report = load_official_checkpoint(sd, task, bert_config={**BERT, "stride_layer": 2}, strict=False)
    assert report.missing == [] and report.unexpected == [], (report.missing, report.unexpected)
    assert "visual_encoder.visual.proj" in report.ignored
    assert "fusion_encoder.encoder.layer.0.attention.self.query.weight" in report.ignored  # dead slot
    assert (
        "fusion_encoder.encoder.layer.5.crossattention.self.query.weight" in report.ignored
    )  # connected j=2
    live_cross = "fusion_encoder.encoder.layer.4.crossattention.self.query.weight"
    assert (live_cross in report.ignored) == (model.fusion is None)  # caption runs no fusion
    if model.momentum is not None:  # momentum copies come from the `_m` keys, not from the online weights
        assert torch.allclose(model.momentum["vision"].cls_token, model.vision.cls_token + 0.01)
    load_official_checkpoint(sd, task, bert_config={**BERT, "stride_layer": 2})  # strict passes too


def test_pretraining_layout_module_wrapper_and_ddp_prefix() -> None:
    sd = make_official_state_dict(BASE_LIKE, pretrain_layout=True)
    wrapped = {"module": {"module." + k: v for k, v in sd.items()}}
    a = load_official_checkpoint(wrapped, "vqa", bert_config=BERT)
    b = load_official_checkpoint(make_official_state_dict(BASE_LIKE), "vqa", bert_config=BERT)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    # `fusion_encoder.bert.` spelling
    bert_spelling = {k.replace("fusion_encoder.fusion.", "fusion_encoder.bert."): v for k, v in sd.items()}
    load_official_checkpoint(bert_spelling, "vqa", bert_config=BERT)


def test_strict_errors_name_the_keys() -> None:
    sd = make_official_state_dict(BASE_LIKE)
    sd["text_encoder.encoder.layer.0.surprise.weight"] = torch.zeros(3)
    del sd["text_decoder.bert.encoder.layer.1.output.dense.bias"]
    with pytest.raises(CheckpointError) as err:
        load_official_checkpoint(sd, "vqa", bert_config=BERT)
    text = str(err.value)
    assert "text_encoder.encoder.layer.0.surprise.weight" in text
    assert "decoder.layers.1.mlp.fc2.bias" in text
    model, report = load_official_checkpoint(sd, "vqa", bert_config=BERT, strict=False)
    assert report.unexpected == ["text_encoder.encoder.layer.0.surprise.weight"]
    assert report.missing == ["decoder.layers.1.mlp.fc2.bias"]


def test_shape_mismatch_and_non_mplug_files_are_clear_errors() -> None:
    sd = make_official_state_dict(BASE_LIKE)
    sd["text_encoder.encoder.layer.1.intermediate.dense.weight"] = torch.zeros(7, BASE_LIKE.hidden)
    with pytest.raises(CheckpointError, match="intermediate|shape"):
        load_official_checkpoint(sd, "vqa", bert_config=BERT)
    with pytest.raises(CheckpointError, match="not an mPLUG checkpoint"):
        load_official_checkpoint({"encoder.weight": torch.zeros(2)}, "vqa")
    with pytest.raises(ValueError, match="unknown task"):
        load_official_checkpoint(make_official_state_dict(BASE_LIKE), "no_such_task")


def test_truncated_and_missing_files(tmp_path) -> None:
    path = tmp_path / "mplug.pth"
    torch.save({"model": make_official_state_dict(BASE_LIKE)}, path)
    assert load_official_checkpoint(path, "caption", bert_config=BERT) is not None
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_official_checkpoint(tmp_path / "cut.pth", "caption", bert_config=BERT)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_official_checkpoint(tmp_path / "empty.pth", "caption")
    with pytest.raises(FileNotFoundError):
        load_official_checkpoint(tmp_path / "nope.pth", "caption")


def test_stride_default_is_logged_and_bert_config_from_path(tmp_path, caplog) -> None:
    sd = make_official_state_dict(BASE_LIKE)
    with caplog.at_level(logging.WARNING):
        model = load_official_checkpoint(
            sd, "vqa", bert_config={"num_attention_heads": 4, "fusion_layers": 3}, strict=True
        )
    assert model.config.fusion.stride == 6  # ViT width 64 is not ViT-B: the ViT-L default
    assert "stride_layer cannot be read" in caplog.text
    path = tmp_path / "config_bert.json"
    path.write_text('{"num_attention_heads": 4, "fusion_layers": 3, "stride_layer": 3}')
    assert load_official_checkpoint(sd, "vqa", bert_config=path).config.fusion.stride == 3
    assert load_official_checkpoint(sd, "vqa", bert_config=path, stride=2).config.fusion.stride == 2


@pytest.mark.parametrize("task", sorted(TASK_MODELS))
def test_round_trip_through_the_official_layout_is_exact(task: str) -> None:
    config = get_config("tiny")
    model = build_model(config, task)
    official = to_official_state_dict(model)
    assert "fusion_encoder.encoder.layer.8.attention.self.query.weight" in official or model.fusion is None
    # depths of components a task does not store (caption: text encoder) come from the BERT config
    bert = {
        "num_attention_heads": 4,
        "fusion_layers": 4,
        "stride_layer": 3,
        "text_encoder_layers": 4,
        "text_decode_layers": 4,
        "intermediate_size": 1024,
    }
    back = load_official_checkpoint(official, task, bert_config=bert)
    assert back.config == config
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_save_and_from_pretrained_round_trip(tmp_path) -> None:
    model = build_model(get_config("tiny"), "retrieval")
    save_pretrained(model, tmp_path / "ckpt")
    back = from_pretrained(tmp_path / "ckpt")
    assert back.task == "retrieval" and back.config == model.config
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    assert not any(p.requires_grad for p in back.momentum.parameters())
    # a pretraining checkpoint serves a downstream task; a task missing components is an error
    pre = build_model(get_config("tiny"), "pretrain")
    save_pretrained(pre, tmp_path / "pre")
    assert from_pretrained(tmp_path / "pre", task="vqa").task == "vqa"
    with pytest.raises(CheckpointError, match="lacks"):
        from_pretrained(tmp_path / "ckpt", task="vqa")

"""The mPLUG model: parameter counts against fidelity §12, the skip-connected fusion against a hand
computation of §1.4 / §3.3, invariants (padding, batch order, causality, shared memory K/V), the task
models' components and shapes, input checks, and a train-mode backward.

Oracles, strongest first:
  * the spec's parameter table (§12), computed from the official module definitions;
  * a float64 re-computation of the fusion written from the spec (post-LN BERT layers of §3.1, with the
    attention written out as softmax(q k^T / sqrt(Dh) + additive mask) v), given the model's weights;
  * invariants (asymmetric layers leave the image states unchanged, padding and batch order do not change
    real outputs, later tokens do not change earlier logits, precomputed memory K/V == recomputation).

Everything numeric runs the `tiny` preset (D=256, 64 px -> 17 image tokens) in fp32 eval mode, with weights
redrawn at a larger scale than `init_weights` (std 0.08, LayerNorm weights ~ N(1, 0.1)) so that attention is
far from uniform and a wrong mask, order or residual shows.

| comparison                                | atol  |
|-------------------------------------------|-------|
| fusion (fp32) vs float64 hand computation | 1e-5 x max(1, max |ref|) |
| fusion (float64) vs hand computation      | 1e-10 |
| padding / batch-order invariance          | 1e-5  |
| causality, shared memory K/V              | 1e-6  |
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mplug_fast.config import MPlugConfig, base, large, tiny
from mplug_fast.modeling import (
    MPlugForCaption,
    MPlugForGrounding,
    MPlugForPretraining,
    MPlugForRetrieval,
    MPlugForVQA,
)
from mplug_fast.modeling.fusion import (
    AsymmetricCoAttentionLayer,
    ConnectedAttentionLayer,
    SkipConnectedFusion,
)
from mplug_fast.tasks import TASKS

A, C = "asymmetric", "connected"
V_TINY = tiny().text.vocab_size
NV_TINY = tiny().vision.num_tokens  # 17

# task -> model class of every task that builds its own model (the zero-shot video tasks borrow theirs)
TASK_MODELS = {name: task.model_class for name, task in TASKS.items() if task.checkpoint_task is task}


# ---- helpers -----------------------------------------------------------------------------------------------


def assert_close(actual: Tensor, expected: Tensor, atol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    diff = (actual.double() - expected.double()).abs()
    assert diff.max().item() <= atol, (
        f"{what}: max |diff| {diff.max().item():.3e} > atol {atol:.0e} (mean |diff| {diff.mean().item():.3e})"
    )


def n_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@torch.no_grad()
def randomize(module: nn.Module, std: float = 0.08, seed: int = 0) -> nn.Module:
    """All parameters ~ N(0, std), LayerNorm weights ~ N(1, 0.1), biases ~ N(0, 0.1); eval mode."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        scale = 0.1 if name.endswith("bias") else std
        p.copy_(torch.randn(p.shape, generator=g) * scale)
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
    return module.eval()


def images(B: int, size: int | tuple[int, int] = 64, seed: int = 1) -> Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(B, 3, h, w, generator=torch.Generator().manual_seed(seed))


def token_ids(B: int, L: int, seed: int = 2) -> Tensor:
    """[CLS] + random word pieces; never the pad id 0."""
    ids = torch.randint(1000, V_TINY, (B, L), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 101
    return ids


def pad_right(ids: Tensor, mask: Tensor, extra: int) -> tuple[Tensor, Tensor]:
    """Append `extra` [PAD] (id 0) tokens with mask 0."""
    B = ids.shape[0]
    return (torch.cat([ids, ids.new_zeros(B, extra)], 1), torch.cat([mask, mask.new_zeros(B, extra)], 1))


def tiny_config(**overrides) -> MPlugConfig:
    return tiny().replace(**overrides) if overrides else tiny()


# ---- the fusion written out from the spec (float64) --------------------------------------------------------


def _lin(x: Tensor, layer: nn.Linear, rows: slice | None = None) -> Tensor:
    w, b = layer.weight.double(), layer.bias.double()
    if rows is not None:
        w, b = w[rows], b[rows]
    return x @ w.T + b


def _ln(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def _mha(q: Tensor, k: Tensor, v: Tensor, heads: int, key_mask: Tensor | None) -> Tensor:
    """q [B, Lq, D], k/v [B, Lk, D] (already projected); key_mask bool [B, Lk], True = attend."""
    B, Lq, D = q.shape
    Dh = D // heads

    def split(x):
        return x.reshape(B, -1, heads, Dh).transpose(1, 2)  # [B, H, L, Dh]

    scores = split(q) @ split(k).transpose(-2, -1) / math.sqrt(Dh)  # [B, H, Lq, Lk]
    if key_mask is not None:
        scores = scores + torch.where(key_mask, 0.0, -math.inf).double()[:, None, None, :]
    ctx = torch.softmax(scores, dim=-1) @ split(v)  # [B, H, Lq, Dh]
    return ctx.transpose(1, 2).reshape(B, Lq, D)


def bert_layer_by_hand(
    layer: nn.Module,
    x: Tensor,
    mask: Tensor | None,
    memory: Tensor | None = None,
    memory_mask: Tensor | None = None,
) -> Tensor:
    """§3.1: a = LN(x + SelfAttn(x)); c = LN(a + CrossAttn(a, memory)); out = LN(c + fc2(gelu(fc1(c))))."""
    D = x.shape[-1]
    heads = layer.attn.num_heads
    q, k, v = (_lin(x, layer.attn.qkv, slice(i * D, (i + 1) * D)) for i in range(3))  # fused rows: q, k, v
    a = _ln(x + _lin(_mha(q, k, v, heads, mask), layer.attn.out_proj), layer.norm_attn)
    if memory is not None:
        q = _lin(a, layer.cross.q_proj)
        k, v = (_lin(memory, layer.cross.kv_proj, slice(i * D, (i + 1) * D)) for i in range(2))  # rows: k, v
        a = _ln(a + _lin(_mha(q, k, v, heads, memory_mask), layer.cross.out_proj), layer.norm_cross)
    h = _lin(F.gelu(_lin(a, layer.mlp.fc1)), layer.mlp.fc2)
    return _ln(a + h, layer.norm_mlp)


def fusion_by_hand(fusion: SkipConnectedFusion, stride: int, v: Tensor, t: Tensor, t_mask: Tensor) -> tuple:
    """fidelity §3.3, in float64, with the layer kind decided by the rule (not by the module)."""
    v, t = v.double(), t.double()
    Nv = v.shape[1]
    v_mask = torch.ones(v.shape[:2], dtype=torch.bool)
    for j, layer in enumerate(fusion.layers):
        if j == 0 or j % stride != 0:  # asymmetric co-attention
            t = bert_layer_by_hand(layer, t, t_mask, memory=v, memory_mask=v_mask)
        else:  # connected attention: the layer's self-attention + FFN over [v; t], then v <- v + y_v
            y = bert_layer_by_hand(layer, torch.cat([v, t], 1), torch.cat([v_mask, t_mask], 1))
            v, t = v + y[:, :Nv], y[:, Nv:]
    return v, t


# ---- parameter counts (fidelity §12), built on the meta device -------------------------------------

# official per-module counts (§12)
VISION_B16 = {224: 86_192_640, 256: 86_238_720, 384: 86_484_480}  # incl. visual.proj [768, 512]
VISION_L14 = {224: 303_966_208, 336: 304_293_888}  # incl. visual.proj [1024, 768]
TEXT_ENCODER = 66_364_416
TEXT_LAYER = 7_087_872
FUSION_LAYER = 9_451_776  # = decoder layer: self + cross + FFN
FUSION_EXECUTED = 56_710_656  # slots 6..11
CROSS_BLOCK = 4 * 590_592 + 1_536  # q, k, v, out (768 * 768 + 768 each) + norm_cross
DECODER = 137_881_146
RETRIEVAL_HEADS = 395_267
ADAPTER = 788_736
OFFICIAL_VQA_BASE_384 = 491_416_635
CLIP_B16_TEXT_TOWER = 63_428_097
FUSION_EMBEDDINGS = 23_837_184


def meta_model(task: str, config: MPlugConfig):
    with torch.device("meta"):
        return TASKS[task].new_model(config)


@pytest.mark.parametrize("res", sorted(VISION_B16))
def test_param_count_vit_b16(res):
    model = meta_model("caption", base().replace(**{"vision.image_size": res}))
    assert n_params(model.vision) + 768 * 512 == VISION_B16[res]  # we do not build visual.proj


@pytest.mark.parametrize("res", sorted(VISION_L14))
def test_param_count_vit_l14_and_adapter(res):
    model = meta_model("caption", large().replace(**{"vision.image_size": res}))
    assert n_params(model.vision) + 1024 * 768 == VISION_L14[res]
    assert n_params(model.adapter) == ADAPTER


def test_param_count_text_encoder_and_layers():
    model = meta_model("vqa", base())
    assert n_params(model.text_encoder) == TEXT_ENCODER
    assert all(n_params(layer) == TEXT_LAYER for layer in model.text_encoder.layers)
    assert all(n_params(layer) == FUSION_LAYER for layer in model.decoder.layers)
    assert CROSS_BLOCK == 2_363_904 == FUSION_LAYER - TEXT_LAYER
    assert n_params(model.adapter) == 0  # nn.Identity for base


def test_param_count_fusion_stride_6_is_the_executed_official_part():
    model = meta_model("vqa", large())
    assert [type(layer) for layer in model.fusion.layers] == [AsymmetricCoAttentionLayer] * 6
    assert n_params(model.fusion) == FUSION_EXECUTED == 6 * FUSION_LAYER


def test_param_count_fusion_stride_3_has_no_cross_attention_in_the_connected_layer():
    model = meta_model("vqa", base())
    counts = [n_params(layer) for layer in model.fusion.layers]
    assert counts == [FUSION_LAYER] * 3 + [TEXT_LAYER] + [FUSION_LAYER] * 2
    assert n_params(model.fusion) == FUSION_EXECUTED - CROSS_BLOCK == 54_346_752


def test_param_count_decoder_counts_the_tied_weight_once():
    model = meta_model("caption", base())
    assert n_params(model.decoder) == DECODER
    names = {name for name, _ in model.decoder.named_parameters()}
    assert not any("head" in name and "weight" in name and name.endswith("decoder.weight") for name in names)


def test_param_count_retrieval_heads():
    model = meta_model("retrieval", base())
    heads = (
        n_params(model.vision_proj)
        + n_params(model.text_proj)
        + n_params(model.itm_head)
        + model.temp.numel()
    )
    assert heads == RETRIEVAL_HEADS


def test_param_count_base_vqa_is_the_official_model_minus_its_dead_weights():
    """The official base VQA model @384 (no momentum) has 491,416,635 parameters (§12). Its modules (§1.7):
    full CLIP (visual 86,484,480 + text tower 63,428,097), text encoder 66,364,416, fusion as stored
    (embeddings 23,837,184 + 12 slots x 9,451,776 = 137,258,496) and decoder 137,881,146 -- they add up
    exactly: 86,484,480 + 63,428,097 + 66,364,416 + 137,258,496 + 137,881,146 = 491,416,635; the VQA model
    has no retrieval heads. We drop the dead weights:
        491,416,635 - 63,428,097 (CLIP text tower) - 393,216 (visual.proj) - 56,710,656 (fusion slots 0-5)
                    - 23,837,184 (fusion embeddings) - 2,363,904 (cross-attn of the connected layer)
                  = 344,683,578
    """
    official_parts = (
        VISION_B16[384] + CLIP_B16_TEXT_TOWER + TEXT_ENCODER + (FUSION_EMBEDDINGS + 12 * FUSION_LAYER)
    )
    assert official_parts + DECODER == OFFICIAL_VQA_BASE_384
    dead = CLIP_B16_TEXT_TOWER + 768 * 512 + 6 * FUSION_LAYER + FUSION_EMBEDDINGS + CROSS_BLOCK
    expected = OFFICIAL_VQA_BASE_384 - dead
    assert expected == 344_683_578
    model = meta_model("vqa", base())
    assert n_params(model) == expected
    assert model.momentum is None


def test_param_count_large_vqa_and_readme_sizes():
    model = meta_model("vqa", large())
    expected = (VISION_L14[336] - 1024 * 768) + ADAPTER + TEXT_ENCODER + FUSION_EXECUTED + DECODER
    assert n_params(model) == expected == 565_252_410
    huge_model = meta_model("vqa", large().replace(**{"text.encoder_layers": 24}))
    assert n_params(huge_model.text_encoder) == TEXT_ENCODER + 18 * TEXT_LAYER


# ---- fusion semantics (tiny, fp32, eval) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fusion_inputs():
    """Image states [2, 17, 256], text states [2, 7, 256] and a text mask (row 1 has 3 padding tokens)."""
    g = torch.Generator().manual_seed(3)
    v = torch.randn(2, NV_TINY, 256, generator=g)
    t = torch.randn(2, 7, 256, generator=g)
    t_mask = torch.ones(2, 7, dtype=torch.bool)
    t_mask[1, 4:] = False
    return v, t, t_mask


def build_fusion(layers: int, stride: int) -> SkipConnectedFusion:
    config = tiny_config(**{"fusion.layers": layers, "fusion.stride": stride})
    return randomize(SkipConnectedFusion(config), seed=layers * 10 + stride)


@pytest.mark.parametrize(
    "layers, stride, expected",
    [(4, 3, (A, A, A, C)), (6, 3, (A, A, A, C, A, A)), (6, 6, (A,) * 6), (6, 2, (A, A, C, A, C, A))],
)
def test_fusion_layer_kinds(layers, stride, expected):
    fusion = build_fusion(layers, stride)
    kinds = tuple(C if isinstance(layer, ConnectedAttentionLayer) else A for layer in fusion.layers)
    assert kinds == expected == fusion.config.layer_types
    for layer in fusion.layers:
        if isinstance(layer, ConnectedAttentionLayer):
            assert layer.cross is None and layer.norm_cross is None  # owns no cross-attention
        else:
            assert isinstance(layer, AsymmetricCoAttentionLayer) and layer.cross is not None


@torch.no_grad()
def test_fusion_stride_6_returns_the_image_states_bitwise(fusion_inputs):
    v, t, t_mask = fusion_inputs
    fusion = build_fusion(6, 6)
    v_out, t_out = fusion(v, t, t_mask)
    assert torch.equal(v_out, v)
    assert not torch.allclose(t_out, t)


@torch.no_grad()
def test_asymmetric_layer_reads_but_never_writes_the_image(fusion_inputs):
    v, t, t_mask = fusion_inputs
    layer = build_fusion(6, 6).layers[0]
    v_out, t_out = layer(v, t, None, t_mask)
    assert torch.equal(v_out, v)
    v_other = v + torch.randn(v.shape, generator=torch.Generator().manual_seed(9))
    v_out2, t_out2 = layer(v_other, t, None, t_mask)
    assert torch.equal(v_out2, v_other)
    assert (t_out2 - t_out).abs().max() > 1e-2, "the text output does not depend on the image"
    assert_close(t_out, bert_layer_by_hand(layer, t.double(), t_mask, v.double(), None), 1e-5, "asym layer")


@torch.no_grad()
def test_fusion_stride_3_reproduced_by_hand_step_by_step(fusion_inputs):
    """tiny (4 layers, S=3): layers 0..2 asymmetric on t, layer 3 over cat([v, t]) with the joint mask;
    v_out == v_in + y[:, :Nv] and t_out == y[:, Nv:]."""
    v, t, t_mask = fusion_inputs
    fusion = build_fusion(4, 3)
    v_out, t_out = fusion(v, t, t_mask)

    Nv = v.shape[1]
    v64, t64 = v.double(), t.double()
    ones = torch.ones(v.shape[:2], dtype=torch.bool)
    for j in range(3):
        t64 = bert_layer_by_hand(fusion.layers[j], t64, t_mask, memory=v64, memory_mask=ones)
    y = bert_layer_by_hand(fusion.layers[3], torch.cat([v64, t64], 1), torch.cat([ones, t_mask], 1))
    assert_close(v_out, v64 + y[:, :Nv], 1e-5, "v_out vs v_in + y[:, :Nv]")
    assert_close(t_out, y[:, Nv:], 1e-5, "t_out vs y[:, Nv:]")
    # The extra residual is really there: v_out differs from the plain post-LN output y[:, :Nv].
    assert (v_out.double() - y[:, :Nv]).abs().max() > 0.5
    # ... and the module's own connected layer agrees with the same split.
    v_mid, t_mid = v, t
    for layer in fusion.layers[:3]:
        v_mid, t_mid = layer(v_mid, t_mid, None, t_mask)
    assert torch.equal(v_mid, v)
    v_last, t_last = fusion.layers[3](v_mid, t_mid, None, t_mask)
    assert torch.equal(v_last, v_out) and torch.equal(t_last, t_out)


@pytest.mark.parametrize("layers, stride", [(6, 3), (6, 2), (6, 1), (4, 3)])
@torch.no_grad()
def test_fusion_matches_the_spec_pseudocode(fusion_inputs, layers, stride):
    """The module in float64 equals the float64 hand computation to rounding (the formula is exact); in fp32
    the bound scales with the output magnitude: every connected layer adds to v (|v| grows to ~14 with S=1)
    and the peaky attention of these weights amplifies fp32 rounding (measured max |diff| 4e-5 for S=1, on
    an Intel Xeon 4.2e-5 on text states of magnitude 3.6, hence 3e-5 x the magnitude)."""
    v, t, t_mask = fusion_inputs
    fusion = build_fusion(layers, stride)
    v_ref, t_ref = fusion_by_hand(fusion, stride, v, t, t_mask)
    v_out, t_out = fusion(v, t, t_mask)
    assert_close(v_out, v_ref, 3e-5 * max(1.0, v_ref.abs().max().item()), f"fp32 image states S={stride}")
    assert_close(t_out, t_ref, 3e-5 * max(1.0, t_ref.abs().max().item()), f"fp32 text states S={stride}")
    v64, t64 = fusion.double()(v.double(), t.double(), t_mask)
    assert_close(v64, v_ref, 1e-10, f"float64 image states S={stride}")
    assert_close(t64, t_ref, 1e-10, f"float64 text states S={stride}")


# ---- tiny task models --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vqa() -> MPlugForVQA:
    torch.manual_seed(0)
    return randomize(MPlugForVQA(tiny()), seed=11)


@pytest.fixture(scope="module")
def task_models() -> dict:
    torch.manual_seed(0)
    models = {}
    for task in TASK_MODELS:
        model = TASKS[task].new_model(tiny())
        model.init_weights()
        models[task] = model.eval()
    return models


@torch.no_grad()
def test_encode_text_padding_invariance(vqa):
    ids = token_ids(2, 7)
    mask = torch.ones(2, 7, dtype=torch.long)
    out = vqa.encode_text(ids, mask)
    ids_p, mask_p = pad_right(ids, mask, 5)
    out_p = vqa.encode_text(ids_p, mask_p)
    assert_close(out_p[:, :7], out, 1e-5, "encode_text with 5 padding tokens")
    assert_close(vqa.encode_text(ids, None), out, 1e-5, "mask None == all ones")
    # a short row inside a longer batch == the same row alone
    short = vqa.encode_text(ids[1:, :4], mask[1:, :4])
    mask_mixed = mask.clone()
    mask_mixed[1, 4:] = 0
    mixed = vqa.encode_text(ids, mask_mixed)
    assert_close(mixed[1:, :4], short, 1e-5, "short row in a padded batch")
    assert_close(mixed[:1], out[:1], 1e-5, "other rows unaffected")


@torch.no_grad()
def test_fuse_padding_invariance(vqa):
    ids = token_ids(2, 7)
    mask = torch.ones(2, 7, dtype=torch.long)
    v = vqa.encode_image(images(2))
    v_out, t_out = vqa.fuse(v, vqa.encode_text(ids, mask), mask)
    ids_p, mask_p = pad_right(ids, mask, 4)
    v_out_p, t_out_p = vqa.fuse(v, vqa.encode_text(ids_p, mask_p), mask_p)
    assert_close(v_out_p, v_out, 1e-5, "fused image states with text padding")
    assert_close(t_out_p[:, :7], t_out, 1e-5, "fused text states with text padding")
    assert (v_out - v).abs().max() > 1e-2  # tiny has a connected layer: the image is updated


@torch.no_grad()
def test_decoder_padding_invariance(vqa):
    memory, memory_mask = vqa.fused_memory(images(2), token_ids(2, 6), torch.ones(2, 6, dtype=torch.long))
    ids = token_ids(2, 5, seed=4)
    mask = torch.ones(2, 5, dtype=torch.long)
    logits = vqa.decode(ids, mask, memory, memory_mask)
    ids_p, mask_p = pad_right(ids, mask, 3)
    assert_close(vqa.decode(ids_p, mask_p, memory, memory_mask)[:, :5], logits, 1e-5, "decoder text padding")
    # padding the memory (masked keys) changes nothing either
    memory_p = torch.cat([memory, torch.randn(2, 3, memory.shape[-1])], 1)
    memory_mask_p = torch.cat([memory_mask, torch.zeros(2, 3, dtype=torch.bool)], 1)
    assert_close(vqa.decode(ids, mask, memory_p, memory_mask_p), logits, 1e-5, "decoder memory padding")


@torch.no_grad()
def test_vqa_question_padding_invariance_end_to_end(vqa):
    imgs, q = images(2), token_ids(2, 6)
    q_mask = torch.ones(2, 6, dtype=torch.long)
    a = token_ids(2, 4, seed=5)
    logits = vqa(imgs, q, q_mask, a, None)
    q_p, q_mask_p = pad_right(q, q_mask, 4)
    assert_close(vqa(imgs, q_p, q_mask_p, a, None), logits, 1e-5, "VQA logits with question padding")


@torch.no_grad()
def test_batch_order_invariance(vqa, task_models):
    imgs, q = images(3), token_ids(3, 6)
    q_mask = torch.ones(3, 6, dtype=torch.long)
    q_mask[2, 3:] = 0
    a = token_ids(3, 4, seed=5)
    perm = torch.tensor([2, 0, 1])
    logits = vqa(imgs, q, q_mask, a, None)
    assert_close(vqa(imgs[perm], q[perm], q_mask[perm], a[perm], None), logits[perm], 1e-5, "VQA batch order")
    retrieval = randomize(MPlugForRetrieval(tiny()), seed=12)  # a fresh one: `task_models` stay at init
    sim, itm = retrieval(imgs, q, q_mask)
    sim_p, itm_p = retrieval(imgs[perm], q[perm], q_mask[perm])
    assert_close(sim_p, sim[perm][:, perm], 1e-5, "ITC similarity batch order")
    assert_close(itm_p, itm[perm], 1e-5, "ITM batch order")


@torch.no_grad()
def test_decoder_is_causal(vqa):
    memory, memory_mask = vqa.fused_memory(images(2), token_ids(2, 6), None)
    ids = token_ids(2, 8, seed=6)
    logits = vqa.decode(ids, None, memory, memory_mask)
    for k in (1, 4, 7):
        changed = ids.clone()
        changed[:, k] = (changed[:, k] + 17) % V_TINY
        other = vqa.decode(changed, None, memory, memory_mask)
        assert_close(other[:, :k], logits[:, :k], 1e-6, f"logits before position {k}")
        assert (other[:, k:] - logits[:, k:]).abs().max() > 1e-3, f"position {k} changes nothing"


@pytest.mark.parametrize("padded_memory", [False, True])
@torch.no_grad()
def test_decode_with_projected_memory_equals_repeated_memory(vqa, padded_memory):
    q = token_ids(2, 6)
    q_mask = torch.ones(2, 6, dtype=torch.long)
    if padded_memory:
        q_mask[1, 3:] = 0
    memory, memory_mask = vqa.fused_memory(images(2), q, q_mask)  # [2, 23, D]
    memory_index = torch.tensor([0, 0, 1, 1, 1])
    answers = token_ids(5, 4, seed=7)
    a_mask = torch.ones(5, 4, dtype=torch.long)
    a_mask[3, 2:] = 0
    repeated = vqa.decode(answers, a_mask, memory[memory_index], memory_mask[memory_index])
    memory_kv = vqa.decoder.project_memory(memory)
    assert len(memory_kv) == tiny().decoder.layers and memory_kv[0][0].shape == (2, 4, NV_TINY + 6, 64)
    shared = vqa.decode(answers, a_mask, None, memory_mask, memory_kv=memory_kv, memory_index=memory_index)
    assert_close(shared, repeated, 1e-6, "memory_kv + memory_index vs repeated memory")
    # the VQA forward's answer_index path is the same computation
    imgs = images(2)
    via_index = vqa(imgs, q, q_mask, answers, a_mask, memory_index)
    via_repeat = vqa(imgs[memory_index], q[memory_index], q_mask[memory_index], answers, a_mask)
    scale = max(1.0, via_repeat.abs().max().item())  # logits ~10: fp32 sums in another order differ ~1e-5
    assert_close(via_index, via_repeat, 1e-5 * scale, "VQA answer_index vs repeated questions")


# ---- task models: components, shapes, errors ---------------------------------------------------------------

EXPECTED_CHILDREN = {
    "pretrain": {
        "vision",
        "adapter",
        "text_encoder",
        "fusion",
        "decoder",
        "vision_proj",
        "text_proj",
        "itm_head",
        "mlm_head",
        "momentum",
    },
    "vqa": {"vision", "adapter", "text_encoder", "fusion", "decoder"},
    "caption": {"vision", "adapter", "decoder"},
    "scst": {"vision", "adapter", "decoder"},
    "retrieval": {
        "vision",
        "adapter",
        "text_encoder",
        "fusion",
        "vision_proj",
        "text_proj",
        "itm_head",
        "momentum",
    },
    "grounding": {"vision", "adapter", "text_encoder", "fusion", "decoder"},
    "nlvr2": {"vision", "adapter", "text_encoder", "fusion", "cls_head"},
    "ve": {"vision", "adapter", "text_encoder", "fusion", "cls_head"},
}
EXPECTED_MOMENTUM = {
    "pretrain": {"vision", "adapter", "text_encoder", "fusion", "decoder", "vision_proj", "text_proj"},
    "retrieval": {"vision", "adapter", "text_encoder", "vision_proj", "text_proj"},
}


def test_task_registry():
    assert set(TASK_MODELS) == set(EXPECTED_CHILDREN)
    assert TASK_MODELS["pretrain"] is MPlugForPretraining and TASK_MODELS["vqa"] is MPlugForVQA
    assert TASK_MODELS["caption"] is MPlugForCaption and TASK_MODELS["retrieval"] is MPlugForRetrieval
    assert TASK_MODELS["grounding"] is MPlugForGrounding


@pytest.mark.parametrize("task", sorted(EXPECTED_CHILDREN))
def test_task_model_owns_exactly_its_components(task_models, task):
    model = task_models[task]
    assert set(dict(model.named_children())) == EXPECTED_CHILDREN[task]
    for name in (
        "text_encoder",
        "fusion",
        "decoder",
        "vision_proj",
        "text_proj",
        "itm_head",
        "mlm_head",
        "momentum",
    ):
        assert (getattr(model, name) is None) == (name not in EXPECTED_CHILDREN[task]), name
    assert (model.temp is not None) == ("itm_head" in EXPECTED_CHILDREN[task])
    assert isinstance(model.adapter, nn.Identity)  # tiny: vision width == text width
    if task in EXPECTED_MOMENTUM:
        assert set(model.momentum) == EXPECTED_MOMENTUM[task]
    else:
        assert model.momentum is None


@pytest.mark.parametrize("task", sorted(EXPECTED_MOMENTUM))
def test_momentum_copies_equal_the_online_weights_after_init(task_models, task):
    model = task_models[task]
    for name, copy in model.momentum.items():
        online = dict(getattr(model, name).named_parameters())
        momentum = dict(copy.named_parameters())
        assert online.keys() == momentum.keys(), name
        for key, p in online.items():
            assert torch.equal(momentum[key], p), f"momentum {name}.{key} != online"
            assert momentum[key].data_ptr() != p.data_ptr(), f"momentum {name}.{key} shares storage"
            assert not momentum[key].requires_grad, f"momentum {name}.{key} requires grad"


def test_momentum_is_not_in_the_trainable_parameters(task_models):
    model = task_models["retrieval"]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(id(p) in trainable for p in model.momentum.parameters())


@torch.no_grad()
def test_vqa_forward_shapes(task_models):
    model = task_models["vqa"]
    logits = model(
        images(2),
        token_ids(2, 6),
        torch.ones(2, 6),
        token_ids(3, 5),
        torch.ones(3, 5),
        torch.tensor([0, 0, 1]),
    )
    assert logits.shape == (3, 5, V_TINY)
    assert model(images(2), token_ids(2, 6), None, token_ids(2, 5), None).shape == (2, 5, V_TINY)


@torch.no_grad()
def test_caption_forward_shapes(task_models):
    logits = task_models["caption"](images(2), token_ids(2, 9), torch.ones(2, 9, dtype=torch.long))
    assert logits.shape == (2, 9, V_TINY)


@torch.no_grad()
def test_retrieval_forward_shapes(task_models):
    model = task_models["retrieval"]
    sim, itm = model(images(3), token_ids(3, 6), torch.ones(3, 6, dtype=torch.long))
    assert sim.shape == (3, 3) and itm.shape == (3, 2)
    v = model.encode_image(images(3))
    feats = model.image_features(v)
    assert feats.shape == (3, tiny().embed_dim)
    assert_close(feats.norm(dim=-1), torch.ones(3), 1e-5, "image features are unit vectors")


@torch.no_grad()
def test_grounding_forward_shapes(task_models):
    box_ids = torch.tensor([[344, 513, 513, 429, 681]] * 2)
    logits = task_models["grounding"](images(2), token_ids(2, 6), torch.ones(2, 6, dtype=torch.long), box_ids)
    assert logits.shape == (2, 5, V_TINY)


@torch.no_grad()
def test_pretrain_model_runs_every_component(task_models):
    """The pretraining model has no single forward (the objectives compose it); run each of its parts."""
    model = task_models["pretrain"]
    imgs, ids, mask = images(2), token_ids(2, 6), torch.ones(2, 6, dtype=torch.long)
    v = model.encode_image(imgs)
    t = model.encode_text(ids, mask)
    assert v.shape == (2, NV_TINY, 256) and t.shape == (2, 6, 256)
    v_f, t_f = model.fuse(v, t, mask)
    assert v_f.shape == v.shape and t_f.shape == t.shape
    assert model.mlm_logits(t_f).shape == (2, 6, V_TINY)
    assert model.itm_logits(v, t, mask).shape == (2, 2)
    assert model.image_features(v).shape == model.text_features(t).shape == (2, tiny().embed_dim)
    memory, memory_mask = model.fused_memory(imgs, ids, mask)
    assert memory.shape == (2, NV_TINY + 6, 256) and memory_mask.shape == (2, NV_TINY + 6)
    assert model.decode(token_ids(2, 4), None, memory, memory_mask).shape == (2, 4, V_TINY)


@pytest.mark.parametrize(
    "task, call, missing",
    [
        ("caption", lambda m: m.encode_text(token_ids(1, 3)), "text_encoder"),
        ("caption", lambda m: m.fuse(torch.zeros(1, 17, 256), torch.zeros(1, 3, 256)), "fusion"),
        ("caption", lambda m: m.image_features(torch.zeros(1, 17, 256)), "vision_proj"),
        ("retrieval", lambda m: m.decode(token_ids(1, 3), None, torch.zeros(1, 17, 256)), "decoder"),
        ("vqa", lambda m: m.text_features(torch.zeros(1, 3, 256)), "text_proj"),
        ("vqa", lambda m: m.mlm_logits(torch.zeros(1, 3, 256)), "mlm_head"),
    ],
)
def test_missing_component_is_a_clear_attribute_error(task_models, task, call, missing):
    with pytest.raises(AttributeError, match=rf"the '{task}' model has no '{missing}'"):
        call(task_models[task])


@torch.no_grad()
def test_other_image_resolutions_resize_the_position_table(task_models):
    model = task_models["caption"]
    assert model.encode_image(images(2, 96)).shape == (2, 37, 256)  # 6 x 6 + CLS
    assert model.encode_image(images(2, (64, 96))).shape == (2, 25, 256)  # 4 x 6 + CLS
    assert model.encode_image(images(1, 16)).shape == (1, 2, 256)
    assert model.vision.pos_embed.shape == (NV_TINY, 256)  # the stored table is not modified
    assert task_models["vqa"](images(2, 96), token_ids(2, 6), None, token_ids(2, 4), None).shape == (
        2,
        4,
        V_TINY,
    )


@pytest.mark.parametrize(
    "shape, pattern",
    [
        ((2, 1, 64, 64), r"images must be \[B, 3, H, W\], got \[2, 1, 64, 64\]"),
        ((3, 64, 64), r"images must be \[B, 3, H, W\], got \[3, 64, 64\]"),
        ((2, 3, 70, 64), r"image size 70x64 is not divisible by the patch size 16"),
        ((2, 3, 64, 72), r"image size 64x72 is not divisible by the patch size 16"),
    ],
)
def test_wrong_image_shapes_raise(task_models, shape, pattern):
    with pytest.raises(ValueError, match=pattern):
        task_models["caption"].encode_image(torch.zeros(shape))


def test_text_longer_than_the_position_table_raises(task_models):
    too_long = token_ids(1, tiny().text.max_position_embeddings + 1)
    with pytest.raises(ValueError, match=r"513 tokens is longer than max_position_embeddings=512"):
        task_models["vqa"].encode_text(too_long)
    memory = torch.zeros(1, NV_TINY, 256)
    with pytest.raises(ValueError, match=r"max_position_embeddings=512"):
        task_models["caption"].decode(too_long, None, memory)


def test_bad_text_inputs_raise(task_models):
    model = task_models["vqa"]
    with pytest.raises(ValueError, match=r"token ids must be \[B, L\]"):
        model.encode_text(token_ids(1, 4)[0])
    with pytest.raises(
        ValueError, match=r"attention mask must have the shape of the ids \[2, 4\], got \[2, 5\]"
    ):
        model.encode_text(token_ids(2, 4), torch.ones(2, 5))


# ---- training ----------------------------------------------------------------------------------------------


def test_vqa_train_step_gives_finite_gradients_for_every_parameter():
    """Train mode (dropout on), a VQA loss over 3 answers for 2 questions; every parameter of the VQA model is
    used, so every one gets a finite gradient, and the loss is finite."""
    torch.manual_seed(0)
    model = MPlugForVQA(tiny())
    model.init_weights()
    model.train()
    q_mask = torch.ones(2, 6, dtype=torch.long)
    q_mask[1, 4:] = 0
    answers = token_ids(3, 5, seed=8)
    a_mask = torch.ones(3, 5, dtype=torch.long)
    a_mask[2, 3:] = 0
    logits = model(images(2), token_ids(2, 6), q_mask, answers, a_mask, torch.tensor([0, 1, 1]))
    labels = answers.masked_fill(a_mask == 0, -100)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V_TINY), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"
    zero = [name for name, p in model.named_parameters() if p.grad.abs().max() == 0]
    assert not zero, f"parameters with an all-zero gradient: {zero}"

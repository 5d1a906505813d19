"""The mPLUG task models: invariants (padding, batch order, causality, shared memory K/V), their components
and shapes, input checks, and a train-mode backward (parameter counts: test_param_counts.py; the fusion
against its hand computation: test_fusion_by_hand.py; shared helpers: model_oracle.py).

Oracles: invariants (padding and batch order do not change real outputs, later tokens do not change
earlier logits, precomputed memory K/V == recomputation) and the task registry's component lists. Everything
numeric runs the `tiny` preset (D=256, 64 px -> 17 image tokens) in fp32 eval mode, with weights redrawn
at a larger scale than `init_weights` (std 0.08, LayerNorm weights ~ N(1, 0.1)) so that attention is far
from uniform and a wrong mask, order or residual shows.

| comparison                                | atol  |
|-------------------------------------------|-------|
| padding / batch-order invariance          | 1e-5  |
| causality, shared memory K/V              | 1e-6  |
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mplug_fast.config import tiny
from mplug_fast.modeling import (
    MPlugForCaption,
    MPlugForGrounding,
    MPlugForPretraining,
    MPlugForRetrieval,
    MPlugForVQA,
)
from mplug_fast.tasks import TASKS
from tests.modeling.model_oracle import (
    NV_TINY,
    TASK_MODELS,
    V_TINY,
    assert_close,
    images,
    pad_right,
    randomize,
    token_ids,
)

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

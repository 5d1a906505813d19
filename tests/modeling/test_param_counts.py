"""Parameter counts against the spec's table (fidelity §12, computed from the official module definitions),
every model built on the meta device."""

from __future__ import annotations

import pytest
import torch

from mplug_fast.config import MPlugConfig, base, large
from mplug_fast.modeling.fusion import (
    AsymmetricCoAttentionLayer,
)
from mplug_fast.tasks import TASKS
from tests.modeling.model_oracle import (
    n_params,
)

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

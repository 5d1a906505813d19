"""The grounding objective options: Gaussian soft coordinate targets (``label_sigma``: the target
distributions, the loss against a hand computation), their validation, and the model preparation (position
table, query reset) when the objective is built."""

from __future__ import annotations

import math

import pytest
import torch

from mplug_fast.data import Tokenizer
from mplug_fast.modeling.vision import sincos_pos_table
from mplug_fast.tasks import build_model, build_objective
from mplug_fast.tasks.grounding import GroundingOptions, soft_bin_targets

from .conftest import grounding_batch, small_config


def test_soft_bin_targets_are_normalised_gaussians_around_the_bin():
    q = soft_bin_targets(torch.tensor([[3, 0]]), 8, sigma=1.0)  # [1, 2, 8]
    assert q.shape == (1, 2, 8)
    torch.testing.assert_close(q.sum(-1), torch.ones(1, 2))
    assert q[0, 0].argmax().item() == 3 and q[0, 1].argmax().item() == 0
    # neighbours one bin away get exp(-1/2) of the centre's weight, two bins away exp(-2)
    torch.testing.assert_close(q[0, 0, 2] / q[0, 0, 3], torch.tensor(math.exp(-0.5)))
    torch.testing.assert_close(q[0, 0, 5] / q[0, 0, 3], torch.tensor(math.exp(-2.0)))
    # a narrow width is the one-hot target
    narrow = soft_bin_targets(torch.tensor([5]), 8, sigma=0.05)
    torch.testing.assert_close(narrow, torch.nn.functional.one_hot(torch.tensor([5]), 8).float())


def test_grounding_soft_target_loss_matches_hand_computation(one_thread):
    torch.manual_seed(0)
    tokenizer = Tokenizer()
    model = build_model(small_config(), "grounding").eval()
    objective = build_objective(
        "grounding", model, tokenizer, num_bins=32, box_weighting=False, label_sigma=1.5
    )
    batch = grounding_batch(tokenizer)
    boxes = batch["boxes"]
    out = objective(batch)
    ids, bins = objective.box_ids(boxes)
    logits = model(batch["images"], batch["text_ids"], batch["text_mask"], ids)[:, :-1]
    logp = logits.index_select(-1, objective.coord_ids).log_softmax(-1)  # [2, 4, 33]
    k = torch.arange(33).float()
    want = 0.0
    for i in range(2):
        for j in range(4):
            w = torch.exp(-0.5 * ((k - bins[i, j]) / 1.5) ** 2)
            want = want - (w / w.sum() * logp[i, j]).sum() / 8
    torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-6)
    # the logged CE is still the one-hot CE, and differs from the soft loss
    hard = -logp.gather(-1, bins[..., None]).mean()
    torch.testing.assert_close(out["ce"], hard, rtol=1e-5, atol=1e-6)
    hard_xy = -logp[:, :2].gather(-1, bins[:, :2, None]).mean()
    torch.testing.assert_close(out["ce_xy"], hard_xy, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out["loss"], out["ce"])


def test_negative_label_sigma_is_rejected():
    with pytest.raises(ValueError, match="label_sigma"):
        GroundingOptions(label_sigma=-1.0)


def test_sincos_pos_table_rows_are_unit_norm_and_encode_row_and_column():
    t = sincos_pos_table(4, 16)  # [16, 16]: 4 frequencies for the row, 4 for the column
    assert t.shape == (16, 16)
    torch.testing.assert_close(t.norm(dim=1), torch.ones(16))
    # patch (row 1, column 2) is index 6; its first channel is sin(1 * 1) / sqrt(8), the column's sin(2 * 1)
    torch.testing.assert_close(t[6, 0], torch.tensor(math.sin(1.0) / math.sqrt(8)))
    torch.testing.assert_close(t[6, 8], torch.tensor(math.sin(2.0) / math.sqrt(8)))
    # the same row shares the row half, the same column the column half
    torch.testing.assert_close(t[4, :8], t[7, :8])
    torch.testing.assert_close(t[2, 8:], t[14, 8:])
    assert not torch.allclose(t[4, 8:], t[7, 8:])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_table(4, 10)


def test_grounding_objective_prepares_the_model_only_when_asked(one_thread):
    torch.manual_seed(0)
    tokenizer = Tokenizer()
    model = build_model(small_config(), "grounding")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    build_objective("grounding", model, tokenizer, num_bins=32)
    for k, v in model.state_dict().items():  # defaults: the model is untouched
        torch.testing.assert_close(v, before[k])
    build_objective("grounding", model, tokenizer, num_bins=32, pos_table_scale=2.0, reset_cross_query=True)
    pos, grid = model.vision.pos_embed, 4  # 64 px in 16 px patches
    torch.testing.assert_close(pos[0], before["vision.pos_embed"][0])  # the class token's row is kept
    want = before["vision.pos_embed"][1:] + 2.0 * sincos_pos_table(grid, pos.shape[1])
    torch.testing.assert_close(pos[1:], want)
    for layer in model.decoder.layers:
        assert not layer.cross.q_proj.weight.any() and not layer.cross.q_proj.bias.any()
        assert layer.cross.kv_proj.weight.any()  # keys and values are kept
    with pytest.raises(ValueError, match="pos_table_scale"):
        GroundingOptions(pos_table_scale=-1.0)

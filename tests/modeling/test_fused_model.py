"""The whole model through the fused epilogues and the Triton attention backend, against the plain path.

The fused epilogues (`residual_layer_norm` in every post-LN block, `bias_gelu` / `bias_quick_gelu` in the
MLPs, see `mplug_fast.modeling.layers`) run with `set_fused_backend(model, "triton")` under the Triton
interpreter and must give the outputs and every parameter gradient of the unfused modules (`reference`)
within 1e-4 in fp32 (grads: relative to max(1, max |reference grad|); the loss weights every output element
by a fixed weight in [-1, 1], so grads reach ~300), for the vqa, caption, retrieval and grounding models, in
train mode with dropout 0 and (captioning) in eval mode; the Triton attention backend with the fused kernels
must give the reference within 1e-4 for caption, retrieval and grounding (VQA with Triton attention alone:
tests/ops/test_triton_attention.py).

The models are micro (width 64, one or two layers per stack, one connected fusion layer, 16 px images)
with weights scaled up (far from uniform attention): the interpreter runs one program per row, so the
cost is in the number of kernel calls and rows, not in the width.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mplug_fast
from mplug_fast.modeling.layers import MLP, TransformerLayer, clear_backend_caches, set_fused_backend
from mplug_fast.ops import fused

_unavailable = fused.triton_unavailable_reason(torch.device("cpu"))
needs_triton = pytest.mark.skipif(_unavailable is not None, reason=f"triton fused ops: {_unavailable}")
pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
]

TASKS = ("vqa", "caption", "retrieval", "grounding")
TOL = 1e-4

MICRO = {
    "vision.image_size": 16,
    "vision.width": 64,
    "vision.heads": 2,
    "vision.layers": 1,
    "vision.attention_dropout": 0.0,
    "text.hidden_size": 64,
    "text.heads": 2,
    "text.intermediate_size": 128,
    "text.encoder_layers": 1,
    "text.vocab_size": 2000,
    "text.hidden_dropout": 0.0,
    "text.attention_dropout": 0.0,
    "fusion.layers": 2,
    "fusion.stride": 1,  # layer 0 asymmetric, layer 1 connected
    "decoder.layers": 1,
}


def micro_config(**overrides) -> mplug_fast.MPlugConfig:
    """Width 64, one layer per stack, two fusion layers (asymmetric + connected), no dropout."""
    return mplug_fast.get_config("tiny", **{**MICRO, **overrides})


def micro_model(task: str, config: mplug_fast.MPlugConfig | None = None, seed: int = 0) -> torch.nn.Module:
    """The task model with weights perturbed by N(0, 0.05^2) (attention far from uniform), fc1 weights x4."""
    torch.manual_seed(seed)
    model = mplug_fast.build_model(config or micro_config(), task)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for module in model.modules():
            if isinstance(module, MLP):  # GELU inputs of std ~2: erf and tanh GELU differ by up to ~5e-4
                module.fc1.weight.mul_(4.0)
    return model


def task_inputs(task: str, config: mplug_fast.MPlugConfig, seed: int = 0) -> tuple:
    """`model(*inputs)` for a batch of 2 (padded text; VQA: 3 answers over 2 questions)."""
    g = torch.Generator().manual_seed(seed)
    R, V = config.vision.image_size, config.text.vocab_size
    images = torch.randn(2, 3, R, R, generator=g)
    ids = torch.randint(1000, V, (2, 5), generator=g)
    ids[:, 0] = 101
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    if task == "vqa":
        answers = torch.randint(1000, V, (3, 4), generator=g)
        answer_mask = torch.ones(3, 4, dtype=torch.long)
        answer_mask[2, 3:] = 0
        return images, ids, mask, answers, answer_mask, torch.tensor([0, 1, 1])
    if task == "grounding":
        return images, ids, mask, torch.randint(1000, V, (2, 5), generator=g)
    return images, ids, mask


def scalar_loss(out) -> torch.Tensor:
    """sum(output * fixed weights sin(1.7 k + i)) over every output (retrieval returns (similarities, ITM
    logits)): every element gets an O(1) gradient of its own (no generator: traceable by torch.compile)."""
    outs = out if isinstance(out, tuple) else (out,)
    loss = torch.zeros((), device=outs[0].device)
    for i, o in enumerate(outs):
        k = torch.arange(o.numel(), device=o.device, dtype=torch.float32).view(o.shape)
        loss = loss + (o.float() * torch.sin(1.7 * k + i)).sum()
    return loss


def run_model(
    model: torch.nn.Module, inputs: tuple
) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """(outputs, parameter grads) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    scalar_loss(out).backward()
    outs = tuple(o.detach() for o in (out if isinstance(out, tuple) else (out,)))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return outs, grads


def max_errors(got, ref) -> tuple[float, float, str]:
    """(max |output diff|, max over parameters of |grad diff| / max(1, max |reference grad|), the parameter
    with the largest such grad diff)."""
    (outs, grads), (ref_outs, ref_grads) = got, ref
    assert len(outs) == len(ref_outs)
    out_err = max((a - b).abs().max().item() for a, b in zip(outs, ref_outs, strict=True))
    assert grads.keys() == ref_grads.keys(), "the two paths give gradients to different parameters"
    grad_err, worst = max(
        ((grads[n] - ref_grads[n]).abs().max().item() / max(1.0, ref_grads[n].abs().max().item()), n)
        for n in grads
    )
    return out_err, grad_err, worst


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(fused.ENV_VAR, raising=False)


def test_reference_is_the_default_on_cpu_and_keeps_the_state_dict():
    """No fused backend set: CPU runs the plain modules; the attribute adds no parameter or buffer."""
    model = micro_model("vqa")
    assert all(m.fused_backend is None for m in model.modules() if isinstance(m, MLP | TransformerLayer))
    keys = set(model.state_dict())
    set_fused_backend(model, "triton")
    assert set(model.state_dict()) == keys
    assert not any("fused" in k for k in keys)
    x = torch.randn(3, 64)
    assert fused.select_backend(x) == "reference"
    with pytest.raises(ValueError, match="unknown fused backend"):
        set_fused_backend(model, "cuda")


@needs_triton
@pytest.mark.parametrize(
    "task",
    # retrieval and grounding run the fused kernels by default in the Triton-attention test below
    ["vqa", "caption", *(pytest.param(task, marks=pytest.mark.slow) for task in ("retrieval", "grounding"))],
)
def test_fused_epilogues_equal_the_unfused_model_in_train_mode(task):
    """Train mode, dropout 0: logits and all grads, fused Triton epilogues vs the unfused modules."""
    config = micro_config()
    model = micro_model(task, config).train()
    inputs = task_inputs(task, config)
    ref = run_model(set_fused_backend(model, "reference"), inputs)
    got = run_model(set_fused_backend(model, "triton"), inputs)
    out_err, grad_err, worst = max_errors(got, ref)
    assert out_err <= TOL, f"{task}: outputs differ by {out_err:.3e}"
    assert grad_err <= TOL, f"{task}: grads differ by {grad_err:.3e} (in {worst})"


def resolved_fused_backends(model: torch.nn.Module) -> set[str]:
    """The fused backends the modules of `model` resolved (and cached)."""
    return {
        name
        for m in model.modules()
        if isinstance(m, MLP | TransformerLayer)
        for name in m.fused_backends.names.values()
    }


@needs_triton
def test_fused_epilogues_equal_the_unfused_model_in_eval_mode_via_the_environment(monkeypatch):
    """Eval mode, fused backend from MPLUG_FAST_FUSED (the modules' attribute left at None)."""
    config = micro_config()
    model = micro_model("caption", config).eval()
    inputs = task_inputs("caption", config)
    ref = run_model(model, inputs)
    assert resolved_fused_backends(model) == {"reference"}
    monkeypatch.setenv(fused.ENV_VAR, "triton")
    assert resolved_fused_backends(model) == {"reference"}, "resolved once per module, not per call"
    got = run_model(clear_backend_caches(model), inputs)
    assert resolved_fused_backends(model) == {"triton"}
    out_err, grad_err, worst = max_errors(got, ref)
    assert out_err <= TOL, f"caption eval: outputs differ by {out_err:.3e}"
    assert grad_err <= TOL, f"caption eval: grads differ by {grad_err:.3e} (in {worst})"


@needs_triton
def test_fused_dropout_in_train_mode_is_seeded_and_drops():
    """Dropout > 0 with the fused kernels: same seed -> same outputs, another seed -> other outputs."""
    config = micro_config(**{"text.hidden_dropout": 0.3})
    model = set_fused_backend(micro_model("caption", config), "triton").train()
    inputs = task_inputs("caption", config)
    with torch.no_grad():
        outs = []
        for seed in (1, 1, 2):
            torch.manual_seed(seed)
            outs.append(model(*inputs))
        clean = model.eval()(*inputs)
    assert torch.equal(outs[0], outs[1]), "the same torch seed must give the same dropout masks"
    assert not torch.allclose(outs[0], outs[2]), "another seed must give other dropout masks"
    assert not torch.allclose(outs[0], clean), "train mode with dropout 0.3 must differ from eval mode"


@needs_triton
@pytest.mark.parametrize("task", ["caption", "retrieval", "grounding"])
def test_triton_attention_and_fused_epilogues_equal_the_reference_model(task):
    """attention_backend="triton" + fused Triton epilogues vs attention "reference" + unfused modules."""
    config = micro_config()
    inputs = task_inputs(task, config)
    ref = run_model(micro_model(task, dataclasses.replace(config, attention_backend="reference")), inputs)
    model = micro_model(task, dataclasses.replace(config, attention_backend="triton"))
    got = run_model(set_fused_backend(model, "triton"), inputs)
    out_err, grad_err, worst = max_errors(got, ref)
    assert out_err <= TOL, f"{task}: outputs differ by {out_err:.3e}"
    assert grad_err <= TOL, f"{task}: grads differ by {grad_err:.3e} (in {worst})"

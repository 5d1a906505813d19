"""`torch.compile(fullgraph=True)` traces the whole model: forward and training step, zero graph breaks.

For the vqa, caption, retrieval and grounding models (micro configs of tests/modeling/test_fused_model.py):

* forward (eval, no grad) and training step (train mode: forward + loss compiled as one graph; the backward
  runs through the AOT-compiled backward graph) compile with `fullgraph=True` (a graph break is an error)
  into exactly one forward graph and, for the training step, one backward graph (counted by an
  `aot_autograd` backend with counting compilers around `aot_eager`'s);
* compiled outputs, loss and parameter grads equal eager.

A graph break under `fullgraph=True` raises, and the counts (one dynamo graph) say the same. The eval-mode
forward runs by default for captioning, for the other tasks with `-m slow` (the training step traces the
same forward code for all four).

Default compiler: `aot_eager` (traces and partitions like inductor, no code generation: fast). One case runs
the Triton attention backend and the fused Triton epilogues (custom ops under the interpreter) compiled;
one case (`slow`) runs inductor (needs a C++ compiler).
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from mplug_fast.modeling.layers import set_fused_backend
from mplug_fast.ops import fused
from tests.modeling.test_fused_model import (
    TASKS,
    max_errors,
    micro_config,
    micro_model,
    run_model,
    scalar_loss,
    task_inputs,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`"),
]

TOL = 1e-5  # aot_eager runs the same ATen ops as eager (reordered): only rounding differs


class GraphCounter:
    """A torch.compile backend: AOT autograd with counting forward / backward compilers (eager kernels)."""

    def __init__(self):
        self.forward_graphs = 0
        self.backward_graphs = 0
        self.dynamo_graphs = 0
        self._aot = aot_autograd(fw_compiler=self._fw, bw_compiler=self._bw)

    def _fw(self, gm: torch.fx.GraphModule, example_inputs):
        self.forward_graphs += 1
        return make_boxed_func(gm.forward)

    def _bw(self, gm: torch.fx.GraphModule, example_inputs):
        self.backward_graphs += 1
        return make_boxed_func(gm.forward)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.dynamo_graphs += 1
        return self._aot(gm, example_inputs)


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    monkeypatch.delenv(fused.ENV_VAR, raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled_training_step(model: torch.nn.Module, backend) -> callable:
    """inputs -> (loss, outputs), compiled with fullgraph=True (the caller calls backward on the loss)."""

    def step(*inputs):
        out = model(*inputs)
        return scalar_loss(out), out

    return torch.compile(step, fullgraph=True, backend=backend)


def check_compiled_training_step(model: torch.nn.Module, inputs: tuple, tol: float = TOL) -> GraphCounter:
    """Compile the training step, run forward + backward, compare loss, outputs and grads with eager."""
    counter = GraphCounter()
    step = compiled_training_step(model, counter)
    model.zero_grad(set_to_none=True)
    loss, out = step(*inputs)
    loss.backward()
    outs = tuple(o.detach() for o in (out if isinstance(out, tuple) else (out,)))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out_err, grad_err, worst = max_errors((outs, grads), run_model(model, inputs))
    assert out_err <= tol, f"compiled outputs differ from eager by {out_err:.3e}"
    assert grad_err <= tol, f"compiled grads differ from eager by {grad_err:.3e} (in {worst})"
    return counter


@pytest.mark.parametrize(
    "task",
    # the training-step test below traces the same forward code (train mode) for every task
    ["caption", *(pytest.param(task, marks=pytest.mark.slow) for task in ("vqa", "retrieval", "grounding"))],
)
def test_forward_compiles_to_one_graph_and_equals_eager(task):
    config = micro_config()
    model = micro_model(task, config).eval()
    inputs = task_inputs(task, config)
    counter = GraphCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        got = compiled(*inputs)
        ref = model(*inputs)
    got, ref = (got, ref) if isinstance(got, tuple) else ((got,), (ref,))
    for a, b in zip(got, ref, strict=True):
        assert (a - b).abs().max().item() <= TOL
    assert (counter.dynamo_graphs, counter.forward_graphs, counter.backward_graphs) == (1, 1, 0)


@pytest.mark.parametrize("task", TASKS)
def test_training_step_compiles_to_one_forward_and_one_backward_graph(task):
    config = micro_config()
    model = micro_model(task, config).train()
    counter = check_compiled_training_step(model, task_inputs(task, config))
    assert (counter.dynamo_graphs, counter.forward_graphs, counter.backward_graphs) == (1, 1, 1)


_unavailable = fused.triton_unavailable_reason(torch.device("cpu"))


@pytest.mark.skipif(_unavailable is not None, reason=f"triton: {_unavailable}")
def test_training_step_with_triton_attention_and_fused_kernels_compiles():
    """The custom ops (Triton attention, residual LayerNorm, bias + GELU / QuickGELU) trace as one graph, with
    their autograd registrations in the one backward graph; values and grads equal the eager run."""
    config = dataclasses.replace(micro_config(), attention_backend="triton")
    model = set_fused_backend(micro_model("caption", config), "triton").train()
    counter = check_compiled_training_step(model, task_inputs("caption", config))
    assert (counter.dynamo_graphs, counter.forward_graphs, counter.backward_graphs) == (1, 1, 1)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
def test_training_step_with_inductor_equals_eager():
    """Inductor (generated C++ kernels) on the captioning training step: loss, logits, grads vs eager."""
    config = micro_config()
    model = micro_model("caption", config).train()
    inputs = task_inputs("caption", config)
    step = compiled_training_step(model, "inductor")
    model.zero_grad(set_to_none=True)
    loss, out = step(*inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out_err, grad_err, worst = max_errors(((out.detach(),), grads), run_model(model, inputs))
    assert out_err <= 1e-4, f"inductor outputs differ from eager by {out_err:.3e}"
    assert grad_err <= 1e-4, f"inductor grads differ from eager by {grad_err:.3e} (in {worst})"

"""The trainer's switches: torch.compile, fp16 + GradScaler, gradient checkpointing, FSDP2 save / resume,
epoch-based schedules, the absolute warm-up start, and starting from an official checkpoint file.

Oracles: the same run in eager fp32 without the switch (compile, checkpointing), hand-stated GradScaler
semantics (an inf gradient leaves the weights alone and halves the scale), a straight 2-process run (FSDP2
resume), and the schedule formula written out here.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mplug_fast.train.checkpointer import load_checkpoint
from mplug_fast.train.precision import enable_gradient_checkpointing
from mplug_fast.train.trainer import Trainer
from tests.train.helpers import collate, dataset, make_objective, run_config, state_equal


def _trainer(cfg, **objective_kwargs) -> Trainer:
    return Trainer(cfg, objective=make_objective(**objective_kwargs), dataset=dataset(), collate_fn=collate())


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _params_close(a: torch.nn.Module, b: torch.nn.Module, atol: float, rtol: float) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=atol, rtol=rtol, msg=name)


# ---- torch.compile ---------------------------------------------------------------------------------------


class _SameBatch(torch.utils.data.Dataset):
    """The same 4 samples over and over: with batch 4 and no shuffling every batch has the same shapes, so
    torch.compile traces once (the shapes of the synthetic questions / answers vary from batch to batch)."""

    def __init__(self, n: int = 24):
        self.items = [dataset()[i] for i in range(4)]
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.items[i % 4]


def _vqa_objective(seed: int = 0) -> torch.nn.Module:
    """The library's VQA objective (no momentum copies) on the micro model."""
    from mplug_fast.config import get_config
    from mplug_fast.tasks import build_model, build_objective
    from tests.train.helpers import micro_overrides

    torch.manual_seed(seed)
    return build_objective("vqa", build_model(get_config("micro", **micro_overrides()), "vqa"), distill=False)


@pytest.mark.parametrize(
    "backend",
    ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)],
)
def test_compile_matches_eager(tmp_path, backend):
    """precision.compile: 3 steps through torch.compile(objective) give eager's losses and weights.
    aot_eager traces forward + backward through dynamo and AOTAutograd without generating code; inductor
    also generates C++ for the CPU (a minute or more here: marked slow)."""
    from torch._dynamo.utils import counters

    counters.clear()
    runs = {}
    for name, precision in (("eager", {}), ("compiled", {"compile": True, "compile_backend": backend})):
        cfg = run_config(
            tmp_path / name,
            data={"batch_size": 4, "shuffle": False},
            schedule={"max_steps": 3},
            precision=precision,
        )
        runs[name] = Trainer(cfg, objective=_vqa_objective(), dataset=_SameBatch(), collate_fn=collate())
        runs[name].fit()
    assert hasattr(runs["compiled"].model, "_orig_mod")  # really wrapped
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured graphs (not a silent eager fallback)
    a, b = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(a) == len(b) == 3 and a[0] != a[2]  # it trained
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-5), (a, b)
    _params_close(runs["eager"].objective, runs["compiled"].objective, atol=1e-5, rtol=1e-4)
    # the checkpoint holds plain parameter names (no "_orig_mod." prefix)
    state = load_checkpoint(tmp_path / "compiled" / "checkpoints" / "step-00000003.pt")
    assert not any("_orig_mod" in k for k in state["objective"])


# ---- fp16 + GradScaler -----------------------------------------------------------------------------------


def test_fp16_grad_scaler_runs_and_is_checkpointed(tmp_path):
    """fp16 autocast + GradScaler("cpu"): the first steps overflow at the initial scale 2^16 and are skipped
    with the scale halved each time (the scaler's calibration); then the updates go through. The scale and
    its growth tracker are in the checkpoint."""
    cfg = run_config(tmp_path, precision={"dtype": "fp16"}, schedule={"max_steps": 6})
    t = _trainer(cfg)
    assert t.precision.scaler is not None and t.precision.scaler.is_enabled()
    scale = t.precision.scaler.get_scale()
    summary = t.fit()
    assert summary["step"] == 6
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    good = 0
    for r in records:
        assert math.isfinite(r["loss"])
        assert r["skipped"] == (r["grad_scale"] < scale), r  # skipped exactly when the scale was lowered
        assert r["grad_scale"] in (scale, scale / 2)
        good, scale = (0 if r["skipped"] else good + 1), r["grad_scale"]
    assert good >= 2, records  # real updates after the calibration
    assert t.nonfinite_total == 0
    saved = load_checkpoint(tmp_path / "checkpoints" / "step-00000006.pt")["precision"]["scaler"]
    assert saved["scale"] == scale and saved["_growth_tracker"] == good


def _inf_gradient_once(trainer: Trainer):
    """A hook that turns one parameter's gradient to inf on the next backward (the loss stays finite)."""
    param = next(trainer.objective.parameters())
    handle = None

    def hook(grad):
        handle.remove()
        return torch.full_like(grad, float("inf"))

    handle = param.register_hook(hook)


def test_fp16_inf_gradient_skips_the_step_and_lowers_the_scale(tmp_path):
    cfg = run_config(tmp_path, precision={"dtype": "fp16"}, schedule={"max_steps": 20})
    t = _trainer(cfg)
    while t.train_step()["skipped"]:  # past the scaler's calibration (see above)
        assert t.step < 10
    scale = t.precision.scaler.get_scale()
    before = {n: p.detach().clone() for n, p in t.objective.named_parameters()}
    exp_avg = {id(p): s["exp_avg"].clone() for p, s in t.optimizer.state.items()}
    _inf_gradient_once(t)
    m = t.train_step()
    assert math.isfinite(m["loss"]) and m["skipped"] == 1.0
    assert t.precision.scaler.get_scale() == scale / 2 == m["grad_scale"]
    assert all(torch.equal(p, before[n]) for n, p in t.objective.named_parameters())  # nothing moved
    assert all(torch.equal(s["exp_avg"], exp_avg[id(p)]) for p, s in t.optimizer.state.items())
    assert t.objective.updates.item() == 1  # no momentum / after-step hook for the skipped update
    assert t.nonfinite_total == 0  # the scaler's business, not a non-finite loss
    m = t.train_step()
    assert m["skipped"] == 0.0 and t.objective.updates.item() == 2 and m["grad_scale"] == scale / 2
    assert any(not torch.equal(p, before[n]) for n, p in t.objective.named_parameters())

    # the lowered scale survives a checkpoint and a resume
    path = t.save_checkpoint()
    resumed = _trainer(cfg, seed=5)
    resumed.resume(path)
    assert resumed.precision.scaler.get_scale() == scale / 2
    assert state_equal(resumed.precision.state_dict(), t.precision.state_dict()) == []


# ---- gradient checkpointing --------------------------------------------------------------------------------


def test_grad_checkpointing_same_loss_and_grads_with_dropout():
    """One forward/backward with dropout on: recomputation replays the RNG, so the loss and every gradient
    equal the plain run's."""
    batch = collate()([dataset()[i] for i in range(6)])
    results = []
    for checkpointing in (False, True):
        objective = make_objective(dropout=0.1)
        objective.train()
        if checkpointing:
            wrapped = enable_gradient_checkpointing(objective)
            m = objective.model
            layers = [m.vision.blocks, m.text_encoder.layers, m.fusion.layers, m.decoder.layers]
            assert wrapped == sum(len(x) for x in layers) > 0
        torch.manual_seed(11)
        loss = objective(batch)["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in objective.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=0, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_grad_checkpointing_leaves_momentum_copies_alone():
    from mplug_fast.config import get_config
    from mplug_fast.tasks import build_model, build_objective
    from tests.train.helpers import micro_overrides

    model = build_model(get_config("micro", **micro_overrides()), "vqa")
    objective = build_objective("vqa", model, distill=True)
    online = sum(len(x) for x in (model.vision.blocks, model.text_encoder.layers, model.fusion.layers))
    online += len(model.decoder.layers)
    assert enable_gradient_checkpointing(objective) == online
    assert all("forward" not in layer.__dict__ for layer in objective.momentum["decoder"].layers)


# ---- schedules from the official settings ------------------------------------------------------------------


def test_epochs_give_max_steps_and_absolute_warmup_lr(tmp_path):
    """24 samples / batch 4 = 6 batches per epoch; accum 2 -> 3 updates per epoch; 1.5 epochs -> 5 (ceil).
    warmup_lr is the same absolute start for both groups (lr 1e-3 rises, lr_visual 1e-5 falls)."""
    cfg = run_config(
        tmp_path,
        optim={"lr": 1e-3, "lr_visual": 1e-5, "accum_steps": 2},
        schedule={"max_steps": None, "epochs": 1.5, "warmup_steps": 2, "warmup_lr": 1e-4, "min_lr": 0.0},
    )
    t = _trainer(cfg)
    assert t.max_steps == 5
    lrs = {g["name"]: g["lr"] for g in t.optimizer.param_groups}
    assert lrs["rest/decay"] == pytest.approx(1e-4 + (1e-3 - 1e-4) / 2)
    assert lrs["visual/decay"] == pytest.approx(1e-4 + (1e-5 - 1e-4) / 2)  # a decrease, as officially
    summary = t.fit()
    assert summary["step"] == 5 and summary["status"] == "finished"
    assert t.epoch == 1  # 10 of 12 batches read: still in the second epoch
    with pytest.raises(ValueError, match="give one of them"):
        run_config(tmp_path, schedule={"max_steps": None})
    capped = _trainer(run_config(tmp_path / "cap", schedule={"max_steps": 3, "epochs": 100.0}))
    assert capped.max_steps == 3  # an explicit max_steps wins (--max-steps on an epochs config)


# ---- model.init_from: an official checkpoint file ----------------------------------------------------------


def test_init_from_official_checkpoint_file(tmp_path):
    """``model.init_from`` naming a .pth file loads it with the run's resolution and stride."""
    from mplug_fast.tasks import load_official_checkpoint
    from mplug_fast.train.build import build_model as build_model_from_config
    from tests.checkpoint.official_layout import OfficialDims, make_official_state_dict

    sd = make_official_state_dict(OfficialDims(slots=6, fusion_layers=6))  # 4x4 grid of 8 px patches
    path = tmp_path / "mplug_tiny.pth"
    torch.save({"model": sd}, path)
    cfg = run_config(
        tmp_path,
        model={
            "preset": "tiny",
            "task": "vqa",
            "init_from": str(path),
            "overrides": {"vision.image_size": 48, "fusion.stride": 2},
        },
    )
    model = build_model_from_config(cfg)
    assert model.config.vision.image_size == 48 and model.config.fusion.stride == 2
    reference = load_official_checkpoint(sd, "vqa", image_res=48, stride=2)
    assert state_equal(model.state_dict(), reference.state_dict()) == []
    missing = run_config(tmp_path, model={"init_from": str(tmp_path / "nope.pth")})
    with pytest.raises(FileNotFoundError, match="neither a save_pretrained directory nor a checkpoint"):
        build_model_from_config(missing)


# ---- FSDP2 (fully_shard) on 2 CPU processes: save, resume ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from mplug_fast.train.distributed import cleanup_distributed

    def trainer(run: str) -> Trainer:
        cfg = run_config(
            Path(out) / run,
            data={"batch_size": 4},
            distributed={"strategy": "fsdp"},
            schedule={"max_steps": 4, "warmup_steps": 1},
        )
        return _trainer(cfg, dropout=0.1)

    try:
        straight = trainer("straight")
        assert type(straight.model).__name__ == "FSDPVQALoss"
        straight.fit()
        first = trainer("resumed")
        first.fit(max_steps=2)
        second = trainer("resumed")
        summary = second.fit(resume="latest")
        assert summary["resumed_from"].endswith("step-00000002.pt") and summary["step"] == 4
        for name, t in (("straight", straight), ("resumed", second)):
            state = t.state_dict()
            if rank == 0:
                torch.save(state, Path(out) / f"{name}.pt")
    finally:
        cleanup_distributed()


@pytest.mark.long
def test_fsdp2_two_processes_save_and_resume(tmp_path):
    """2 gloo processes with FSDP2: 2 steps, checkpoint, resume in new trainers, 2 more == 4 steps straight
    (full state gathered for the checkpoint and scattered back into the shards on resume)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        pytest.skip(
            f"FSDP2 (torch.distributed.fsdp.fully_shard) is not available in torch {torch.__version__}: {e}"
        )
    if not torch.distributed.is_gloo_available():
        pytest.skip("the gloo backend is not built into this torch")
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    straight = torch.load(tmp_path / "straight.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    for key in ("objective", "optimizer", "scheduler", "data", "step"):
        assert state_equal(straight[key], resumed[key]) == [], key
    assert straight["step"] == 4 and len(straight["rng"]) == 2
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "resumed")
    init = make_objective(dropout=0.1).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in straight["objective"].items() if k in init)  # trained

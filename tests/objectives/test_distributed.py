"""2 CPU processes (gloo) with the all-gathered ITC keys, queue and ITM negatives give the losses and the
(DDP-averaged) gradients of 1 process holding the global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mplug_fast.tasks import build_model
from mplug_fast.tasks.retrieval import RetrievalObjective

from .conftest import small_config

GLOBAL_B, WORLD, STEPS, LR = 4, 2, 2, 0.05
CHECKED = (
    "temp",
    "itm_head.weight",
    "vision_proj.weight",
    "text_proj.weight",
    "fusion.layers.1.mlp.fc1.weight",
    "vision.patch_embed.weight",
)


def _batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {
        "images": torch.randn(GLOBAL_B, 3, 64, 64, generator=g),
        "text_ids": torch.randint(1000, 3000, (GLOBAL_B, 7), generator=g),
        "text_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 6 + [0], [1] * 7], dtype=torch.bool),
        "image_ids": torch.tensor([0, 1, 2, 0]) + 3 * step,  # image 0 on both ranks: a cross-rank positive
    }


def _run(rank: int, world: int) -> dict[str, list]:
    torch.manual_seed(0)
    model = build_model(small_config(), "retrieval")
    objective = RetrievalObjective(model, queue_size=8, sampler=lambda w: w.argmax(1))
    params = dict(model.named_parameters())
    B = GLOBAL_B // world
    losses, grads = [], []
    for step in range(STEPS):
        batch = {k: v[rank * B : (rank + 1) * B] for k, v in _batch(step).items()}
        out = objective(batch)
        out["loss"].backward()
        loss = out["loss"].detach()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        losses.append(loss.item())
        grads.append({name: params[name].grad.clone() for name in CHECKED})
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= LR * p.grad
                    p.grad = None
        objective.after_optimizer_step()
    return {"losses": losses, "grads": grads, "queue": objective.itc.queue.image.clone()}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_run(rank, world), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process_with_the_global_batch(tmp_path, one_thread):
    reference = _run(0, 1)
    mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for a, b in zip(got["losses"], reference["losses"], strict=True):
            assert abs(a - b) <= 1e-5, (got["losses"], reference["losses"])
        for step in range(STEPS):
            for name in CHECKED:
                torch.testing.assert_close(
                    got["grads"][step][name], reference["grads"][step][name], rtol=1e-4, atol=1e-6
                )
        torch.testing.assert_close(got["queue"], reference["queue"])

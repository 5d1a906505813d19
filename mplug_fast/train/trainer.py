"""The training loop: an `Objective` (``forward(batch) -> {"loss": ..., parts...}``) on a dataset. It knows
no task: ``mplug_fast.train.build`` turns a run config into the parts.

    trainer = Trainer(config, objective, dataset, collate_fn)   # built parts (see build.build_parts)
    trainer = Trainer.from_config(config)                       # the same, built from the run config
    summary = trainer.fit(resume="latest")

Per optimizer step: ``accum_steps`` micro-batches (loss / accum; DDP all-reduce only on the last through
``no_sync``), then unscale (fp16) + clip + AdamW step + ``objective.after_optimizer_step()`` (momentum EMA)
+ schedule step. A non-finite loss or gradient norm (agreed over all ranks) skips the update and keeps
nothing of the step: gradients and the objective's held feature-queue writes are dropped, the optimizer and
the momentum copies are not touched; the step, the schedule, the data and the RNG still advance (as the
forward drew them), the skip is counted; ``max_nonfinite`` skips in a row save a checkpoint and raise
``NonFiniteLossError``. (fp16: inf gradients with a finite loss are the GradScaler's
business: it skips that update (logged as skipped, no momentum update, not counted as non-finite) and
lowers the scale, logged as ``grad_scale``.) Ctrl-C (SIGINT) finishes the current step, saves a
checkpoint and returns with status "interrupted" (a second Ctrl-C aborts at once).

Outputs under ``output_dir``: ``config.yaml``, ``metrics.jsonl`` (one record per logged step, rank 0),
``checkpoints/step-*.pt``, ``loss_curves.png``, ``tensorboard/`` (when installed), each written atomically.
A run folder holds one run: a run started without ``resume`` in a folder with another run's checkpoints or
metrics raises `RunFolderError` unless ``config.overwrite`` (then `clear_run_folder` first); a resume
from step N drops the metrics records past N (the loss curve never runs backwards).

Exact resume: the checkpoint holds the data position (epoch + samples consumed on each rank), every RNG
state per rank, and the loader draws its worker seeds from its own generator, so N steps + resume + N steps
equals 2N steps bitwise on CPU fp32 (with ``num_workers=0``; with workers, random augmentations inside the
workers are reseeded per epoch and after a resume).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mplug_fast.data.collate import move_to
from mplug_fast.data.dataset import EpochAware
from mplug_fast.objectives.base import Objective
from mplug_fast.train.build import build_parts
from mplug_fast.train.checkpointer import (
    CheckpointManager,
    RunFolderError,
    checkpoint_path,
    clear_run_folder,
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    rng_state,
    seed_everything,
    set_rng_state,
)
from mplug_fast.train.config import RunConfig
from mplug_fast.train.distributed import (
    DistEnv,
    ResumableSampler,
    all_reduce_flags,
    all_reduce_mean,
    barrier,
    init_distributed,
    unwrap,
    wrap_model,
)
from mplug_fast.train.metrics_log import MetricsLog
from mplug_fast.train.optim import build_optimizer
from mplug_fast.train.precision import Precision, enable_gradient_checkpointing
from mplug_fast.train.schedule import WarmupCosine

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run stopped (its last checkpoint is kept)."""


# ---- the trainer ---------------------------------------------------------------------------------------


class Trainer:
    """Trains ``objective`` on ``dataset`` as ``config`` says (optimisation, schedule, precision,
    distribution, checkpoints, logging).

    Args:
        config: the run config.
        objective: the `Objective` to train (it holds its model).
        dataset: samples (dicts); ``collate_fn`` turns a list of them into a batch.
        env: the process group view; None = ``init_distributed`` from the torchrun environment.
        seed: seed every RNG with ``config.seed + rank`` first (False when the caller already did, before
            building the parts: `from_config`).
    """

    def __init__(
        self,
        config: RunConfig,
        objective: Objective,
        dataset: Dataset,
        collate_fn: Callable[[list], dict],
        env: DistEnv | None = None,
        *,
        seed: bool = True,
    ):
        if not isinstance(objective, Objective):
            raise TypeError(
                f"Trainer trains an mplug_fast.objectives.Objective, got {type(objective).__name__} "
                "(subclass Objective: forward(batch) -> {'loss': ...}, after_optimizer_step())"
            )
        self.config = config
        self.env = env or init_distributed(config.device, config.distributed.backend)
        if seed:
            seed_everything(config.seed + self.env.rank)
        self.objective = objective.to(self.env.device)
        self.objective.hold_updates()  # queue writes wait until the step is known to be finite
        if config.precision.grad_checkpointing:
            wrapped = enable_gradient_checkpointing(self.objective)
            if wrapped == 0:
                logger.warning("grad_checkpointing: no transformer layer lists (blocks/layers) found to wrap")
        self.model = wrap_model(
            self.objective, self.env, config.distributed.strategy, config.distributed.find_unused_parameters
        )
        o = config.optim
        self.optimizer = build_optimizer(
            self.objective, o.lr, o.lr_visual, o.weight_decay, tuple(o.betas), o.eps, o.implementation
        )
        self.precision = Precision(config.precision.dtype, self.env.device)
        if config.precision.compile:
            self.model = torch.compile(self.model, backend=config.precision.compile_backend)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.dataset, self.collate_fn = dataset, collate_fn
        self.sampler = ResumableSampler(
            len(self.dataset), self.env.rank, self.env.world_size, config.data.shuffle, config.seed
        )
        if self.sampler.num_samples < config.data.batch_size:
            raise ValueError(
                f"each rank gets {self.sampler.num_samples} samples per epoch, fewer than one batch "
                f"(data.batch_size={config.data.batch_size}); use more data or a smaller batch"
            )
        self._loader_generator = torch.Generator()
        self.loader = DataLoader(
            self.dataset,
            batch_size=config.data.batch_size,
            sampler=self.sampler,
            collate_fn=self.collate_fn,
            num_workers=config.data.num_workers,
            drop_last=True,
            pin_memory=self.env.device.type == "cuda",
            generator=self._loader_generator,
            persistent_workers=False,
        )
        s = config.schedule
        self.max_steps = s.max_steps if s.max_steps is not None else self._steps_for_epochs(s.epochs)
        warmup = min(s.warmup_steps, self.max_steps)
        if warmup < s.warmup_steps:
            logger.warning("schedule.warmup_steps=%d: clipped to the run's %d steps", s.warmup_steps, warmup)
        self.scheduler = WarmupCosine(
            self.optimizer, warmup, self.max_steps, s.min_lr, s.warmup_start, s.warmup_lr
        )
        self._iter = None
        self.step, self.epoch, self.offset = 0, 0, 0
        self.nonfinite_total, self.nonfinite_in_row = 0, 0
        self._stop_requested = False
        self.output_dir = Path(config.output_dir)
        self.checkpoints = CheckpointManager(
            self.output_dir / "checkpoints", config.checkpoint.keep_last, config.checkpoint.every_steps
        )
        self.metrics = MetricsLog(self.output_dir, tensorboard=config.logging.tensorboard)

    @classmethod
    def from_config(cls, config: RunConfig, env: DistEnv | None = None) -> Trainer:
        """A trainer of the parts `build_parts` makes of ``config`` (seeded before they are built)."""
        env = env or init_distributed(config.device, config.distributed.backend)
        seed_everything(config.seed + env.rank)
        parts = build_parts(config)
        return cls(config, parts.objective, parts.dataset, parts.collate_fn, env, seed=False)

    def _steps_for_epochs(self, epochs: float) -> int:
        """Optimizer steps of ``epochs`` passes: ceil(epochs x (this rank's batches per epoch // accum))."""
        per_epoch = len(self.loader) // self.config.optim.accum_steps
        if per_epoch < 1:
            raise ValueError(
                f"one epoch has {len(self.loader)} batches per rank, fewer than optim.accum_steps="
                f"{self.config.optim.accum_steps}: set schedule.max_steps instead of schedule.epochs"
            )
        steps = max(1, math.ceil(epochs * per_epoch))
        logger.info("schedule.epochs=%g: %d optimizer steps (%d per epoch)", epochs, steps, per_epoch)
        return steps

    # ---- data ----------------------------------------------------------------------------------------

    def _new_iterator(self) -> None:
        self.sampler.set_position(self.epoch, self.offset)
        if isinstance(self.dataset, EpochAware):  # e.g. the official pretraining list's caption draw
            self.dataset.set_epoch(self.epoch)
        self._loader_generator.manual_seed(self.config.seed * 1_000_003 + self.epoch * 7919 + self.env.rank)
        self._iter = iter(self.loader)

    def _next_batch(self) -> dict[str, Any]:
        if self._iter is None:
            self._new_iterator()
        try:
            batch = next(self._iter)
        except StopIteration:
            self.epoch, self.offset = self.epoch + 1, 0
            self._new_iterator()
            batch = next(self._iter)
        self.offset += self.config.data.batch_size
        return move_to(batch, self.env.device)

    # ---- one optimizer step --------------------------------------------------------------------------

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """No gradient all-reduce on non-final micro-steps: DDP ``no_sync``, FSDP2 gradient-sync switch."""
        target = getattr(self.model, "_orig_mod", self.model)
        if hasattr(target, "set_requires_gradient_sync"):  # FSDP2: sync only on the last micro-step
            target.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if not last and hasattr(target, "no_sync"):
            return target.no_sync()
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``accum_steps`` micro-batches; returns the step's metrics (this rank)."""
        accum = self.config.optim.accum_steps
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, Tensor] = {}
        for micro in range(accum):
            batch = self._next_batch()
            with self._no_sync(micro == accum - 1):
                with self.precision.autocast():
                    out = self.model(batch)
                if "loss" not in out:
                    raise KeyError(f"the objective returned no 'loss' (keys: {sorted(out)})")
                self.precision.backward(out["loss"] / accum)
            for key, value in out.items():
                if isinstance(value, Tensor) and value.numel() == 1:
                    sums[key] = sums.get(key, 0.0) + value.detach().float().reshape(()) / accum
        grad_norm = self.precision.clip(self.optimizer, self.params, self.config.optim.grad_clip)
        loss = sums["loss"]
        bad = not bool(torch.isfinite(loss)) or (
            self.precision.scaler is None and not bool(torch.isfinite(grad_norm))
        )
        flags = all_reduce_flags(torch.tensor([float(bad), float(self._stop_requested)]), self.env)
        bad, self._stop_requested = bool(flags[0]), bool(flags[1])
        lrs = self.scheduler.lrs()
        stepped = False
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            if self.precision.scaler is not None:
                self.precision.scaler.update()  # resets the unscale_ bookkeeping
            self.nonfinite_total += 1
            self.nonfinite_in_row += 1
        else:
            stepped = self.precision.step(self.optimizer)  # False: the fp16 scaler skipped an inf gradient
            if stepped:
                self.objective.after_optimizer_step()
            self.nonfinite_in_row = 0
        self.objective.apply_updates(keep=stepped)
        self.scheduler.step()
        self.step += 1
        metrics = {k: float(v) for k, v in sums.items()}
        metrics["grad_norm"] = float(grad_norm)
        metrics["skipped"] = float(not stepped)
        if self.precision.scaler is not None:
            metrics["grad_scale"] = float(self.precision.scaler.get_scale())
        for group, lr in zip(self.optimizer.param_groups, lrs):
            metrics[f"lr/{group.get('name', len(metrics))}"] = lr
        return metrics

    # ---- checkpoints ---------------------------------------------------------------------------------

    def _is_fsdp(self) -> bool:
        return self.env.distributed and self.config.distributed.strategy == "fsdp"

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (call on every rank: RNG states are gathered)."""
        if self._is_fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            model_sd, optim_sd = get_state_dict(
                self.objective,
                self.optimizer,
                options=StateDictOptions(full_state_dict=True, cpu_offload=True),
            )
        else:
            model_sd, optim_sd = unwrap(self.objective).state_dict(), self.optimizer.state_dict()
        rngs = [rng_state()]
        if self.env.distributed:
            rngs = [None] * self.env.world_size
            dist.all_gather_object(rngs, rng_state())
        return {
            "step": self.step,
            "objective": model_sd,
            "optimizer": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "precision": self.precision.state_dict(),
            "rng": rngs,
            "data": {"epoch": self.epoch, "offset": self.offset, "world_size": self.env.world_size},
            "nonfinite": {"total": self.nonfinite_total, "in_row": self.nonfinite_in_row},
            "config": self.config.to_dict(),
        }

    def save_checkpoint(self) -> Path:
        state = self.state_dict()
        path = checkpoint_path(self.checkpoints.directory, self.step)
        if self.env.is_main:
            path = self.checkpoints.save(state, self.step)
            if self.config.logging.plots:
                self.metrics.plot()
        barrier(self.env)
        return path

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._is_fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(
                self.objective,
                self.optimizer,
                model_state_dict=state["objective"],
                optim_state_dict=state["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            unwrap(self.objective).load_state_dict(state["objective"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state["precision"])
        self.step = int(state["step"])
        data = state["data"]
        if data.get("world_size", 1) != self.env.world_size:
            logger.warning(
                "resuming a %d-process run on %d processes: the data order restarts the epoch",
                data.get("world_size", 1),
                self.env.world_size,
            )
            self.epoch, self.offset = int(data["epoch"]) + 1, 0
        else:
            self.epoch, self.offset = int(data["epoch"]), int(data["offset"])
        self.nonfinite_total = int(state["nonfinite"]["total"])
        self.nonfinite_in_row = int(state["nonfinite"]["in_row"])
        rngs = state["rng"]
        set_rng_state(rngs[self.env.rank] if len(rngs) == self.env.world_size else rngs[0])
        self._iter = None

    def resume(self, resume: str | Path | None) -> Path | None:
        """Loads the checkpoint named by ``resume`` ("latest", "auto", a file or a directory; None: a new
        run, which claims the run folder) and drops the metrics records past its step."""
        path = resolve_resume(None if resume is None else str(resume), self.checkpoints.directory)
        if resume is None:
            self._claim_run_folder()
        if path is not None:
            self.load_state_dict(load_checkpoint(path))
            logger.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)
        if self.env.is_main:
            self.metrics.truncate_after(self.step)
        return path

    def _claim_run_folder(self) -> None:
        """A new run: refuse a folder holding another run's checkpoints or metrics, or (``overwrite``)
        remove that run's files first."""
        if not (latest_checkpoint(self.checkpoints.directory) or self.metrics.read()):
            return
        if not self.config.overwrite:
            raise RunFolderError(
                f"{self.output_dir} holds another run's checkpoints or metrics.jsonl: pass --resume to "
                "continue it or --overwrite to replace it (or choose another --output-dir)"
            )
        barrier(self.env)  # every rank has looked before rank 0 removes
        if self.env.is_main:
            logger.warning("overwrite: removing the previous run's files in %s", self.output_dir)
            clear_run_folder(self.output_dir)

    # ---- the loop ------------------------------------------------------------------------------------

    def _install_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._stop_requested:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self._stop_requested = True
            logger.warning("Ctrl-C: finishing this step, saving a checkpoint (press again to abort)")

        return signal.signal(signal.SIGINT, handler)

    def fit(self, resume: str | Path | None = None, max_steps: int | None = None) -> dict[str, Any]:
        """Trains up to ``max_steps`` (default ``schedule.max_steps``, or ``schedule.epochs`` worth) total
        optimizer steps.

        Returns a summary: status ("finished" | "interrupted"), step, first/last logged metrics, steps/s,
        samples/s, non-finite count, the last checkpoint path.
        """
        cfg = self.config
        max_steps = self.max_steps if max_steps is None else max_steps
        resumed_from = self.resume(resume)
        if self.env.is_main:
            cfg.to_yaml(self.output_dir / "config.yaml")
            self.metrics.open(purge_step=self.step if resumed_from else None)
        barrier(self.env)
        self.model.train()
        previous = self._install_sigint()
        progress = None
        if cfg.logging.progress and self.env.is_main:
            progress = tqdm(total=max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        samples_per_step = cfg.data.batch_size * cfg.optim.accum_steps * self.env.world_size
        window: dict[str, float] = {}
        window_steps, window_start = 0, time.perf_counter()
        start_step, start_time = self.step, time.perf_counter()
        first: dict[str, Any] | None = None
        last: dict[str, Any] | None = None
        status, ckpt = "finished", None
        try:
            while self.step < max_steps:
                metrics = self.train_step()
                for k, v in metrics.items():
                    window[k] = window.get(k, 0.0) + v
                window_steps += 1
                if self.nonfinite_in_row >= cfg.max_nonfinite:
                    ckpt = self.save_checkpoint()
                    raise NonFiniteLossError(
                        f"{self.nonfinite_in_row} non-finite losses in a row (step {self.step}, "
                        f"{self.nonfinite_total} in total): stopping. Checkpoint kept at {ckpt}; lower the "
                        f"learning rate, use fp32/bf16 or check the data, then --resume"
                    )
                log_now = self.step % cfg.logging.every_steps == 0 or self.step == max_steps
                if log_now or self._stop_requested:
                    elapsed = time.perf_counter() - window_start
                    record = all_reduce_mean({k: v / window_steps for k, v in window.items()}, self.env)
                    record = {k: v for k, v in record.items() if not k.startswith("lr/")} | {
                        k: metrics[k] for k in metrics if k.startswith("lr/")
                    }
                    record["skipped"] = round(record.get("skipped", 0.0) * window_steps)  # the ranks agree
                    record = {"step": self.step, "epoch": self.epoch, **record}
                    record["samples_per_s"] = samples_per_step * window_steps / max(elapsed, 1e-9)
                    record["steps_per_s"] = window_steps / max(elapsed, 1e-9)
                    record["nonfinite_total"] = self.nonfinite_total
                    if self.env.is_main:
                        self.metrics.write(record)
                    first = first or record
                    last = record
                    window, window_steps, window_start = {}, 0, time.perf_counter()
                    if progress is not None:
                        progress.set_postfix(
                            loss=f"{record.get('loss', float('nan')):.4f}",
                            sps=f"{record['samples_per_s']:.1f}",
                        )
                if progress is not None:
                    progress.update(1)
                if self._stop_requested:
                    status = "interrupted"
                    break
                if self.checkpoints.due(self.step, max_steps):
                    ckpt = self.save_checkpoint()
            if status == "interrupted" or self.step > start_step or resumed_from is None:
                ckpt = self.save_checkpoint()
        finally:
            if progress is not None:
                progress.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            self.metrics.flush()
        elapsed = time.perf_counter() - start_time
        steps = self.step - start_step
        rate = steps / max(elapsed, 1e-9)
        since = f"the resume at step {start_step}" if resumed_from else "the start"
        message = "%s at step %d: %d steps in %.1f s since %s (%.3g steps/s, %.3g samples/s)"
        logger.info(message, status, self.step, steps, elapsed, since, rate, rate * samples_per_step)
        return {
            "status": status,
            "step": self.step,
            "steps": steps,
            "first": first,
            "last": last,
            "steps_per_s": rate,
            "samples_per_s": rate * samples_per_step,
            "nonfinite_total": self.nonfinite_total,
            "checkpoint": str(ckpt) if ckpt else None,
            "resumed_from": str(resumed_from) if resumed_from else None,
        }

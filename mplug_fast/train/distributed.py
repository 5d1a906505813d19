"""Process groups from the torchrun environment, DDP / FSDP2 wrapping, a resumable sampler, metric reduction.

``init_distributed`` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (set by torchrun); without them the
run is one process and nothing is initialised. Backend "auto" = NCCL when the run is on CUDA, gloo on CPU.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def check_device(device: str | torch.device) -> torch.device:
    """A device this torch can use ("auto": cuda when available, else cpu); ValueError naming it otherwise
    (an unknown name, CUDA on a torch without CUDA or without a visible GPU, a GPU index out of range)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or auto") from e
    if found.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r}: this torch {torch.__version__} cannot use CUDA (built without it, or "
            "no GPU is visible); use cpu"
        )
    if found.type == "cuda" and (found.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return found


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """ "auto" -> cuda:LOCAL_RANK when CUDA is available, else cpu; "cuda" -> cuda:LOCAL_RANK; checked by
    `check_device`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return check_device(f"cuda:{local_rank}" if device == "cuda" else device)


def init_distributed(device: str = "auto", backend: str = "auto") -> DistEnv:
    """Joins the torchrun process group when ``WORLD_SIZE`` > 1 (gloo on CPU, NCCL on CUDA by default)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if backend == "nccl" and dev.type != "cuda":
            raise ValueError("the NCCL backend needs CUDA devices; use backend gloo on the CPU")
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(
    module: nn.Module, env: DistEnv, strategy: str = "ddp", find_unused_parameters: bool = False
) -> nn.Module:
    """DDP (buffers not broadcast: the objectives keep their queues in sync themselves) or FSDP2
    ``fully_shard`` of every transformer layer and then the root; a single process gets ``module`` back."""
    if not env.distributed:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(
            module,
            device_ids=ids,
            broadcast_buffers=False,
            find_unused_parameters=find_unused_parameters,
        )
    if strategy == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        for unit in fsdp_units(module):
            fully_shard(unit)
        fully_shard(module)
        return module
    raise ValueError(f"unknown distributed strategy {strategy!r}; use 'ddp' or 'fsdp'")


PER_LAYER_SHARDING = ("vision", "text_encoder")  # components whose layers run only through their own forward


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one before the root: each transformer layer of the vision and text
    encoders, and the fusion and the decoder as wholes (they call their layers' K/V projections outside the
    layers' own forward, which per-layer sharding would not gather). Momentum copies stay in the root unit."""
    units: list[nn.Module] = []
    for name, child in module.named_modules():
        parts = name.split(".")
        if "momentum" in parts or not name:
            continue
        if isinstance(child, nn.ModuleList) and parts[-1] in ("blocks", "layers") and len(parts) >= 2:
            if parts[-2] in PER_LAYER_SHARDING:
                units.extend(child)
        elif parts[-1] in ("fusion", "decoder"):
            units.append(child)
    return units


DATA_PARALLEL = ("DistributedDataParallel", "DataParallel")  # wrappers holding the model as .module


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        wrapped = getattr(module, "module", None)
        if type(module).__name__ in DATA_PARALLEL and isinstance(wrapped, nn.Module):
            module = wrapped
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


class ResumableSampler(Sampler[int]):
    """``DistributedSampler`` semantics with a resumable position.

    Epoch e shuffles ``range(n)`` with a generator seeded ``seed + e`` (the same permutation on every rank),
    pads it by wrapping to a multiple of ``world_size`` and gives rank r the indices ``perm[r::world_size]``.
    ``set_position(epoch, offset)`` starts the next iteration ``offset`` indices into epoch ``epoch`` of this
    rank's share; the trainer records the offset of the samples actually consumed.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0):
        if n < 1:
            raise ValueError("the dataset is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.n, self.rank, self.world_size, self.shuffle, self.seed = n, rank, world_size, shuffle, seed
        self.num_samples = math.ceil(n / world_size)
        self.epoch, self.offset = 0, 0

    def indices(self, epoch: int) -> list[int]:
        """This rank's full index list of ``epoch``."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        total = self.num_samples * self.world_size
        perm = (perm * math.ceil(total / self.n))[:total]
        return perm[self.rank :: self.world_size]

    def set_position(self, epoch: int, offset: int = 0) -> None:
        if not 0 <= offset <= self.num_samples:
            raise ValueError(f"offset {offset} out of range 0..{self.num_samples}")
        self.epoch, self.offset = epoch, offset

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch)[self.offset :])

    def __len__(self) -> int:
        return self.num_samples - self.offset


def all_reduce_mean(values: Mapping[str, float | Tensor], env: DistEnv) -> dict[str, float]:
    """Mean over the ranks of each scalar metric (one all-reduce for all of them)."""
    keys = sorted(values)
    if not keys:
        return {}
    vec = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if env.distributed:
        backend = dist.get_backend()
        vec = vec.to(env.device if backend == "nccl" else "cpu")
        dist.all_reduce(vec)
        vec = vec.cpu() / env.world_size
    return dict(zip(keys, vec.tolist()))


def all_reduce_flags(flags: Tensor, env: DistEnv) -> Tensor:
    """Element-wise max over the ranks of a small float tensor of flags ([non-finite, stop-requested])."""
    if env.distributed:
        device = env.device if dist.get_backend() == "nccl" else torch.device("cpu")
        flags = flags.to(device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.cpu()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()

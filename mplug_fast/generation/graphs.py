"""Recorded decode steps: `beam_search(cuda_graph=True)` replays its steps as CUDA graphs (docs/native.md).

A recorded step keeps its inputs and outputs in fixed buffers, makes no host synchronisation and computes
the same host values at every replay. The step index (an argument of the native beam step), the cache
length and which buffer of the cache pair is current change from step to step, so one graph is recorded
per step index t, run with the cache's host state of that step (`KVCache.snapshot` / `restore`); all
graphs of a shape share one memory pool.

`StepGraphs.run` runs every step eagerly the first time (on CUDA on a side stream: Triton compiles and
library handles happen before recording), records them, and replays them later. Without CUDA it runs each
step eagerly on the same buffers with the same host state: the CPU tests check the replay discipline so.
The recordings of a decoder live as long as it does (at most `MAX_KEYS` shapes; new weights drop them);
not thread-safe.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import torch
from torch import Tensor, nn

from mplug_fast.modeling.kv_cache import KVCache

MAX_KEYS = 8  # recorded shapes kept per decoder; the oldest is dropped first

_RECORDINGS: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, StepGraphs]] = weakref.WeakKeyDictionary()


class StepGraphs:
    """Steps t of one shape, on static buffers `tensors` (clones of the first call's, kept by the graphs)."""

    def __init__(self, tensors: dict[str, Tensor]):
        with torch.inference_mode(False):  # plain tensors: later calls may write them outside inference mode
            self.tensors = {name: x.clone() for name, x in tensors.items()}
        self.host: dict[int, tuple] = {}  # per step: the cache's host state, saved on the first run
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.warm = False  # every step ran once

    def load(self, tensors: dict[str, Tensor]) -> None:
        """Copies a new call's start state into the static buffers (same names and shapes)."""
        for name, x in tensors.items():
            self.tensors[name].copy_(x)

    def run(
        self, step: Callable[[int], None], cache: KVCache, steps: range, stop: Callable[[int], bool]
    ) -> None:
        """Runs `step(t)` for t in `steps` with `cache`'s host state of step t. The first run takes every
        step eagerly (never stopping early) and then records them (CUDA); later runs replay them and stop
        before a step t where `stop(t)` (a host check of the buffers)."""
        if not self.warm:
            self._warm_up(step, cache, steps)
            return
        for t in steps:
            if stop(t):
                break
            if t in self.graphs:
                self.graphs[t].replay()
            else:
                self._eager(step, cache, t)

    def _eager(self, step: Callable[[int], None], cache: KVCache, t: int) -> None:
        if t in self.host:
            cache.restore(self.host[t])
        else:
            self.host[t] = cache.snapshot()
        step(t)

    def _warm_up(self, step: Callable[[int], None], cache: KVCache, steps: range) -> None:
        with torch.inference_mode(False):  # allocates the cache's spare buffers (plain, current stream)
            self.host[steps[0]] = cache.snapshot()
        if not next(iter(self.tensors.values())).is_cuda:
            for t in steps:
                self._eager(step, cache, t)
            self.warm = True
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for t in steps:
                self._eager(step, cache, t)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()  # one pool: a step's temporaries are dead when the next runs
        for t in steps:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    self._eager(step, cache, t)
            except RuntimeError as e:  # e.g. "operation not permitted when stream is capturing"
                raise RuntimeError(
                    f"recording decode step {t} as a CUDA graph failed: {e}. Something in the step waits "
                    "for the GPU (e.g. the flash_attn backend with a padding mask); use cuda_graph=False "
                    "or another attention backend (MPLUG_FAST_ATTENTION=sdpa)"
                ) from e
            self.graphs[t] = graph
        self.warm = True


def step_graphs(module: nn.Module, key: Hashable, tensors: dict[str, Tensor]) -> StepGraphs:
    """The recorded steps of `module` for `key` with `tensors` loaded into their buffers (new ones, holding
    clones of `tensors`, when the key or the module's weights are new)."""
    weights = tuple(p.data_ptr() for p in module.parameters())
    recordings = _RECORDINGS.setdefault(module, {})
    if any(k[0] != weights for k in recordings):  # moved or reloaded weights: the graphs read the old ones
        recordings.clear()
    graphs = recordings.pop((weights, key), None)
    if graphs is None:
        if len(recordings) >= MAX_KEYS:
            del recordings[next(iter(recordings))]
        graphs = StepGraphs(tensors)
    else:
        graphs.load(tensors)
    recordings[(weights, key)] = graphs  # most recent last
    return graphs

"""Recorded decode steps: `beam_search(cuda_graph=True)` replays its steps as CUDA graphs.

At batch 1-8 a beam-search step is bound by kernel launches: about fifteen per decoder layer, the cache
reorder and the beam step, each a few microseconds of GPU work behind a Python launch. A CUDA graph records
the launches of a step once and replays them with one call.

What a recorded step needs, and the beam-search step gives: its inputs and outputs stay in the same
buffers (the KV cache pair, the beam state, the last tokens, the memory K/V), it makes no host
synchronisation (the native beam step; `stable_topk` takes its tie path while a graph records) and every
host value it computes is the same at each replay. The host values that change from step to step -- the
step index (an argument of the native beam step and of the length penalty), the cache length (the
self-attention views grow by one position per step) and which buffer of the cache pair is current -- are
fixed per step index, so one graph is recorded per step index t (1 .. T-1), all in one memory pool, each
run with the cache's host state of its step (`KVCache.snapshot` / `restore`). The attention of step t reads
exactly the Lp + t written positions, as in eager decoding. Closed samples stay in the batch (the beam step
freezes them): the batch size is part of the recording.

`StepGraphs.run` runs every step eagerly the first time (that call's results; on CUDA on a side stream,
which also compiles Triton kernels and creates library handles before recording), records them, and later
replays them. Without CUDA it runs the step eagerly on the same buffers with the same host state, which is
how the tests check the replay discipline on CPU. The recordings of a decoder live as long as it does (at
most `MAX_KEYS` shapes; new weights drop the old ones); not thread-safe.
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

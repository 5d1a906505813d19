"""The self-attention key/value cache of a decoder stack, for incremental decoding.

One buffer per tensor for all layers, `k`, `v`: [layers, N, H, Lmax, Dh] (slot `i` is layer i's
[N, H, Lmax, Dh]), allocated on the first `update` with the dtype/device of the projected keys, and a
key-padding mask `mask`: bool [N, Lmax] (True = attend). Positions [0, length) are valid. Every step
writes in place (slice assignment); nothing is concatenated.

`reorder(index)` selects rows (a beam-search step, expanding one prompt per sample to its beams, or dropping
finished samples): with the same row count it gathers into a second buffer of the same shape and swaps the
two (no allocation after the first reorder); a new row count allocates new buffers. The gather is the
native `reorder_caches` op when built (kernels/: K and V of every layer in one call, only the `length` valid
positions), else `index_select(..., out=)` (its Python twin: one contiguous gather of all positions).

A recorded decode step (CUDA graph) is replayed on the same buffers (`use_buffers`) with the same host state
(`snapshot` / `restore`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mplug_fast.ops.native import native_op


class KVCache:
    """Preallocated self-attention keys/values of `num_layers` layers for up to `max_length` positions.

    Per decoding call: `append_mask(new_mask, N, L, device)`, every layer `update(i, k, v)`, `advance(L)`.
    """

    def __init__(self, num_layers: int, max_length: int):
        if num_layers < 1 or max_length < 1:
            raise ValueError(
                f"KVCache needs num_layers >= 1 and max_length >= 1, got {num_layers}, {max_length}"
            )
        self.num_layers = num_layers
        self.max_length = max_length
        self.length = 0
        self.k: Tensor | None = None  # [layers, N, H, Lmax, Dh]
        self.v: Tensor | None = None
        self.mask: Tensor | None = None  # bool [N, Lmax]
        self.padded = False  # True once a mask was appended: attention then needs the key-padding mask
        self._spare: tuple[Tensor, Tensor, Tensor] | None = None  # (k, v, mask) buffers of the same shape

    def append_mask(
        self, mask: Tensor | None, batch_size: int, new_length: int, device: torch.device
    ) -> None:
        """Record the padding mask of `new_length` tokens about to be written (None = all real tokens)."""
        end = self.length + new_length
        if end > self.max_length:
            raise ValueError(
                f"KVCache holds {self.max_length} positions; {self.length} are used and {new_length} more "
                "were given: build the cache with a larger max_length"
            )
        if self.mask is None:
            self.mask = torch.ones(batch_size, self.max_length, dtype=torch.bool, device=device)
        elif self.mask.shape[0] != batch_size:
            raise ValueError(f"KVCache holds {self.mask.shape[0]} rows, got {batch_size}; reorder it first")
        if mask is not None:
            self.mask[:, self.length : end] = mask
            self.padded = True

    def key_mask(self, new_length: int) -> Tensor | None:
        """bool [N, length + new_length] over the cached and new keys, or None when nothing was padded."""
        return self.mask[:, : self.length + new_length] if self.padded else None

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write layer `layer`'s new k, v [N, H, L, Dh] at [length, length + L); return views over
        [0, length + L), each [N, H, length + L, Dh]."""
        N, H, L, Dh = k.shape
        self.allocate(N, H, Dh, k.dtype, k.device)
        end = self.length + L
        if end > self.max_length:
            raise ValueError(f"KVCache overflow: {end} positions > max_length {self.max_length}")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def allocate(
        self, rows: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        """Allocate the k, v buffers [layers, rows, heads, max_length, head_dim] (zeros) if not yet there."""
        if self.k is None:
            shape = (self.num_layers, rows, heads, self.max_length, head_dim)
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)

    def advance(self, new_length: int) -> None:
        """Mark `new_length` more positions valid (after every layer has written them)."""
        self.length += new_length

    def use_buffers(self, k: Tensor, v: Tensor, mask: Tensor) -> None:
        """Continue in these buffers (of the shapes of `k`, `v`, `mask`; their contents are kept)."""
        self.k, self.v, self.mask, self._spare = k, v, mask, None

    def snapshot(self) -> tuple:
        """The host state: (length, padded, k, v, mask, spare buffers); the spare buffers are allocated now,
        so that no later same-size `reorder` allocates."""
        if self.k is not None:
            self._spare_buffers()
        return (self.length, self.padded, self.k, self.v, self.mask, self._spare)

    def restore(self, snapshot: tuple) -> None:
        """Sets the host state saved by `snapshot` (the buffers' contents are not touched)."""
        self.length, self.padded, self.k, self.v, self.mask, self._spare = snapshot

    def _spare_buffers(self) -> tuple[Tensor, Tensor, Tensor]:
        """The second (k, v, mask) buffers of the current shapes, allocated on first use."""
        if self._spare is None:
            self._spare = (torch.empty_like(self.k), torch.empty_like(self.v), torch.empty_like(self.mask))
        return self._spare

    def reorder(self, index: Tensor) -> None:
        """Row i becomes old row index[i]; index: long [N'] (N' may differ from N, e.g. prompt -> beams)."""
        if self.k is None:
            return
        if index.shape[0] != self.k.shape[1]:  # a new row count: new buffers, no spare pair
            shape = (self.num_layers, index.shape[0], *self.k.shape[2:])
            k, v = self.k.new_empty(shape), self.v.new_empty(shape)  # [layers, N', H, Lmax, Dh]
            mask, spare = self.mask.new_empty(index.shape[0], self.max_length), None  # [N', Lmax]
        else:  # gather into the spare pair, which then becomes the spare again
            (k, v, mask), spare = self._spare_buffers(), (self.k, self.v, self.mask)
        op = native_op("reorder_caches", self.k.device.type)
        if op is None:
            torch.index_select(self.k, 1, index, out=k)
            torch.index_select(self.v, 1, index, out=v)
        else:  # positions >= length stay unwritten: never read before `update` writes them
            op([self.k, self.v], [k, v], index, self.length)
        torch.index_select(self.mask, 0, index, out=mask)
        self._spare = spare
        self.k, self.v, self.mask = k, v, mask

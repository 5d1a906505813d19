"""Triton kernels (optional: importing this package imports `triton`).

`mplug_fast.ops.attention` reaches these lazily through its `triton` backend, so `import mplug_fast` works
without triton. Set `TRITON_INTERPRET=1` before importing to run the kernels on CPU tensors (tests only).
`attention_unsupported_reasons` says whether the attention kernels can run given inputs on a device (dtype,
head dim, fp32 matmul precision, compute capability, the tiles' shared memory against the device's limit).
"""

from mplug_fast.ops.triton.attention import flash_attention
from mplug_fast.ops.triton.tiles import attention_unsupported_reasons

__all__ = ["attention_unsupported_reasons", "flash_attention"]

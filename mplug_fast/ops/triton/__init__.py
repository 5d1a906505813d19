"""Triton kernels (optional: importing this package imports `triton`).

`mplug_fast.ops.attention` reaches these lazily through its `triton` backend, so `import mplug_fast` works
without triton. Set `TRITON_INTERPRET=1` before importing to run the kernels on CPU tensors (tests only).
"""

from mplug_fast.ops.triton.attention import flash_attention

__all__ = ["flash_attention"]

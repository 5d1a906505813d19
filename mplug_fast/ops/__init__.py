"""Numeric kernels behind one backend registry (`registry.py`; the backends of `attention.py`,
`external.py` and `fused.py`).

The entry point is `mplug_fast.ops.attention.attention` (the module keeps its name, so
`mplug_fast.ops.attention` is never shadowed by the function).
"""

from mplug_fast.ops.attention import ATTENTION, available_backends, select_backend
from mplug_fast.ops.fused import FUSED

__all__ = ["ATTENTION", "FUSED", "available_backends", "select_backend"]

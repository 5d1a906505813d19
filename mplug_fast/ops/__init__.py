"""Numeric kernels behind one backend registry (`registry.py`; the backends of `attention.py`,
`external.py` and `fused.py`).

The entry point is `mplug_fast.ops.attention.attention` (the module keeps its name, so
`mplug_fast.ops.attention` is never shadowed by the function).
"""

from mplug_fast.ops.attention import available_backends

__all__ = ["available_backends"]

"""Numeric kernels behind one dispatch layer (see `attention.py` for the backend rules).

The entry point is `mplug_fast.ops.attention.attention` (the module keeps its name, so
`mplug_fast.ops.attention` is never shadowed by the function).
"""

from mplug_fast.ops.attention import available_backends, register_backend, select_backend

__all__ = ["available_backends", "register_backend", "select_backend"]

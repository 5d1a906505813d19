"""Numeric kernels behind one dispatch layer (see `attention.py` for the backend rules)."""

from mplug_fast.ops.attention import attention, available_backends, register_backend, select_backend

__all__ = ["attention", "available_backends", "register_backend", "select_backend"]

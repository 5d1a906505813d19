"""The native ops must be built for these tests (`make test` builds them with `pip install -e .`)."""

from __future__ import annotations

import os

import pytest

from mplug_fast.ops import native


@pytest.fixture(autouse=True)
def require_native():
    """Fails (skips only with MPLUG_FAST_SKIP_EXT=1) when mplug_fast._C cannot be loaded."""
    error = native.load_error()
    if error is None:
        return
    if os.environ.get("MPLUG_FAST_SKIP_EXT") == "1":
        pytest.skip(f"MPLUG_FAST_SKIP_EXT=1: {error}")
    pytest.fail(f"the native ops are not built: {error} (build: pip install --no-build-isolation -e .)")

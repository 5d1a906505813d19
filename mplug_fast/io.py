"""Atomic file writes (the one place for them) and weights-only torch loads (the one place for them).

Every writer goes through `atomic_path`: the bytes go to a temporary file `.<name>.tmp` beside the target,
are flushed and fsync'ed, then `os.replace`d onto the target (and the directory fsync'ed), so a crash or a
kill mid-write leaves either the old file or the new one, never a half-written file; on an error the
temporary file is removed. Files are created with the normal permissions (0o666 minus the umask, as
`open` does), not the 0o600 of `tempfile.mkstemp`. One writer per target path at a time (the temporary
name is derived from the target); a temporary file left by a killed process is overwritten by the next
write.

Reads never run code: `torch_load` unpickles with `weights_only=True` (tensors, containers, plain Python
values) plus, scoped to the read, the few numpy types of the RNG state a trainer checkpoint holds. There
is no switch to lift that: a file that needs more is refused with `UnreadableFileError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "UnreadableFileError",
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_json",
    "atomic_write_text",
    "temp_path_for",
    "torch_load",
]

# The non-tensor types a trainer checkpoint holds: numpy's RNG state (a uint32 array) in `rng`, pickled as
# numpy's array-rebuild function (numpy.core.multiarray._reconstruct, numpy._core in numpy 2: taken from an
# array's own pickle recipe), ndarray, dtype and the uint32 dtype class. Everything else a trainer saves
# (python RNG state, optimizer / scheduler state, the run config) is plain containers.
SAFE_GLOBALS = [np.zeros(1).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class UnreadableFileError(ValueError):
    """A file that cannot be read as what it should be (corrupt, truncated, another format, or a pickle
    that would run code); the message names the file and says why in one line."""


def temp_path_for(path: str | os.PathLike[str]) -> Path:
    """The temporary file a write of `path` goes through: `.<name>.tmp` in the same directory."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield the temporary path to write `path`'s new content to, renamed onto `path` on a clean exit (see
    the module docstring); parent folders are created. For writers that take a file name (safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer did not create {tmp} (atomic write of {path})")
        _fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after an error; after the rename it is gone already
    with contextlib.suppress(OSError):  # persist the rename (some file systems cannot fsync a directory)
        _fsync_path(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; returns `path` as a Path."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 1) -> Path:
    """Write `obj` as JSON to `path` atomically (serialised first: an unserialisable `obj` leaves no file)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """`torch.save(obj)` to `path` atomically; returns `path` as a Path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def torch_load(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", *, mmap: bool = False
) -> Any:
    """`torch.load(path, weights_only=True)` with `SAFE_GLOBALS` allowed for this read only (see the module
    docstring). `mmap`: map the tensors' storage instead of reading it (zip files only). FileNotFoundError
    when `path` is no file; `UnreadableFileError` when it is not a readable torch file or holds more."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.stat().st_size == 0:
        raise UnreadableFileError(f"{path} is empty (0 bytes): the download or save was interrupted")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for a bad file; weights_only means nothing else ran
        reason = _load_failure(e)
        refused = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", reason)
        if refused:
            raise UnreadableFileError(
                f"{path} holds a Python object ({refused.group(1) or refused.group(2)}) besides tensors; "
                "mplug_fast reads weights only and never runs code from a file"
            ) from e
        raise UnreadableFileError(
            f"{path} is not a readable PyTorch file (truncated or corrupt?): {reason}"
        ) from e


def _load_failure(error: Exception) -> str:
    """What a failed `torch.load` says, in one line, without torch's weights-only boilerplate (which
    suggests `weights_only=False` or allowlisting the refused type)."""
    text = str(error)
    if text.startswith("Weights only load failed"):
        text = text.split("WeightsUnpickler error:", 1)[-1]
    boilerplate = ("Weights only load failed", "(1)", "(2)", "Please file an issue", "Check the doc")
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith(boilerplate)
    ]
    return f"{type(error).__name__}: {' '.join(lines)[:300]}"

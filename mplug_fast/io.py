"""Atomic file writes (the one place for them) and weights-only torch loads.

Every writer goes through `atomic_path`: the bytes go to a temporary file `.<name>.tmp` beside the target,
are flushed and fsync'ed, then `os.replace`d onto the target (and the directory fsync'ed), so a crash or a
kill mid-write leaves either the old file or the new one, never a half-written file; on an error the
temporary file is removed. Files are created with the normal permissions (0o666 minus the umask, as
`open` does), not the 0o600 of `tempfile.mkstemp`. One writer per target path at a time (the temporary
name is derived from the target); a temporary file left by a killed process is overwritten by the next
write.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "temp_path_for",
    "torch_load",
]


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


def _fsync_dir(directory: Path) -> None:
    """Persist a rename (best effort: some file systems cannot fsync a directory)."""
    with contextlib.suppress(OSError):
        _fsync_path(directory)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; on a clean exit it is fsync'ed and renamed
    onto `path`, on an exception it is removed and `path` is left as it was. Parent folders are created.

    For writers that take a file name (`safetensors.torch.save_file`); the others below use it.
    """
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
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically; returns `path` as a Path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


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


def torch_load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`: tensors, containers and plain Python values, no code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)

"""`mplug_fast.io`: atomic writes (content, permissions, no half-written file), weights-only loads."""

from __future__ import annotations

import os
import pickle
import stat

import pytest
import torch

from mplug_fast.io import (
    UnreadableFileError,
    atomic_path,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    temp_path_for,
    torch_load,
)


def test_writes_create_parents_and_replace_the_content(tmp_path):
    path = tmp_path / "a" / "b" / "out.json"
    assert atomic_write_json(path, {"x": [1, 2]}) == path
    assert path.read_text() == '{\n "x": [\n  1,\n  2\n ]\n}\n'
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"], "no temporary file is left"


def test_files_get_the_normal_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        for write in (
            lambda p: atomic_write_text(p, "x"),
            lambda p: atomic_write_json(p, {}),
            lambda p: atomic_torch_save({"w": torch.ones(2)}, p),
        ):
            path = tmp_path / "f"
            path.unlink(missing_ok=True)
            write(path)
            assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.pt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert not temp_path_for(path).exists()
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})  # not serialisable: nothing is written
    assert path.read_text() == "old"
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a local lambda cannot be pickled
        atomic_torch_save(lambda: 0, path)
    assert path.read_text() == "old" and not temp_path_for(path).exists()


def test_a_writer_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="did not create"):
        with atomic_path(tmp_path / "x"):
            pass
    assert not (tmp_path / "x").exists()


def test_a_stale_temporary_file_is_overwritten(tmp_path):
    path = tmp_path / "x.json"
    temp_path_for(path).write_text("left by a killed process")
    atomic_write_json(path, [1])
    assert path.read_text() == "[\n 1\n]\n" and not temp_path_for(path).exists()


class _NotAWeight:
    pass


def test_torch_roundtrip_is_weights_only(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"w": torch.arange(3.0), "step": 7}, path)
    loaded = torch_load(path)
    assert torch.equal(loaded["w"], torch.arange(3.0)) and loaded["step"] == 7
    atomic_torch_save({"obj": _NotAWeight()}, path)
    with pytest.raises(UnreadableFileError, match="_NotAWeight.*never runs code"):
        torch_load(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        torch_load(tmp_path / "missing.pt")

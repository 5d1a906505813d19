"""No source file over 500 lines (the project's rule: one concept per file, small enough to read whole)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 500
FOLDERS = ("mplug_fast", "kernels", "benchmarks", "tests", "examples")
SUFFIXES = {".py", ".cpp", ".h", ".cu", ".cuh", ".sh"}


def long_files(root: Path, limit: int = LIMIT) -> list[str]:
    """``path: lines`` for every source file under ``root``'s FOLDERS longer than ``limit`` lines."""
    found = []
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*")):
            if path.suffix in SUFFIXES and path.is_file():
                lines = len(path.read_text(errors="replace").splitlines())
                if lines > limit:
                    found.append(f"{path.relative_to(root)}: {lines}")
    return found


def test_no_source_file_over_the_limit():
    assert long_files(ROOT) == [], f"split these files (over {LIMIT} lines)"


def test_the_checker_sees_a_long_file(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "big.cpp").write_text("int x;\n" * (LIMIT + 1))
    (tmp_path / "kernels" / "ok.cpp").write_text("int x;\n" * LIMIT)
    assert long_files(tmp_path) == [f"kernels/big.cpp: {LIMIT + 1}"]

"""The package's import structure: the layers contract (import-linter, configured in pyproject.toml) and no
function-level imports of ``mplug_fast`` modules (they hide cycles)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mplug_fast"
# Packages that may be imported inside a function: they need an optional dependency, deferred until used.
DEFERRED = {"mplug_fast.ops.triton": "the Triton kernels need the optional triton package"}


def function_level_imports(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line module`` (relative to ``root``) of every ``mplug_fast`` import inside a function or
    method of ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mplug_fast"):
                if (node.module or "").startswith(tuple(DEFERRED)):
                    continue
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.module}")
            elif isinstance(node, ast.Import):
                found += [
                    f"{path.relative_to(root)}:{node.lineno} {a.name}"
                    for a in node.names
                    if a.name.startswith("mplug_fast")
                ]
    return found


def test_no_function_level_imports_of_the_package():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in function_level_imports(path)]
    assert not found, "import these at module level (a cycle is a layering bug):\n" + "\n".join(found)


def test_the_checker_sees_a_function_level_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f():\n    from mplug_fast.tasks import TASKS\n    return TASKS\n\n\n"
        "def g():\n    from mplug_fast.ops.triton.attention import flash_attention\n"
    )
    assert function_level_imports(bad, tmp_path) == ["bad.py:2 mplug_fast.tasks"]


def test_import_linter_layers_contract():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("lint-imports (import-linter) is not installed here: pip install import-linter")
    proc = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

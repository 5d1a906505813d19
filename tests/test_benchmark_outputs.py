"""Where the benchmark scripts write: the untracked `.benchmarks/` unless `--out` says otherwise (the tracked
benchmarks/results/ changes only on purpose), and `fusion_speed.py --quick` runs what its help says."""

import ast
from pathlib import Path

import torch

from tests.test_fusion_speed import _load

ROOT = Path(__file__).resolve().parents[1]


def _code_strings(path: Path) -> list[str]:
    """The string constants of a script but its docstrings (they may show `--out benchmarks/results/`)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_scripts_default_to_the_untracked_folder():
    assert ".benchmarks/" in (ROOT / ".gitignore").read_text().splitlines()
    scripts = sorted((ROOT / "benchmarks").glob("*.py"))
    assert len(scripts) >= 6
    for script in scripts:
        strings = _code_strings(script)
        bad = [s for s in strings if "benchmarks/results" in s.replace("\\", "/") or s == "results"]
        assert not bad, f"{script.name} writes into the tracked benchmarks/results/ by default: {bad}"
    assert _load("common").OUT_DIR == ROOT / ".benchmarks"


def test_fusion_speed_quick_runs_two_shapes_as_its_help_says(capsys):
    fusion_speed = _load("fusion_speed")
    settings = fusion_speed.default_settings(torch.device("cpu"), quick=True, smoke=False)
    assert settings.fusion_shapes == ("pretrain", "finetune_base") == settings.flop_shapes
    assert settings.e2e_shapes == ("pretrain",)
    try:
        fusion_speed.main(["--help"])
    except SystemExit:
        pass
    assert "fusion at 2 shapes (pretrain, finetune_base)" in " ".join(capsys.readouterr().out.split())

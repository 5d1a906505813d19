"""What a plain `pip install .` gives: the extras in setup.py match the package's optional imports, and a
base install (no matplotlib) trains and evaluates through the CLI, skipping only the loss plot."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mplug_fast"
# distribution name -> the module the package imports for it (when they differ)
IMPORT_NAME = {
    "flash-attn": "flash_attn",
    "import-linter": "importlinter",
    "nvidia-ml-py": "pynvml",
    "pillow": "PIL",
    "pyyaml": "yaml",
    "tensorboard": "torch.utils.tensorboard",
}
TOOL_EXTRAS = ("dev",)  # test, lint and benchmark tools: used in the checkout (tests/, benchmarks/)
# benchmarks/ imports its own files; `mplug-fast demo` imports the checkout's examples/demo as `demo`
# the package, the tests, the demo and the benchmark scripts (which import each other by file name)
LOCAL_MODULES = {"mplug_fast", "tests", "demo"} | {p.stem for p in (ROOT / "benchmarks").glob("*.py")}


def _setup_lists() -> tuple[list[str], dict[str, list[str]]]:
    """(install_requires, extras_require) read from setup.py's `setup(...)` call without running it."""
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            kw = {k.arg: k.value for k in node.keywords}
            return ast.literal_eval(kw["install_requires"]), ast.literal_eval(kw["extras_require"])
    raise AssertionError("no setup(...) call in setup.py")


def _module(requirement: str) -> str:
    name = requirement.split(";")[0].split("[")[0]
    for sep in "<>=!~ ":
        name = name.split(sep)[0]
    return IMPORT_NAME.get(name.lower(), name.replace("-", "_"))


def _imports(*folders: Path) -> dict[str, str]:
    """Every module the files import (statements, `import_module` / `find_spec` names) -> one such file."""
    found: dict[str, str] = {}
    for path in sorted(p for folder in folders for p in folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) in (
                "import_module",
                "find_spec",
            ):
                names = [
                    a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)
                ]
            for name in names:
                found.setdefault(name, str(path.relative_to(ROOT)))
    return found


def _imported(module: str, imports: dict[str, str]) -> bool:
    return any(name == module or name.startswith(module + ".") for name in imports)


def _unprovided(imports: dict[str, str], requirements: list[str]) -> dict[str, str]:
    """The third-party top-level modules in `imports` that no requirement provides -> a file importing it."""
    provided = {_module(r).split(".")[0] for r in requirements}
    tops = {name.split(".")[0]: where for name, where in imports.items()}
    return {
        top: where
        for top, where in tops.items()
        if top not in sys.stdlib_module_names and top not in LOCAL_MODULES and top not in provided
    }


def test_every_extra_is_imported_and_every_optional_import_has_an_extra():
    base, extras = _setup_lists()
    imports = _imports(PACKAGE)
    for extra, requirements in extras.items():
        if extra in TOOL_EXTRAS:
            continue
        for req in requirements:
            assert _imported(_module(req), imports), f"extra {extra!r}: nothing in mplug_fast imports {req!r}"
    package_extras = [r for extra, reqs in extras.items() if extra not in TOOL_EXTRAS for r in reqs]
    missing = _unprovided(imports, base + package_extras)
    assert not missing, (
        f"imported by the package but neither a dependency nor an extra in setup.py: {missing}"
    )
    checkout = _imports(ROOT / "tests", ROOT / "benchmarks", ROOT / "examples")
    missing = _unprovided(checkout, base + package_extras + [r for e in TOOL_EXTRAS for r in extras[e]])
    assert not missing, f"imported by tests/ or benchmarks/ but in no requirement of setup.py: {missing}"


def test_base_install_trains_without_matplotlib(tmp_path):
    """A tiny caption run through the CLI with matplotlib unimportable: it trains, evaluates, saves, and says
    once that the plot is skipped."""
    out = tmp_path / "run"
    args = [
        "train", "--task", "caption", "--config", "caption_tiny_synthetic", "--output-dir", str(out),
        "--max-steps", "2",
        "--set", "schedule.warmup_steps=1", "--set", "device=cpu", "--set", "data.batch_size=4",
        "--set", "data.synthetic.num_scenes=16", "--set", "data.synthetic.eval_scenes=4",
        "--set", "logging.every_steps=1", "--set", "logging.progress=false",
        "--set", "checkpoint.every_steps=1",
    ]  # fmt: skip
    shim = (
        "import sys; sys.modules['matplotlib'] = None  # as if not installed: its import raises ImportError\n"
        "from mplug_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run(
        [sys.executable, "-c", shim, *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text()), "the evaluation wrote no metrics"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (out / "loss_curves.png").exists()
    assert res.stderr.count("matplotlib is not installed") == 1, res.stderr[-3000:]

"""``mplug-fast demo``: runs the demo example of the source checkout (``examples/demo``: the staged
pretrain -> finetune -> evaluate runner, its report and gallery), which is not part of the installed library.

The example is looked up beside the package (an editable install in a clone, as ``make demo`` makes) and
then in the working directory (a clone with mplug_fast installed from it). All arguments pass through to the
example's own parser (``mplug-fast demo --help``)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import mplug_fast

NOT_FOUND = (
    "the demo is an example of the source repository (examples/demo), not of the installed package: run it "
    "from a clone with `make demo` (or `mplug-fast demo` inside the clone)"
)


def find_examples() -> Path | None:
    """The ``examples`` folder holding ``demo/cli.py``: beside the package, else in the working directory."""
    for root in (Path(mplug_fast.__file__).resolve().parents[1], Path.cwd()):
        if (root / "examples" / "demo" / "cli.py").is_file():
            return root / "examples"
    return None


def _demo(args: argparse.Namespace) -> int:
    examples = find_examples()
    if examples is None:
        raise FileNotFoundError(NOT_FOUND)
    if str(examples) not in sys.path:
        sys.path.insert(0, str(examples))
    # Imported here, not at the top: the example lives outside the package and only in a source checkout.
    cli = importlib.import_module("demo.cli")
    if Path(cli.__file__).resolve().parents[1] != examples.resolve():
        raise ImportError(f"`import demo` found {cli.__file__}, not the example in {examples}")
    return cli.main(args.args)


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``demo`` to the ``mplug-fast`` sub-commands."""
    p = commands.add_parser(
        "demo",
        add_help=False,
        help="pretrain + finetune + evaluate every task on the synthetic world (examples/demo; --help there)",
    )
    p.set_defaults(func=_demo, passthrough=True, args=[])  # `main` hands it every argument after `demo`

"""Summarises `make cuda-build-check`: build time, the extension's CUDA kernels per architecture, ptxas
resource use per kernel and architecture, and the op test result -> JSON.

    python benchmarks/cuda_build_report.py BUILD_LOG TESTS_LOG --out benchmarks/results/cuda-build-check.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("build_log", type=Path)
    parser.add_argument("tests_log", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    build = args.build_log.read_text(errors="replace")
    tests = args.tests_log.read_text(errors="replace").strip().splitlines()
    resources, kernel = [], None
    for line in build.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line):
            kernel = {"kernel": m.group(1), "arch": m.group(2)}
        elif (m := re.search(r"Used (\d+) registers", line)) and kernel is not None:
            smem = re.search(r"(\d+) bytes smem", line)
            resources.append(
                {**kernel, "registers": int(m.group(1)), "smem_bytes": int(smem.group(1)) if smem else 0}
            )
        elif (
            m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)
        ) and kernel is not None:
            kernel.update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)))
    built = re.search(r"mplug_fast: built (\S+) in ([\d.]+) s", build)
    import mplug_fast._C  # noqa: F401  (the installed extension, registering the ops)

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": built.group(1) if built else None,
        "build_s": float(built.group(2)) if built else None,
        "cuda_kernels_registered": all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"mplug_fast::{op}", "CUDA")
            for op in ("beam_step", "reorder_caches")
        ),
        "ptxas": resources,
        "tests": tests[-1] if tests else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

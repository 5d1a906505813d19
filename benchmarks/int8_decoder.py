"""What the opt-in int8 decoder (`mplug_fast.inference.precision.quantize_decoder`) costs in accuracy and
gains in time on CPU, against the same model in fp32.

    python benchmarks/int8_decoder.py                                  # random weights, base, 384 px
    python benchmarks/int8_decoder.py --preset tiny --quick            # smoke run
    python benchmarks/int8_decoder.py --checkpoint runs/demo/vqa --task vqa          # a trained model:
    python benchmarks/int8_decoder.py --checkpoint runs/demo/caption --task caption  # its evaluation split

Random weights (`--checkpoint` not given): caption beam search (beam 5, min 8, max 25) over random images
with the preset's random-weight model; reported: the share of generated tokens equal to fp32's (position by
position on the best beam), the share of identical sequences, and the median time of both. Random weights
spread the logits thinly, so this is the hard case for int8 (near-ties flip).

Trained model (`--checkpoint` + `--task`): the task's evaluation (`mplug_fast.train.evaluation`) run twice,
fp32 and int8, on the run's evaluation split (the synthetic world's held-out scenes for the demo runs):
the metric of both and the share of identical predictions.

One thread by default (`--threads`). Output: JSON (.benchmarks/cpu-int8-decoder.json, or --out) and a
Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, machine_info, markdown_table  # noqa: E402

import mplug_fast  # noqa: E402
from mplug_fast.data import Tokenizer  # noqa: E402
from mplug_fast.inference.generate import caption_generate  # noqa: E402
from mplug_fast.inference.precision import quantize_decoder  # noqa: E402
from mplug_fast.modeling.layers import init_bert_weights  # noqa: E402
from mplug_fast.tasks import get_task  # noqa: E402
from mplug_fast.train.evaluation import load_for_evaluation, run_evaluation  # noqa: E402


def token_agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """a, b: long [B, L] best-beam ids -> (share of equal positions, share of equal rows)."""
    L = min(a.shape[1], b.shape[1])
    same = a[:, :L] == b[:, :L]
    rows = [torch.equal(x, y) for x, y in zip(a, b, strict=True)]
    return float(same.float().mean()), sum(rows) / len(rows)


def random_weights(args: argparse.Namespace) -> list[dict]:
    config = mplug_fast.get_config(args.preset)
    torch.manual_seed(0)
    model = get_task("caption").build_model(config).eval()
    model.apply(init_bert_weights)
    R = config.vision.image_size
    images = torch.rand(args.images, 3, R, R, generator=torch.Generator().manual_seed(1))
    q8 = quantize_decoder(copy.deepcopy(model))
    options = dict(beam_size=5, min_length=8, max_length=25)
    records, ids = [], {}
    for name, m in (("fp32", model), ("int8", q8)):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = caption_generate(m, images, **options)
            times.append((time.perf_counter() - t0) * 1e3)
        ids[name] = out.ids[:, 0]
        records.append(
            {"model": f"random {args.preset}", "variant": name, "ms_median": statistics.median(times)}
        )
    tokens, rows = token_agreement(ids["fp32"], ids["int8"])
    for r in records:
        r.update(token_agreement=tokens, sequence_agreement=rows, images=args.images)
    records[1]["speedup_vs_fp32"] = records[0]["ms_median"] / records[1]["ms_median"]
    return records


def trained(args: argparse.Namespace) -> list[dict]:
    model, config, _, _ = load_for_evaluation(args.checkpoint, args.task, None, [])
    model = model.float().eval()
    spec = get_task(args.task)
    records, predictions = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in (("fp32", model), ("int8", quantize_decoder(copy.deepcopy(model)))):
            out = Path(tmp) / name
            t0 = time.perf_counter()
            record = run_evaluation(
                m, Tokenizer(), config, args.task, device="cpu", out_dir=out, limit=args.limit
            )
            ms = (time.perf_counter() - t0) * 1e3
            predictions[name] = json.loads((out / spec.predictions_file).read_text())
            metrics = {k: v for k, v in record["metrics"].items() if isinstance(v, (int, float))}
            records.append(
                {"model": f"{args.task} {args.checkpoint}", "variant": name, "ms_total": ms, **metrics}
            )
    a, b = predictions["fp32"], predictions["int8"]
    same = sum(x == y for x, y in zip(a, b, strict=True)) / max(len(a), 1)
    for r in records:
        r.update(prediction_agreement=same, predictions=len(a))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="base", help="random-weight model preset (default: base)")
    parser.add_argument("--images", type=int, default=4, help="random images (default: 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 images, 1 repeat")
    parser.add_argument("--checkpoint", help="a trained run folder / step-*.pt instead of random weights")
    parser.add_argument("--task", default="vqa", help="the trained model's task (vqa, caption)")
    parser.add_argument("--limit", type=int, default=None, help="evaluation examples at most")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT_DIR / "cpu-int8-decoder.json")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats = 2, 1
    torch.set_num_threads(args.threads)
    records = trained(args) if args.checkpoint else random_weights(args)
    command = "python benchmarks/int8_decoder.py " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": machine_info(torch.device("cpu"), torch.float32, None),
                "command": command,
                "records": records,
            },
            indent=2,
        )
    )
    headers = sorted({k for r in records for k in r}, key=lambda k: (k not in ("model", "variant"), k))
    print(markdown_table(headers, [[r.get(h, "") for h in headers] for r in records]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

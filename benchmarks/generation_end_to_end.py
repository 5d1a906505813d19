"""Whole caption and VQA generation from pixels, ours against the official decoding loop (CPU, fp32).

    python benchmarks/generation_end_to_end.py                 # base, 384 px, batch 1 and 2, 1 thread
    python benchmarks/generation_end_to_end.py --quick         # tiny preset (smoke run)

Random weights (BERT init) and random images; official inference settings (caption: beam 5, min 8, max 25
from [CLS]; VQA: beam 5, max 10 over [image; 12-token question]). Ours: the public `caption_generate` /
`vqa_generate` (KV cache, memory K/V projected once, native beam step and small-row linears where built)
on the model in the decoder layout `mplug_fast.pipeline` loads (`--layout auto`: packed on AVX2 CPUs in
fp32; `mplug_fast.inference.layout`).
Official: the same model's encoders (their speed against the official encoders is
`benchmarks/stage_speed.py`'s), then the official loop of `generation_speed.official_beam_search` (no cache,
memory tiled per beam and re-projected every step). Both return the same ids (checked). Random weights never
emit [SEP]: every beam runs to max_length (the worst case). Timing: median of `--repeats` runs after a
warm-up for ours; the official loop takes minutes per run at base, so its check run is timed, plus
`--official-repeats` more runs. Output: JSON + Markdown table
(.benchmarks/cpu-generation-end-to-end.json, or --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, machine_info, markdown_table  # noqa: E402
from generation_speed import official_beam_search, time_ms  # noqa: E402

import mplug_fast  # noqa: E402
from mplug_fast.inference.generate import caption_generate, vqa_generate  # noqa: E402
from mplug_fast.inference.layout import LAYOUTS, pack_decoder, resolve_layout  # noqa: E402
from mplug_fast.modeling.layers import init_bert_weights  # noqa: E402
from mplug_fast.tasks import get_task  # noqa: E402

SETTINGS = {
    "caption": dict(beam_size=5, min_length=8, max_length=25),
    "vqa": dict(beam_size=5, min_length=1, max_length=10),
}


def sides(case: str, model, ours_model, images, q_ids, q_mask):
    """(ours, official) callables for one case, each returning the best ids per image (a list of lists):
    ours on `ours_model` (`model` in our decoder layout), the official loop on `model`."""
    kw = SETTINGS[case]
    start = torch.full((images.shape[0], 1), 101)

    def ours():
        if case == "caption":
            out = caption_generate(ours_model, images, **kw)
        else:
            out = vqa_generate(ours_model, images, q_ids, q_mask, **kw)
        return [out.ids[b, 0, : int(out.lengths[b, 0])].tolist() for b in range(images.shape[0])]

    def official():
        with torch.no_grad():
            if case == "caption":
                memory = model.encode_image(images)
                mask = torch.ones(memory.shape[:2], dtype=torch.bool)
            else:
                memory, mask = model.fused_memory(images, q_ids, q_mask)
            best = official_beam_search(model.decoder, memory, mask, start, kw["beam_size"], kw["max_length"],
                                        kw["min_length"])  # fmt: skip
        return [hyp[1].tolist() for hyp in best]

    return ours, official


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny preset")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cases", nargs="+", default=["caption", "vqa"], choices=["caption", "vqa"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--official-repeats",
        type=int,
        default=0,
        help="official runs timed besides the check run (0: it alone)",
    )
    parser.add_argument("--skip-official", action="store_true", help="time ours only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layout", choices=LAYOUTS, default="auto", help="our decoder's weight layout")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "cpu-generation-end-to-end.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = mplug_fast.get_config("tiny" if args.quick else "base")
    torch.manual_seed(0)
    models = {case: get_task(case).build_model(config).eval() for case in args.cases}
    for model in models.values():
        model.apply(init_bert_weights)
    layouts = {case: resolve_layout(args.layout, model) for case, model in models.items()}
    ours_models = {
        case: pack_decoder(copy.deepcopy(model)) if layouts[case] == "packed" else model
        for case, model in models.items()
    }
    R, records = config.vision.image_size, []
    for B in args.batch_sizes:
        g = torch.Generator().manual_seed(B)
        images = torch.randn(B, 3, R, R, generator=g)
        q_ids, q_mask = torch.randint(1000, 30000, (B, 12), generator=g), torch.ones(B, 12, dtype=torch.bool)
        q_mask[:, 9:] = False
        for case in args.cases:
            ours, official = sides(case, models[case], ours_models[case], images, q_ids, q_mask)
            first = ours()  # warm-up
            rec = {
                "case": case,
                "batch": B,
                "image_size": R,
                "layout": layouts[case],
                "ours_ms": statistics.median(time_ms(ours, args.repeats)),
            }
            rec |= {"official_ms": None, "official_over_ours": None, "same_ids": None}
            if not args.skip_official:  # minutes per run: the check run is timed too
                t0 = time.perf_counter()
                rec["same_ids"] = first == official()
                t_official = [(time.perf_counter() - t0) * 1e3] + time_ms(official, args.official_repeats)
                rec["official_ms"] = statistics.median(t_official)
                rec["official_over_ours"] = rec["official_ms"] / rec["ours_ms"]
            records.append(rec)
            print(f"{case} batch {B}: {rec}", flush=True)
    result = {
        "machine": machine_info(torch.device("cpu"), torch.float32, None),
        "command": "python benchmarks/generation_end_to_end.py " + " ".join(sys.argv[1:]),
        "threads": args.threads,
        "records": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    headers = ["case", "batch", "image_size", "layout", "official_ms", "ours_ms", "official_over_ours"]
    headers.append("same_ids")
    table = markdown_table(headers, [[r[h] for h in headers] for r in records])
    args.out.with_suffix(".md").write_text(f"`{result['command']}`\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()

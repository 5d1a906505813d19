"""`mplug-fast predict caption | vqa | ground | rank`: the pipeline from the command line.

    mplug-fast predict caption IMG [IMG ...]            --checkpoint DIR_OR_PTH [--beams 5 --max-length 25]
    mplug-fast predict vqa IMG "question"               --checkpoint ...
    mplug-fast predict ground IMG "referring expression" --checkpoint ...   -> x0 y0 x1 y1 in pixels
    mplug-fast predict rank --images IMG ... --texts TEXT ...   -> the best text per image and image per text

Common options: --checkpoint (a run folder, a save_pretrained folder, an official .pth or a trainer
step-*.pt; the kind found is named on stderr), --config (a preset name or a config file; alone: random
weights, for demos), --device, --dtype (auto: chosen from the machine), --quantize int8, --layout (the
decoder's weight layout; auto: chosen from the machine), --json (one JSON document on stdout),
--no-progress.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mplug_fast.cli.common import announce
from mplug_fast.inference.layout import LAYOUTS
from mplug_fast.pipeline import Pipeline, pipeline


def _add_common(parser: argparse.ArgumentParser, generation: bool = True) -> None:
    parser.add_argument(
        "--checkpoint", help="a run folder, a save_pretrained folder, an official .pth or a trainer step-*.pt"
    )
    parser.add_argument(
        "--config",
        help="preset name (tiny, base, large, huge) or config file; without --checkpoint: random weights",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (default: bf16 on CPUs with native bf16, else fp32; the checkpoint's on GPU), float32, "
        "bfloat16 or float16",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="int8 dynamic quantisation of the text decoder (CPU; opt-in: it changes the logits)",
    )
    parser.add_argument(
        "--layout",
        choices=list(LAYOUTS),
        default="auto",
        help="the text decoder's weight layout: auto (default: packed panels on AVX2 CPUs in float32, else "
        "plain), packed or plain",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per model call")
    if generation:
        parser.add_argument("--beams", type=int, default=None, help="beam size (official: 5)")
        parser.add_argument("--max-length", type=int, default=None, help="generated tokens at most")
        parser.add_argument("--min-length", type=int, default=None, help="generated tokens at least")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (default: one on stderr when the images need more than one batch)",
    )


def _pipeline(task: str, args: argparse.Namespace, **options) -> Pipeline:
    if args.checkpoint is None and args.config is None:
        raise ValueError("give --checkpoint (or --config for random weights)")
    pipe = pipeline(
        task,
        args.checkpoint,
        device=args.device,
        dtype=args.dtype,
        config=args.config,
        quantize=args.quantize,
        layout=args.layout,
        batch_size=args.batch_size,
        progress=None if args.progress else False,
        **options,
    )
    announce(f"{args.command} {args.what}", pipe.source)
    return pipe


def _generation_options(args: argparse.Namespace) -> dict:
    return {"beam_size": args.beams, "max_length": args.max_length, "min_length": args.min_length}


def _emit(args: argparse.Namespace, document, lines: list[str]) -> None:
    if args.json:
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write("".join(line + "\n" for line in lines))


def _caption(args: argparse.Namespace) -> int:
    pipe = _pipeline("caption", args, prompt=args.prompt, **_generation_options(args))
    captions = pipe.caption(list(args.images), method=args.method, seed=args.seed)
    doc = [{"image": img, "caption": c} for img, c in zip(args.images, captions)]
    _emit(args, doc, [f"{img}\t{c}" for img, c in zip(args.images, captions)])
    return 0


def _vqa(args: argparse.Namespace) -> int:
    answer_list = json.loads(Path(args.answer_list).read_text()) if args.answer_list else None
    pipe = _pipeline("answer", args, answer_list=answer_list, **_generation_options(args))
    answer = pipe.answer(args.image, args.question)
    _emit(args, {"image": args.image, "question": args.question, "answer": answer}, [answer])
    return 0


def _ground(args: argparse.Namespace) -> int:
    pipe = _pipeline("ground", args)
    box = [round(c, 2) for c in pipe.ground(args.image, args.expression)]
    _emit(
        args, {"image": args.image, "expression": args.expression, "box_xyxy": box}, [" ".join(map(str, box))]
    )
    return 0


def _rank(args: argparse.Namespace) -> int:
    pipe = _pipeline("rank", args)
    scores = pipe.rank(list(args.images), list(args.texts), k=args.k)
    best_text = scores.i2t.argmax(dim=1).tolist()
    best_image = scores.t2i.argmax(dim=1).tolist()
    doc = {
        "images": args.images,
        "texts": args.texts,
        "i2t": scores.i2t.tolist(),
        "t2i": scores.t2i.tolist(),
        "itc": scores.itc.tolist(),
        "best_text_per_image": best_text,
        "best_image_per_text": best_image,
    }
    lines = [f"{img}\t{args.texts[j]}" for img, j in zip(args.images, best_text)]
    lines += [f"{text}\t{args.images[i]}" for text, i in zip(args.texts, best_image)]
    _emit(args, doc, lines)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``predict`` with its caption, vqa, ground and rank sub-commands."""
    predict = commands.add_parser(
        "predict", help="run a model on images and text: caption, vqa, ground, rank"
    )
    commands = predict.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = commands.add_parser("caption", help="caption images")
    p.add_argument("images", nargs="+", metavar="IMG", help="image files")
    p.add_argument("--prompt", default="", help="decoder prompt, e.g. 'a picture of'")
    p.add_argument("--method", choices=("beam", "greedy", "sample"), default="beam")
    p.add_argument("--seed", type=int, default=None, help="seed of --method sample")
    _add_common(p)
    p.set_defaults(func=_caption)

    p = commands.add_parser("vqa", help="answer a question about an image")
    p.add_argument("image", metavar="IMG")
    p.add_argument("question")
    p.add_argument("--answer-list", help="JSON list of answers to rank instead of generating")
    _add_common(p)
    p.set_defaults(func=_vqa)

    p = commands.add_parser("ground", help="box of the object a phrase refers to (x0 y0 x1 y1 pixels)")
    p.add_argument("image", metavar="IMG")
    p.add_argument("expression")
    _add_common(p, generation=False)
    p.set_defaults(func=_ground)

    p = commands.add_parser("rank", help="image-text retrieval scores (ITC top-k, ITM rerank)")
    p.add_argument("--images", nargs="+", required=True, metavar="IMG")
    p.add_argument("--texts", nargs="+", required=True, metavar="TEXT")
    p.add_argument("--k", type=int, default=None, help="ITM-reranked candidates per query (official 256)")
    _add_common(p, generation=False)
    p.set_defaults(func=_rank)

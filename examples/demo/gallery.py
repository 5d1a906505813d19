"""The gallery: every served task's prediction on a few held-out scenes, drawn on the upscaled images."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from mplug_fast.data import Tokenizer
from mplug_fast.data.synthetic import SyntheticWorld
from mplug_fast.metrics.boxes import box_cxcywh_to_xyxy, box_iou_aligned
from mplug_fast.tasks import from_pretrained, get_task

from .settings import DemoSettings

GALLERY_METHODS = ("answer", "caption", "rank", "ground")  # the pipeline methods the gallery draws


def _font(size: int):

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font: Any, width: int, draw: Any) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}" if line else word
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = "  " + word
        else:
            line = trial
    return lines + ([line] if line else [])


def gallery_predictions(
    configs: dict[str, Any], evals: dict[str, dict[str, Any]], out: Path, settings: DemoSettings
) -> list[dict[str, Any]]:
    """Every task model's prediction on the first ``gallery_images`` held-out scenes of the gallery world,
    obtained with the tasks' own evaluate functions (same options as the evaluation)."""

    tokenizer = Tokenizer()
    world = dataclasses.asdict(configs[settings.gallery_world].data.synthetic)
    n = min(settings.gallery_images, world["eval_scenes"])
    w = SyntheticWorld.from_config(world)
    rows = [{"scene": w.scene(world["num_scenes"] + k)} for k in range(n)]
    for task in settings.finetunes:
        spec = get_task(task)
        method = spec.pipeline_method  # what the gallery shows: the stages the pipeline serves
        if method not in GALLERY_METHODS:
            continue
        model = from_pretrained(out / task / "model", task=task)
        # ranking uses the texts of more scenes than the gallery shows (its first n are these)
        scenes = min(world["eval_scenes"], max(n, settings.quick_eval_scenes)) if method == "rank" else n
        dataset = spec.synthetic_dataset("test", **{**world, "eval_scenes": scenes})
        with tempfile.TemporaryDirectory() as tmp:
            output = Path(tmp) / "predictions.json"
            with torch.no_grad():
                result = spec.evaluate(
                    model,
                    dataset,
                    tokenizer,
                    batch_size=evals[task]["batch_size"],
                    device="cpu",
                    output=output,
                    **evals[task]["options"],
                )
            written = json.loads(output.read_text())
        for k, row in enumerate(rows):
            if method == "answer":
                item = dataset[k]
                row["question"], row["gold_answer"] = item["question"], item["answers"][0]
                row["answer"] = result["predictions"][item["question_id"]]
            elif method == "caption":
                row["caption"] = result["predictions"][row["scene"].index]
            elif method == "rank":
                top = written["i2t"][k][0]
                row["retrieved"], row["retrieved_correct"] = dataset.texts[top], top in dataset.img2txt[k]
            else:
                item = dataset[k]
                row["expression"] = item["expression"]
                row["gold_box"] = item["box"].tolist()
                row["box"] = result["boxes"][k].tolist()
    return rows


def draw_gallery(rows: list[dict[str, Any]], directory: Path, size: int) -> list[Path]:
    """One PNG per gallery row: the scene upscaled (nearest) to ``size`` px with the gold (green) and
    predicted (red) grounding boxes, and a text panel with the predictions."""

    directory.mkdir(parents=True, exist_ok=True)
    font, small = _font(15), _font(13)
    panel, pad = 430, 10
    paths = []
    for row in rows:
        scene = row["scene"]
        image = scene.image().convert("RGB")
        scale = max(1, size // image.width)
        side = image.width * scale
        canvas = Image.new("RGB", (side + panel, max(side, 300)), "white")
        canvas.paste(image.resize((side, side), Image.NEAREST), (0, 0))
        draw = ImageDraw.Draw(canvas)
        ok, bad, ink = (0, 130, 0), (200, 0, 0), (20, 20, 20)
        blocks = [(f"held-out scene {scene.index}", ink, small)]
        if "caption" in row:
            blocks.append((f"caption: {row['caption']}", ink, font))
        if "answer" in row:
            answer_ok = row["answer"].strip().lower() == row["gold_answer"].strip().lower()
            blocks.append((f"Q: {row['question']}", ink, font))
            blocks.append(
                (f"A: {row['answer']}   (gold: {row['gold_answer']})", ok if answer_ok else bad, font)
            )
        if "retrieved" in row:
            blocks.append(
                (f"retrieval top-1: {row['retrieved']}", ok if row["retrieved_correct"] else bad, font)
            )
        if "box" in row:
            gold = box_cxcywh_to_xyxy(torch.tensor([row["gold_box"]], dtype=torch.float64))
            pred = box_cxcywh_to_xyxy(torch.tensor([row["box"]], dtype=torch.float64)).clamp(0, 1)
            iou = row["iou"] = float(box_iou_aligned(pred, gold).nan_to_num(0.0)[0])
            for box, colour, width in ((gold, (0, 200, 0), 3), (pred, (230, 0, 0), 2)):
                x0, y0, x1, y1 = (box[0] * side).tolist()
                draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=width)
            blocks.append((f"grounding: {row['expression']}", ink, font))
            blocks.append(
                (f"IoU {iou:.2f}  (gold box green, predicted red)", ok if iou >= 0.5 else bad, small)
            )
        y = pad
        for text, colour, f in blocks:
            for line in _wrap(text, f, panel - 2 * pad, draw):
                draw.text((side + pad, y), line, fill=colour, font=f)
                y += f.size + 5 if hasattr(f, "size") else 16
            y += 6
        path = directory / f"scene_{scene.index}.png"
        canvas.save(path)
        paths.append(path)
    return paths

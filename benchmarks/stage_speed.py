"""Every stage of the model against the official computation on the same weights and inputs (CPU).

    python benchmarks/stage_speed.py                      # base, 384 px, batch 2, 1 thread
    python benchmarks/stage_speed.py --image-size 224     # faster
    python benchmarks/stage_speed.py --quick              # small dims (smoke run)

The official side is the official forward written from the spec over a state dict in the official layout
(`tests/checkpoint/official_layout.py`, the oracle of the checkpoint tests: BERT layers with separate
query / key / value projections, explicit softmax attention and additive -10000 masks, as the official MM
BERT computes them), except the vision tower, which is run here as the official CLIP block runs it:
sequence-first `nn.MultiheadAttention` math through `F.multi_head_attention_forward(need_weights=False)`
(which dispatches to fused attention in current torch, as the official code would). Ours: the same state
dict loaded with `load_official_checkpoint`, through the public modules.

Stages (batch B, text 30 tokens, caption 25 tokens): vision (image tokens), text encoder, fusion (6 layers
over [image; text]), teacher-forced decoder (captioning: memory = image tokens), caption training forward
(vision + decoder + token cross-entropy, no grad) and caption training step (the same with backward;
dropout off on both sides: the oracle has none).
Outputs are compared first (max abs difference / max abs official output). Timing: median of `--repeats`
runs after one warm-up, the two sides interleaved; `official / ours` > 1 means ours is faster. Output: JSON +
Markdown table (.benchmarks/cpu-stages.json, or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import OUT_DIR, machine_info, markdown_table  # noqa: E402

from mplug_fast.tasks import load_official_checkpoint  # noqa: E402
from tests.checkpoint.official_layout import (  # noqa: E402
    OfficialDims,
    _lin,
    _ln,
    make_official_state_dict,
    official_decoder_logits,
    official_fusion,
    official_text_encoder,
)


def official_vision_mha(sd: dict, d: OfficialDims, images: torch.Tensor) -> torch.Tensor:
    """The official CLIP VisualTransformer as it runs: LND layout, `nn.MultiheadAttention` math."""
    v = "visual_encoder.visual."
    x = F.conv2d(images, sd[v + "conv1.weight"], stride=d.patch)  # [B, W, g, g]
    B, W = x.shape[:2]
    x = x.reshape(B, W, -1).permute(0, 2, 1)
    x = torch.cat([sd[v + "class_embedding"] + torch.zeros(B, 1, W), x], dim=1)
    x = _ln(x + sd[v + "positional_embedding"][: x.shape[1]], sd, v + "ln_pre", 1e-5).permute(1, 0, 2)
    for i in range(d.vision_layers):
        p = f"{v}transformer.resblocks.{i}."
        h = _ln(x, sd, p + "ln_1", 1e-5)
        a = F.multi_head_attention_forward(
            h, h, h, W, W // 64, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None,
            False, 0.0, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], need_weights=False,
        )[0]  # fmt: skip
        x = x + a
        h = _lin(_ln(x, sd, p + "ln_2", 1e-5), sd, p + "mlp.c_fc")
        x = x + _lin(h * torch.sigmoid(1.702 * h), sd, p + "mlp.c_proj")
    return _ln(x.permute(1, 0, 2), sd, v + "ln_post", 1e-5)


def scaled_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout's random weights (std 0.2) scaled to BERT's init (0.02) for the matrices: at base width
    std 0.2 saturates every softmax, and the two sides' rounding then moves the outputs far apart. Tensors
    shared by several keys stay shared (the decoder's LM head is its word embedding, as in the official
    model, so the official training step also sums the two gradients of that weight)."""
    scaled: dict[int, torch.Tensor] = {}
    for t in sd.values():
        if id(t) not in scaled:
            scaled[id(t)] = t * 0.1 if t.dim() >= 2 else t
    return {k: scaled[id(t)] for k, t in sd.items()}


def caption_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of captioning (logits [B, L, V] predict ids[:, 1:])."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median ms per side; one warm-up call each, then `repeats` rounds alternating the sides."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small dims, 64 px")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "cpu-stages.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        d, res, heads, slots = OfficialDims(), 64, 4, 6
    else:
        res, heads, slots = args.image_size, 12, 12
        d = OfficialDims(width=768, vision_layers=12, patch=16, grid=24, hidden=768, heads=12,
                         intermediate=3072, vocab=30522, max_pos=512, text_layers=6, slots=12,
                         fusion_layers=6, decoder_layers=12, clip_text_width=64, embed_dim=64)  # fmt: skip
    sd = scaled_state_dict(make_official_state_dict(d))
    bert = {"num_attention_heads": heads, "fusion_layers": d.fusion_layers, "num_hidden_layers": slots}
    stride = 3
    vqa = load_official_checkpoint(sd, "vqa", bert_config={**bert, "stride_layer": stride}, image_res=res)
    cap = load_official_checkpoint(sd, "caption", bert_config={**bert, "stride_layer": stride}, image_res=res)
    if res != d.grid * d.patch:  # the official side at the same resolution: the resized table ours loaded
        sd = dict(sd, **{"visual_encoder.visual.positional_embedding": cap.vision.pos_embed.detach().clone()})
    B, g = args.batch, torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, res, res, generator=g)
    q_ids, q_mask = torch.randint(d.vocab // 2, d.vocab, (B, 30), generator=g), torch.ones(B, 30)
    q_mask[1, 20:] = 0
    c_ids, c_mask = torch.randint(d.vocab // 2, d.vocab, (B, 25), generator=g), torch.ones(B, 25)
    with torch.no_grad():
        v_off = official_vision_mha(sd, d, images)
        t_off = official_text_encoder(sd, d, q_ids, q_mask)
        v_ours, t_ours = vqa.encode_image(images), vqa.encode_text(q_ids, q_mask)
    zeros = torch.zeros(B, 1, 1, v_off.shape[1])

    def ours_caption_loss():
        return caption_loss(cap(images, c_ids, c_mask), c_ids)

    def official_caption_loss():
        memory = official_vision_mha(sd, d, images)
        return caption_loss(official_decoder_logits(sd, d, c_ids, c_mask, memory, zeros), c_ids)

    def with_backward(fn):
        def run():
            loss = fn()
            loss.backward()
            return loss

        return run

    params = [
        t for k, t in sd.items() if k.startswith(("visual_encoder", "text_decoder")) and t.is_floating_point()
    ]
    stages = {  # name: (ours, official, autograd)
        "vision": (
            lambda: cap.encode_image(images),
            lambda: official_vision_mha(sd, d, images),
            False,
        ),
        "text encoder": (
            lambda: vqa.encode_text(q_ids, q_mask),
            lambda: official_text_encoder(sd, d, q_ids, q_mask),
            False,
        ),
        "fusion": (
            lambda: vqa.fuse(v_ours, t_ours, q_mask)[1],
            lambda: official_fusion(sd, d, stride, v_off, t_off, q_mask)[1],
            False,
        ),
        "decoder (teacher-forced)": (
            lambda: cap.decode(c_ids, c_mask, v_ours),
            lambda: official_decoder_logits(sd, d, c_ids, c_mask, v_off, zeros),
            False,
        ),
        "caption training forward": (ours_caption_loss, official_caption_loss, False),
        "caption training step": (
            with_backward(ours_caption_loss),
            with_backward(official_caption_loss),
            True,
        ),
    }
    records = []
    for name, (ours, official, grad) in stages.items():
        for p in params:
            p.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            a, b = ours(), official()
            a, b = a.detach(), b.detach()
            diff = float((a - b).abs().max() / b.abs().max())  # relative to the output's scale
            ms = timed({"ours": ours, "official": official}, args.repeats)
        cap.zero_grad(set_to_none=True)
        for p in params:
            p.grad = None
        rec = {"stage": name, "official_ms": ms["official"], "ours_ms": ms["ours"],
               "official_over_ours": ms["official"] / ms["ours"], "max_rel_diff": diff}  # fmt: skip
        records.append(rec)
        print(f"{name:26s} official {ms['official']:9.1f} ms  ours {ms['ours']:9.1f} ms  "
              f"{rec['official_over_ours']:.2f}x  (max diff {diff:.1e})", flush=True)  # fmt: skip
    setting = {
        "image_size": res,
        "batch": B,
        "threads": args.threads,
        "dims": vars(d),
        "repeats": args.repeats,
    }
    result = {
        "machine": machine_info(torch.device("cpu"), torch.float32, None),
        "setting": setting,
        "command": "python benchmarks/stage_speed.py " + " ".join(sys.argv[1:]),
        "records": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    headers = ["stage", "official_ms", "ours_ms", "official_over_ours", "max_rel_diff"]
    table = markdown_table(headers, [[r[h] for h in headers] for r in records])
    args.out.with_suffix(".md").write_text(f"`{result['command']}`\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()

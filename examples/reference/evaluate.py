"""Prompt adherence of the reference model, measured automatically.

For each prompt the dominant colour of the bright pixels and the motion of the shape's
centroid / area across frames are measured and compared with the ground truth that the
prompt (i.e. the data generator's attributes) implies:

- colour: mean RGB of the shape pixels, nearest palette colour;
- motion: growing / shrinking (area ratio last/first), bouncing (vertical excursion that
  comes back), static (no drift), or moving left/right/up/down (sign of the dominant axis of
  the least-squares centroid velocity); the speed (slow/fast) is reported separately.

A video adheres when colour and motion class (including direction) are both right.

    python -m examples.reference.evaluate --n 52 --steps 30 --guidance 3.0
    python -m examples.reference.evaluate --check-data      # the measurement on real data

(from the repository root).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .data import COLOURS, ShapeSpec, all_specs, render

PALETTE = torch.tensor(list(COLOURS.values()))
NAMES = list(COLOURS)
MOTION_CLASSES = ("static", "left", "right", "up", "down", "bouncing", "growing", "shrinking")


def truth(spec: ShapeSpec) -> dict:
    motion = spec.direction if spec.motion == "moving" else spec.motion
    return {"colour": spec.colour, "motion": motion, "speed": spec.speed if spec.motion == "moving" else None}


def measure(video: torch.Tensor) -> dict:
    """Measure one video ``(3, F, H, W)`` in [-1, 1]."""
    img = ((video.float() + 1) / 2).clamp(0, 1)
    bright = img.max(dim=0).values  # (F, H, W)
    w = ((bright - 0.3) / 0.4).clamp(0, 1)
    area = w.sum(dim=(1, 2))  # (F,)
    total = w.sum()
    if total < 1.0 or (area < 0.5).any():
        return {"colour": None, "motion": None, "speed": None, "empty": True}
    rgb = (img * w).sum(dim=(1, 2, 3)) / total
    # compare chromaticity: normalise by the brightest channel
    rgb_n = rgb / rgb.max().clamp_min(1e-6)
    colour = NAMES[int(torch.cdist(rgb_n[None], PALETTE).argmin())]
    f, h, wd = bright.shape
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(wd) + 0.5, indexing="ij")
    cx = (w * xs).sum(dim=(1, 2)) / area
    cy = (w * ys).sum(dim=(1, 2)) / area
    t = torch.arange(f, dtype=torch.float32)
    tc = t - t.mean()
    vx = float((tc * (cx - cx.mean())).sum() / (tc**2).sum())
    vy = float((tc * (cy - cy.mean())).sum() / (tc**2).sum())
    a0, a1 = float(area[:2].mean()), float(area[-2:].mean())
    y_range = float(cy.max() - cy.min())
    y_net = abs(float(cy[-1] - cy[0]))
    x_range = float(cx.max() - cx.min())
    speed = None
    if a1 / a0 > 2.0:
        motion = "growing"
    elif a1 / a0 < 0.5:
        motion = "shrinking"
    elif y_range > 5.0 and y_net < 0.5 * y_range and x_range < 0.5 * y_range:
        motion = "bouncing"
    elif max(abs(vx), abs(vy)) < 0.35:
        motion = "static"
    else:
        if abs(vx) >= abs(vy):
            motion = "right" if vx > 0 else "left"
        else:
            motion = "down" if vy > 0 else "up"
        speed = "fast" if max(abs(vx), abs(vy)) > 1.4 else "slow"
    return {"colour": colour, "motion": motion, "speed": speed, "empty": False,
            "velocity": [round(vx, 3), round(vy, 3)], "area_ratio": round(a1 / a0, 3), "y_range": round(y_range, 2)}


def eval_specs(n: int, seed: int = 0) -> list[ShapeSpec]:
    """``n`` prompts, balanced over the 13 motions, colours and shapes (deterministic)."""
    specs = all_specs()
    by_motion: dict[str, list[ShapeSpec]] = {}
    for s in specs:
        by_motion.setdefault(s.prompt.split(" ", 2)[2], []).append(s)
    g = torch.Generator().manual_seed(seed)
    for k in by_motion:
        perm = torch.randperm(len(by_motion[k]), generator=g).tolist()
        by_motion[k] = [by_motion[k][i] for i in perm]
    keys = list(by_motion)
    out, i = [], 0
    while len(out) < n:
        k = keys[i % len(keys)]
        out.append(by_motion[k][(i // len(keys)) % len(by_motion[k])])
        i += 1
    return out


def score(measured: list[dict], specs: list[ShapeSpec]) -> dict:
    rows, ok_c, ok_m, ok_all, sp_n, sp_ok = [], 0, 0, 0, 0, 0
    for m, s in zip(measured, specs):
        gt = truth(s)
        c = m["colour"] == gt["colour"]
        mo = m["motion"] == gt["motion"]
        ok_c += c
        ok_m += mo
        ok_all += c and mo
        if gt["speed"] is not None and mo:
            sp_n += 1
            sp_ok += m["speed"] == gt["speed"]
        rows.append({"prompt": s.prompt, "measured": m, "colour_ok": c, "motion_ok": mo})
    n = max(1, len(specs))
    return {"n": len(specs), "adherence": ok_all / n, "colour_acc": ok_c / n, "motion_acc": ok_m / n,
            "speed_acc_given_direction": (sp_ok / sp_n) if sp_n else None, "rows": rows}


def check_data(n: int = 234, seed: int = 0) -> dict:
    """The measurement applied to the generator's own videos (should be ~100%)."""
    g = torch.Generator().manual_seed(seed)
    specs = eval_specs(n, seed)
    vids = [render(s, g)[0] for s in specs]
    return score([measure(v) for v in vids], specs)


def generate(transformer, tokenizer, specs, steps=30, guidance=3.0, seed=0, batch=16, model_fn=None, progress=None,
             shift=None):
    from .model import make_scheduler, sample

    out = []
    for i in range(0, len(specs), batch):
        chunk = specs[i:i + batch]
        emb = tokenizer([s.prompt for s in chunk])
        neg = tokenizer([""] * len(chunk))
        seeds = [seed + i + j for j in range(len(chunk))]
        out.append(sample(transformer, emb, num_steps=steps, seed=seeds, guidance_scale=guidance,
                          negative_prompt_embeds=neg, model_fn=model_fn,
                          scheduler=make_scheduler(shift)))
        if progress:
            progress(i + len(chunk), len(specs))
    return torch.cat(out)


def save_grid(videos: torch.Tensor, prompts: list[str], path, scale: int = 3):
    """PNG grid: one row per video (prompt on the left), one column per frame."""
    from PIL import Image, ImageDraw

    b, _, f, h, w = videos.shape
    label_w, pad = 230, 2
    W = label_w + f * (w * scale + pad)
    H = b * (h * scale + pad)
    im = Image.new("RGB", (W, H), (40, 40, 40))
    dr = ImageDraw.Draw(im)
    arr = (((videos.clamp(-1, 1) + 1) / 2) * 255).round().byte().permute(0, 2, 3, 4, 1).numpy()
    for i in range(b):
        y = i * (h * scale + pad)
        dr.text((4, y + h * scale // 2 - 6), prompts[i], fill=(230, 230, 230))
        for j in range(f):
            tile = Image.fromarray(arr[i, j]).resize((w * scale, h * scale), Image.NEAREST)
            im.paste(tile, (label_w + j * (w * scale + pad), y))
    im.save(path)
    return path


def main():
    ap = argparse.ArgumentParser(prog="python -m examples.reference.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=52)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shift", type=float, default=None, help="scheduler shift (default: config.json)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--weights", type=str, default=None)
    ap.add_argument("--grid", type=str, default=None, help="also save a sample grid PNG of the first 13")
    ap.add_argument("--json", type=str, default=None, help="write the full result here")
    ap.add_argument("--check-data", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.check_data:
        r = check_data(a.n if a.n != 52 else 234, a.seed)
        bad = [x for x in r["rows"] if not (x["colour_ok"] and x["motion_ok"])]
        print(json.dumps({k: v for k, v in r.items() if k != "rows"}, indent=1))
        for x in bad[:10]:
            print(x)
        return
    from .model import load_reference_model

    transformer, tokenizer = load_reference_model(weights=a.weights)
    specs = eval_specs(a.n, a.seed)
    t0 = time.time()
    vids = generate(transformer, tokenizer, specs, a.steps, a.guidance, a.seed, shift=a.shift,
                    progress=lambda i, n: print(f"  {i}/{n} videos, {time.time() - t0:.0f}s", file=sys.stderr))
    r = score([measure(v) for v in vids], specs)
    r.update({"steps": a.steps, "guidance": a.guidance, "shift": a.shift, "seed": a.seed, "seconds": round(time.time() - t0, 1)})
    summary = {k: v for k, v in r.items() if k != "rows"}
    print(json.dumps(summary, indent=1))
    for x in r["rows"]:
        if not (x["colour_ok"] and x["motion_ok"]):
            m = x["measured"]
            print(f"  miss: {x['prompt']!r}: measured {m.get('colour')} {m.get('motion')} {m.get('speed')}"
                  f" v={m.get('velocity')} area_ratio={m.get('area_ratio')}")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1) + "\n")
    if a.grid:
        k = min(13, len(specs))
        save_grid(vids[:k], [s.prompt for s in specs[:k]], a.grid)
        print("grid:", a.grid)


if __name__ == "__main__":
    main()

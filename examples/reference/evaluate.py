"""Prompt adherence of the reference model, measured automatically and robustly.

Each video ``(3, F, H, W)`` is reduced to one track: per frame, the **largest connected
component** of the bright pixels (8-connected, brightness > 0.5 on [0, 1]) gives a
brightness-weighted centroid (cx, cy) and a size r = sqrt(area / pi). Then:

- **colour**: mean RGB of the tracked components' pixels, normalised by the brightest
  channel, nearest palette colour;
- **persistence**: a shape (component of at least ``MIN_AREA`` px) in every frame. Motion
  is still measured when a frame or two are empty (at least ``MIN_FRAMES`` frames needed), so
  one faint frame costs persistence, not motion;
- **motion**: trajectory templates fitted by least squares to (cx, cy, r) over the frames
  that hold a shape: *static / linear* (free start and velocity, constant size), *bouncing*
  (constant x, y = floor - amp |sin(pi n t / (F - 1))|, n = 1 or 2 bounces, constant size),
  *radius ramp* (fixed centre, r linear in t: growing / shrinking). Each fit's residual is the
  RMS per-frame distance in pixels between the track and the template. Decision: a radius
  ramp of at least ``MIN_DR`` px that fits best -> growing / shrinking; else a bounce of
  amplitude at least ``MIN_AMP`` px that halves the linear residual -> bouncing (slow: 1
  bounce, fast: 2); else linear -> static below ``STATIC_SPEED`` px/frame, else the direction
  of the dominant axis (slow / fast split at ``FAST_SPEED``). A track whose chosen template
  leaves a residual above ``REJECT_RESIDUAL`` px (jumps, flicker, shapes that change
  size while they move) is **rejected** ("incoherent"). That threshold is calibrated on
  ground truth (``calibrate()``: twice the 99th percentile of the true template's residual
  over clean, noisy, blurred and jittered ground truth, from seeds the evaluation does not use).

Scores (each also given as counts): colour, persistence, motion class (8 classes), direction
(moving prompts only), speed given the direction, and **adherence = colour and motion right**
(``adherence_strict`` also needs persistence), with a confusion matrix of the motion classes
(rows: prompted, columns: measured, plus ``incoherent`` and ``empty``).

Every score is printed beside the same measurement on **controls** built from ground truth
for the same prompts and seeds: clean, pixel noise (std 0.3), blur (Gaussian, sigma 1),
sub-pixel jitter (+-0.5 px per frame), which should score ~100%; and shuffled frames,
reversed frames and independently rendered frames (a new start per frame), the "no temporal
coherence" levels (not all 0%: a reversed static or bouncing clip is still right).

    python -m examples.reference.evaluate --steps 30 --guidance 3      # all 234 prompts
    python -m examples.reference.evaluate --check-data                 # the controls only

(from the repository root).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import COLOURS, DIRECTIONS, ShapeSpec, _coverage, all_specs, render, trajectory

PALETTE = torch.tensor(list(COLOURS.values()))
NAMES = list(COLOURS)
MOTION_CLASSES = ("static", "left", "right", "up", "down", "bouncing", "growing", "shrinking")
MEASURED_CLASSES = MOTION_CLASSES + ("incoherent", "empty")

THRESHOLD = 0.5       # brightness on [0, 1] for the shape mask
MIN_AREA = 4.0        # px: a frame "holds a shape"
MIN_FRAMES = 6        # frames with a shape needed to measure motion
STATIC_SPEED = 0.35   # px/frame
FAST_SPEED = 1.4      # px/frame (slow 0.8, fast 2.0)
MIN_AMP = 4.0         # px (bounces are 9-12 px)
MIN_DR = 2.0          # px of radius change over the clip (ground truth: 4.5-7)
REJECT_RESIDUAL = 1.0  # px; calibrate() recomputes it (--calibrate): 0.996 px, i.e. 2 x 0.498
CONTROLS = ("gt", "gt_noise", "gt_blur", "gt_jitter", "shuffled", "reversed", "independent")


def truth(spec: ShapeSpec) -> dict:
    motion = spec.direction if spec.motion == "moving" else spec.motion
    return {"colour": spec.colour, "motion": motion, "speed": spec.speed if spec.motion in ("moving", "bouncing") else None}


# ----------------------------------------------------------------------------- tracking
def largest_components(mask: torch.Tensor) -> torch.Tensor:
    """``(F, H, W)`` bool -> bool mask of each frame's largest 8-connected component."""
    f, h, w = mask.shape
    m = mask.float()[:, None]
    lab = (torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w).expand(f, 1, h, w)) * m
    for _ in range(h * w):
        new = F.max_pool2d(lab, 3, stride=1, padding=1) * m
        if torch.equal(new, lab):
            break
        lab = new
    lab = lab[:, 0].long()  # (F, H, W), 0 = background
    out = torch.zeros_like(mask)
    for i in range(f):
        ids = lab[i][lab[i] > 0]
        if ids.numel() == 0:
            continue
        vals, counts = torch.unique(ids, return_counts=True)
        out[i] = lab[i] == vals[counts.argmax()]
    return out


def track(video: torch.Tensor) -> dict:
    """Per-frame centroid, size and presence of the largest bright component."""
    img = ((video.float() + 1) / 2).clamp(0, 1)
    bright = img.max(dim=0).values  # (F, H, W)
    comp = largest_components(bright > THRESHOLD)
    w = bright * comp
    area = w.sum(dim=(1, 2))
    f, h, wd = bright.shape
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(wd) + 0.5, indexing="ij")
    a = area.clamp_min(1e-6)
    cx = (w * xs).sum(dim=(1, 2)) / a
    cy = (w * ys).sum(dim=(1, 2)) / a
    present = area >= MIN_AREA
    rgb = (img * w).sum(dim=(1, 2, 3)) / w.sum().clamp_min(1e-6)
    # more than one shape: the second-largest bright blob (outside the largest) per frame
    rest = ((bright > THRESHOLD) & ~comp).float().sum(dim=(1, 2))
    return {"cx": cx, "cy": cy, "r": torch.sqrt(area / math.pi), "area": area, "present": present, "rgb": rgb,
            "extra_area": rest}


# ----------------------------------------------------------------------------- templates
def _lstsq(A: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(A.double(), y.double()[:, None]).solution[:, 0].float()


def fit_templates(t: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, frames: int) -> dict:
    """Least-squares fits; residual = RMS per-frame distance (px) between track and template."""
    n = t.shape[0]
    one = torch.ones(n)
    A_lin = torch.stack([one, t], dim=1)

    def rms(ex, ey, er):
        return float(torch.sqrt((ex**2 + ey**2 + er**2).mean()))

    out = {}
    # static / linear (constant size)
    px, py = _lstsq(A_lin, cx), _lstsq(A_lin, cy)
    ex, ey, er = cx - A_lin @ px, cy - A_lin @ py, r - r.mean()
    out["linear"] = {"residual": rms(ex, ey, er), "vx": float(px[1]), "vy": float(py[1]),
                     "x0": float(px[0]), "y0": float(py[0])}
    out["static"] = {"residual": rms(cx - cx.mean(), cy - cy.mean(), er)}
    # bouncing: cx constant, cy = floor - amp * |sin(pi n t / (F - 1))|
    best = None
    for nb in (1, 2):
        s = torch.abs(torch.sin(math.pi * nb * t / (frames - 1)))
        A = torch.stack([one, -s], dim=1)
        p = _lstsq(A, cy)
        if p[1] < 0:  # amplitude must be positive (an upward excursion)
            p = torch.tensor([float(cy.mean()), 0.0])
        res = rms(cx - cx.mean(), cy - A @ p, er)
        if best is None or res < best["residual"]:
            best = {"residual": res, "bounces": nb, "amp": float(p[1])}
    out["bouncing"] = best
    # radius ramp: fixed centre, r linear in t
    pr = _lstsq(A_lin, r)
    out["ramp"] = {"residual": rms(cx - cx.mean(), cy - cy.mean(), r - A_lin @ pr),
                   "dr": float(pr[1]) * (frames - 1)}
    return out


def classify(fits: dict, reject: float = None) -> tuple[str, str | None, str]:
    """-> (motion class or "incoherent", speed or None, template used)."""
    reject = REJECT_RESIDUAL if reject is None else reject
    lin, bo, ra = fits["linear"], fits["bouncing"], fits["ramp"]
    if abs(ra["dr"]) >= MIN_DR and ra["residual"] <= min(lin["residual"], bo["residual"]):
        motion, speed, tpl = ("growing" if ra["dr"] > 0 else "shrinking"), None, "ramp"
    elif bo["amp"] >= MIN_AMP and bo["residual"] < 0.5 * lin["residual"]:
        motion, speed, tpl = "bouncing", ("slow" if bo["bounces"] == 1 else "fast"), "bouncing"
    else:
        vx, vy = lin["vx"], lin["vy"]
        v = max(abs(vx), abs(vy))
        if v < STATIC_SPEED:
            motion, speed, tpl = "static", None, "static"
        else:
            tpl = "linear"
            if abs(vx) >= abs(vy):
                motion = "right" if vx > 0 else "left"
            else:
                motion = "down" if vy > 0 else "up"
            speed = "fast" if v > FAST_SPEED else "slow"
    # the rejection test uses the linear fit for "static" too (a drifting "static" is judged by speed)
    res = fits["linear" if tpl == "static" else tpl]["residual"]
    if res > reject:
        return "incoherent", None, tpl
    return motion, speed, tpl


def measure(video: torch.Tensor, reject: float | None = None) -> dict:
    """Measure one video ``(3, F, H, W)`` in [-1, 1]: colour, persistence, motion (see module doc)."""
    tr = track(video)
    f = video.shape[1]
    present = tr["present"]
    n_present = int(present.sum())
    persistent = n_present == f
    if n_present == 0:
        return {"colour": None, "motion": "empty", "speed": None, "empty": True, "persistent": False,
                "frames_with_shape": 0}
    rgb = tr["rgb"]
    rgb_n = rgb / rgb.max().clamp_min(1e-6)
    colour = NAMES[int(torch.cdist(rgb_n[None], PALETTE).argmin())]
    res = {"colour": colour, "persistent": persistent, "frames_with_shape": n_present, "empty": False,
           "multi_shape_frames": int((tr["extra_area"] >= MIN_AREA).sum())}
    if n_present < MIN_FRAMES:
        res.update({"motion": "empty", "speed": None})
        return res
    t = torch.arange(f, dtype=torch.float32)[present]
    fits = fit_templates(t, tr["cx"][present], tr["cy"][present], tr["r"][present], f)
    motion, speed, tpl = classify(fits, reject)
    lin = fits["linear"]
    res.update({"motion": motion, "speed": speed, "template": tpl,
                "residual": round(fits["linear" if tpl == "static" else tpl]["residual"], 3),
                "velocity": [round(lin["vx"], 3), round(lin["vy"], 3)],
                "bounce_amp": round(fits["bouncing"]["amp"], 2), "radius_change": round(fits["ramp"]["dr"], 2),
                "start": [round(float(tr["cx"][present][0]), 2), round(float(tr["cy"][present][0]), 2)]})
    return res


# ----------------------------------------------------------------------------- scoring
def eval_specs(n: int = 234, seed: int = 0) -> list[ShapeSpec]:
    """``n`` prompts, balanced over the 13 motions, colours and shapes (deterministic);
    ``n = 234`` is every prompt once."""
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
    n = max(1, len(specs))
    cnt = {k: 0 for k in ("colour", "persistence", "motion", "adherence", "adherence_strict", "dir_n", "dir_ok",
                          "speed_n", "speed_ok", "bounce_speed_n", "bounce_speed_ok", "incoherent", "empty")}
    confusion = {c: {m: 0 for m in MEASURED_CLASSES} for c in MOTION_CLASSES}
    per_motion: dict[str, list[int]] = {}
    rows = []
    for m, s in zip(measured, specs):
        gt = truth(s)
        c = m["colour"] == gt["colour"]
        mo = m["motion"] == gt["motion"]
        pe = bool(m.get("persistent", False))
        cnt["colour"] += c
        cnt["persistence"] += pe
        cnt["motion"] += mo
        cnt["adherence"] += c and mo
        cnt["adherence_strict"] += c and mo and pe
        cnt["incoherent"] += m["motion"] == "incoherent"
        cnt["empty"] += m["motion"] == "empty"
        confusion[gt["motion"]][m["motion"] if m["motion"] in MEASURED_CLASSES else "incoherent"] += 1
        if s.motion == "moving":
            cnt["dir_n"] += 1
            cnt["dir_ok"] += mo
            if mo:
                cnt["speed_n"] += 1
                cnt["speed_ok"] += m["speed"] == gt["speed"]
        if s.motion == "bouncing" and mo:
            cnt["bounce_speed_n"] += 1
            cnt["bounce_speed_ok"] += m["speed"] == gt["speed"]
        key = s.prompt.split(" ", 2)[2]
        pm = per_motion.setdefault(key, [0, 0])
        pm[0] += c and mo
        pm[1] += 1
        rows.append({"prompt": s.prompt, "measured": m, "colour_ok": c, "motion_ok": mo, "persistent": pe})
    return {"n": len(specs), "adherence": cnt["adherence"] / n, "adherence_strict": cnt["adherence_strict"] / n,
            "colour_acc": cnt["colour"] / n, "persistence": cnt["persistence"] / n, "motion_acc": cnt["motion"] / n,
            "direction_acc": (cnt["dir_ok"] / cnt["dir_n"]) if cnt["dir_n"] else None,
            "speed_acc_given_direction": (cnt["speed_ok"] / cnt["speed_n"]) if cnt["speed_n"] else None,
            "bounce_speed_acc": (cnt["bounce_speed_ok"] / cnt["bounce_speed_n"]) if cnt["bounce_speed_n"] else None,
            "incoherent": cnt["incoherent"] / n, "empty": cnt["empty"] / n,
            "counts": cnt, "per_motion": {k: f"{a}/{b}" for k, (a, b) in per_motion.items()},
            "confusion": confusion, "rows": rows}


# ----------------------------------------------------------------------------- controls
def _blur(v: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    k = torch.arange(5, dtype=torch.float32) - 2
    g = torch.exp(-(k**2) / (2 * sigma**2))
    g = g / g.sum()
    c, f, h, w = v.shape
    x = v.reshape(c * f, 1, h, w)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), g.view(1, 1, 1, 5))
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), g.view(1, 1, 5, 1))
    return x.view(c, f, h, w)


def _render_track(spec: ShapeSpec, cx, cy, r) -> torch.Tensor:
    from .data import SIZE

    cov = _coverage(spec.shape, cx, cy, r, SIZE)
    col = torch.tensor(COLOURS[spec.colour]).view(3, 1, 1, 1)
    return cov[None] * col * 2.0 - 1.0


def control_videos(specs: list[ShapeSpec], seed: int = 0, which=CONTROLS) -> dict[str, list[torch.Tensor]]:
    """Ground-truth videos for ``specs`` (prompt i rendered with seed ``seed + i``) and their controls."""
    out = {k: [] for k in which}
    for i, s in enumerate(specs):
        g = torch.Generator().manual_seed(seed + i)
        cx, cy, r = trajectory(s, g)
        v = _render_track(s, cx, cy, r)
        f = v.shape[1]
        gc = torch.Generator().manual_seed(10_000 + seed + i)
        if "gt" in out:
            out["gt"].append(v)
        if "gt_noise" in out:
            out["gt_noise"].append((v + 0.3 * torch.randn(v.shape, generator=gc)).clamp(-1, 1))
        if "gt_blur" in out:
            out["gt_blur"].append(_blur(v))
        if "gt_jitter" in out:
            jx = torch.rand(f, generator=gc) - 0.5
            jy = torch.rand(f, generator=gc) - 0.5
            out["gt_jitter"].append(_render_track(s, cx + jx, cy + jy, r))
        if "shuffled" in out:
            perm = torch.randperm(f, generator=gc)
            while torch.equal(perm, torch.arange(f)):
                perm = torch.randperm(f, generator=gc)
            out["shuffled"].append(v[:, perm])
        if "reversed" in out:
            out["reversed"].append(v.flip(1))
        if "independent" in out:
            frames = []
            for j in range(f):
                cxj, cyj, rj = trajectory(s, gc)  # a new random start / size per frame
                frames.append(_render_track(s, cxj[j:j + 1], cyj[j:j + 1], rj[j:j + 1]))
            out["independent"].append(torch.cat(frames, dim=1))
    return out


def control_scores(specs: list[ShapeSpec], seed: int = 0, reject: float | None = None) -> dict[str, dict]:
    vids = control_videos(specs, seed)
    return {k: score([measure(v, reject) for v in vs], specs) for k, vs in vids.items()}


def calibrate(n: int = 234, seed: int = 100_000, quantile: float = 0.99, factor: float = 2.0) -> dict:
    """The rejection threshold: ``factor`` x the ``quantile`` of the true template's residual
    on clean / noisy / blurred / jittered ground truth (seeds apart from the evaluation's)."""
    specs = eval_specs(n, 0)
    tpl_of = {"static": "static", "moving": "linear", "bouncing": "bouncing", "growing": "ramp", "shrinking": "ramp"}
    vids = control_videos(specs, seed, which=("gt", "gt_noise", "gt_blur", "gt_jitter"))
    res = []
    for vs in vids.values():
        for v, s in zip(vs, specs):
            tr = track(v)
            p = tr["present"]
            t = torch.arange(v.shape[1], dtype=torch.float32)[p]
            fits = fit_templates(t, tr["cx"][p], tr["cy"][p], tr["r"][p], v.shape[1])
            tpl = tpl_of[s.motion]
            res.append(fits["linear" if tpl == "static" else tpl]["residual"])
    r = torch.tensor(res)
    q = float(torch.quantile(r, quantile))
    return {"threshold": factor * q, "quantile": quantile, "q_value": q, "max": float(r.max()),
            "median": float(r.median()), "n": len(res)}


def check_data(n: int = 234, seed: int = 0) -> dict:
    """The measurement applied to the generator's own videos (should be 100%)."""
    specs = eval_specs(n, seed)
    vids = control_videos(specs, seed, which=("gt",))["gt"]
    return score([measure(v) for v in vids], specs)


# ----------------------------------------------------------------------------- generation
def generate(transformer, tokenizer, specs, steps=30, guidance=3.0, seed=0, batch=16, model_fn=None, progress=None,
             shift=None):
    """Videos for ``specs`` (prompt i with seed ``seed + i``); the scheduler shift defaults to
    the ``sampling.shift`` of the config the weights were loaded with."""
    from .model import make_scheduler, sample

    cfg = getattr(transformer, "reference_config_file", None)
    out = []
    for i in range(0, len(specs), batch):
        chunk = specs[i:i + batch]
        emb = tokenizer([s.prompt for s in chunk])
        neg = tokenizer([""] * len(chunk))
        seeds = [seed + i + j for j in range(len(chunk))]
        out.append(sample(transformer, emb, num_steps=steps, seed=seeds, guidance_scale=guidance,
                          negative_prompt_embeds=neg, model_fn=model_fn,
                          scheduler=make_scheduler(shift, config=cfg)))
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


# ----------------------------------------------------------------------------- report
SUMMARY_KEYS = ("adherence", "adherence_strict", "colour_acc", "persistence", "motion_acc", "direction_acc",
                "speed_acc_given_direction", "bounce_speed_acc", "incoherent", "empty")


def _pct(v):
    return "   -  " if v is None else f"{100 * v:5.1f}%"


def format_table(results: dict[str, dict]) -> str:
    """One column per result (the model first, then the controls), one row per score."""
    cols = list(results)
    lines = ["score".ljust(26) + "".join(c[:11].rjust(12) for c in cols)]
    for k in SUMMARY_KEYS:
        lines.append(k.ljust(26) + "".join(_pct(results[c].get(k)).rjust(12) for c in cols))
    return "\n".join(lines)


def format_confusion(conf: dict) -> str:
    short = {"incoherent": "incoh", "empty": "empty", "bouncing": "bounce", "growing": "grow", "shrinking": "shrink"}
    lines = ["prompted \\ measured".ljust(20) + "".join(short.get(m, m).rjust(7) for m in MEASURED_CLASSES)]
    for c in MOTION_CLASSES:
        lines.append(c.ljust(20) + "".join(str(conf[c][m]).rjust(7) for m in MEASURED_CLASSES))
    return "\n".join(lines)


def _summary(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "rows"}


def main():
    ap = argparse.ArgumentParser(prog="python -m examples.reference.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=234, help="prompts (234: every prompt once)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shift", type=float, default=None, help="scheduler shift (default: the weights' config.json)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--weights", type=str, default=None)
    ap.add_argument("--grid", type=str, default=None, help="also save a sample grid PNG of the first 13")
    ap.add_argument("--json", type=str, default=None, help="write the full result here")
    ap.add_argument("--check-data", action="store_true", help="only the ground-truth controls")
    ap.add_argument("--calibrate", action="store_true", help="recompute the rejection threshold and use it")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    reject = REJECT_RESIDUAL
    if a.calibrate:
        cal = calibrate()
        print("calibration:", json.dumps(cal))
        reject = cal["threshold"]
    specs = eval_specs(a.n, a.seed)
    controls = control_scores(specs, a.seed, reject)
    if a.check_data:
        print(format_table(controls))
        print("\nconfusion, clean ground truth:\n" + format_confusion(controls["gt"]["confusion"]))
        print("\nconfusion, shuffled frames:\n" + format_confusion(controls["shuffled"]["confusion"]))
        bad = [x for x in controls["gt"]["rows"] if not (x["colour_ok"] and x["motion_ok"])]
        for x in bad[:10]:
            print("  gt miss:", x)
        return
    from .model import load_reference_model, sampling_settings

    transformer, tokenizer = load_reference_model(weights=a.weights)
    shift = a.shift if a.shift is not None else float(sampling_settings(transformer.reference_config_file).get("shift", 1.0))
    t0 = time.time()
    vids = generate(transformer, tokenizer, specs, a.steps, a.guidance, a.seed, batch=a.batch, shift=shift,
                    progress=lambda i, n: print(f"  {i}/{n} videos, {time.time() - t0:.0f}s", file=sys.stderr))
    seconds = round(time.time() - t0, 1)
    r = score([measure(v, reject) for v in vids], specs)
    r.update({"steps": a.steps, "guidance": a.guidance, "shift": shift, "seed": a.seed, "seconds": seconds,
              "weights": str(a.weights or "examples/weights/reference_model.safetensors"),
              "reject_residual_px": reject})
    print(format_table({"model": r, **controls}))
    print(f"\nper motion (adherence): {json.dumps(r['per_motion'])}")
    print("\nconfusion (model):\n" + format_confusion(r["confusion"]))
    print(f"\n{a.n} prompts, {a.steps} steps, guidance {a.guidance}, shift {shift}, {seconds} s")
    if a.json:
        out = dict(r)
        out["controls"] = {k: _summary(v) for k, v in controls.items()}
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    if a.grid:
        k = min(13, len(specs))
        save_grid(vids[:k], [s.prompt for s in specs[:k]], a.grid)
        print("grid:", a.grid)


if __name__ == "__main__":
    main()

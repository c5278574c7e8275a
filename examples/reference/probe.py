"""Go/no-go probe: has the reference model learnt the motion direction? (cheap, ~20 s on 1 thread)

Three measurements on a fixed, seeded set of "moving" videos (balanced over the 4 directions
and 2 speeds), with the conditional model (no guidance):

- **direction gap of the loss** at sigma 0.9 and 0.97: the velocity MSE with the direction
  word swapped for each of the 3 wrong ones, minus the MSE with the right word (same video,
  same noise). Zero when the direction word is ignored. ``dir_acc`` is how often the right
  word gives the lowest loss (chance 25%).
- **drift of the sigma=1 predicted centroid**: from pure noise, the predicted clean video
  ``x0 = noise - v`` is the model's mean guess; its bright-weighted centroid per frame, fitted
  by least squares, should move along the prompted direction (``drift_along``, px/frame;
  ground truth 0.8 slow / 2.0 fast, mean 1.4) and not across it (``drift_across``).
  ``drift_sign_acc``: how often the dominant axis and sign of that velocity are right.
- optionally a **mini adherence** (``quick_adherence``): 26 prompts (2 per motion), few steps,
  guidance 3, measured with ``evaluate.measure``.

    python -m examples.reference.probe --weights examples/weights_next/reference_model.safetensors
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from .data import DIRECTIONS, SPEEDS, ShapeSpec, COLOURS, SHAPES, render


def _moving_specs(n: int, g: torch.Generator) -> list[ShapeSpec]:
    out = []
    dirs, speeds = list(DIRECTIONS), list(SPEEDS)
    for i in range(n):
        c = list(COLOURS)[int(torch.randint(len(COLOURS), (), generator=g))]
        s = SHAPES[int(torch.randint(len(SHAPES), (), generator=g))]
        out.append(ShapeSpec(c, s, "moving", dirs[i % 4], speeds[(i // 4) % 2]))
    return out


def _with_direction(spec: ShapeSpec, d: str) -> str:
    return ShapeSpec(spec.colour, spec.shape, "moving", d, spec.speed).prompt


def centroids(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright-weighted centroid per frame of ``(3, F, H, W)`` (background-subtracted)."""
    bright = ((video.float() + 1) / 2).clamp(0, 1).max(dim=0).values  # (F, H, W)
    w = (bright - bright.flatten(1).median(dim=1).values[:, None, None]).clamp_min(0) + 1e-8
    f, h, wd = bright.shape
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(wd) + 0.5, indexing="ij")
    a = w.sum(dim=(1, 2))
    return (w * xs).sum(dim=(1, 2)) / a, (w * ys).sum(dim=(1, 2)) / a


def _slope(v: torch.Tensor) -> float:
    t = torch.arange(v.shape[0], dtype=torch.float32)
    tc = t - t.mean()
    return float((tc * (v - v.mean())).sum() / (tc**2).sum())


@torch.no_grad()
def direction_probe(transformer, tokenizer, n: int = 32, sigmas=(0.9, 0.97), seed: int = 1234) -> dict:
    from .model import model_input

    was_training = transformer.training
    transformer.eval()
    g = torch.Generator().manual_seed(seed)
    specs = _moving_specs(n, g)
    x0 = torch.stack([render(s, g)[0] for s in specs])
    noise = torch.randn(x0.shape, generator=g)
    dirs = list(DIRECTIONS)
    true_idx = torch.tensor([dirs.index(s.direction) for s in specs])
    out: dict = {}
    for sig in sigmas:
        xt = (1 - sig) * x0 + sig * noise
        target = noise - x0
        t = torch.full((n,), 1000.0 * sig)
        losses = []
        for d in dirs:
            emb = tokenizer([_with_direction(s, d) for s in specs])
            pred = transformer(hidden_states=model_input(transformer, xt), timestep=t,
                               encoder_hidden_states=emb, return_dict=False)[0]
            losses.append(((pred - target) ** 2).mean(dim=(1, 2, 3, 4)))
        L = torch.stack(losses, dim=1)  # (n, 4)
        right = L.gather(1, true_idx[:, None])[:, 0]
        wrong = (L.sum(dim=1) - right) / 3
        out[f"gap@{sig}"] = float((wrong - right).mean())
        out[f"dir_acc@{sig}"] = float((L.argmin(dim=1) == true_idx).float().mean())
        out[f"loss@{sig}"] = float(right.mean())
    # sigma = 1: the model's mean guess of the clean video from pure noise
    emb = tokenizer([s.prompt for s in specs])
    pred = transformer(hidden_states=model_input(transformer, noise), timestep=torch.full((n,), 1000.0),
                       encoder_hidden_states=emb, return_dict=False)[0]
    x0hat = noise - pred
    along, across, sign_ok = [], [], 0
    for v, s in zip(x0hat, specs):
        cx, cy = centroids(v)
        vx, vy = _slope(cx), _slope(cy)
        dx, dy = DIRECTIONS[s.direction]
        along.append(vx * dx + vy * dy)
        across.append(abs(vx * dy) + abs(vy * dx))
        if abs(dx) > 0:
            sign_ok += abs(vx) >= abs(vy) and vx * dx > 0
        else:
            sign_ok += abs(vy) > abs(vx) and vy * dy > 0
    out["drift_along"] = sum(along) / n
    out["drift_across"] = sum(across) / n
    out["drift_sign_acc"] = sign_ok / n
    transformer.train(was_training)
    return out


@torch.no_grad()
def quick_adherence(transformer, tokenizer, steps: int = 10, guidance: float = 3.0, shift: float = 3.0,
                    per_motion: int = 2, seed: int = 0) -> dict:
    """Mini adherence on ``13 * per_motion`` prompts with few sampling steps (a trend, not a score)."""
    from .evaluate import eval_specs, generate, measure, score

    was_training = transformer.training
    transformer.eval()
    specs = eval_specs(13 * per_motion, seed)
    vids = generate(transformer, tokenizer, specs, steps=steps, guidance=guidance, seed=seed, batch=len(specs),
                    shift=shift)
    r = score([measure(v) for v in vids], specs)
    transformer.train(was_training)
    return {k: r[k] for k in r if k in ("adherence", "colour_acc", "motion_acc", "direction_acc", "persistence")}


def main():
    ap = argparse.ArgumentParser(prog="python -m examples.reference.probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="also a mini adherence (26 prompts, 10 steps)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from .model import load_reference_model, sampling_settings

    transformer, tokenizer = load_reference_model(weights=a.weights)
    t0 = time.time()
    r = direction_probe(transformer, tokenizer)
    if a.quick:
        shift = float(sampling_settings(transformer.reference_config_file).get("shift", 1.0))
        r.update({"quick_" + k: v for k, v in quick_adherence(transformer, tokenizer, shift=shift).items()})
    r["seconds"] = round(time.time() - t0, 1)
    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}))


if __name__ == "__main__":
    main()

"""Train the reference model (small WanTransformer3DModel) on procedural moving shapes.

Flow matching as Wan / SD3 train it: x_t = (1 - sigma) * x0 + sigma * noise, target
velocity = noise - x0, timestep = 1000 * sigma, sigma = sigmoid(N(ln shift, 1)) (the
logit-normal of SD3 moved by the scheduler's time shift), 10% of it drawn uniform, so that
diffusers' FlowMatchEulerDiscreteScheduler(shift=shift) samples the model. With shift 3, 37%
of the samples lie above sigma 0.8, where the trajectory is decided. The transformer gets the
noisy video plus three fixed coordinate channels (examples.reference.model.model_input).
Prompts are dropped (all <pad>) 10% of the time for classifier-free guidance.

Seeded and reproducible for a fixed --steps and --threads (the learning-rate schedule
depends on the step count only); --minutes is a safety limit that stops early and still
saves. Logs to <out>/train_log.jsonl, saves the EMA weights every --ckpt-every steps (a
partial run leaves usable weights) and runs the direction probe (examples.reference.probe)
every --probe-every steps, logged as {"probe": ...} records.

    python -m examples.train_reference --out examples/weights_next
    python -m examples.train_reference --bench 5        # s/step of the configuration

The defaults are the recipe of the shipped weights (one stage, 10,000 steps, about 72 min on 1
thread): --high-sigma 0.25 (a quarter of the sigmas uniform in [0.85, 1]), --start-spread 0.33
(narrower starts of linear motion) and more bouncing and fast motion in the mix
(--motion-weights). The full command is in examples/weights/MODEL_CARD.md.

(from the repository root).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from examples.reference.data import MovingShapes
from examples.reference.model import (DEFAULT_TRANSFORMER_CONFIG, build_reference_model, model_input,
                                      state_dict_for_saving)

ROOT = Path(__file__).resolve().parents[1]
# how often each motion is drawn in the shipped weights' training (more bouncing and moving than the
# data's default mix: static, growing and shrinking are learnt early)
SHIPPED_MOTION_WEIGHTS = "static=0.1,moving=0.54,bouncing=0.2,growing=0.08,shrinking=0.08"


def parse():
    ap = argparse.ArgumentParser(prog="python -m examples.train_reference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--minutes", type=float, default=88.0, help="wall-time limit (stops early, still saves)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--shift", type=float, default=3.0, help="sigma = sigmoid(N(ln shift, 1)); sampling shift")
    ap.add_argument("--p-uncond", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dim", type=int, default=None, help="inner dim (heads x 64)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--ffn", type=int, default=None)
    ap.add_argument("--patch-t", type=int, default=None, help="temporal patch size (default 2)")
    ap.add_argument("--no-coords", action="store_true", help="no coordinate channels (in_channels=3)")
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--probe-every", type=int, default=2000, help="0: never")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--out", type=Path, default=ROOT / "examples" / "weights_next")
    ap.add_argument("--high-sigma", type=float, default=0.25,
                    help="fraction of sigmas drawn uniform in [--high-sigma-min, 1] (where the layout is decided)")
    ap.add_argument("--high-sigma-min", type=float, default=0.85)
    ap.add_argument("--start-spread", type=float, default=0.33,
                    help="linear motion starts within this fraction of the allowed range (data.trajectory)")
    ap.add_argument("--motion-weights", type=str, default=SHIPPED_MOTION_WEIGHTS,
                    help="how often each motion is drawn, e.g. 'static=0.1,moving=0.54,bouncing=0.2,growing=0.08,"
                         "shrinking=0.08'; '': data.MOTION_WEIGHTS")
    ap.add_argument("--init", type=Path, default=None, help="start from these weights (to continue a run)")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="stop (and save) after this many steps of the --steps schedule")
    ap.add_argument("--bench", type=int, default=0, help="only time this many steps and exit")
    return ap.parse_args()


def sample_sigmas(n, g, shift: float = 1.0, high: float = 0.0, high_min: float = 0.85):
    """Logit-normal(ln shift, 1) sigmas (SD3 / Wan, moved by the time shift), 10% uniform;
    with ``high`` > 0, that fraction is replaced by uniform draws in [high_min, 1]."""
    s = torch.sigmoid(torch.randn(n, generator=g) + math.log(shift))
    u = torch.rand(n, generator=g)
    pick = torch.rand(n, generator=g) < 0.1
    s = torch.where(pick, u, s)
    if high > 0:
        h = high_min + (1 - high_min) * torch.rand(n, generator=g)
        s = torch.where(torch.rand(n, generator=g) < high, h, s)
    return s.clamp(1e-3, 1.0)


def motion_weights(text: str | None) -> dict[str, float] | None:
    """``'static=0.1,moving=0.5,...'`` -> ``{"static": 0.1, "moving": 0.5, ...}`` (motions left out: 0)."""
    if not text:
        return None
    try:
        return {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise SystemExit(f"--motion-weights: expected 'motion=weight,...', got {text!r}") from None


def lr_at(step, a):
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup))
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def save(path: Path, transformer, tokenizer, meta):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "reference_model.safetensors.tmp"
    save_file(state_dict_for_saving(transformer, tokenizer), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / "reference_model.safetensors")
    (path / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


def main():
    a = parse()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = dict(DEFAULT_TRANSFORMER_CONFIG)
    if a.dim:
        cfg["num_attention_heads"] = a.dim // 64
    if a.layers:
        cfg["num_layers"] = a.layers
    if a.ffn:
        cfg["ffn_dim"] = a.ffn
    if a.patch_t:
        cfg["patch_size"] = (a.patch_t, *cfg["patch_size"][1:])
    if a.no_coords:
        cfg["in_channels"] = cfg["out_channels"]
    transformer, tokenizer = build_reference_model(cfg, seed=a.seed)
    if a.init:
        from safetensors.torch import load_file

        sd = load_file(str(a.init))
        transformer.load_state_dict({k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")})
        tokenizer.prompt_embedding.weight.data.copy_(sd["tokenizer.prompt_embedding.weight"])
    transformer.train()
    params = list(transformer.parameters()) + list(tokenizer.parameters())
    n_params = sum(p.numel() for p in params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.99))
    ema_t = copy.deepcopy(transformer).eval().requires_grad_(False)
    ema_k = copy.deepcopy(tokenizer).eval().requires_grad_(False)
    ema_params = list(ema_t.parameters()) + list(ema_k.parameters())

    data = MovingShapes(seed=a.seed, start_spread=a.start_spread, motion_weights=motion_weights(a.motion_weights))
    g = torch.Generator().manual_seed(a.seed + 1)
    print(f"params {n_params} config {cfg}", flush=True)
    meta = {
        "transformer": {**cfg, "patch_size": list(cfg["patch_size"])},
        "tokenizer": {"max_tokens": 8},
        "video_shape": [3, 8, 32, 32],
        "conditioning": ("x_t concatenated with 3 coordinate channels (x, y, t ramps in [-1, 1]); "
                         "examples.reference.model.model_input" if cfg["in_channels"] == cfg["out_channels"] + 3
                         else "x_t only"),
        "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": a.shift},
        "training": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "num_parameters": n_params,
        "sampling": {"scheduler": "FlowMatchEulerDiscreteScheduler", "shift": a.shift, "guidance_scale": 3.0,
                     "num_steps": 30},
    }
    a.out.mkdir(parents=True, exist_ok=True)
    log = None if a.bench else open(a.out / "train_log.jsonl", "w")
    t0 = time.time()
    run_loss, n_loss = 0.0, 0
    step = 0
    stopped = "steps"
    for step in range(a.steps if not a.bench else a.bench):
        lr = lr_at(step, a)
        for grp in opt.param_groups:
            grp["lr"] = lr
        x0, prompts, _ = data.batch(a.batch)
        ids = tokenizer.ids(prompts)
        drop = torch.rand(a.batch, generator=g) < a.p_uncond
        ids[drop] = 0
        noise = torch.randn(x0.shape, generator=g)
        sigma = sample_sigmas(a.batch, g, a.shift, a.high_sigma, a.high_sigma_min)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        target = noise - x0
        pred = transformer(hidden_states=model_input(transformer, xt), timestep=sigma * 1000.0,
                           encoder_hidden_states=tokenizer.embed_ids(ids), return_dict=False)[0]
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(a.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - d)
        run_loss += loss.item()
        n_loss += 1
        elapsed = time.time() - t0
        if a.bench:
            print(f"step {step} {elapsed:.2f}s loss {loss.item():.4f}", flush=True)
            continue
        if (step + 1) % a.log_every == 0:
            rec = {"step": step + 1, "loss": run_loss / n_loss, "lr": lr, "elapsed_s": round(elapsed, 1)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(rec, flush=True)
            run_loss, n_loss = 0.0, 0
        if (step + 1) % a.ckpt_every == 0:
            meta["training_result"] = {"steps": step + 1, "elapsed_s": round(elapsed, 1), "stopped": "checkpoint"}
            save(a.out, ema_t, ema_k, meta)
        if a.probe_every and (step + 1) % a.probe_every == 0:
            from examples.reference.probe import direction_probe, quick_adherence

            tp = time.time()
            pr = direction_probe(ema_t, ema_k)
            pr.update({"quick_" + k: v for k, v in quick_adherence(ema_t, ema_k, shift=a.shift).items()})
            rec = {"step": step + 1, "probe": {k: round(v, 5) for k, v in pr.items()},
                   "probe_s": round(time.time() - tp, 1)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(rec, flush=True)
            t0 += time.time() - tp  # the probe does not count towards the training time
        if elapsed > a.minutes * 60:
            stopped = "time limit"
            break
        if a.stop_after and step + 1 >= a.stop_after:
            stopped = "stop-after"
            break
    elapsed = time.time() - t0
    if a.bench:
        print(f"{a.bench} steps in {elapsed:.1f}s: {a.bench / elapsed:.3f} steps/s; params {n_params}")
        return
    meta["training_result"] = {"steps": step + 1, "elapsed_s": round(elapsed, 1), "stopped": stopped}
    save(a.out, ema_t, ema_k, meta)
    print(f"done: {step + 1} steps in {elapsed / 60:.1f} min ({stopped})", flush=True)


if __name__ == "__main__":
    main()

"""Demo: the shipped reference model, uncached (plain torch.compile) vs AdaCache.

    python -m examples.generate "blue square moving left fast"
    python -m examples.generate                      # a few default prompts, low to high motion
    python -m examples.generate --mode fast --steps 30 --inner eager "red circle static"

(from the repository root).

Writes to --out (default out/): side_by_side.gif (baseline | AdaCache per prompt),
schedule.png (distance, motion score, cache rate, computed steps), report.json; prints the
speedup, the computed steps and PSNR / SSIM of the AdaCache video against the baseline.
Both are compiled side by side and warmed up first; then baseline and AdaCache generations
alternate --repeats times (same seed, same sampling loop) and the median speedup is printed.
Inductor compiles take most of the wall time on a small CPU; --inner aot_eager starts faster.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from examples.machine import command_line, machine
from examples.reference import CONFIG_FILE, load_reference_model, sample
from examples.reference.quality import psnr, ssim

# low to high motion, among what the shipped model draws (it does not bounce: MODEL_CARD.md)
DEFAULT_PROMPTS = ["red circle static", "green square moving right slow", "blue triangle moving down fast"]


def save_gif(base: torch.Tensor, cached: torch.Tensor, path: Path, scale: int = 4, ms: int = 160):
    from PIL import Image

    b, _, f, h, w = base.shape
    pad = 4
    to8 = lambda v: (((v.clamp(-1, 1) + 1) / 2) * 255).round().byte().permute(0, 2, 3, 4, 1).numpy()  # noqa: E731
    A, B = to8(base), to8(cached)
    W, H = 2 * w * scale + 3 * pad, b * (h * scale + pad) + pad
    frames = []
    for j in range(f):
        im = Image.new("RGB", (W, H), (90, 90, 90))
        for i in range(b):
            y = pad + i * (h * scale + pad)
            im.paste(Image.fromarray(A[i, j]).resize((w * scale, h * scale), Image.NEAREST), (pad, y))
            im.paste(Image.fromarray(B[i, j]).resize((w * scale, h * scale), Image.NEAREST), (2 * pad + w * scale, y))
        frames.append(im)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms, loop=0)


def _f(v):
    return float("nan") if v is None else float(v)


def plot_schedule(report, num_steps: int, path: Path, title: str, prompts: list):
    """Distance, motion score and rate at each computed step, and the computed steps: per prompt
    under per-sample schedules, else the batch's one schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_sample = report.sample_computed_steps is not None
    series = (list(zip(prompts, report.sample_metrics, report.sample_computed_steps)) if per_sample
              else [("batch", list(report.metrics), list(report.computed_steps))])
    fig, axes = plt.subplots(4, 1, figsize=(7, 7.5), sharex=True)
    for ax, key, label in zip(axes[:3], ("reg_distance", "motion", "rate"),
                              ("distance c (MoReg-regularised)", "motion score", "cache rate tau")):
        for name, ms, _comp in series:
            ax.plot([m.step for m in ms], [_f(getattr(m, key, None)) for m in ms], "o-", ms=4, label=name)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    if per_sample:
        axes[0].legend(fontsize=7)
    for row, (name, _ms, comp) in enumerate(series):
        axes[3].scatter(comp, [row] * len(comp), marker="s", s=30, color=f"C{row}")
    axes[3].set_yticks(range(len(series)))
    axes[3].set_yticklabels([f"{name} ({len(comp)})" for name, _ms, comp in series], fontsize=7)
    axes[3].set_ylabel("computed", fontsize=8)
    axes[3].set_xlabel("denoising step")
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timed_sample(model_fn, transformer, emb, neg, a, desc):
    from tqdm import tqdm

    t0 = time.perf_counter()
    out = sample(transformer, emb, num_steps=a.steps, seed=a.seed, guidance_scale=a.guidance,
                 negative_prompt_embeds=neg, model_fn=model_fn,
                 progress=lambda it: tqdm(it, desc=desc, leave=False, ncols=80, file=sys.stderr))
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(prog="python -m examples.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts", nargs="*", help=f"default: {DEFAULT_PROMPTS}")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance scale (default: sampling.guidance_scale of config.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=["fast", "slow", "off"], default="slow",
                    help="AdaCache codebook: slow (default), fast, or off ({inf: 1}, computes every step). On the "
                         "shipped model fast computes about 8 of 30 steps and the video is visibly degraded "
                         "(PSNR about 22.5 dB against the uncached one); slow about 13 at 31 dB")
    ap.add_argument("--schedule", choices=["per-sample", "shared"], default="per-sample",
                    help="per-sample (default): each prompt its own schedule, the blocks run on the prompts that "
                         "compute (AdaCacheConfig(per_sample=True)); shared: one schedule for the batch")
    ap.add_argument("--inner", default="inductor", help="compiler behind both runs: inductor, aot_eager, eager")
    ap.add_argument("--no-warmup", action="store_true", help="time the first (compiling) runs")
    ap.add_argument("--repeats", type=int, default=3, help="timed generations of each, interleaved")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("out"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    prompts = a.prompts or DEFAULT_PROMPTS
    if a.guidance is None:
        a.guidance = float(json.loads(CONFIG_FILE.read_text()).get("sampling", {}).get("guidance_scale", 3.0))
    a.out.mkdir(parents=True, exist_ok=True)

    transformer, tokenizer = load_reference_model()
    emb, neg = tokenizer(prompts), tokenizer([""] * len(prompts))
    print(f"reference model: WanTransformer3DModel, {len(transformer.blocks)} blocks, "
          f"{sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M params; {len(prompts)} prompt(s), "
          f"{a.steps} steps, guidance {a.guidance}, seed {a.seed}, inner={a.inner}")

    from adacache_fx import AdaCacheConfig, adacache_backend
    from adacache_fx.tracing import mark_batch_dynamic

    # per-sample: a schedule per prompt; the batch is [uncond, cond] (classifier-free guidance in one call)
    schedule = dict(per_sample=True, guidance_in_batch=2 if a.guidance > 1 else 1) if a.schedule == "per-sample" else {}
    if a.mode == "fast":
        cfg = AdaCacheConfig.fast(num_steps=a.steps, **schedule)
    elif a.mode == "slow":
        cfg = AdaCacheConfig.slow(num_steps=a.steps, **schedule)
    else:
        cfg = AdaCacheConfig.no_cache(num_steps=a.steps, **schedule)
    backend = adacache_backend(cfg, inner=a.inner)
    # Both compiled side by side on the same module: dynamo keeps one entry per backend.
    base_model = torch.compile(transformer, backend=a.inner)
    compiled = torch.compile(transformer, backend=backend)

    def ada_model(*args, **kwargs):
        if cfg.per_sample:   # a dynamic batch: the blocks compile once for every sub-batch
            mark_batch_dynamic(args, kwargs)
        return compiled(*args, **kwargs)

    def run_baseline(desc="baseline"):
        return timed_sample(base_model, transformer, emb, neg, a, desc)

    def run_adacache(desc=f"AdaCache-{a.mode}"):
        backend.reset()  # a new generation
        return timed_sample(ada_model, transformer, emb, neg, a, desc)

    if not a.no_warmup:
        t0 = time.perf_counter()
        run_baseline("compile baseline")
        t_compile_base = time.perf_counter() - t0
        run_adacache("compile AdaCache")
        print(f"compiled : baseline {t_compile_base:.1f} s, AdaCache {time.perf_counter() - t0 - t_compile_base:.1f} s "
              "(first generations, not timed)")
    # timed: baseline and AdaCache alternate, the order flipping every round
    t_base, t_ada = [], []
    for r in range(a.repeats):
        for which in (("base", "ada") if r % 2 == 0 else ("ada", "base")):
            if which == "base":
                base, t = run_baseline()
                t_base.append(t)
            else:
                cached, t = run_adacache()
                t_ada.append(t)
    report = backend.report()
    comp = list(report.computed_steps)
    ratios = [b / c for b, c in zip(t_base, t_ada)]
    speedup = statistics.median(ratios)
    # the ideal counts what the blocks run: per-sample schedules run them on the computing rows only
    if report.sample_computed_steps is not None:
        rows = sum(len(steps) for steps in report.sample_computed_steps)
        total_rows = a.steps * len(report.sample_computed_steps)
        computed_what = (f"{len(comp)} of {a.steps} steps computed for some prompt; "
                         f"{rows} of {total_rows} prompt-steps")
    else:
        rows, total_rows = len(comp), a.steps
        computed_what = f"{len(comp)} of {a.steps} steps computed"
    ideal = total_rows / max(1, rows)
    print(f"baseline : {statistics.median(t_base):6.2f} s median of {a.repeats} ({a.steps} of {a.steps} steps computed)")
    print(f"AdaCache : {statistics.median(t_ada):6.2f} s median of {a.repeats} ({computed_what})")
    print(f"speedup  : {speedup:.2f}x (median of {a.repeats} interleaved pairs, {min(ratios):.2f}-{max(ratios):.2f}; "
          f"ideal {ideal:.2f}x: the blocks' work, {rows} of {total_rows} "
          f"{'prompt-steps' if report.sample_computed_steps is not None else 'steps'})   computed steps: {comp}")
    print(f"quality  : PSNR {psnr(cached, base):.2f} dB, SSIM {ssim(cached, base):.4f} (vs the uncached video)")
    print(f"cache    : {report.cache_bytes / 1024:.1f} KiB")
    if report.sample_computed_steps is not None:
        print("schedule : per sample (AdaCacheConfig(per_sample=True)): the blocks run on the prompts that compute")
        for prompt, steps in zip(prompts, report.sample_computed_steps):
            print(f"           {prompt:34s} {len(steps):2d}/{a.steps} computed: {steps}")
        if len({tuple(steps) for steps in report.sample_computed_steps}) == 1 and len(prompts) > 1:
            print("           every prompt computed the same steps: here per-sample schedules changed nothing "
                  "(benchmarks/results/per_sample.md measures when they do)")

    save_gif(base, cached, a.out / "side_by_side.gif")
    plot_schedule(report, a.steps, a.out / "schedule.png", f"AdaCache-{a.mode}, {a.schedule} schedule", prompts)
    res = {
        "command": command_line("examples.generate"),
        "machine": machine(),
        "prompts": prompts, "steps": a.steps, "guidance": a.guidance, "seed": a.seed, "mode": a.mode,
        "inner": a.inner, "repeats": a.repeats, "baseline_s": t_base, "adacache_s": t_ada, "speedup": speedup,
        "computed_steps": comp, "psnr": psnr(cached, base), "ssim": ssim(cached, base), "schedule": a.schedule,
        "sample_computed_steps": report.sample_computed_steps,
        "sample_psnr": [psnr(cached[i:i + 1], base[i:i + 1]) for i in range(len(prompts))],
        "cache_bytes": getattr(report, "cache_bytes", None),
        "metrics": [{k: getattr(m, k, None) for k in ("step", "distance", "motion", "rate")} for m in report.metrics],
    }
    (a.out / "report.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    print(f"wrote {a.out / 'side_by_side.gif'} (left: baseline, right: AdaCache), {a.out / 'schedule.png'}, "
          f"{a.out / 'report.json'}")


if __name__ == "__main__":
    main()

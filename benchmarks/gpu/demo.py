"""Part 4: the reference-model demo on CUDA (examples/weights, via ``examples.reference``).

The shipped small WanTransformer3DModel (trained on moving shapes), three prompts (low to high
motion), classifier-free guidance from config.json (batched [uncond, cond]), 30 steps of
diffusers' FlowMatchEulerDiscreteScheduler through ``examples.reference.sample`` (it runs on the
device of the transformer's parameters). Uncached = plain ``torch.compile`` (inductor) vs
AdaCache-fast (``AdaCacheConfig.fast(30)``, inner inductor), compiled side by side, warmed up,
then generations alternate (--repeats, order flipping); median of the per-pair speedups,
computed steps, PSNR / SSIM of the AdaCache video against the uncached one.

The AdaCache model is called through a wrapper that announces each step's host timestep with
``backend.step(t)`` (the same timesteps the sampler computes): without it the backend reads the
CUDA timestep on the host at every call (a sync, with a warning).

``--dry-run``: the same on the CPU, 10 steps, one prompt, one pair, aot_eager.
"""
from __future__ import annotations

import statistics
import time

import torch

from ._common import PartReport, SkipPart, base_parser, run_part

PROMPTS = ["red circle static", "green square moving right slow", "blue triangle bouncing fast"]


def main(argv):
    ap = base_parser(__doc__)
    ap.add_argument("--steps", type=int, default=None, help="default 30; dry run 10")
    ap.add_argument("--repeats", type=int, default=None, help="timed pairs at most (default 5; dry run 1)")
    ap.add_argument("--inner", default=None, help="default inductor; dry run aot_eager")
    args = ap.parse_args(argv)
    return PartReport("demo", "Part 4: reference-model demo (uncached vs AdaCache-fast)", args).run(_run)


def _run(rep: PartReport, args, device):
    try:
        import json

        from examples.reference import CONFIG_FILE, WEIGHTS_FILE, load_reference_model, make_scheduler, sample
        from examples.reference.quality import psnr, ssim
    except ImportError as exc:
        raise SkipPart(f"examples.reference does not import ({exc}): it needs diffusers and safetensors")
    if not WEIGHTS_FILE.exists():
        raise SkipPart(f"{WEIGHTS_FILE} is missing")
    from adacache_fx import AdaCacheConfig, adacache_backend

    steps = args.steps or (10 if args.dry_run else 30)
    repeats = args.repeats or (1 if args.dry_run else 5)
    inner = args.inner or ("aot_eager" if args.dry_run else "inductor")
    prompts = PROMPTS[:1] if args.dry_run else PROMPTS
    guidance = float(json.loads(CONFIG_FILE.read_text()).get("sampling", {}).get("guidance_scale", 3.0))
    transformer, tokenizer = load_reference_model(device=device)
    emb, neg = tokenizer(prompts), tokenizer([""] * len(prompts))
    n_params = sum(p.numel() for p in transformer.parameters())
    rep.add(f"- model: examples/weights reference WanTransformer3DModel, {len(transformer.blocks)} blocks, "
            f"{n_params / 1e6:.2f} M params, float32 on {device}",
            f"- {len(prompts)} prompt(s) {prompts}, guidance {guidance} (batched uncond+cond: batch {2 * len(prompts)}), "
            f"{steps} steps, seed 0, compiler `{inner}` for both", "")

    backend = adacache_backend(AdaCacheConfig.fast(num_steps=steps), inner=inner)
    base_model = torch.compile(transformer, backend=inner, dynamic=False)
    ada_compiled = torch.compile(transformer, backend=backend, dynamic=False)
    sched = make_scheduler()
    sched.set_timesteps(steps)
    host_ts = [float(t) for t in sched.timesteps]
    calls = {"i": 0}

    def ada_model(**kwargs):   # announce the host timestep of this step (no device read)
        backend.step(host_ts[calls["i"] % steps])
        calls["i"] += 1
        return ada_compiled(**kwargs)

    def run(which):
        if which == "ada":
            backend.reset()
            calls["i"] = 0
        fn = ada_model if which == "ada" else base_model
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = sample(transformer, emb, num_steps=steps, seed=0, guidance_scale=guidance,
                     negative_prompt_embeds=neg, model_fn=fn)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out.float().cpu(), time.perf_counter() - t0

    t0 = time.perf_counter()
    _, first_base = run("base")
    _, first_ada = run("ada")
    rep.add(f"- first generations (compile + warm-up): uncached {first_base:.1f} s, AdaCache {first_ada:.1f} s "
            f"(together {time.perf_counter() - t0:.1f} s)")
    t_base, t_ada = [], []
    for k in range(repeats):
        pair_s = (t_base[-1] + t_ada[-1]) if t_base else 0.0
        if k > 0 and rep.remaining() < 1.5 * pair_s + 5:
            rep.add(f"- stopped after {k} pair(s): budget")
            break
        for which in (("base", "ada") if k % 2 == 0 else ("ada", "base")):
            out, t = run(which)
            if which == "base":
                base = out
                t_base.append(t)
            else:
                cached = out
                t_ada.append(t)
        report = backend.report()
        comp = list(report.computed_steps)
        ratios = [b / a for b, a in zip(t_base, t_ada)]
        rep.results.clear()
        rep.result(f"speedup **{statistics.median(ratios):.2f}x** (median of {len(ratios)} interleaved pair(s), "
                   f"{min(ratios):.2f}-{max(ratios):.2f}); ideal {steps / max(1, len(comp)):.2f}x")
        rep.result(f"uncached {statistics.median(t_base):.3f} s, AdaCache-fast {statistics.median(t_ada):.3f} s per "
                   f"generation ({steps} steps, {2 * len(prompts)} videos per batch)")
        rep.result(f"computed steps {len(comp)}/{steps}: {comp}")
        rep.result(f"vs the uncached video: PSNR {psnr(cached, base):.2f} dB, SSIM {ssim(cached, base):.4f}; "
                   f"cache {report.cache_bytes / 2**20:.2f} MiB")
        rep.check(not report.uncached_graphs, f"graphs ran uncached: {report.uncached_graphs}")
        rep.check(bool(torch.isfinite(cached).all()), "AdaCache video has non-finite values")
    rep.section("times", ["", "Generation times (s): uncached " + ", ".join(f"{t:.3f}" for t in t_base)
                          + "; AdaCache " + ", ".join(f"{t:.3f}" for t in t_ada), "",
                          "AdaCache report of the last generation:", "", "```", str(backend.report()), "```"])


if __name__ == "__main__":
    run_part(main)

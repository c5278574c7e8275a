"""Part 3: overhead of the adacache rewrite in bf16 on a model of real size (Wan 2.1 1.3B).

diffusers ``WanTransformer3DModel`` with the Wan 2.1 T2V 1.3B config (30 layers, 12 x 128 = 1536,
ffn 8960, patch (1, 2, 2), text_dim 4096, freq_dim 256) and random weights, bf16, latents of a
480p 81-frame video (B, 16, 21, 60, 104) -> 32760 tokens, random text embeddings (B, 512, 4096),
a flow-matching Euler loop whose input changes every step. Methods, on the same weights:

* ``plain``: ``torch.compile(model)`` (inductor),
* ``off``:   ``compile_model`` on a copy, caching off (``AdaCacheConfig.no_cache``: every step computed),
* ``fixed``: ``compile_model`` on a copy, fixed codebook ``{inf: 3}`` (speedup vs the ideal steps / computed),
* ``regional``: diffusers' ``compile_repeated_blocks`` on a copy (each block class compiled once, the
  rest eager): the startup a diffusers user compares against. ``compile_model`` is the entry point
  users call: Dynamo traces one block and stamps the others out, and each repeated block is
  compiled once (``compile_blocks="auto"`` at this depth), as ``benchmarks/compile_time.py``
  measures on the CPU; the first call, the first reused call, the warm steps, the peak memory and
  the cache's bytes are reported here for the same methods at 480p.

The first generation of each compiles (its first call is reported as the compile time); then
the methods' generations are timed interleaved (order rotating every round), as many rounds as
--repeats and the budget allow; medians. Each step is timed between CUDA syncs.

``--dry-run``: the tiny Wan config on the CPU, 5 steps (one reused), aot_eager instead of inductor.
"""
from __future__ import annotations

import copy
import time

import torch

from ._common import (INF, PartReport, base_parser, flow_generation, flow_sigmas, latent_psnr, median,
                      raise_dynamo_limits, rel_diff, require_diffusers, run_part, wan_setup)


def main(argv):
    ap = base_parser(__doc__)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 8; dry run 5: one reused step)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds at most (the budget may allow fewer)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=None, help="override num_layers (default 30)")
    ap.add_argument("--inner", default=None, help="compiler of plain and of adacache's pieces "
                                                   "(default inductor; dry run aot_eager)")
    args = ap.parse_args(argv)
    return PartReport("overhead_bf16", "Part 3: adacache overhead in bf16, Wan 2.1 1.3B size (plain torch.compile vs "
                     "caching off vs fixed {inf: 3})", args).run(_run)


def _run(rep: PartReport, args, device):
    require_diffusers()
    from torch._dynamo.utils import counters

    from adacache_fx import AdaCacheConfig, compile_model

    raise_dynamo_limits()
    steps = args.steps or (5 if args.dry_run else 8)
    inner = args.inner or ("aot_eager" if args.dry_run else "inductor")
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    model, x0, ctx, desc = wan_setup(args.dry_run, device, dtype, batch=args.batch, layers=args.layers)
    rep.add(f"- model: {desc} (built in {time.perf_counter() - t0:.1f} s)",
            f"- loop: flow-matching Euler, {steps} steps, shift 3, timesteps 1000 * sigma; the adacache "
            "backends get the host timestep through `backend.step(t)`",
            f"- compilers: plain `torch.compile(model, backend={inner!r})`; adacache `inner={inner!r}`", "")
    sigmas = flow_sigmas(steps)
    configs = {"off": AdaCacheConfig.no_cache(steps), "fixed": AdaCacheConfig(codebook={INF: 3}, num_steps=steps)}
    copies = {name: copy.deepcopy(model) for name in ("regional", *configs)}   # each compiled in place
    backends = {name: compile_model(copies[name], config, inner=inner, dynamic=False) for name, config in configs.items()}
    copies["regional"].compile_repeated_blocks(fullgraph=True, backend=inner, dynamic=False)
    fns = {"plain": torch.compile(model, backend=inner, dynamic=False), "off": copies["off"],
           "fixed": copies["fixed"], "regional": copies["regional"]}
    counters.clear()
    first = {}
    for name, fn in fns.items():  # the first generation compiles (first call) and warms up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res = flow_generation(fn, x0, ctx, sigmas, device, backend=backends.get(name))
        first[name] = res
        mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
        rep.add(f"- {name}: first generation {res['total_s']:.1f} s, of which the first call (compile) "
                f"{res['step_s'][0]:.1f} s{mem}")
    breaks = sum(counters["graph_break"].values())
    for name, be in backends.items():
        r = be.report()
        rep.check(not r.uncached_graphs, f"{name}: graphs ran uncached: {r.uncached_graphs}")
        rep.check(bool(r.regions), f"{name}: no cached region found")
    rep.check(breaks == 0, f"{breaks} graph breaks")
    fixed = backends["fixed"].report()
    reused = [i for i in range(1, steps + 1) if i not in fixed.computed_steps]
    if reused:   # the first reused call of the first generation: what a skip costs before anything is warm
        rep.add(f"- fixed: first reused call (step {reused[0]}) {1000 * first['fixed']['step_s'][reused[0] - 1]:.1f} ms; "
                f"cache {fixed.cache_bytes / 2**20:.2f} MiB")
    rep.add("")
    # preliminary numbers from the warm steps (2..N) of the first generations, replaced by the timed rounds
    warm = {n: 1000 * median(first[n]["step_s"][1:]) for n in fns}
    rep.result(f"preliminary (first generations, median of steps 2..{steps}): per step plain {warm['plain']:.1f} ms, "
               f"caching off {warm['off']:.1f} ms ({warm['off'] / warm['plain'] - 1:+.1%}), fixed {warm['fixed']:.1f} ms; "
               "compile (first call): " + ", ".join(f"{n} {first[n]['step_s'][0]:.1f} s" for n in fns))

    # timed rounds, interleaved, order rotating
    names = list(fns)
    times = {n: [] for n in names}
    step_times = {n: [] for n in names}
    finals = {}
    round_s = sum(first[n]["total_s"] - first[n]["step_s"][0] for n in names) * steps / max(1, steps - 1)
    for k in range(args.repeats):
        if rep.remaining() < 1.3 * round_s + 5:
            rep.add(f"- stopped after {k} timed round(s): the budget left ({rep.remaining():.0f} s) does not fit "
                    f"another ({round_s:.0f} s)")
            break
        t_round = time.perf_counter()
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order:
            res = flow_generation(fns[name], x0, ctx, sigmas, device, backend=backends.get(name))
            times[name].append(res["total_s"])
            step_times[name].append(res["step_s"])
            finals[name] = res["final"]
        round_s = time.perf_counter() - t_round
        _write(rep, names, times, step_times, first, backends, steps, finals, breaks)
    rep.check(backends["off"].report().computed_steps == list(range(1, steps + 1)),
              "caching off did not compute every step")
    if not finals:
        rep.result("no timed round fitted in the budget: the preliminary numbers above are all there is")
    rep.add("", "(`off` and `fixed` compile the same pieces: the second gets them from inductor's FX graph cache, "
            "so its first call is mostly Dynamo tracing and the analysis.)")


def _write(rep, names, times, step_times, first, backends, steps, finals, breaks):
    computed = backends["fixed"].report().computed_steps
    med = {n: median(times[n]) for n in names}
    rows = []
    for n in names:
        rows.append((n, f"{med[n]:.3f}", f"{min(times[n]):.3f}-{max(times[n]):.3f}", f"{1000 * med[n] / steps:.1f}",
                     f"{med['plain'] / med[n]:.2f}x", f"{first[n]['step_s'][0]:.1f}", len(times[n])))
    comp_ms = [1000 * s[i - 1] for s in step_times["fixed"] for i in computed]
    reuse_ms = [1000 * s[i - 1] for s in step_times["fixed"] for i in range(1, steps + 1) if i not in computed]
    overhead = med["off"] / med["plain"] - 1
    speedup = med["plain"] / med["fixed"]
    ideal = steps / len(computed)
    rep.results.clear()
    rep.result(f"per step: plain {1000 * med['plain'] / steps:.1f} ms, caching off {1000 * med['off'] / steps:.1f} ms "
               f"(**{overhead:+.1%}** vs plain), fixed {{inf: 3}} {1000 * med['fixed'] / steps:.1f} ms")
    rep.result(f"fixed {{inf: 3}}: {len(computed)}/{steps} steps computed {computed}; speedup **{speedup:.2f}x**, ideal "
               f"{ideal:.2f}x, efficiency **{speedup / ideal:.1%}**; computed step {median(comp_ms):.1f} ms, reused step "
               f"{median(reuse_ms):.1f} ms (medians)")
    rep.result("compile (first call): " + ", ".join(f"{n} {first[n]['step_s'][0]:.1f} s" for n in names)
               + f"; graph breaks {breaks}")
    plain_final = finals["plain"]
    rep.result(f"final latent vs plain: caching off rel diff {rel_diff(finals['off'], plain_final):.2e}; fixed rel diff "
               f"{rel_diff(finals['fixed'], plain_final):.2e} (latent PSNR {latent_psnr(finals['fixed'], plain_final):.1f} dB); "
               "random weights, so this says nothing about image quality")
    rep.section("table", ["| method | median generation (s) | min-max (s) | per step (ms) | speedup vs plain "
                          "| first call incl. compile (s) | rounds |", "|---|---|---|---|---|---|---|"]
                + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
                + ["", "Per-step times of the timed rounds (ms):", ""]
                + [f"- {n}: " + "; ".join(", ".join(f"{1000 * s:.0f}" for s in st) for st in step_times[n]) for n in names]
                + [""])


if __name__ == "__main__":
    run_part(main)

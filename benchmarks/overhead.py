"""Overhead of the rewrite, measured side by side in one process.

Methods, on the same model (the Open-Sora-style reference STDiT from examples/models at a
benchmark size), each a full N-step generation, timed interleaved and repeated (medians):

* plain:   ``torch.compile(model)`` (inductor)
* off:     adacache with codebook ``{inf: 1}``: every step computed (goal: <= 3% slower)
* fixed:   adacache with codebook ``{inf: 3}``: a fixed schedule (goal: speedup >= 97%
           of the ideal ``N / computed steps``), with the default forecast reuse
* fixed_constant: the same with ``reuse="constant"`` (what the forecast costs)
* off_once / fixed_once: ``off`` / ``fixed`` with ``compile_blocks="once"`` (each repeated block
  compiled once and called per block, against the default here: with fewer than 8 blocks sharing a
  graph, ``"auto"`` compiles the region as one graph)

plus the compile time of each (first call). Usage::

    python -m benchmarks.overhead                  # writes benchmarks/results/overhead.{md,json}
    python -m benchmarks.overhead --quick          # small model, few repeats (a smoke run)

(from the repository root).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from adacache_fx import AdaCacheConfig, adacache_backend
from benchmarks.common import interleaved, machine, machine_markdown, median, write_results
from examples.models.stdit import STDiT3, init_random_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INF = float("inf")


def build(quick: bool):
    if quick:
        cfg = dict(input_size=(8, 8), hidden_size=64, depth=2, num_heads=4)
        frames, batch = 4, 2
    else:
        cfg = dict(input_size=(16, 16), hidden_size=192, depth=6, num_heads=6)
        frames, batch = 8, 2
    model = STDiT3(in_channels=4, patch_size=(1, 2, 2), mlp_ratio=4.0, caption_channels=64,
                   pred_sigma=True, init="default", **cfg)
    init_random_(model, seed=0)
    model = model.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    h, w = cfg["input_size"]
    x = torch.randn(batch, 4, frames, h, w, generator=g)
    y = torch.randn(batch, 8, 64, generator=g)
    return model, x, y, dict(cfg, frames=frames, batch=batch)


def generation(compiled, x, y, steps):
    def run():
        with torch.no_grad():
            for t in steps:
                compiled(x, torch.full((x.shape[0],), t), y)
    return run


def main():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    model, x, y, cfg = build(args.quick)
    steps = torch.linspace(1000, 1000 / args.steps, args.steps).tolist()

    backends = {
        "off": adacache_backend(AdaCacheConfig.no_cache(args.steps)),
        "fixed": adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=args.steps)),
        # the same schedule with the paper's constant reuse: what the default forecast costs
        "fixed_constant": adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=args.steps, reuse="constant")),
        # each repeated block compiled once: what a call per block costs per step on this model
        "off_once": adacache_backend(AdaCacheConfig.no_cache(args.steps, compile_blocks="once")),
        "fixed_once": adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=args.steps, compile_blocks="once")),
    }
    compiled = {"plain": torch.compile(model)}
    compiled.update({name: torch.compile(model, backend=be) for name, be in backends.items()})
    compile_s = {}
    for name, fn in compiled.items():  # first call compiles; time it
        start = time.perf_counter()
        with torch.no_grad():
            fn(x, torch.full((x.shape[0],), steps[0]), y)
        compile_s[name] = time.perf_counter() - start
    for be in backends.values():
        be.reset()
    runs = {name: generation(fn, x, y, steps) for name, fn in compiled.items()}
    interleaved(runs, 1)  # warm-up round
    for be in backends.values():
        be.reset()
    times = interleaved(runs, args.repeats)
    med = {name: median(ts) for name, ts in times.items()}
    computed = backends["fixed"].report().computed_steps
    assert backends["off"].report().computed_steps == list(range(1, args.steps + 1))

    overhead = med["off"] / med["plain"] - 1
    speedup = med["plain"] / med["fixed"]
    ideal = args.steps / len(computed)
    result = {
        "machine": machine(), "model": "examples/models/stdit.py STDiT3", "config": cfg,
        "steps": args.steps, "repeats": args.repeats,
        "median_generation_s": med, "per_step_ms": {k: 1000 * v / args.steps for k, v in med.items()},
        "all_generation_s": times, "compile_s": compile_s,
        "fixed_computed_steps": computed, "fixed_reuse": backends["fixed"].config.reuse,
        "off_overhead": overhead, "fixed_speedup": speedup, "fixed_ideal_speedup": ideal,
        "fixed_efficiency": speedup / ideal,
        "goals": {"off_overhead <= 3%": overhead <= 0.03, "fixed efficiency >= 97%": speedup / ideal >= 0.97},
        "forecast_cost": med["fixed"] / med["fixed_constant"] - 1,
        "compile_blocks_once_vs_whole": {"off": med["off_once"] / med["off"] - 1,
                                         "fixed": med["fixed_once"] / med["fixed"] - 1},
    }
    lines = [
        "# Overhead of the adacache rewrite (plain torch.compile vs adacache)",
        "",
        f"Command: `python -m benchmarks.overhead{' --quick' if args.quick else ''} --steps {args.steps} "
        f"--repeats {args.repeats}{f' --threads {args.threads}' if args.threads else ''}`",
        "",
        f"Load average when it started: {load}",
        "",
        machine_markdown(result["machine"]),
        "",
        f"Model: reference STDiT (examples/models/stdit.py), config {cfg}; {args.steps} steps; "
        f"each method a full generation, interleaved, {args.repeats} repeats, medians.",
        "",
        "| method | median generation (s) | min-max (s) | per step (ms) | compile, first call (s) |",
        "|---|---|---|---|---|",
    ]
    for name in ("plain", "off", "fixed", "fixed_constant", "off_once", "fixed_once"):
        lines.append(f"| {name} | {med[name]:.3f} | {min(times[name]):.2f}-{max(times[name]):.2f} | "
                     f"{1000 * med[name] / args.steps:.1f} | {compile_s[name]:.1f} |")
    lines += [
        "",
        f"- caching off (`{{inf: 1}}`) vs plain: **{overhead:+.1%}** per step (goal: at most +3%: "
        f"{'met' if overhead <= 0.03 else 'missed'})",
        f"- fixed schedule `{{inf: 3}}`: {len(computed)}/{args.steps} steps computed {computed}; speedup "
        f"**{speedup:.2f}x**, ideal {ideal:.2f}x, efficiency **{speedup / ideal:.1%}** (goal: at least 97%: "
        f"{'met' if speedup / ideal >= 0.97 else 'missed'})",
        f"- the fixed schedule's linear forecast vs constant reuse (`fixed_constant`): "
        f"**{result['forecast_cost']:+.1%}** per generation",
        f"- each repeated block compiled once (`compile_blocks=\"once\"`) vs the region as one graph (what "
        f"`\"auto\"` chooses for this model): caching off **{med['off_once'] / med['off'] - 1:+.1%}** per generation, "
        f"the fixed schedule **{med['fixed_once'] / med['fixed'] - 1:+.1%}**; first call {compile_s['off_once']:.1f} s "
        f"vs {compile_s['off']:.1f} s",
        f"- best of {args.repeats} (less sensitive to other load on the machine): caching off "
        f"{min(times['off']) / min(times['plain']) - 1:+.1%}, fixed speedup "
        f"{min(times['plain']) / min(times['fixed']):.2f}x",
        "",
    ]
    write_results(args.out, "overhead_quick" if args.quick else "overhead", lines, result)


if __name__ == "__main__":
    main()

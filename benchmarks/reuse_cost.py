"""What a reused step costs: the fused reused step (one compiled graph) against the split top
level run piece by piece, on the shipped reference model, side by side in one process.

Three methods, each a full generation (30 steps, guidance as one batch, inductor), timed
interleaved and repeated (medians): the uncached model under plain ``torch.compile``, and
AdaCache with the fixed codebook ``{inf: 5}`` (9 of 30 steps computed) with the fused reused
step and without it (``CachedGraph.reuse_step = None``: the path before ``rewrite.fuse_reuse``).
Every model call is timed too, so the table shows a computed call, a reused call and the first
reused call after a computed one.

    python -m benchmarks.reuse_cost --threads 1      # writes benchmarks/results/reuse_cost.{md,json}

(from the repository root).
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch

from adacache_fx import AdaCacheConfig, adacache_backend
from benchmarks.common import machine, machine_markdown, median, sync, write_results
from examples.reference import load_reference_model, sample

PROMPT = "red circle moving right fast"


def _timed(fn, calls: list):
    def call(**kwargs):
        sync()
        start = time.perf_counter()
        out = fn(**kwargs)
        sync()
        calls.append(time.perf_counter() - start)
        return out
    return call


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.reuse_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rate", type=int, default=5, help="the fixed codebook {inf: rate}")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    transformer, tokenizer = load_reference_model()
    embeds, null = tokenizer([PROMPT]), tokenizer([""])
    plain = torch.compile(copy.deepcopy(transformer), backend="inductor")
    methods = {"plain": (plain, None)}
    for name in ("fused", "piecewise"):
        backend = adacache_backend(AdaCacheConfig(codebook={math.inf: a.rate}, num_steps=a.steps, moreg=False),
                                   inner="inductor")
        methods[name] = (torch.compile(copy.deepcopy(transformer), backend=backend), backend)
    times = {name: [] for name in methods}
    calls = {name: [] for name in methods}
    computed = None

    def generate(name, record: bool):
        fn, backend = methods[name]
        if backend is not None:
            backend.reset()
            if name == "piecewise":
                for g in backend.graphs:
                    g.reuse_step = None
        per_call: list = []
        sync()
        start = time.perf_counter()
        sample(transformer, embeds, num_steps=a.steps, seed=0, guidance_scale=3.0, negative_prompt_embeds=null,
               model_fn=_timed(fn, per_call))
        sync()
        if record:
            times[name].append(time.perf_counter() - start)
            calls[name].append(per_call)
        return backend

    for name in methods:   # compile and warm up
        generate(name, record=False)
        generate(name, record=False)
    for _ in range(a.repeats):
        for name in methods:
            backend = generate(name, record=True)
            if backend is not None:
                computed = backend.report().computed_steps
    fused_graphs = sum(g.reuse_step is not None for g in methods["fused"][1].graphs)

    def per_kind(name):
        steps = range(1, a.steps + 1)
        by_step = [median([c[s - 1] for c in calls[name]]) for s in steps]
        if name == "plain":
            return {"call_ms": median(by_step) * 1e3}
        comp = [by_step[s - 1] for s in steps if s in computed]
        reused = [by_step[s - 1] for s in steps if s not in computed]
        first = [by_step[s - 1] for s in steps if s not in computed and s - 1 in computed]
        return {"computed_call_ms": median(comp) * 1e3, "reused_call_ms": median(reused) * 1e3,
                "first_reused_call_ms": median(first) * 1e3, "reused_calls_ms_total": sum(reused) * 1e3}

    result = {"machine": machine(), "command": "python -m benchmarks.reuse_cost " + " ".join(argv or []),
              "steps": a.steps, "rate": a.rate, "repeats": a.repeats, "computed_steps": computed,
              "fused_graphs": fused_graphs,
              "median_generation_s": {name: median(t) for name, t in times.items()},
              "spread_s": {name: [min(t), max(t)] for name, t in times.items()},
              "calls": {name: per_kind(name) for name in methods}}
    g = result["median_generation_s"]
    result["speedup"] = {name: g["plain"] / g[name] for name in ("fused", "piecewise")}
    result["ideal_speedup"] = a.steps / len(computed)
    lines = ["# What a reused step costs: fused reused step vs piece by piece", "",
             f"Command: `{result['command'].strip()}`", "", machine_markdown(result["machine"]), "",
             f"Model: the shipped reference WanTransformer3DModel, one prompt, guidance 3.0 (batch 2), "
             f"{a.steps} steps, inductor; AdaCache with `{{inf: {a.rate}}}`, linear forecast: computed steps "
             f"{computed}. Each method a full generation, interleaved, {a.repeats} repeats, medians; per-call "
             "times are medians per step over the repeats, then over the steps of a kind.", "",
             "| method | median generation (ms) | min-max (ms) | speedup | computed call (ms) | reused call (ms) "
             "| first reused call after a computed one (ms) |",
             "|---|---|---|---|---|---|---|"]
    for name in methods:
        c = result["calls"][name]
        lo, hi = result["spread_s"][name]
        speed = f"{result['speedup'][name]:.2f}x" if name in result["speedup"] else "1.00x"
        if name == "plain":
            cells = f"{c['call_ms']:.2f} | - | -"
        else:
            cells = f"{c['computed_call_ms']:.2f} | {c['reused_call_ms']:.2f} | {c['first_reused_call_ms']:.2f}"
        lines.append(f"| {name} | {g[name] * 1e3:.1f} | {lo * 1e3:.0f}-{hi * 1e3:.0f} | {speed} | {cells} |")
    lines += ["", f"- ideal speedup ({a.steps} / {len(computed)} computed steps): {result['ideal_speedup']:.2f}x",
              f"- graphs running the fused reused step: {fused_graphs} of {len(methods['fused'][1].graphs)}", ""]
    write_results(a.out, "reuse_cost", lines, result)
    return result


if __name__ == "__main__":
    main()

"""A model that breaks Dynamo's graph in every block: plain ``torch.compile`` vs ``compile_model``.

The model is ``examples/models/breaking_dit.py`` with three constructs on in every block
(``--model captured``, the default): a rotary table from ``grid_sizes.tolist()``, text tokens
sliced to ``mask.sum().item()``, and a top-k mixture of experts routed with ``nonzero``, all of
which ``compile_model`` captures into one graph; or (``--model python_loop``) the same with the
experts dispatched by a Python loop over the per-expert token counts (HiDream-Image's code), which
no capture keeps in the graph: ``compile_model(..., block_guard="modules")`` guards the block list
at its calls. Methods, each on its own copy of the same weights, inner compiler inductor:

* plain: ``torch.compile(model)`` (default Dynamo config: the graph breaks)
* off:   ``compile_model(model, AdaCacheConfig.no_cache(N))``: every step computed
* fixed: ``compile_model(model, AdaCacheConfig(codebook={inf: 3}, num_steps=N))``

Under the block guard the first call runs eagerly (it finds the blocks) and the second compiles:
"first call" is then the first two calls.

Measured: the compile time (first call), graphs compiled and graph breaks (Dynamo's counters),
recompiles inside a generation, the graphs a second prompt with another number of valid text
tokens adds, and the per-step time of full N-step generations (medians). Each method runs in
its own process, the methods alternated: Dynamo's code caches are per process and keyed by the
model's code objects, and a plain and a captured compile of the same model code in one process
interfere (the second keeps the first one's graph breaks).
Usage (from the repository root)::

    python -m benchmarks.graph_breaks            # writes benchmarks/results/graph_breaks.{md,json}
    python -m benchmarks.graph_breaks --quick    # a smoke run
    python -m benchmarks.graph_breaks --model python_loop   # benchmarks/results/graph_breaks_python_loop.{md,json}
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import torch
from torch._dynamo.utils import counters

from adacache_fx import AdaCacheConfig, compile_model
from benchmarks.common import machine, machine_markdown, median, write_results
from examples.models.breaking_dit import BreakingDiT, make_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INF = float("inf")
#: model -> (constructs, compile_model's block_guard)
MODELS = {"captured": (dict(rope_tolist=True, mask_item=True, moe=True), "graph"),
          "python_loop": (dict(rope_tolist=True, mask_item=True, moe_loop=True), "modules")}
METHODS = ("plain", "off", "fixed")
RESULT_TAG = "GRAPH_BREAKS_RESULT "


def _dynamo_counts() -> dict:
    return {"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values())}


def _generation(model, steps, inputs):
    x, _, grid, context, mask = inputs

    def run():
        with torch.no_grad():
            for t in steps:
                model(x, torch.full((x.shape[0],), t), grid, context, mask)
    return run


def _build(quick: bool, model_name: str):
    size = dict(dim=32, depth=2) if quick else dict(dim=96, heads=4, depth=6)
    shape = dict(frames=3, height=4, width=5) if quick else dict(frames=4, height=8, width=8)
    torch.manual_seed(0)
    model = BreakingDiT(**size, **MODELS[model_name][0]).eval().requires_grad_(False)
    return model, size, shape


def measure(method: str, steps: int, repeats: int, quick: bool, model_name: str = "captured") -> dict:
    """One method in this process: compile, Dynamo's counts, then ``repeats`` timed generations."""
    model, size, shape = _build(quick, model_name)
    block_guard = MODELS[model_name][1]
    ts = torch.linspace(1000, 1000 / steps, steps).tolist()
    inputs = make_inputs(2, ts[0], **shape, text_tokens=12, valid=9)
    other_prompt = make_inputs(2, ts[0], **shape, text_tokens=12, valid=6)
    torch._dynamo.reset()
    counters.clear()
    backend = None
    if method == "plain":
        model = torch.compile(model)
    else:
        config = AdaCacheConfig.no_cache(steps) if method == "off" else AdaCacheConfig(codebook={INF: 3}, num_steps=steps)
        backend = compile_model(model, config, block_guard=block_guard)
    start = time.perf_counter()
    _generation(model, ts[:2] if backend is not None and block_guard == "modules" else ts[:1], inputs)()
    compile_s = time.perf_counter() - start
    first = _dynamo_counts()
    if backend is not None:
        backend.reset()
    _generation(model, ts, inputs)()
    in_generation = _dynamo_counts()["graphs"] - first["graphs"]
    report = backend.report() if backend is not None else None
    if backend is not None:
        backend.reset()
    _generation(model, ts[:2], other_prompt)()
    added = _dynamo_counts()["graphs"] - first["graphs"] - in_generation
    times = []
    for _ in range(repeats):
        if backend is not None:
            backend.reset()
        start = time.perf_counter()
        _generation(model, ts, inputs)()
        times.append(time.perf_counter() - start)
    return {"method": method, "size": size, "shape": shape, "compile_s": compile_s, "graphs": first["graphs"],
            "graph_breaks": first["breaks"], "recompiles_in_generation": in_generation,
            "graphs_added_by_other_prompt": added, "generation_s": times,
            "computed_steps": report.computed_steps if report else None,
            "cached_flops_fraction": report.cached_flops_fraction if report else None}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.graph_breaks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per method, alternated")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", choices=sorted(MODELS), default="captured")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)   # a child process
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.rounds = min(args.steps, 6), 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.method:
        print(RESULT_TAG + json.dumps(measure(args.method, args.steps, args.repeats, args.quick, args.model)))
        return
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    runs: dict = {m: [] for m in METHODS}
    for _ in range(args.rounds):          # methods alternated, one process each
        for method in METHODS:
            cmd = [sys.executable, "-m", "benchmarks.graph_breaks", "--method", method, "--steps", str(args.steps),
                   "--repeats", str(args.repeats), "--threads", str(args.threads), "--model", args.model] + (
                       ["--quick"] if args.quick else [])
            # inductor's on-disk caches off, so each process's compile time is a cold compile
            env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
            out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
            runs[method].append(json.loads(next(ln for ln in out.splitlines() if ln.startswith(RESULT_TAG))[len(RESULT_TAG):]))
    stats = {m: runs[m][0] for m in METHODS}
    times = {m: [t for r in runs[m] for t in r["generation_s"]] for m in METHODS}
    med = {m: median(ts) for m, ts in times.items()}
    size, shape = stats["plain"]["size"], stats["plain"]["shape"]
    computed = stats["fixed"]["computed_steps"]
    assert stats["off"]["computed_steps"] == list(range(1, args.steps + 1)), stats["off"]["computed_steps"]
    constructs, block_guard = MODELS[args.model]
    result = {
        "machine": machine(), "model": "examples/models/breaking_dit.py BreakingDiT", "constructs": constructs,
        "block_guard": block_guard,
        "size": size, "shape": shape, "steps": args.steps, "repeats": args.repeats, "rounds": args.rounds,
        "load_average": load, "runs": runs, "median_generation_s": med,
        "per_step_ms": {k: 1000 * v / args.steps for k, v in med.items()},
        "fixed_computed_steps": computed, "cached_flops_fraction": stats["fixed"]["cached_flops_fraction"],
    }
    per_step = result["per_step_ms"]
    lines = [
        "# A model that breaks Dynamo's graph in every block: plain torch.compile vs compile_model",
        "",
        f"Command: `python -m benchmarks.graph_breaks{' --quick' if args.quick else ''}"
        f"{f' --model {args.model}' if args.model != 'captured' else ''} --steps {args.steps} "
        f"--repeats {args.repeats} --rounds {args.rounds}{f' --threads {args.threads}' if args.threads else ''}`",
        "",
        f"Load average when it started: {load}",
        "",
        machine_markdown(result["machine"]),
        "",
        f"Model: examples/models/breaking_dit.py `BreakingDiT({size}, {constructs})`, video {shape}, 12 text "
        f"tokens (9 valid); inner compiler inductor; {args.steps}-step generations. Each method runs in its own "
        f"process (Dynamo's caches are per process and keyed by the model's code, so plain and captured "
        f"compiles of the same code in one process interfere: README, limitations), the methods alternated, "
        f"{args.rounds} process(es) x {args.repeats} timed generations each, medians. Graphs and breaks are "
        "Dynamo's counters for the first call; compile times are cold (inductor's on-disk caches disabled)."
        + (" compile_model runs with `block_guard=\"modules\"`: its first call runs eagerly (it finds the "
           "blocks), the second compiles, so its first-call columns are the first two calls." if block_guard == "modules"
           else ""),
        "",
        "| method | compile, first call (s) | graphs | graph breaks | recompiles in a generation | graphs added by "
        "a prompt with 6 valid text tokens | per step (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in METHODS:
        s = stats[name]
        lines.append(f"| {name} | {s['compile_s']:.1f} | {s['graphs']} | {s['graph_breaks']} | "
                     f"{s['recompiles_in_generation']} | {s['graphs_added_by_other_prompt']} | {per_step[name]:.2f} |")
    lines += [
        "",
        f"- caching off vs plain torch.compile: **{med['off'] / med['plain'] - 1:+.1%}** per step "
        f"({stats['off']['graphs']} graph(s) and {stats['off']['graph_breaks']} break(s) against "
        f"{stats['plain']['graphs']} graphs and {stats['plain']['graph_breaks']} breaks)",
        f"- fixed `{{inf: 3}}`: {len(computed)}/{args.steps} steps computed; **{med['plain'] / med['fixed']:.2f}x** "
        f"faster than plain; {result['cached_flops_fraction']:.1%} of a forward's FLOPs in the cached region",
        "",
    ]
    name = "graph_breaks" + ("" if args.model == "captured" else f"_{args.model}") + ("_quick" if args.quick else "")
    write_results(args.out, name, lines, result)


if __name__ == "__main__":
    main()

"""Startup at real model size: compile time, step time and memory at the Wan 2.1 1.3B configuration.

diffusers' ``WanTransformer3DModel`` at the Wan 2.1 T2V 1.3B configuration (30 blocks, dim 1536 =
12 heads x 128, ffn 8960, text dim 4096; 1.42 B parameters) with seeded random weights, float32,
and at 40 blocks of the same width (Wan 14B's depth; 14B's own width does not fit this machine's
memory), on a tiny latent (1, 16, 3, 16, 16) = 192 tokens and 16 text tokens. Methods:

* ``plain``: ``torch.compile(model)`` (inductor, the whole forward as one graph);
* ``regional``: diffusers' ``model.compile_repeated_blocks(fullgraph=True)`` (each block class
  compiled once, the rest eager);
* ``adacache-off`` / ``adacache-inf3``: ``adacache_fx.compile_model`` with ``{inf: 1}`` (caching
  off) / ``{inf: 3}`` (steps 1, 2, 5, 6 of 6 computed), ``compile_blocks="once"`` (the default at
  this depth: Dynamo traces one block, each repeated block compiled once, the rest uncompiled) or
  ``"whole"`` (the whole graph traced and the region compiled as one graph).

Each method runs in its own process (a fresh Dynamo, and a fresh inductor cache directory, so
nothing is reused from an earlier compile), one generation of 6 steps with a changing latent
(``--generations 2`` for two). Reported: the first call (compile + run), the first reused call (step
3), the warm computed and reused steps (medians over the calls after the first of the last
generation: computed steps 2, 5, 6 and reused step 4 with ``{inf: 3}``), the process's peak
resident memory and ``report().cache_bytes``; and, after each first call, Dynamo's own timers (``PHASES``):
where that first call went, and the gap to ``compile_repeated_blocks``' phase by phase.

    python -m benchmarks.compile_time --threads 1                 # every method, 30 and 40 blocks
    python -m benchmarks.compile_time --blocks 30 --methods plain adacache-off-once --threads 1
    python -m benchmarks.compile_time --blocks 30 --rounds 3 --threads 1   # every method 3 times, interleaved
    python -m benchmarks.compile_time --merge a/compile_time.json b/compile_time.json --more-rounds   # 2 runs as rounds
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.common import command_line, machine, machine_markdown, write_results

WAN_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
LATENT = (1, 16, 3, 16, 16)
TEXT = (1, 16, 4096)
STEPS = 6
METHODS = ("plain", "regional", "adacache-off-once", "adacache-inf3-once", "adacache-off-whole", "adacache-inf3-whole")


#: Dynamo's timers (``torch._dynamo.utils.compile_times``), read after the first call: where its compile went
PHASES = {
    "dynamo_s": "_compile.compile_inner",             # Dynamo's whole compile, the backend's call included
    "tracing_s": "bytecode_tracing",                   # its trace of the bytecode (nested regions included)
    "region_trace_s": "invoke_subgraph_trace",         # nested regions traced (the first block of each class)
    "region_lookup_s": "invoke_subgraph_reuse_lookup",  # the reuse check of every other block
    "region_stamp_s": "invoke_subgraph_reuse_stamp_out",  # its traced graph stamped out for them
    "backend_s": "OutputGraph.call_user_compiler",     # the backend (regional and plain: inductor itself)
    "guards_s": "build_guards",
}


def dynamo_phases() -> dict:
    """Seconds per phase of ``PHASES`` spent so far in this process (0.0 where none was timed)."""
    from torch._dynamo.utils import compile_times
    headers, values = compile_times(repr="csv", aggregate=True)
    seconds = dict(zip(headers, (float(v) for v in values)))
    return {name: seconds.get(key, 0.0) for name, key in PHASES.items()}


def build(blocks: int, tiny: bool = False):
    import diffusers
    torch.manual_seed(0)
    config = dict(WAN_13B, num_layers=blocks)
    if tiny:   # the smoke test's size
        config.update(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32, freq_dim=32)
    return diffusers.WanTransformer3DModel(**config).eval().requires_grad_(False), config


def _timed_inductor(log: list):
    """Inductor as the backend's inner compiler, each compile's op count and seconds logged."""
    from torch._dynamo.backends.registry import lookup_backend
    inductor = lookup_backend("inductor")

    def inner(gm, example_inputs):
        start = time.perf_counter()
        fn = inductor(gm, example_inputs)
        log.append([sum(n.op == "call_function" for n in gm.graph.nodes), time.perf_counter() - start])
        return fn
    return inner


def prepare(model, method: str, log: list):
    """The callable to run, and the backend (None for the baselines)."""
    if method == "plain":
        return torch.compile(model), None
    if method == "regional":
        model.compile_repeated_blocks(fullgraph=True)
        return model, None
    from adacache_fx import AdaCacheConfig, compile_model
    _name, codebook, blocks = method.split("-")
    config = AdaCacheConfig(codebook={math.inf: 1 if codebook == "off" else 3}, num_steps=STEPS, compile_blocks=blocks)
    return model, compile_model(model, config, inner=_timed_inductor(log))


def measure(method: str, blocks: int, tiny: bool = False, generations: int = 1) -> dict:
    model, config = build(blocks, tiny)
    inner_compiles: list = []
    run, backend = prepare(model, method, inner_compiles)
    text_shape = TEXT if not tiny else (1, 16, config["text_dim"])
    g = torch.Generator().manual_seed(0)
    text = torch.randn(text_shape, generator=g)
    calls = []
    with torch.no_grad():
        for generation in range(generations):
            x = torch.randn(LATENT, generator=torch.Generator().manual_seed(generation))
            for step in range(STEPS):
                t = torch.tensor([1000.0 * (1 - step / STEPS)])
                start = time.perf_counter()
                out = run(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
                calls.append({"generation": generation, "step": step + 1, "seconds": time.perf_counter() - start})
                if len(calls) == 1:
                    phases = dynamo_phases()
                x = x - 0.1 * out
            if backend is not None:
                computed = set(backend.report(model).computed_steps)
                for c in calls[-STEPS:]:
                    c["computed"] = c["step"] in computed
    for c in calls:
        c.setdefault("computed", True)
    reused_first = [c for c in calls if not c["computed"]]
    # warm: the last generation's calls, its first call left out when it is the very first (the compile)
    second = [c for c in calls if c["generation"] == generations - 1 and c is not calls[0] and c is not
              (reused_first[0] if reused_first else None)]
    return {
        "method": method, "blocks": blocks, "parameters": sum(p.numel() for p in model.parameters()),
        "first_call_s": calls[0]["seconds"],
        "first_reused_s": reused_first[0]["seconds"] if reused_first else None,
        "warm_computed_s": statistics.median(c["seconds"] for c in second if c["computed"]),
        "warm_reused_s": (statistics.median(c["seconds"] for c in second if not c["computed"])
                          if any(not c["computed"] for c in second) else None),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "cache_bytes": backend.report(model).cache_bytes if backend is not None else 0,
        "compile_seconds": backend.report(model).compile_seconds if backend is not None else None,
        "inner_compiles": inner_compiles,   # [ops, seconds] per inner compile (adacache methods)
        "phases": phases,                   # Dynamo's timers after the first call (PHASES)
        "calls": calls,
    }


def run_in_process(method: str, blocks: int, threads: int, tiny: bool = False, generations: int = 1) -> dict:
    """One method in a fresh process with a fresh inductor cache directory."""
    with tempfile.TemporaryDirectory() as cache, tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_FX_GRAPH_CACHE="0",
                   TORCHINDUCTOR_AUTOGRAD_CACHE="0")
        args = [sys.executable, "-m", "benchmarks.compile_time", "--one", method, "--blocks", str(blocks),
                "--threads", str(threads), "--generations", str(generations), "--json", out.name] + \
            (["--tiny"] if tiny else [])
        subprocess.run(args, env=env, check=True)
        with open(out.name) as f:
            return json.load(f)


def _s(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def _median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def by_method(rows: list) -> list:
    """One row per (blocks, method): the median of each time over its rounds, the largest peak,
    the first calls of every round (``first_call_runs``), and the round whose first call is the
    median's (``median_run``: where its first call went)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["blocks"], r["method"]), []).append(r)
    out = []
    for runs in groups.values():
        first = [r["first_call_s"] for r in runs]
        median = statistics.median(first)
        out.append(dict(runs[0], first_call_s=median, first_call_runs=first,
                        first_reused_s=_median_or_none(r["first_reused_s"] for r in runs),
                        warm_computed_s=statistics.median(r["warm_computed_s"] for r in runs),
                        warm_reused_s=_median_or_none(r["warm_reused_s"] for r in runs),
                        peak_rss_gib=max(r["peak_rss_gib"] for r in runs),
                        median_run=min(runs, key=lambda r: abs(r["first_call_s"] - median))))
    return out


def _inner_seconds(run: dict) -> float:
    return sum(seconds for _ops, seconds in run.get("inner_compiles") or [])


def first_call_terms(ours: dict, regional: dict) -> list:
    """Where one adacache run's first call differs from one regional run's, phase by phase:
    ``[(phase, seconds more, detail)]``, adding up to the difference of the first calls ([] without
    Dynamo's timers)."""
    if not ours.get("phases") or not regional.get("phases"):
        return []
    a, b = ours["phases"], regional["phases"]
    inner = _inner_seconds(ours)
    rest = lambda r: r["first_call_s"] - r["phases"]["dynamo_s"]  # noqa: E731
    other = lambda p: p["dynamo_s"] - p["tracing_s"] - p["backend_s"] - p["guards_s"]  # noqa: E731
    return [
        ("Dynamo's trace", a["tracing_s"] - b["tracing_s"],
         f"{a['tracing_s']:.1f} s for the whole model, of which {a['region_lookup_s']:.1f} s of reuse checks and "
         f"{a['region_stamp_s']:.1f} s of stamp-outs for the blocks after the first, against {b['tracing_s']:.1f} s "
         "for one block"),
        ("the backend's passes", a["backend_s"] - inner, "the inlining, analysis, rewrite and split"),
        ("the inner compile", inner - b["backend_s"], f"{inner:.1f} s against regional's {b['backend_s']:.1f} s"),
        ("guards", a["guards_s"] - b["guards_s"], f"{a['guards_s']:.1f} s against {b['guards_s']:.1f} s"),
        ("the rest of Dynamo", other(a) - other(b), "outside its trace, the backend and the guards"),
        ("the first run and the rest", rest(ours) - rest(regional), f"{rest(ours):.1f} s against {rest(regional):.1f} s"),
    ]


def first_call_gap(ours: dict, regional: dict) -> str:
    """``first_call_terms`` as the tail of a goal line ("" without Dynamo's timers)."""
    terms = first_call_terms(ours, regional)
    if not terms:
        return ""
    return (f"; the rounds nearest the medians differ by {ours['first_call_s'] - regional['first_call_s']:+.1f} s = " +
            ", ".join(f"{name} {delta:+.1f} s ({detail})" for name, delta, detail in terms))


def goal_lines(summary: list) -> list:
    """The issue's goals against ``by_method``'s rows, per depth: the first call against
    ``compile_repeated_blocks``' (with where the difference went) and the warm computed step against
    plain ``torch.compile``'s."""
    lines = []
    for blocks in sorted({r["blocks"] for r in summary}):
        rows = {r["method"]: r for r in summary if r["blocks"] == blocks}
        ours = rows.get("adacache-off-once")
        if ours is None:
            continue
        if "regional" in rows:
            lines.append(f"- {blocks} blocks: first call {ours['first_call_s']:.1f} s against compile_repeated_blocks' "
                         f"{rows['regional']['first_call_s']:.1f} s "
                         f"({ours['first_call_s'] / rows['regional']['first_call_s']:.2f}x; goal <= 1.00x)" +
                         first_call_gap(ours["median_run"], rows["regional"]["median_run"]))
        if "plain" in rows:
            lines.append(f"- {blocks} blocks: warm computed step {ours['warm_computed_s']:.2f} s against plain "
                         f"torch.compile's {rows['plain']['warm_computed_s']:.2f} s "
                         f"({ours['warm_computed_s'] / rows['plain']['warm_computed_s']:.3f}x; goal <= 1.03x)")
    return lines


def markdown(result: dict, info: dict, command: str) -> list:
    lines = ["# Startup at real size: compile time, step time, memory", "", machine_markdown(info), "",
             f"Command: `{command}`", "",
             "diffusers `WanTransformer3DModel` at the Wan 2.1 1.3B configuration (dim 1536, ffn 8960, text dim 4096) "
             f"with 30 blocks and with 40 (Wan 14B's depth), seeded random weights, float32, latent {LATENT}, "
             f"{TEXT[1]} text tokens, {STEPS} steps per generation, {result.get('generations', 1)} generation(s); each "
             "method in its own process with an empty inductor cache. First reused call: the first step that skips "
             "the blocks. Warm: medians over the last generation's calls after the first call and the first reused "
             f"call. {result.get('rounds', 1)} round(s): every method run once per round, the methods interleaved; "
             "each time is the median over the rounds (first call: min-max in brackets).", "",
             "| blocks | method | parameters | first call (s) | first reused call (s) | warm computed step (s) | "
             "warm reused step (s) | peak RSS (GiB) | cache bytes |", "|---|---|---|---|---|---|---|---|---|"]
    summary = by_method(result["rows"])
    for r in summary:
        runs = r["first_call_runs"]
        spread = f" ({min(runs):.1f}-{max(runs):.1f})" if len(runs) > 1 else ""
        lines.append(f"| {r['blocks']} | {r['method']} | {r['parameters'] / 1e9:.2f} B | {_s(r['first_call_s'], '.1f')}{spread} | "
                     f"{_s(r['first_reused_s'])} | {_s(r['warm_computed_s'])} | {_s(r['warm_reused_s'])} | "
                     f"{r['peak_rss_gib']:.1f} | {r['cache_bytes']} |")
    runs = [r["median_run"] for r in summary if r["median_run"].get("phases")]
    if runs:
        lines += ["", "## Where the first call goes", "",
                  "Dynamo's own timers (`torch._dynamo.utils.compile_times`) after the first call, for the round whose "
                  "first call is nearest the median (its own first call in the table). Dynamo: its whole compile, the backend's call included; nested regions: "
                  "the first block's trace, the reuse check of every other block, their stamp-outs (adacache only: "
                  "`compile_model` marks the blocks); the backend: the user compiler Dynamo calls (for regional and plain "
                  "that is inductor itself; for adacache the passes and the inner compiles); the first run and the rest: "
                  "the first call less Dynamo's compile.", "",
                  "| blocks | method | first call (s) | Dynamo (s) | its trace (s) | nested regions (s) | the backend (s) | "
                  "inner compiles (s) | guards (s) | first run and the rest (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            p = r["phases"]
            regions = (f"{p['region_trace_s']:.1f} / {p['region_lookup_s']:.1f} / {p['region_stamp_s']:.1f}"
                       if p["region_trace_s"] else "-")
            inner = f"{_inner_seconds(r):.1f}" if r.get("inner_compiles") else "-"
            lines.append(f"| {r['blocks']} | {r['method']} | {r['first_call_s']:.1f} | {p['dynamo_s']:.1f} | "
                         f"{p['tracing_s']:.1f} | {regions} | {p['backend_s']:.1f} | {inner} | {p['guards_s']:.1f} | "
                         f"{r['first_call_s'] - p['dynamo_s']:.1f} |")
    lines += ["", "## Goal", ""] + goal_lines(summary)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[30, 40])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="a tiny width (the smoke test)")
    parser.add_argument("--generations", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every method this many times, interleaved (the table gives medians)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="only combine earlier outputs (e.g. 30 and 40 blocks run as two commands)")
    parser.add_argument("--more-rounds", action="store_true",
                        help="with --merge: the outputs are rounds of one measurement (every run kept, the "
                             "medians taken over all of them) instead of the later replacing the earlier")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)   # the child process: one method
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.merge:
        parts = [json.load(open(path)) for path in a.merge]
        rows: dict = {}
        offset = 0
        for part in parts:   # a later measurement of the same method and depth replaces the earlier
            latest: dict = {}
            for r in part["rows"]:
                r = dict(r, round=r.get("round", 0) + offset) if a.more_rounds else r
                latest.setdefault((r["blocks"], r["method"]), []).append(r)
            for key, runs in latest.items():
                rows[key] = (rows.get(key, []) + runs) if a.more_rounds else runs
            offset += part.get("rounds", 1)
        rounds = max(len(runs) for runs in rows.values())
        result = dict(parts[0], rows=[r for runs in rows.values() for r in runs], rounds=rounds,
                      command=" ; ".join([p["command"] for p in parts] + [command_line("benchmarks.compile_time", argv)]))
        write_results(a.out, "compile_time", markdown(result, result["machine"], result["command"]), result)
        return
    if a.one:
        with open(a.json, "w") as f:
            json.dump(measure(a.one, a.blocks[0], a.tiny, a.generations), f)
        return
    rows = []
    for round_ in range(a.rounds):   # the methods interleaved, round after round: medians over rounds
        for blocks in a.blocks:
            for method in a.methods:
                row = dict(run_in_process(method, blocks, a.threads, a.tiny, a.generations), round=round_)
                print(f"round {round_ + 1}, {blocks} blocks, {method}: first call {row['first_call_s']:.1f} s, warm "
                      f"computed {row['warm_computed_s']:.2f} s, reused {_s(row['warm_reused_s'])} s, "
                      f"peak {row['peak_rss_gib']:.1f} GiB", flush=True)
                rows.append(row)
    info, command = machine(), command_line("benchmarks.compile_time", argv)
    result = {"rows": rows, "machine": info, "command": command, "generations": a.generations, "rounds": a.rounds}
    write_results(a.out, "compile_time" + ("_tiny" if a.tiny else ""), markdown(result, info, command), result)


if __name__ == "__main__":
    main()

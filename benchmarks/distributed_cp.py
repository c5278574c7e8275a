"""AdaCache under diffusers' own context parallelism: 1 and 2 processes, Ulysses and ring (gloo, CPU).

The model is diffusers' ``WanTransformer3DModel`` at a benchmark size (seeded random weights,
latents ``(1, 16, 8, 32, 32)``: 2,048 tokens), parallelised as a diffusers user does it:
``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))`` (or
``ring_degree``). On CPU the ranks need the shims of ``examples/cpu_context_parallel.py``. Per
process count and mode:

* baseline: plain ``torch.compile(transformer, backend="eager")``, no caching (diffusers' hooks
  break its graph on the first call: counted);
* AdaCache: ``compile_model(transformer, AdaCacheConfig.fast(30))`` (official fast codebook and
  MoReg, sharded over the ranks' frames), inner compiler ``eager`` as the baseline's;
* latency of one 30-step flow-Euler generation (the latent moves with the output every step),
  max over ranks, median of interleaved repeats;
* communication, measured: one more generation of each under ``torch.profiler``; the summed
  durations of the gloo collectives it ran (``gloo:*`` events: the attention's all-to-alls or
  KV all-gathers, the output gather, and AdaCache's metric gather and MoReg halo exchange), max
  over ranks. Saved = baseline's minus AdaCache's.

Usage (from the repository root)::

    python -m benchmarks.distributed --engine cp    # writes benchmarks/results/distributed_cp.{md,json}
"""
from __future__ import annotations


import torch

from benchmarks.common import machine_markdown

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
           text_dim=64, freq_dim=64, ffn_dim=512, num_layers=4, rope_max_seq_len=64)
WAN_QUICK = dict(WAN, num_layers=2, ffn_dim=128)
LATENT = (1, 16, 8, 32, 32)
LATENT_QUICK = (1, 16, 4, 8, 8)
TEXT = (1, 16, 64)


def _build(quick: bool):
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    return WanTransformer3DModel(**(WAN_QUICK if quick else WAN)).eval()


def _inputs(quick: bool):
    g = torch.Generator().manual_seed(0)
    return torch.randn(LATENT_QUICK if quick else LATENT, generator=g), torch.randn(TEXT, generator=g)


def _generation(fn, x0, text, n: int):
    grid = torch.linspace(1000.0, 1000.0 / n, n).tolist() + [0.0]
    x = x0
    with torch.no_grad():
        for t, t_next in zip(grid, grid[1:]):
            out = fn(x, torch.tensor([t]), encoder_hidden_states=text, return_dict=False)[0]
            x = x + (t_next - t) / 1000.0 * out
    return x


def _communication(fn) -> tuple:
    """(seconds, {collective: count}) of the gloo collectives that ``fn()`` ran on this rank."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.key.startswith("gloo:")]
    return sum(e.cpu_time_total for e in events) / 1e6, {e.key: e.count for e in events}


def measure(rank: int, world: int, args, threads: int) -> dict:
    """One rank's results for every mode at this process count (called in each spawned rank)."""
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    from adacache_fx import AdaCacheConfig, compile_model
    from benchmarks.distributed import _max_over_ranks, interleaved_generations, same_on_every_rank
    from examples.cpu_context_parallel import cpu_lse_attention, cpu_workarounds, enable_context_parallel

    cpu_workarounds(threads)
    cpu_lse_attention()
    n = args.steps
    x0, text = _inputs(args.quick)
    rows = []
    for mode in (args.modes.split(",") if world > 1 else ["none"]):
        models = [_build(args.quick), _build(args.quick)]
        if world > 1:
            for m in models:
                enable_context_parallel(m, mode, world)
        torch._dynamo.reset()
        counters.clear()
        baseline = torch.compile(models[0], backend="eager")
        _generation(baseline, x0, text, n)   # compile
        baseline_breaks = sum(counters["graph_break"].values())
        baseline_graphs = counters["stats"]["unique_graphs"]
        counters.clear()
        backend = compile_model(models[1], AdaCacheConfig.fast(num_steps=n), inner="eager")
        _generation(models[1], x0, text, n)   # compile
        cached_breaks = sum(counters["graph_break"].values())
        cached_graphs = counters["stats"]["unique_graphs"]

        times, out_base, out_cached = interleaved_generations(
            lambda: _generation(baseline, x0, text, n), lambda: _generation(models[1], x0, text, n), backend.reset,
            args.repeats)
        report = backend.report()
        computed = report.computed_steps
        same_on_every_rank(computed, world)

        dist.barrier()
        comm_base, counts_base = _communication(lambda: _generation(baseline, x0, text, n))
        backend.reset()
        dist.barrier()
        comm_cached, counts_cached = _communication(lambda: _generation(models[1], x0, text, n))
        rows.append({
            "world": world, "mode": mode, "threads_per_rank": threads, "steps": n, "computed_steps": computed,
            "moreg": all(m.motion is not None for m in report.metrics),
            "baseline_s": sorted(times["baseline"])[len(times["baseline"]) // 2],
            "adacache_s": sorted(times["adacache"])[len(times["adacache"]) // 2],
            "baseline_all": times["baseline"], "adacache_all": times["adacache"],
            "comm_baseline_s": _max_over_ranks(comm_base), "comm_adacache_s": _max_over_ranks(comm_cached),
            "collectives_baseline": counts_base, "collectives_adacache": counts_cached,
            "graphs_baseline": baseline_graphs, "graph_breaks_baseline": baseline_breaks,
            "graphs_adacache": cached_graphs, "graph_breaks_adacache": cached_breaks,
            "uncached_graphs": report.uncached_graphs,
            "max_abs_diff_vs_baseline": float((out_base - out_cached).abs().max()),
            "model": dict(WAN_QUICK if args.quick else WAN, latent=list(LATENT_QUICK if args.quick else LATENT)),
        })
    return {"rows": rows}


def markdown(rows: list, info: dict, command: str) -> list:
    single = next((r for r in rows if r["world"] == 1), None)
    lines = [
        "# AdaCache under diffusers' context parallelism (gloo, CPU)", "",
        f"diffusers `WanTransformer3DModel` {rows[0]['model']}, seeded random weights, {rows[0]['steps']}-step "
        "flow-Euler loop, `enable_parallelism(ContextParallelConfig(ulysses_degree=P))` or `ring_degree=P` "
        "(CPU shims: examples/cpu_context_parallel.py). Baseline: plain `torch.compile(transformer, "
        "backend='eager')`. AdaCache: `compile_model(transformer, AdaCacheConfig.fast(30))` (official fast "
        "codebook, MoReg sharded over the frames), inner `eager`. Latency: one generation, max over ranks, median "
        "of interleaved repeats. Communication: measured in one more profiled generation of each, the summed "
        "durations of its gloo collectives (max over ranks).", "",
        "## Machine", "", machine_markdown(info), f"- command: `{command}`", "",
        "## Results", "",
        "| processes | attention | threads/rank | baseline (s) | AdaCache (s) | speedup | baseline vs 1 proc "
        "| AdaCache vs 1-proc baseline | computed steps | MoReg | communication, baseline (ms) "
        "| communication, AdaCache (ms) | saved (ms) | graphs / breaks, baseline | graphs / breaks, AdaCache |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base1 = single["baseline_s"] if single else float("nan")
        lines.append(
            f"| {r['world']} | {r['mode']} | {r['threads_per_rank']} | {r['baseline_s']:.3f} | {r['adacache_s']:.3f} "
            f"| {r['baseline_s'] / r['adacache_s']:.2f}x | {base1 / r['baseline_s']:.2f}x "
            f"| {base1 / r['adacache_s']:.2f}x | {len(r['computed_steps'])}/{r['steps']} | {'on' if r['moreg'] else 'off'} "
            f"| {1e3 * r['comm_baseline_s']:.1f} | {1e3 * r['comm_adacache_s']:.1f} "
            f"| {1e3 * (r['comm_baseline_s'] - r['comm_adacache_s']):.1f} "
            f"| {r['graphs_baseline']} / {r['graph_breaks_baseline']} | {r['graphs_adacache']} / {r['graph_breaks_adacache']} |")
    lines += ["", "Computed steps (identical on every rank, checked): "
              + "; ".join(f"{r['world']} proc {r['mode']}: {r['computed_steps']}" for r in rows), "",
              "Collectives per generation (rank 0): "
              + "; ".join(f"{r['world']} proc {r['mode']}: baseline {r['collectives_baseline']}, AdaCache "
                          f"{r['collectives_adacache']}" for r in rows if r["world"] > 1), ""]
    lines += ["## Reading the numbers", ""] + reading(rows)
    return lines


def reading(rows: list) -> list:
    """Measured facts of the table, in words: the speedup at each process count, whether it grows,
    and the communication's share of a baseline generation."""
    single = next((r for r in rows if r["world"] == 1), None)
    out = []
    for r in rows:
        speedup = r["baseline_s"] / r["adacache_s"]
        ceiling = r["steps"] / len(r["computed_steps"])
        line = (f"- {r['world']} process{'es' if r['world'] > 1 else ''} ({r['mode']}): {speedup:.2f}x over the "
                f"baseline at the same process count, of a ceiling of {ceiling:.2f}x ({len(r['computed_steps'])} of "
                f"{r['steps']} steps computed)")
        if r["world"] > 1:
            share = r["comm_baseline_s"] / r["baseline_s"]
            line += (f"; communication is {100 * share:.0f}% of a baseline generation, and AdaCache's generation "
                     f"spends {1e3 * (r['comm_baseline_s'] - r['comm_adacache_s']):.0f} ms less in it")
            if single is not None:
                grows = speedup > single["baseline_s"] / single["adacache_s"]
                line += f"; the speedup {'grows' if grows else 'does not grow'} over the 1-process one"
        out.append(line + ".")
    return out + [""]

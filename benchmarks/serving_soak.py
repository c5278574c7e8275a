"""A serving soak: many generations through one cached diffusers pipeline, as a server runs it.

A diffusers ``WanPipeline`` (prompt embeddings given, no text encoder) on a tiny
``WanTransformer3DModel`` with seeded random weights and a tiny VAE, cached with
``adacache_fx.enable_cache(pipe, AdaCacheConfig.fast())`` (the preset follows each request's step
count). Requests vary the prompt (its own random embeddings and seed), the batch (1, 2, 4 prompts),
the step count (20, 30, 50) and the resolution (two sizes); the first 18 requests cover every
combination once (the warm-up), the rest are drawn at random. Per request it records:

* compiles: graphs Dynamo traced and graphs the inner compiler compiled (the backend's pieces
  included, also those first compiled at a reused step); a compile outside a shape's first request
  is a failure, and so is one at a new shape once Dynamo has made the shapes dynamic;
* ``report().cache_bytes`` after the request, per (batch, resolution): must stay flat;
* the process's resident memory (``VmRSS``): after the warm-up it must grow by < 50 MB;
* the computed steps against the schedule contract (``../docs/concepts.md``: steps 1, 2, N-1, N
  computed; after a computed step with a metric the next computed step is ``s + tau``, or a
  forced one; no other step computed);
* a throwaway pipeline every 25 requests, enabled, run once and dropped without
  ``disable_cache``: it must be freed (a weak reference to its transformer dies).

    python -m benchmarks.serving_soak --requests 100 --threads 1
"""
from __future__ import annotations

import argparse
import gc
import itertools
import random
import time
import weakref

import torch

import adacache_fx
from adacache_fx import AdaCacheConfig
from benchmarks.common import command_line, machine, machine_markdown, write_results

BATCHES = (1, 2, 4)
STEPS = (20, 30, 50)
SIZES = (32, 48)
FRAMES = 5
RSS_LIMIT_MB = 50.0


def build_pipeline(seed: int = 0):
    """A tiny WanPipeline (seeded random weights; nothing downloaded)."""
    import diffusers
    torch.manual_seed(seed)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=4, rope_max_seq_len=64).eval()
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                                     temperal_downsample=[False], latents_mean=[0.0] * 4,
                                     latents_std=[1.0] * 4).eval()
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def requests(count: int, seed: int = 0) -> list:
    """(batch, steps, size) per request: every combination once, then random draws."""
    combos = list(itertools.product(BATCHES, STEPS, SIZES))
    draw = random.Random(seed)
    return (combos + [draw.choice(combos) for _ in range(max(0, count - len(combos)))])[:count]


def generate(pipe, index: int, batch: int, steps: int, size: int):
    g = torch.Generator().manual_seed(index)
    embeds = torch.randn(batch, 8, 32, generator=g)
    negative = torch.randn(batch, 8, 32, generator=g)
    with torch.no_grad():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, height=size, width=size,
                    num_frames=FRAMES, num_inference_steps=steps, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(index), output_type="latent").frames


def contract_violations(report) -> list:
    """What in ``report``'s computed steps breaks the schedule contract (empty: none)."""
    n, computed = report.num_steps, list(report.computed_steps)
    problems = []
    forced = {1, 2, n - 1, n} & set(range(1, n + 1))
    missing = sorted(forced - set(computed))
    if missing:
        problems.append(f"forced steps {missing} not computed")
    allowed = set(forced) | {m.next_step for m in report.metrics}
    extra = sorted(set(computed) - allowed)
    if extra:
        problems.append(f"steps {extra} computed though no metric scheduled them")
    by_step = {m.step: m for m in report.metrics}
    for s, following in zip(computed, computed[1:]):
        m = by_step.get(s)
        if m is not None and following != m.next_step and following not in forced:
            problems.append(f"after step {s} the next computed step is {following}, the metric said {m.next_step}")
    return problems


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _counting(inner: str):
    """The inner compiler, counting its compiles."""
    from torch._dynamo.backends.registry import lookup_backend
    compile_fn, count = lookup_backend(inner), [0]

    def counted(gm, example_inputs):
        count[0] += 1
        return compile_fn(gm, example_inputs)
    return counted, count


def _dynamo_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def throwaway_is_freed(inner) -> bool:
    """A second pipeline enabled, run once and dropped without disable_cache: freed?"""
    pipe = build_pipeline(seed=1)
    adacache_fx.enable_cache(pipe, AdaCacheConfig.fast(), inner=inner)
    generate(pipe, 0, 1, 20, SIZES[0])
    alive = weakref.ref(pipe.transformer)
    del pipe
    gc.collect()
    return alive() is None


def run(count: int, inner_name: str) -> dict:
    pipe = build_pipeline()
    inner, inner_compiles = _counting(inner_name)
    backend = adacache_fx.enable_cache(pipe, AdaCacheConfig.fast(), inner=inner)
    seen_shapes, rows, freed = set(), [], []
    warm = len(list(itertools.product(BATCHES, STEPS, SIZES)))
    for index, (batch, steps, size) in enumerate(requests(count)):
        if index and index % 25 == 0:
            freed.append(throwaway_is_freed(inner))
        graphs, compiles = _dynamo_graphs(), inner_compiles[0]
        start = time.perf_counter()
        generate(pipe, index, batch, steps, size)
        seconds = time.perf_counter() - start
        report = backend.report(pipe.transformer)
        shape = (batch, size)
        rows.append({"index": index, "batch": batch, "steps": steps, "size": size,
                     "new_shape": shape not in seen_shapes, "dynamo_graphs": _dynamo_graphs() - graphs,
                     "inner_compiles": inner_compiles[0] - compiles, "cache_bytes": report.cache_bytes,
                     "computed": len(report.computed_steps), "num_steps": report.num_steps,
                     "violations": contract_violations(report), "rss_mb": rss_mb(), "seconds": seconds,
                     "warm_up": index < warm})
        seen_shapes.add(shape)
        print(f"{index:3d} batch {batch} steps {steps} size {size}: {len(report.computed_steps)}/{report.num_steps} "
              f"computed, compiles {rows[-1]['inner_compiles']}, rss {rows[-1]['rss_mb']:.0f} MB, {seconds:.2f} s",
              flush=True)
    return {"rows": rows, "freed": freed, "guard": [c.guard for c in backend.guard_choices]}


def verdicts(result: dict) -> dict:
    rows = result["rows"]
    late_compiles = [r["index"] for r in rows if (r["dynamo_graphs"] or r["inner_compiles"]) and not r["new_shape"]]
    first_dynamic = next((r["index"] for r in rows if r["new_shape"] and r["index"] > 0
                          and not (r["dynamo_graphs"] or r["inner_compiles"])), None)
    bytes_by_shape: dict = {}
    for r in rows:
        bytes_by_shape.setdefault(f"batch {r['batch']}, {r['size']}px", set()).add(r["cache_bytes"])
    warm_rows = [r for r in rows if not r["warm_up"]]
    growth = (warm_rows[-1]["rss_mb"] - warm_rows[0]["rss_mb"]) if len(warm_rows) > 1 else 0.0
    violations = [(r["index"], v) for r in rows for v in r["violations"]]
    return {
        "compiles_only_at_a_new_shape": not late_compiles, "late_compiles": late_compiles,
        "first_new_shape_without_compile": first_dynamic,
        "cache_bytes_flat_per_shape": all(len(v) == 1 for v in bytes_by_shape.values()),
        "cache_bytes_by_shape": {k: sorted(v) for k, v in bytes_by_shape.items()},
        "rss_growth_after_warm_up_mb": round(growth, 1), "rss_ok": growth < RSS_LIMIT_MB,
        "dropped_pipelines_freed": all(result["freed"]) if result["freed"] else None,
        "contract_violations": violations,
    }


def markdown(result: dict, verdict: dict, info: dict, command: str, inner: str) -> list:
    rows = result["rows"]
    lines = ["# Serving soak", "", machine_markdown(info), "", f"Command: `{command}`", "",
             f"{len(rows)} requests through one diffusers `WanPipeline` (tiny `WanTransformer3DModel`: 4 blocks, "
             f"dim 32, seeded random weights; {FRAMES} frames; classifier-free guidance as two calls per step) "
             f"with `adacache_fx.enable_cache(pipe, AdaCacheConfig.fast())`, inner compiler `{inner}`, guard "
             f"{', '.join(result['guard']) or '-'}. Batches {BATCHES}, steps {STEPS}, sizes {SIZES} px; the first "
             f"{sum(r['warm_up'] for r in rows)} requests cover every combination (warm-up).", "",
             "| check | result |", "|---|---|",
             f"| compiles only at a shape's first request | {'yes' if verdict['compiles_only_at_a_new_shape'] else 'no: requests ' + str(verdict['late_compiles'])} |",
             f"| first new shape served without compiling (dynamic shapes) | "
             f"{'request ' + str(verdict['first_new_shape_without_compile']) if verdict['first_new_shape_without_compile'] is not None else 'none'} |",
             f"| cache bytes flat per shape | {'yes' if verdict['cache_bytes_flat_per_shape'] else 'no'} |",
             f"| resident memory growth after warm-up | {verdict['rss_growth_after_warm_up_mb']:+.1f} MB "
             f"({'ok' if verdict['rss_ok'] else 'over'} the {RSS_LIMIT_MB:.0f} MB limit) |",
             f"| dropped pipelines freed | {verdict['dropped_pipelines_freed']} ({len(result['freed'])} dropped) |",
             f"| schedule contract violations | {len(verdict['contract_violations'])} |", "",
             "| shape | cache bytes (every request of the shape) |", "|---|---|"]
    lines += [f"| {shape} | {', '.join(str(b) for b in sizes)} |" for shape, sizes in verdict["cache_bytes_by_shape"].items()]
    lines += ["", "| request | batch | steps | size | new shape | Dynamo graphs | inner compiles | computed | RSS MB | s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['index']} | {r['batch']} | {r['steps']} | {r['size']} | {'yes' if r['new_shape'] else ''} | "
              f"{r['dynamo_graphs']} | {r['inner_compiles']} | {r['computed']}/{r['num_steps']} | {r['rss_mb']:.0f} | "
              f"{r['seconds']:.2f} |" for r in rows]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--inner", default="inductor")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.requests, args.inner)
    verdict = verdicts(result)
    info, command = machine(), command_line("benchmarks.serving_soak", argv)
    result.update(verdict=verdict, machine=info, command=command)
    write_results(args.out, "serving_soak", markdown(result, verdict, info, command, args.inner), result)


if __name__ == "__main__":
    main()

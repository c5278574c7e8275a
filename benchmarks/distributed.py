"""AdaCache with sequence parallelism on torch.distributed: 1, 2 and 4 processes.

The model is the Ulysses sequence-parallel video DiT of examples/models/sp_dit.py at a
benchmark size; every process count runs the same generation (same inputs, same
weights). Per process count ``P`` (gloo, this machine):

* baseline: ``torch.compile`` of the model, no caching (inner compiler ``eager``, the
  same one AdaCache's pieces use here: the difference is the caching alone);
* AdaCache: the official 30-step fast codebook with MoReg, 30 steps;
* latency of a whole generation (max over ranks, median of repeats, interleaved);
* speedup of AdaCache over the baseline at this ``P``, and both against the 1-process
  baseline;
* communication: the Ulysses all-to-alls of one step (2 per block) timed alone with the
  model's shapes, times the skipped steps = the communication the skipped steps save;
  and the metric's collective (one per computed step) it adds.

Usage::

    python -m benchmarks.distributed            # writes benchmarks/results/distributed.{md,json}
    python -m benchmarks.distributed --quick    # small model, 1 repeat (a smoke run)
    python -m benchmarks.distributed --engine cp --worlds 1,2   # diffusers' context parallelism
                                                # (benchmarks/distributed_cp.py: distributed_cp.{md,json})

(from the repository root).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import queue as queue_mod
import socket
import statistics
import time
import traceback

import torch

from benchmarks.common import command_line, machine, machine_markdown, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INF = float("inf")


def model_config(quick: bool) -> dict:
    if quick:
        return dict(input_size=8, hidden_size=64, depth=2, num_heads=4, frames=4, batch=2)
    return dict(input_size=16, hidden_size=128, depth=6, num_heads=8, frames=8, batch=2)


def _timesteps(n):
    return torch.linspace(1000.0, 1000.0 / n, n).tolist()


def _worker(rank, world, port, args, q, measure):
    import torch.distributed as dist
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        threads = args.threads or max(1, (os.cpu_count() or 1) // world)
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
        q.put((rank, "ok", measure(rank, world, args, threads)))
    except BaseException:  # noqa: BLE001
        q.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _max_over_ranks(seconds: float) -> float:
    import torch.distributed as dist
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def interleaved_generations(baseline, cached, reset, repeats: int) -> tuple:
    """``repeats`` interleaved pairs of whole generations, ``baseline()`` then ``cached()`` (after
    ``reset()``), every rank starting together: ``({"baseline": [s], "adacache": [s]}, last
    baseline output, last cached output)``, each time the max over ranks."""
    import torch.distributed as dist

    def timed(run):
        dist.barrier()
        start = time.perf_counter()
        out = run()
        return _max_over_ranks(time.perf_counter() - start), out

    times, out_base, out_cached = {"baseline": [], "adacache": []}, None, None
    for _ in range(repeats):
        t, out_base = timed(baseline)
        times["baseline"].append(t)
        reset()
        t, out_cached = timed(cached)
        times["adacache"].append(t)
    return times, out_base, out_cached


def same_on_every_rank(computed: list, world: int) -> None:
    """Every rank must have taken the same decisions."""
    import torch.distributed as dist
    gathered = [None] * world
    dist.all_gather_object(gathered, computed)
    assert all(g == computed for g in gathered), f"ranks disagree: {gathered}"


def _measure(rank, world, args, threads):
    import torch.distributed as dist

    from adacache_fx import AdaCacheConfig, adacache_backend
    from adacache_fx.config import CODEBOOK_30_FAST
    from adacache_fx.runtime.collectives import all_reduce_sums
    from examples.models.sp_dit import SPVideoDiT, make_inputs

    cfg = model_config(args.quick)
    frames, batch = cfg.pop("frames"), cfg.pop("batch")
    n = args.steps
    group = dist.group.WORLD if world > 1 else None
    model = SPVideoDiT(sp_group=group, **cfg).eval()
    inputs = [make_inputs(batch, t, frames=frames, input_size=cfg["input_size"])[0] for t in _timesteps(n)]

    torch._dynamo.reset()
    baseline = torch.compile(model, backend="eager")
    backend = adacache_backend(AdaCacheConfig(codebook=dict(CODEBOOK_30_FAST), num_steps=n), inner="eager")
    cached = torch.compile(model, backend=backend)

    def generate(fn):
        with torch.no_grad():
            for a in inputs:
                out = fn(*a)
        return out

    # warm up (compiles), then interleaved repeats
    generate(baseline)
    backend.reset()
    generate(cached)
    times, out_base, out_cached = interleaved_generations(lambda: generate(baseline), lambda: generate(cached),
                                                          backend.reset, args.repeats)
    computed = backend.report().computed_steps
    same_on_every_rank(computed, world)

    # communication of one computed step, timed alone: 2 all-to-alls per block, model shapes
    comm_step = metric_comm = 0.0
    if world > 1:
        from torch.distributed import _functional_collectives as funcol
        D, P = cfg["hidden_size"], world
        tokens = frames * (cfg["input_size"] // 2) ** 2 // P
        qkv = torch.randn(P, tokens, batch, 3, cfg["num_heads"] // P, D // cfg["num_heads"])
        out = torch.randn(P, tokens, batch, cfg["num_heads"] // P, D // cfg["num_heads"])

        def one_step_comm():
            for _ in range(cfg["depth"]):
                funcol.wait_tensor(funcol.all_to_all_single(qkv, None, None, group))
                funcol.wait_tensor(funcol.all_to_all_single(out, None, None, group))

        reps = 5
        one_step_comm()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(reps):
            one_step_comm()
        comm_step = _max_over_ranks((time.perf_counter() - start) / reps)
        sums = torch.rand(5)
        all_reduce_sums(sums, group)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(20):
            all_reduce_sums(sums, group)
        metric_comm = _max_over_ranks((time.perf_counter() - start) / 20)

    return {
        "world": world, "threads_per_rank": threads, "steps": n, "computed_steps": computed,
        "baseline_s": statistics.median(times["baseline"]), "adacache_s": statistics.median(times["adacache"]),
        "baseline_all": times["baseline"], "adacache_all": times["adacache"],
        "comm_per_computed_step_s": comm_step, "metric_collective_s": metric_comm,
        "max_abs_diff_vs_baseline": float((out_base - out_cached).abs().max()),
        "model": dict(cfg, frames=frames, batch=batch),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, args, measure=None) -> dict:
    """Rank 0's result of ``measure(rank, world, args, threads)`` (default: the SP model's) on
    ``world`` gloo processes."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, q, measure or _measure), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + args.timeout
    try:
        while len(results) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{world} processes did not finish in {args.timeout} s")
            try:
                rank, status, payload = q.get(timeout=min(remaining, 5.0))
            except queue_mod.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError("a rank died without reporting")
                continue
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results[0]


def markdown(rows: list, info: dict, command: str) -> str:
    base1 = rows[0]["baseline_s"]
    lines = [
        "# AdaCache with sequence parallelism (gloo, CPU)", "",
        "Ulysses sequence-parallel video DiT (examples/models/sp_dit.py), "
        f"model {rows[0]['model']}, {rows[0]['steps']} steps, official 30-step fast codebook + MoReg. "
        "Latency: one whole generation, max over ranks, median of the repeats (interleaved). "
        "Baseline: torch.compile(backend='eager') of the same model, no caching. "
        "Saved communication: the step's all-to-alls (2 per block, model shapes) timed alone, "
        "times the skipped steps; added: the metric's collective, once per computed step.", "",
        "## Machine", "", machine_markdown(info), f"- command: `{command}`", "",
        "## Results", "",
        "| processes | threads/rank | baseline (s) | AdaCache (s) | speedup | baseline vs 1 proc | AdaCache vs 1-proc baseline "
        "| computed steps | comm per computed step (ms) | comm saved by skipped steps (ms) | metric collectives added (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        skipped = r["steps"] - len(r["computed_steps"])
        with_metric = max(0, len(r["computed_steps"]) - 2)
        lines.append(
            f"| {r['world']} | {r['threads_per_rank']} | {r['baseline_s']:.3f} | {r['adacache_s']:.3f} "
            f"| {r['baseline_s'] / r['adacache_s']:.2f}x | {base1 / r['baseline_s']:.2f}x | {base1 / r['adacache_s']:.2f}x "
            f"| {len(r['computed_steps'])}/{r['steps']} | {1e3 * r['comm_per_computed_step_s']:.2f} "
            f"| {1e3 * skipped * r['comm_per_computed_step_s']:.1f} | {1e3 * with_metric * r['metric_collective_s']:.2f} |")
    lines += ["", "Computed steps (identical on every rank, checked): "
              + "; ".join(f"{r['world']} proc: {r['computed_steps']}" for r in rows), ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores // processes)")
    parser.add_argument("--engine", choices=("sp", "cp"), default="sp",
                        help="sp: our sequence-parallel model (examples/models/sp_dit.py); cp: diffusers' context "
                             "parallelism on WanTransformer3DModel (benchmarks/distributed_cp.py)")
    parser.add_argument("--modes", default="ulysses,ring", help="with --engine cp: the attention modes at P > 1")
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.engine == "cp":
        return _main_cp(args)
    out = args.out or os.path.join(ROOT, "benchmarks", "results", "distributed_quick" if args.quick else "distributed")
    command = command_line("benchmarks.distributed")
    info = machine()
    rows = []
    for world in [int(w) for w in args.worlds.split(",")]:
        start = time.perf_counter()
        row = run_world(world, args)
        rows.append(row)
        print(f"{world} proc: baseline {row['baseline_s']:.3f} s, adacache {row['adacache_s']:.3f} s, "
              f"computed {len(row['computed_steps'])}/{row['steps']}, comm/step {1e3 * row['comm_per_computed_step_s']:.2f} ms "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    text = markdown(rows, info, command)
    with open(out + ".md", "w") as f:
        f.write(text)
    with open(out + ".json", "w") as f:
        json.dump({"machine": info, "command": command, "rows": rows}, f, indent=1)
    print(text)


def _main_cp(args) -> None:
    from benchmarks import distributed_cp
    stem = "distributed_cp_quick" if args.quick else "distributed_cp"
    out_dir = os.path.dirname(args.out) if args.out else os.path.join(ROOT, "benchmarks", "results")
    stem = os.path.basename(args.out) if args.out else stem
    rows = []
    for world in [int(w) for w in args.worlds.split(",")]:
        start = time.perf_counter()
        got = run_world(world, args, distributed_cp.measure)["rows"]
        rows += got
        for row in got:
            print(f"{world} proc {row['mode']}: baseline {row['baseline_s']:.3f} s, adacache {row['adacache_s']:.3f} s, "
                  f"computed {len(row['computed_steps'])}/{row['steps']}, communication {1e3 * row['comm_baseline_s']:.1f}"
                  f" -> {1e3 * row['comm_adacache_s']:.1f} ms ({time.perf_counter() - start:.0f} s)", flush=True)
    command = command_line("benchmarks.distributed")
    info = machine()
    write_results(out_dir, stem, distributed_cp.markdown(rows, info, command),
                  {"machine": info, "command": command, "rows": rows})


if __name__ == "__main__":
    main()

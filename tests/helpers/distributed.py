"""Launching and checking CPU (gloo) process groups for the distributed tests
(tests/distributed): spawn ``world`` ranks that each run module-level scenario functions, collect
their results with a hard timeout, and the checks every scenario shares (rank agreement, a new
generation on a compiled model, per-step collective counts, NaN metric sums on one rank).

The scenarios are pickled by reference (``spawn``): they must be module-level functions of an
importable module; the spawned ranks inherit the parent's ``sys.path`` (pytest's, with the test's
folder and ``tests/``), so a test module's own scenarios import there as they do in the parent."""
import dataclasses
import math
import os
import socket
import time
import traceback

import pytest
import torch

INF = math.inf
LAUNCH_TIMEOUT_S = float(os.environ.get("ADACACHE_DIST_TEST_TIMEOUT", "300"))
GLOO_TIMEOUT_S = float(os.environ.get("ADACACHE_DIST_GLOO_TIMEOUT", "120"))
COLLECTIVES = ("gloo:all_gather", "gloo:all_to_all", "c10d::_allgather_base_")


def _generation(backend, codebook, num_steps):
    """Start a new generation on an already compiled model with another codebook / N
    (one compile per process: compiles dominate the run time on this machine)."""
    backend.set_config(dataclasses.replace(backend.config, codebook=dict(codebook), num_steps=num_steps))


def _profiled_generation(backend, codebook, num_steps, run) -> dict:
    """A generation under ``codebook`` with every step profiled alone (``run(num_steps, on_step)``
    runs the loop): its outputs, computed steps, collective counts per step and block executions."""
    _generation(backend, codebook, num_steps)
    executions = backend.report().block_executions
    on_step, counts = _profiled_steps()
    outputs = run(num_steps, on_step=on_step)
    report = backend.report()
    return {"outputs": outputs, "steps": report.computed_steps, "counts": counts,
            "executions": report.block_executions - executions}


def _profiled_steps():
    """``on_step`` that profiles each step alone; returns (on_step, counts per step)."""
    counts = []

    def on_step(step, call):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = call()
        events = {e.key: e.count for e in prof.key_averages()}
        counts.append({name: events.get(name, 0) for name in COLLECTIVES})
        return out
    return on_step, counts


def _reap(procs) -> None:
    """Join the rank processes; kill the ones still alive (a hang must not outlive the test)."""
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _nan_generation(backend, poisoned: bool, step: int, num_steps: int, run) -> list:
    """The computed steps of an ``{inf: 3}`` generation (``run(num_steps)``) whose metric sums are
    NaN at ``step`` on this process when ``poisoned``."""
    _generation(backend, {INF: 3}, num_steps)
    restore = _nan_sums_at(backend, step) if poisoned else (lambda: None)
    try:
        run(num_steps)
    finally:
        restore()
    return backend.report().computed_steps


def _nan_sums_at(backend, step):
    """Make the metric op return NaN sums at ``step`` on this process only (the model's outputs
    are untouched: nothing but the metric's own reduction can carry the NaN to other ranks)."""
    import adacache_fx.runtime.branch_store as branch_store
    original = branch_store.fused_cache_metrics

    def poisoned(r, p, stride=1):
        out = original(r, p, stride)
        return torch.full_like(out, float("nan")) if backend.scheduler.clock.step == step else out
    branch_store.fused_cache_metrics = poisoned
    return lambda: setattr(branch_store, "fused_cache_metrics", original)


def _disagreement(value, what):
    """None if every rank holds the same ``value``, else a message (the same on every rank, so
    that every rank takes the same path: skipping the SP scenarios that a diverging schedule
    would hang in the model's all-to-all)."""
    import torch.distributed as dist
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if all(v == values[0] for v in values):
        return None
    return f"ranks disagree on {what}: {values}; the later SP scenarios were skipped"


def _worker(rank, world, port, ref, queue, scenarios):
    """One rank: every scenario ``{name: fn(rank, world, ref)}`` in order."""
    import datetime

    import torch.distributed as dist
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
        out, seconds = {}, []
        for name, scenario in scenarios.items():
            t0 = time.perf_counter()
            out[name] = scenario(rank, world, ref)
            seconds.append(time.perf_counter() - t0)
        out["seconds"] = tuple(seconds)
        dist.barrier()
        queue.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, ref: dict, timeout: float = LAUNCH_TIMEOUT_S, *, scenarios: dict) -> list:
    """Run ``_worker`` (with ``scenarios``: module-level functions) on ``world`` spawned
    processes; kill them and fail on a timeout."""
    import queue as queue_mod

    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, ref, q, scenarios), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout
    try:
        while len(results) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            try:
                rank, status, payload = q.get(timeout=min(remaining, 5.0))
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    pytest.fail(f"a rank died (exit code {dead[0].exitcode}) without reporting")
                continue
            if status != "ok":
                pytest.fail(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
    except TimeoutError:
        pytest.fail(f"{world} processes did not finish within {timeout:.0f} s (a hang?); killed")
    finally:
        _reap(procs)
    return [results[r] for r in range(world)]

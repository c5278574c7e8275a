"""AdaCache under diffusers' context parallelism (CPU, gloo, 2 processes): the tiny zoo Wan
transformer with ``enable_parallelism(ContextParallelConfig(ulysses_degree=2))``, and with
``ring_degree=2`` on a test-only attention op that returns the log-sum-exp on CPU (diffusers'
native backend refuses ``return_lse=True``; ``_cpu_lse_attention`` below).

What a user gets from ``compile_model(model, config)`` (and from ``integrations.diffusers.enable``
on a WanPipeline whose transformer has parallelism enabled), checked on every rank:

* one graph, no graph break, the whole block stack (``blocks.0 .. blocks.1``) in one region: the
  split hook's shard of ``blocks.0``'s input is not taken for part of the block;
* caching off equals the single-process model;
* ``{inf: 3}`` over 12 steps: computed steps ``[1, 2, 5, 8, 11, 12]`` on every rank as in a
  single-process run, outputs equal to that run's, and the reused steps run no attention
  collective (gloo all-to-alls / KV all-gathers counted by the profiler, per step);
* a codebook with a threshold on (and next to) the measured distance: decisions identical on
  every rank, and equal to the single-process run's when the threshold is not within 1e-4 of it;
* NaN metric sums on one rank make every rank compute;
* MoReg is off under CP (the frame axis stops at the shard), and the analysis says so. Every
  config here has ``moreg=False`` so that the single-process references decide alike.

CPU-only workarounds, in the ranks' setup only: ``torch.accelerator.device_count()`` returns 0 on
a CPU machine and diffusers divides the rank by it (patched to 1); ``Logger.warning_once``, which
diffusers' hook calls for the 1-D timestep, exists only once transformers is imported (a no-op is
installed when it is missing). Each launch has a hard timeout and every collective a gloo timeout:
a hang kills the ranks and fails the tests.
"""
from __future__ import annotations

import datetime
import logging
import math
import os
import time
import traceback
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from adacache_fx import AdaCacheConfig, compile_model, explain  # noqa: E402
from helpers import timesteps  # noqa: E402
from test_distributed import (_disagreement, _free_port, _generation, _nan_generation,  # noqa: E402
                              _profiled_generation, _reap)
from zoo import get_case, get_output, timestep_tensor  # noqa: E402

INF = math.inf
WORLD = 2
LAUNCH_TIMEOUT_S = float(os.environ.get("ADACACHE_CP_TEST_TIMEOUT", "240"))
GLOO_TIMEOUT_S = float(os.environ.get("ADACACHE_DIST_GLOO_TIMEOUT", "60"))
MODES = ("ulysses", "ring")
N_OFF, N_FIXED, N_FUZZ = 6, 12, 6
NAN_STEP = 5
EXPECTED_FIXED = [1, 2, 5, 8, 11, 12]
METRIC_STEPS = [3, 6, 9, 12]          # {inf: 3}: the steps whose start reduces the last metric
FUZZ_OFFSETS = [-1e-3, 0.0, 1e-3]     # relative offsets of the threshold from step 2's distance
FUZZ_SEEDS = (1, 2)
FAR = 1e-4
BLOCKS = ["blocks.0", "blocks.1"]
# per block and computed step: Ulysses all-to-alls q, k, v, out; ring one KV all-gather
ATTENTION_COLLECTIVES = {"ulysses": ("gloo:all_to_all", 4), "ring": ("gloo:all_gather", 1)}


def _config(codebook, num_steps):
    return AdaCacheConfig(codebook=dict(codebook), num_steps=num_steps, moreg=False)


def _loop(model, n, seed=0, on_step=None):
    """Flow-Euler loop over ``n`` steps (the latent moves with the output every step)."""
    case = get_case("wan")
    grid = timesteps(n) + [0.0]
    (x, _t), kwargs = case.make_inputs(1, grid[0], seed=seed)
    outs = []
    with torch.no_grad():
        for step, (t, t_next) in enumerate(zip(grid, grid[1:]), start=1):
            def call(x=x, t=t):
                return get_output(model(x, timestep_tensor(1, t), **kwargs))
            out = on_step(step, call) if on_step is not None else call()
            outs.append(out.numpy().copy())
            x = x + (t_next - t) / 1000.0 * out
    return outs


def _region_paths(backend):
    """Block paths per region: the model's own (``blocks.0``), also through diffusers' wrapped forwards."""
    return [list(r.blocks) for r in backend.report().regions]


# ----------------------------------------------------------------------------------------------
# rank side
# ----------------------------------------------------------------------------------------------
def _cpu_workarounds() -> None:
    torch.set_num_threads(1)
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1   # diffusers: rank % device_count()
    from diffusers import WanTransformer3DModel  # noqa: F401  (may import transformers, which adds warning_once)
    if not hasattr(logging.Logger, "warning_once"):
        logging.Logger.warning_once = lambda self, *args, **kwargs: None


def _cpu_lse_attention() -> None:
    """TEST SHIM: diffusers' native attention op with ``return_lse=True`` on CPU (ring attention
    merges the partial results by their log-sum-exp), from aten's CPU flash attention, in
    diffusers' (B, S, H, D) / (B, S, H) layout."""
    import diffusers.models.attention_dispatch as dispatch
    original = dispatch._native_attention_forward_op

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if not return_lse:
            return original(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, False,
                            _save_ctx=_save_ctx, _parallel_config=_parallel_config)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[:2]
        return out.transpose(1, 2), lse.transpose(1, 2)

    dispatch._native_attention_forward_op = forward_op


def _parallel(module, mode):
    from diffusers import ContextParallelConfig
    degree = {"ulysses_degree": WORLD} if mode == "ulysses" else {"ring_degree": WORLD}
    module.enable_parallelism(config=ContextParallelConfig(**degree))
    return module


def _scenario_model(mode, ref):
    from torch._dynamo.utils import counters
    res = {}
    model = _parallel(get_case("wan").build(), mode)

    # what the analysis finds (explain traces as compile_model does)
    (x, t), kwargs = get_case("wan").make_inputs(1, 1000.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = explain(model, x, t, **kwargs, config=AdaCacheConfig(num_steps=N_OFF))   # MoReg asked for
    res["explain_log"] = [line for g in found.graphs for line in g.log]
    res["explain_graphs"] = len(found.graphs)
    res["moreg_warnings"] = [str(w.message) for w in caught if "MoReg off" in str(w.message)]

    torch._dynamo.reset()
    counters.clear()
    backend = compile_model(model, _config({INF: 1}, N_OFF), inner="eager")
    res["off_outputs"] = _loop(model, N_OFF)
    report = backend.report()
    res["off_steps"], res["uncached"], res["regions"] = report.computed_steps, report.uncached_graphs, _region_paths(backend)
    res["graphs"], res["graph_breaks"] = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    res["aborted"] = _disagreement(res["regions"], "the cached regions")
    if res["aborted"]:
        return res

    fixed = _profiled_generation(backend, {INF: 3}, N_FIXED, lambda n, on_step: _loop(model, n, on_step=on_step))
    res.update({f"fixed_{key}": value for key, value in fixed.items()})
    res["aborted"] = _disagreement(res["fixed_steps"], "the computed steps")
    if res["aborted"]:
        return res

    res["fuzz"] = []
    for trial in ref["fuzz"]:
        _generation(backend, trial["codebook"], N_FUZZ)
        _loop(model, N_FUZZ, seed=trial["seed"])
        report = backend.report()
        res["fuzz"].append((report.computed_steps, [m.reg_distance for m in report.metrics]))
        res["aborted"] = _disagreement(report.computed_steps, f"the computed steps of fuzz trial {trial}")
        if res["aborted"]:
            return res

    import torch.distributed as dist
    res["nan_steps"] = _nan_generation(backend, dist.get_rank() == WORLD - 1, NAN_STEP, N_FIXED,
                                       lambda n: _loop(model, n))
    return res


def _wan_pipeline():
    """test_integrations_diffusers' tiny WanPipeline, built under a fixed global seed (its VAE is
    left at diffusers' random init, which must match between the ranks and the reference)."""
    from test_integrations_diffusers import tiny_wan_pipeline
    torch.manual_seed(0)
    return tiny_wan_pipeline()


def _scenario_pipeline(mode):
    """``integrations.diffusers.enable`` on a WanPipeline whose transformer has CP enabled."""
    from test_integrations_diffusers import run_wan
    from adacache_fx.integrations.diffusers import enable
    pipe, embeds = _wan_pipeline()
    _parallel(pipe.transformer, mode)
    torch._dynamo.reset()
    backend = enable(pipe, _config({INF: 3}, None), inner="eager")
    video = run_wan(pipe, embeds, 6, num_frames=5, size=16)
    report = backend.report()
    return {"steps": report.computed_steps, "uncached": report.uncached_graphs, "regions": _region_paths(backend),
            "video": video.numpy().copy()}


def _worker(rank, port, ref, queue):
    import torch.distributed as dist
    try:
        _cpu_workarounds()
        _cpu_lse_attention()   # only the ring path asks for the LSE
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
        for mode in MODES:   # one result per mode: a failure in ring leaves the Ulysses results
            t0 = time.perf_counter()
            try:
                res = _scenario_model(mode, ref)
                if mode == "ulysses" and not res["aborted"]:
                    res["pipeline"] = _scenario_pipeline(mode)
                res["seconds"] = time.perf_counter() - t0
                queue.put((rank, mode, "ok", res))
            except Exception:  # noqa: BLE001 - reported to the parent
                queue.put((rank, mode, "error", traceback.format_exc()))
        dist.barrier()
    except BaseException:  # noqa: BLE001
        queue.put((rank, None, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _launch(ref) -> dict:
    """``{mode: [rank results] or an error string}``; the ranks are killed at the timeout."""
    import queue as queue_mod

    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, ref, q), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    got, deadline, fatal = {}, time.monotonic() + LAUNCH_TIMEOUT_S, None
    try:
        while len(got) < WORLD * len(MODES) and fatal is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                fatal = f"the ranks did not finish within {LAUNCH_TIMEOUT_S:.0f} s (a hang?); killed"
                break
            try:
                rank, mode, status, payload = q.get(timeout=min(remaining, 5.0))
            except queue_mod.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    fatal = "a rank died without reporting"
                continue
            if mode is None:
                fatal = f"rank {rank} failed:\n{payload}"
            else:
                got[(rank, mode)] = payload if status == "ok" else f"rank {rank} failed in {mode}:\n{payload}"
    finally:
        _reap(procs)
    results = {}
    for mode in MODES:
        ranks = [got.get((r, mode), fatal or "no result") for r in range(WORLD)]
        errors = [r for r in ranks if isinstance(r, str)]
        results[mode] = errors[0] if errors else ranks
    return results


# ----------------------------------------------------------------------------------------------
# single-process references (in the pytest process, no torch.distributed)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ref():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    model = get_case("wan").build()
    data = {"eager_off": _loop(model, N_OFF)}
    backend = compile_model(model, _config({INF: 3}, N_FIXED), inner="eager")
    data["fixed_outputs"] = _loop(model, N_FIXED)
    data["fixed_steps"] = backend.report().computed_steps
    fuzz = []
    for seed in FUZZ_SEEDS:
        _generation(backend, {INF: 1}, N_FUZZ)
        _loop(model, N_FUZZ, seed=seed)
        d2 = backend.report().metrics[0].reg_distance
        for offset in FUZZ_OFFSETS:
            codebook = {d2 * (1.0 + offset): 3, INF: 1}
            _generation(backend, codebook, N_FUZZ)
            _loop(model, N_FUZZ, seed=seed)
            fuzz.append({"seed": seed, "offset": offset, "codebook": codebook,
                         "single_steps": backend.report().computed_steps})
    data["fuzz"] = fuzz
    data["nan_steps"] = _nan_generation(backend, True, NAN_STEP, N_FIXED, lambda n: _loop(model, n))
    torch._dynamo.reset()
    torch.set_num_threads(threads)
    return data


_launched = {}


@pytest.fixture(scope="module")
def cp(ref):
    if not _launched:
        t0 = time.perf_counter()
        _launched.update(_launch({"fuzz": ref["fuzz"]}))
        print(f"\ncontext-parallel launch: {time.perf_counter() - t0:.1f} s")
    return _launched


def _ranks(cp, mode):
    ranks = cp[mode]
    if isinstance(ranks, str):
        pytest.fail(ranks)
    for r in ranks:
        assert not r["aborted"], r["aborted"]
    return ranks


def _close(got, want, tol):
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_cp_whole_block_stack_in_one_graph(cp, mode):
    for r in _ranks(cp, mode):
        assert r["graph_breaks"] == 0 and r["graphs"] == 1 and r["explain_graphs"] == 1
        assert r["uncached"] == []
        assert r["regions"] == [BLOCKS]
        # the split hook's shard of blocks.0's input is left outside the block, and said so
        assert any("hook or wrapper around WanTransformerBlock.forward" in line for line in r["explain_log"])


@pytest.mark.parametrize("mode", MODES)
def test_cp_moreg_off_is_reported(cp, mode):
    for r in _ranks(cp, mode):
        assert any(line.startswith("MoReg off:") and "shard" in line for line in r["explain_log"])
        assert r["moreg_warnings"], "no AdaCacheWarning says that MoReg is off"


@pytest.mark.parametrize("mode", MODES)
def test_cp_caching_off_equals_single_process(cp, ref, mode):
    for r in _ranks(cp, mode):
        assert r["off_steps"] == list(range(1, N_OFF + 1))
        for got, want in zip(r["off_outputs"], ref["eager_off"]):
            _close(got, want, 1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_cp_fixed_codebook_skips_blocks_and_their_collectives(cp, ref, mode):
    assert ref["fixed_steps"] == EXPECTED_FIXED
    name, per_block = ATTENTION_COLLECTIVES[mode]
    for r in _ranks(cp, mode):
        assert r["fixed_steps"] == EXPECTED_FIXED
        assert r["fixed_executions"] == len(EXPECTED_FIXED)
        for step, counts in enumerate(r["fixed_counts"], start=1):
            metric = 1 if step in METRIC_STEPS else 0
            attention = per_block * len(BLOCKS) if step in EXPECTED_FIXED else 0
            gathers = 1 + metric + (attention if name == "gloo:all_gather" else 0)   # proj_out's gather hook
            assert counts["gloo:all_gather"] == gathers, (step, counts)
            assert counts["gloo:all_to_all"] == (attention if name == "gloo:all_to_all" else 0), (step, counts)
            assert counts["c10d::_allgather_base_"] == metric, (step, counts)
        for got, want in zip(r["fixed_outputs"], ref["fixed_outputs"]):
            _close(got, want, 1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_cp_near_thresholds_ranks_agree(cp, ref, mode):
    ranks = _ranks(cp, mode)
    for i, trial in enumerate(ref["fuzz"]):
        steps0, distances0 = ranks[0]["fuzz"][i]
        for r in ranks[1:]:
            assert r["fuzz"][i] == (steps0, distances0), f"ranks disagree in trial {trial}"
        if abs(trial["offset"]) >= FAR:
            assert steps0 == trial["single_steps"], f"trial {trial} differs from the single-process run"
    assert len({tuple(ranks[0]["fuzz"][i][0]) for i in range(len(ref["fuzz"]))}) >= 2   # both sides exercised


@pytest.mark.parametrize("mode", MODES)
def test_cp_nan_on_one_rank_makes_all_compute(cp, ref, mode):
    assert ref["nan_steps"] != EXPECTED_FIXED and NAN_STEP + 1 in ref["nan_steps"]
    for r in _ranks(cp, mode):
        assert r["nan_steps"] == ref["nan_steps"]


def test_cp_pipeline_enable_ulysses(cp):
    """``enable`` on a WanPipeline (two transformer calls per step) whose transformer has CP
    enabled: the same schedule and video as the single-process pipeline."""
    from test_integrations_diffusers import run_wan
    from adacache_fx.integrations.diffusers import enable
    ranks = _ranks(cp, "ulysses")
    torch._dynamo.reset()
    pipe, embeds = _wan_pipeline()
    backend = enable(pipe, _config({INF: 3}, None), inner="eager")
    single = run_wan(pipe, embeds, 6, num_frames=5, size=16)
    assert backend.report().computed_steps == [1, 2, 5, 6]
    for r in ranks:
        p = r["pipeline"]
        assert p["uncached"] == [] and p["regions"] == [BLOCKS]
        assert p["steps"] == [1, 2, 5, 6]
        _close(p["video"], single.numpy(), 1e-4)

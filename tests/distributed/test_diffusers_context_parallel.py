"""AdaCache under diffusers' context parallelism (CPU, gloo, 2 processes): the tiny zoo Wan
transformer (and the tiny Flux, an image model with two block lists) with
``enable_parallelism(ContextParallelConfig(ulysses_degree=2))``, and with ``ring_degree=2`` on a
test-only attention op that returns the log-sum-exp on CPU (diffusers' native backend refuses
``return_lse=True``; ``examples.cpu_context_parallel.cpu_lse_attention``).

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
* Flux (both block lists in one region): caching off, ``{inf: 3}`` with its collectives counted,
  the near-threshold fuzz and the NaN, as above;
* MoReg under CP: the frame axis reaches each rank's shard of the frames (the analysis says
  ``shard r of 2``), and the motion scores, with the frame pairs across the shard boundary from
  the neighbour rank (2 frames: one per rank, only boundary pairs; 4 frames: two per rank), equal
  the single-process scores; the official fast codebook with MoReg decides as the single process;
  ``shard_boundary_sums`` alone, on odd shapes, strides and dtypes, against the float64 reference.
  The configs of the other checks have ``moreg=False``.

CPU-only workarounds, in the ranks' setup only (``examples/cpu_context_parallel.py``):
``torch.accelerator.device_count()`` returns 0 on a CPU machine and diffusers divides the rank by it
(patched to 1); ``Logger.warning_once``, which diffusers' hook calls for the 1-D timestep, exists only
once transformers is imported (a no-op is installed when it is missing); the LSE attention of ring. Each launch has a hard timeout and every collective a gloo timeout:
a hang kills the ranks and fails the tests.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import time
import traceback
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from adacache_fx import AdaCacheConfig, compile_model, explain  # noqa: E402
from examples.cpu_context_parallel import cpu_lse_attention, cpu_workarounds, enable_context_parallel  # noqa: E402
from helpers import timesteps  # noqa: E402
from helpers.distributed import (_disagreement, _free_port, _generation, _nan_generation,  # noqa: E402
                                 _profiled_generation, _reap)
from zoo import get_case, get_output, timestep_tensor  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.zoo, pytest.mark.slow]

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
N_MOREG = 8
MOREG_FRAMES = (2, 4)        # latent frames: one or two per rank
ODD_FRAMES = 3               # 1.5 frames per rank: no whole frames, so no motion score under CP
# the fast codebook scaled to this tiny model's distances (which sit far below Open-Sora's), so
# that MoReg's regularised distance moves the rate: some steps skipped, not all
MOREG_CODEBOOK = {0.02: 6, 0.04: 5, 0.06: 4, 0.08: 3, 0.10: 2, INF: 1}
# (shape (B, F, N) split along F, dtype, frame strides up to the frames per rank)
BOUNDARY_CASES = [((2, 6, 5), torch.float32, (1, 2, 3)), ((1, 2, 7), torch.float32, (1,)),
                  ((3, 10, 33), torch.bfloat16, (1, 4))]
BLOCKS = ["blocks.0", "blocks.1"]
# per block and computed step: Ulysses all-to-alls q, k, v, out; ring one KV all-gather
ATTENTION_COLLECTIVES = {"ulysses": ("gloo:all_to_all", 4), "ring": ("gloo:all_gather", 1)}


def _config(codebook, num_steps):
    return AdaCacheConfig(codebook=dict(codebook), num_steps=num_steps, moreg=False)


def _loop(model, n, seed=0, on_step=None, frames=None, case="wan"):
    """Flow-Euler loop over ``n`` steps of the zoo ``case`` (the latent moves with the output every
    step); ``frames``: a seeded Wan latent with that many frames instead of the case's 2."""
    grid = timesteps(n) + [0.0]
    args, kwargs = get_case(case).make_inputs(1, grid[0], seed=seed)
    x = args[0]
    if frames is not None:
        x = torch.randn((1, x.shape[1], frames) + tuple(x.shape[3:]), generator=torch.Generator().manual_seed(seed))
    outs = []
    with torch.no_grad():
        for step, (t, t_next) in enumerate(zip(grid, grid[1:]), start=1):
            def call(x=x, t=t):
                if "timestep" in kwargs:   # Flux: the timestep is a keyword
                    return get_output(model(x, **dict(kwargs, timestep=timestep_tensor(1, t))))
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
def _parallel(module, mode):
    return enable_context_parallel(module, mode, WORLD)


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

    res.update(_fuzz_and_nan(backend, model, ref["fuzz"]))
    return res


def _fuzz_trials(backend, model, case="wan"):
    """Codebooks with a threshold on (and next to) step 2's distance of single-process runs, with
    the computed steps they give there."""
    trials = []
    for seed in FUZZ_SEEDS:
        _generation(backend, {INF: 1}, N_FUZZ)
        _loop(model, N_FUZZ, seed=seed, case=case)
        d2 = backend.report().metrics[0].reg_distance
        for offset in FUZZ_OFFSETS:
            codebook = {d2 * (1.0 + offset): 3, INF: 1}
            _generation(backend, codebook, N_FUZZ)
            _loop(model, N_FUZZ, seed=seed, case=case)
            trials.append({"seed": seed, "offset": offset, "codebook": codebook,
                           "single_steps": backend.report().computed_steps})
    return trials


def _fuzz_and_nan(backend, model, trials, case="wan") -> dict:
    """On a rank: the fuzz trials' computed steps and distances (stopping at the first disagreement
    between ranks), then the computed steps with NaN metric sums on the last rank."""
    import torch.distributed as dist
    res = {"fuzz": []}
    for trial in trials:
        _generation(backend, trial["codebook"], N_FUZZ)
        _loop(model, N_FUZZ, seed=trial["seed"], case=case)
        report = backend.report()
        res["fuzz"].append((report.computed_steps, [m.reg_distance for m in report.metrics]))
        res["aborted"] = _disagreement(report.computed_steps, f"the computed steps of fuzz trial {trial}")
        if res["aborted"]:
            return res
    res["nan_steps"] = _nan_generation(backend, dist.get_rank() == WORLD - 1, NAN_STEP, N_FIXED,
                                       lambda n: _loop(model, n, case=case))
    return res


def _scenario_flux(mode, ref):
    """An image model under CP: Flux's double- and single-stream blocks, its text and image tokens
    both split by the root hook; caching off, ``{inf: 3}`` with its collectives counted, the
    near-threshold fuzz and NaN on one rank."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = _parallel(get_case("flux").build(), mode)
    backend = compile_model(model, _config({INF: 1}, N_OFF), inner="eager")
    res = {"off_outputs": _loop(model, N_OFF, case="flux")}
    report = backend.report()
    res.update(off_steps=report.computed_steps, uncached=report.uncached_graphs, regions=_region_paths(backend),
               graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()))
    fixed = _profiled_generation(backend, {INF: 3}, N_FIXED,
                                 lambda n, on_step: _loop(model, n, on_step=on_step, case="flux"))
    res.update({f"fixed_{key}": value for key, value in fixed.items()})
    res["aborted"] = _disagreement(res["fixed_steps"], "Flux's computed steps")
    if not res["aborted"]:
        res.update(_fuzz_and_nan(backend, model, ref["flux_fuzz"], case="flux"))
    return res


def _moreg_config(codebook):
    """MoReg with the normaliser at this tiny model's motion score (about 0.17), power 1: the
    regularised distance follows the motion score instead of vanishing (official: 0.385, power 8)."""
    return AdaCacheConfig(codebook=dict(codebook), num_steps=N_MOREG, moreg=True, moreg_normalizer=0.17,
                          moreg_power=1.0)


def _moreg_runs(model):
    """Per frame count: the motion scores of ``{inf: 1}`` with MoReg, and the official fast
    codebook's computed steps and regularised distances (both over the Flow-Euler loop)."""
    out = {}
    torch._dynamo.reset()
    backend = compile_model(model, _moreg_config({INF: 1}), inner="eager")
    for frames in MOREG_FRAMES + (ODD_FRAMES,):
        backend.set_config(_moreg_config({INF: 1}))
        _loop(model, N_MOREG, frames=frames)
        motions = [m.motion for m in backend.report().metrics]
        distances = [m.distance for m in backend.report().metrics]
        backend.set_config(_moreg_config(MOREG_CODEBOOK))
        _loop(model, N_MOREG, frames=frames, seed=1)
        report = backend.report()
        out[frames] = {"motions": motions, "distances": distances, "fast_steps": report.computed_steps,
                       "fast_distances": [m.reg_distance for m in report.metrics]}
    return out


def _scenario_moreg(mode):
    return _moreg_runs(_parallel(get_case("wan").build(), mode))


PER_SAMPLE_FRAMES = 4   # two whole frames per rank


def _per_sample_run(model):
    """Two samples of different motion in one batch, per-sample schedules with MoReg: each sample's
    motion scores and computed steps (the sharded metric adds each sample's boundary pairs)."""
    torch._dynamo.reset()
    config = dataclasses.replace(_moreg_config(MOREG_CODEBOOK), per_sample=True)
    backend = compile_model(model, config, inner="eager")
    grid = timesteps(N_MOREG) + [0.0]
    (x1, _t), kwargs = get_case("wan").make_inputs(2, grid[0], seed=3)
    x = torch.randn((2, x1.shape[1], PER_SAMPLE_FRAMES) + tuple(x1.shape[3:]), generator=torch.Generator().manual_seed(3))
    drift = torch.stack([0.0 * x[0], 0.5 * torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(4))])
    with torch.no_grad():
        for t, t_next in zip(grid, grid[1:]):
            out = get_output(model(x, timestep_tensor(2, t), **kwargs))
            x = x + (t_next - t) / 1000.0 * out + drift * torch.arange(PER_SAMPLE_FRAMES, dtype=torch.float32).view(1, 1, -1, 1, 1)
    report = backend.report()
    return {"steps": report.sample_computed_steps,
            "motions": [[m.motion for m in sample] for sample in report.sample_metrics]}


def _scenario_per_sample(mode):
    return _per_sample_run(_parallel(get_case("wan").build(), mode))


def _scenario_boundary_sums():
    """``shard_boundary_sums`` on this rank's frames of seeded videos, reduced over the ranks, against
    the float64 sums of the whole video; and a stride longer than the shard refused before any exchange."""
    import torch.distributed as dist

    from adacache_fx.ops.cache_metrics import cache_metrics_reference, fused_cache_metrics
    from adacache_fx.runtime.collectives import all_reduce_sums, shard_boundary_sums
    rank, group = dist.get_rank(), dist.group.WORLD
    out = []
    for (shape, dtype, strides) in BOUNDARY_CASES:
        g = torch.Generator().manual_seed(7)
        r, p = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
        local = shape[1] // WORLD
        mine = slice(rank * local, (rank + 1) * local)
        for stride in strides:
            sums = fused_cache_metrics(r[:, mine], p[:, mine], stride).sum(0)
            sums = sums + shard_boundary_sums(r[:, mine], stride, (rank, WORLD), group)
            got = all_reduce_sums(sums, group)
            want = cache_metrics_reference(r, p, stride).sum(0)
            out.append((str(shape), str(dtype), stride, got.tolist(), want.tolist()))
    try:
        shard_boundary_sums(torch.zeros(1, 2, 3), 3, (rank, WORLD), group)
        refused = None
    except ValueError as exc:
        refused = str(exc)
    return {"sums": out, "refused": refused}


def _wan_pipeline():
    """The tiny WanPipeline of tests/models/pipelines.py, built under a fixed global seed (its VAE is
    left at diffusers' random init, which must match between the ranks and the reference)."""
    from models.pipelines import tiny_wan_pipeline
    torch.manual_seed(0)
    return tiny_wan_pipeline()


def _scenario_pipeline(mode):
    """``integrations.diffusers.enable`` on a WanPipeline whose transformer has CP enabled."""
    from models.pipelines import run_wan
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
        cpu_workarounds()
        cpu_lse_attention()   # only the ring path asks for the LSE
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
        for mode in MODES:   # one result per mode: a failure in ring leaves the Ulysses results
            t0 = time.perf_counter()
            try:
                res = _scenario_model(mode, ref)
                if not res["aborted"]:
                    res["moreg"] = _scenario_moreg(mode)
                    res["flux"] = _scenario_flux(mode, ref)
                if mode == "ulysses" and not res["aborted"]:
                    res["pipeline"] = _scenario_pipeline(mode)
                    res["boundary"] = _scenario_boundary_sums()
                    res["per_sample"] = _scenario_per_sample(mode)
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
    data["fuzz"] = _fuzz_trials(backend, model)
    data["nan_steps"] = _nan_generation(backend, True, NAN_STEP, N_FIXED, lambda n: _loop(model, n))
    data["moreg"] = _moreg_runs(get_case("wan").build())
    data["per_sample"] = _per_sample_run(get_case("wan").build())
    torch._dynamo.reset()
    flux = get_case("flux").build()
    data["flux_off"] = _loop(flux, N_OFF, case="flux")
    backend = compile_model(flux, _config({INF: 3}, N_FIXED), inner="eager")
    data["flux_fixed_outputs"] = _loop(flux, N_FIXED, case="flux")
    data["flux_fixed_steps"] = backend.report().computed_steps
    data["flux_fuzz"] = _fuzz_trials(backend, flux, case="flux")
    data["flux_nan_steps"] = _nan_generation(backend, True, NAN_STEP, N_FIXED, lambda n: _loop(flux, n, case="flux"))
    torch._dynamo.reset()
    torch.set_num_threads(threads)
    return data


_launched = {}


@pytest.fixture(scope="module")
def cp(ref):
    if not _launched:
        t0 = time.perf_counter()
        _launched.update(_launch({"fuzz": ref["fuzz"], "flux_fuzz": ref["flux_fuzz"]}))
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
def test_cp_moreg_on_a_shard_of_the_frames(cp, mode):
    for rank, r in enumerate(_ranks(cp, mode)):
        layout = [line for line in r["explain_log"] if line.startswith("infer_frame_layout:")]
        assert layout and f"shard {rank} of {WORLD}" in layout[-1], layout
        assert not any(line.startswith("MoReg off:") for line in r["explain_log"])
        assert r["moreg_warnings"] == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("frames", MOREG_FRAMES)
def test_cp_sharded_motion_score_equals_single_process(cp, ref, mode, frames):
    want = ref["moreg"][frames]
    assert len(want["motions"]) == N_MOREG - 1 and all(m is not None and m > 0 for m in want["motions"])
    assert len(set(want["motions"])) > 1   # the score changes along the generation
    for r in _ranks(cp, mode):
        got = r["moreg"][frames]
        # under a process group the last step's sums wait for the next step's collective
        assert len(got["motions"]) == len(want["motions"]) - 1 and None not in got["motions"]
        torch.testing.assert_close(torch.tensor(got["motions"]), torch.tensor(want["motions"][:-1]), rtol=1e-4, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_cp_shard_of_part_of_a_frame_measures_without_motion(cp, ref, mode):
    """3 frames on 2 ranks: each rank holds 1.5 frames at this call's shapes (the graph was traced for
    another frame count, with dynamic shapes); every rank measures the distance without motion."""
    want = ref["moreg"][ODD_FRAMES]
    assert None not in want["motions"]
    for r in _ranks(cp, mode):
        got = r["moreg"][ODD_FRAMES]
        assert got["motions"] == [None] * (N_MOREG - 2)
        torch.testing.assert_close(torch.tensor(got["distances"]), torch.tensor(want["distances"][:-1]), rtol=1e-4,
                                   atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_cp_moreg_decisions_equal_single_process(cp, ref, mode):
    for frames in MOREG_FRAMES:
        want = ref["moreg"][frames]
        assert 1 < len(want["fast_steps"]) < N_MOREG   # the codebook skips some steps, not all
        ranks = _ranks(cp, mode)
        for r in ranks:
            got = r["moreg"][frames]
            assert got["fast_steps"] == want["fast_steps"]
            assert got["fast_distances"] == ranks[0]["moreg"][frames]["fast_distances"]   # bitwise across ranks
            torch.testing.assert_close(torch.tensor(got["fast_distances"]), torch.tensor(want["fast_distances"][:-1]),
                                       rtol=1e-4, atol=0)


def test_cp_per_sample_motion_and_schedules_equal_single_process(cp, ref):
    """Per-sample schedules on a shard of the frames: each sample's motion score adds its own
    frame pairs across the shard boundary, so both ranks take the single process's per-sample
    decisions."""
    want = ref["per_sample"]
    assert len({tuple(s) for s in want["steps"]}) > 1   # the two samples' schedules differ
    for r in _ranks(cp, "ulysses"):
        got = r["per_sample"]
        assert got["steps"] == want["steps"]
        for mine, theirs in zip(got["motions"], want["motions"]):
            # under a process group the last computed step's sums wait for the next step's collective
            assert None not in mine and len(mine) >= len(theirs) - 1
            torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs[:len(mine)]), rtol=1e-4, atol=0)


def test_cp_shard_boundary_sums_against_reference(cp):
    for r in _ranks(cp, "ulysses"):
        assert len(r["boundary"]["sums"]) == sum(len(strides) for _s, _d, strides in BOUNDARY_CASES)
        for shape, dtype, stride, got, want in r["boundary"]["sums"]:
            tol = 1e-5 if dtype == "torch.float32" else 1e-2
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want, dtype=torch.float32), rtol=tol,
                                       atol=tol, msg=lambda m: f"{shape} {dtype} stride {stride}: {m}")
        assert "fewer than the frame stride 3" in r["boundary"]["refused"]


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


def _case_results(cp, mode, case):
    return [r if case == "wan" else r["flux"] for r in _ranks(cp, mode)]


@pytest.mark.parametrize("case", ["wan", "flux"])
@pytest.mark.parametrize("mode", MODES)
def test_cp_near_thresholds_ranks_agree(cp, ref, mode, case):
    trials = ref["fuzz" if case == "wan" else "flux_fuzz"]
    ranks = _case_results(cp, mode, case)
    for r in ranks:
        assert not r["aborted"], r["aborted"]
    for i, trial in enumerate(trials):
        steps0, distances0 = ranks[0]["fuzz"][i]
        for r in ranks[1:]:
            assert r["fuzz"][i] == (steps0, distances0), f"ranks disagree in trial {trial}"
        if abs(trial["offset"]) >= FAR:
            assert steps0 == trial["single_steps"], f"trial {trial} differs from the single-process run"
    assert len({tuple(ranks[0]["fuzz"][i][0]) for i in range(len(trials))}) >= 2   # both sides exercised


@pytest.mark.parametrize("case", ["wan", "flux"])
@pytest.mark.parametrize("mode", MODES)
def test_cp_nan_on_one_rank_makes_all_compute(cp, ref, mode, case):
    want = ref["nan_steps" if case == "wan" else "flux_nan_steps"]
    assert want != EXPECTED_FIXED and NAN_STEP + 1 in want
    for r in _case_results(cp, mode, case):
        assert r["nan_steps"] == want


FLUX_BLOCKS = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
               "single_transformer_blocks.1"]


@pytest.mark.parametrize("mode", MODES)
def test_cp_flux_caches_both_block_lists(cp, ref, mode):
    """Flux under CP: one graph, both block lists in one region; caching off equals the single
    process; ``{inf: 3}`` computes [1, 2, 5, 8, 11, 12] on every rank with the single process's
    outputs, and its reused steps run no attention collective."""
    assert ref["flux_fixed_steps"] == EXPECTED_FIXED
    name, per_block = ATTENTION_COLLECTIVES[mode]
    for rank in _ranks(cp, mode):
        r = rank["flux"]
        assert r["graph_breaks"] == 0 and r["graphs"] == 1 and r["uncached"] == []
        assert r["regions"] == [FLUX_BLOCKS]
        assert r["off_steps"] == list(range(1, N_OFF + 1))
        for got, want in zip(r["off_outputs"], ref["flux_off"]):
            _close(got, want, 1e-5)
        assert r["fixed_steps"] == EXPECTED_FIXED and r["fixed_executions"] == len(EXPECTED_FIXED)
        for step, counts in enumerate(r["fixed_counts"], start=1):
            attention = counts[name] - (1 + (1 if step in METRIC_STEPS else 0) if name == "gloo:all_gather" else 0)
            if step in EXPECTED_FIXED:
                assert attention >= per_block * len(FLUX_BLOCKS), (step, counts)
            else:
                assert attention == 0, (step, counts)
        for got, want in zip(r["fixed_outputs"], ref["flux_fixed_outputs"]):
            _close(got, want, 1e-4)


def test_cp_pipeline_enable_ulysses(cp):
    """``enable`` on a WanPipeline (two transformer calls per step) whose transformer has CP
    enabled: the same schedule and video as the single-process pipeline."""
    from models.pipelines import run_wan
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

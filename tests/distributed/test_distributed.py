"""AdaCache under torch.distributed (CPU, gloo), 2 and 4 processes.

Two parallel layouts of the same small video DiT (examples/models/sp_dit.py):

* sequence parallel (SP): Ulysses all-to-all attention, functional collectives traced into
  the graph; every rank holds a spatial shard of every frame;
* batch parallel (BP): each rank runs the plain model on its rows of the batch, the outputs
  are all-gathered *around* the compiled model (no collective in the graph).

Every loop is a flow-Euler loop (the latent changes every step with the gathered output).
Checked: caching off equals the single-process model, and every rank measures the
single-process distances (the sums are reduced, not rank-local); with AdaCache every rank's
computed steps are identical and equal to a single-process run's, and so are the outputs of
reused steps; the collectives that really reach the gloo process group (profiler events of
the backend, per step) are: the all-to-alls on computed steps only, one metric all-gather at
the start of the step after each measured step; the process group is found from the graph
(SP) or is the world (BP); decisions stay rank-identical for thresholds placed on (and next
to) the measured distance; a NaN put into one rank's metric sums only (after the model ran,
so that no collective of the model can carry it) makes every rank compute, and without the
reduction the ranks would diverge.

All processes of one world size run every scenario in one launch (startup and compiles
dominate on a 2-core machine). The launch has a hard timeout, and so has every collective
(``ADACACHE_DIST_TEST_TIMEOUT``, ``ADACACHE_DIST_GLOO_TIMEOUT``): a hang kills the processes
and fails the tests instead of blocking CI. A rank that measures other distances than its peers
fails its launch at once (before a diverging schedule could hang a collective).
"""
import math
import time

import pytest
import torch


from examples.models.sp_dit import SPVideoDiT, make_inputs  # noqa: E402
from adacache_fx import AdaCacheConfig, adacache_backend  # noqa: E402
from helpers import timesteps  # noqa: E402
from helpers.distributed import (_disagreement, _generation, _nan_generation, _nan_sums_at,  # noqa: E402
                                 _profiled_generation, launch)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

INF = float("inf")
BATCH = 4                 # BP splits it over up to 4 ranks
SP_BATCH = BATCH       # the same inputs for SP, BP and the single-process references
MOREG_NORM = 0.005        # the tiny model's motion score is ~0.005 (so m' is O(1), MoReg matters)
N_FIXED = 12
N_REAL = 12
N_FUZZ = 8
NAN_STEP = 5
EXPECTED_FIXED = [1, 2, 5, 8, 11, 12]          # {inf: 3}, N = 12 (the contract)
# NaN sums at step 5 -> rate 1; step 6's MoReg gradient still sees step 5's NaN m' -> rate 1
EXPECTED_NAN = [1, 2, 5, 6, 7, 10, 11, 12]
METRIC_STEPS = [3, 6, 9, 12]                    # {inf: 3}: the steps whose start reduces a metric
FUZZ_OFFSETS = [-1e-3, -1e-7, 0.0, 1e-7, 1e-3]  # relative offsets of the threshold from the distance
FAR = 1e-4                                      # |offset| >= FAR: must also agree with single process


def _config(codebook, num_steps, process_group="auto"):
    return AdaCacheConfig(codebook=dict(codebook), num_steps=num_steps, moreg_normalizer=MOREG_NORM,
                          process_group=process_group)


def _compile(model, config):
    torch._dynamo.reset()
    backend = adacache_backend(config, inner="eager")
    return torch.compile(model, backend=backend), backend


# ----------------------------------------------------------------------------------------------
# worker side (runs in each spawned rank)
# ----------------------------------------------------------------------------------------------
def _run(compiled, n, *, seed=0, batch=SP_BATCH, rows=None, gather=False, on_step=None):
    """A flow-Euler loop over ``n`` steps: the latent starts from ``make_inputs`` and moves with
    the (full-batch) output every step; ``rows``: this rank's rows of the batch (BP), whose
    outputs are all-gathered around the compiled model (``gather``). ``on_step(step, fn)``
    may wrap each call (profiling)."""
    import torch.distributed as dist
    outs = []
    grid = timesteps(n) + [0.0]
    x = None
    with torch.no_grad():
        for step, (t, t_next) in enumerate(zip(grid, grid[1:]), start=1):
            (x0, ts, text), _ = make_inputs(batch, t, seed=seed)
            x = x0 if x is None else x

            def call(x=x, ts=ts, text=text):
                if rows is not None:
                    x, ts, text = x[rows], ts[rows], text[rows]
                out = compiled(x, ts, text)
                if gather:   # a collective around the compiled model
                    parts = [torch.empty_like(out) for _ in range(dist.get_world_size())]
                    dist.all_gather(parts, out.contiguous())
                    out = torch.cat(parts)
                return out
            out = on_step(step, call) if on_step is not None else call()
            outs.append(out.numpy().copy())
            x = x + (t_next - t) / 1000.0 * out
    return outs


def _scenario_sp(rank, world, ref):
    import torch.distributed as dist
    res = {}
    model = SPVideoDiT(sp_group=dist.group.WORLD).eval()
    compiled, backend = _compile(model, _config({INF: 1}, 8))

    # caching off: equals the single-process model, and every rank measures the global distances
    res["off_outputs"] = _run(compiled, 8)
    res["off_steps"] = backend.report().computed_steps
    res["off_distances"] = [m.distance for m in backend.report().metrics]
    res["aborted"] = _disagreement(res["off_distances"], "the distances of a generation with every step computed")
    group = backend.scheduler.process_group
    res["group_ranks"] = None if group is None else dist.get_process_group_ranks(group)
    res["uncached"] = list(backend.uncached_graphs)
    if res["aborted"]:
        return res

    # fixed codebook: the contract schedule; the collectives that reach the process group, per step
    fixed = _profiled_generation(backend, {INF: 3}, N_FIXED, lambda n, on_step: _run(compiled, n, on_step=on_step))
    res.update({f"fixed_{key}": value for key, value in fixed.items()})
    res["depth"] = len(model.blocks)
    res["aborted"] = _disagreement(res["fixed_steps"], "the computed steps")
    if res["aborted"]:
        return res

    # real codebook (MoReg on), then the fuzz
    _generation(backend, ref["real_codebook"], N_REAL)
    _run(compiled, N_REAL)
    res["real_steps"] = backend.report().computed_steps
    res["real_distances"] = [m.reg_distance for m in backend.report().metrics]
    res["aborted"] = _disagreement(res["real_steps"], "the computed steps")
    if res["aborted"]:
        return res
    fuzz = []
    for trial in ref["fuzz"]:
        _generation(backend, trial["codebook"], N_FUZZ)
        _run(compiled, N_FUZZ, seed=trial["seed"])
        report = backend.report()
        fuzz.append((report.computed_steps, [m.reg_distance for m in report.metrics]))
        res["aborted"] = _disagreement(report.computed_steps, f"the computed steps of fuzz trial {trial}")
        if res["aborted"]:
            return res
    res["fuzz"] = fuzz

    # NaN in the last rank's metric sums only
    res["nan_steps"] = _nan_generation(backend, rank == world - 1, NAN_STEP, N_FIXED, lambda n: _run(compiled, n))
    return res


def _scenario_bp(rank, world, ref):
    """Batch parallel: rows of the batch per rank, the collective around the compiled model."""
    import adacache_fx.runtime.scheduler as scheduler_module
    res = {}
    model = SPVideoDiT().eval()
    per = BATCH // world
    rows = slice(rank * per, (rank + 1) * per)

    compiled, backend = _compile(model, _config(ref["real_codebook"], N_REAL))
    res["real_outputs"] = _run(compiled, N_REAL, batch=BATCH, rows=rows, gather=True)
    res["real_steps"] = backend.report().computed_steps
    res["uncached"] = list(backend.uncached_graphs)
    res["group_is_world"] = backend.scheduler.process_group is not None

    # a NaN in the last rank's metric sums only
    _generation(backend, {INF: 3}, N_FIXED)
    restore = _nan_sums_at(backend, NAN_STEP) if rank == world - 1 else (lambda: None)
    try:
        _run(compiled, N_FIXED, batch=BATCH, rows=rows, gather=True)
    finally:
        restore()
    res["nan_steps"] = backend.report().computed_steps
    # the same without the reduction: the ranks diverge (shows the test can fail; BP has no
    # collective inside the model, so diverging schedules cannot hang it)
    original = scheduler_module.all_reduce_sums
    scheduler_module.all_reduce_sums = lambda sums, group: sums
    _generation(backend, {INF: 3}, N_FIXED)
    restore = _nan_sums_at(backend, NAN_STEP) if rank == world - 1 else (lambda: None)
    try:
        _run(compiled, N_FIXED, batch=BATCH, rows=rows, gather=True)
    finally:
        restore()
        scheduler_module.all_reduce_sums = original
    res["nan_steps_no_reduction"] = backend.report().computed_steps
    return res


# ----------------------------------------------------------------------------------------------
# single-process references (in the pytest process, no torch.distributed)
# ----------------------------------------------------------------------------------------------
def _margin(distances, codebook) -> float:
    """Smallest relative gap between a measured distance and a finite threshold."""
    gaps = [abs(d - thr) / thr for d in distances for thr in codebook if math.isfinite(thr) and math.isfinite(d)]
    return min(gaps) if gaps else INF


@pytest.fixture(scope="module")
def ref():
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the ranks: a tiny model, and no thread oversubscription on a loaded machine
    model = SPVideoDiT().eval()
    data = {}
    compiled, backend = _compile(model, _config({INF: 1}, 8))

    def single(codebook, n, seed=0, nan_at=None):
        _generation(backend, codebook, n)
        restore = _nan_sums_at(backend, nan_at) if nan_at else (lambda: None)
        try:
            outs = _run(compiled, n, seed=seed, batch=BATCH)
        finally:
            restore()
        return outs, backend.report()

    outs, report = single({INF: 1}, 8)
    data["off_outputs"], data["off_distances"] = outs, [m.distance for m in report.metrics]
    outs, report = single({INF: 3}, N_FIXED)
    assert report.computed_steps == EXPECTED_FIXED
    data["fixed_outputs"] = outs
    data["fixed_nan"] = single({INF: 3}, N_FIXED, nan_at=NAN_STEP)[1].computed_steps

    # a real codebook: thresholds between the distances measured with every step computed
    _, full = single({INF: 1}, N_REAL)
    d = sorted(m.reg_distance for m in full.metrics if math.isfinite(m.reg_distance))
    lo, hi = math.sqrt(d[len(d) // 4] * d[len(d) // 4 + 1]), math.sqrt(d[len(d) // 2] * d[len(d) // 2 + 1])
    codebook = {lo: 3, hi: 2, INF: 1}
    data["real_codebook"] = codebook
    outs, report = single(codebook, N_REAL)
    data["real_steps"] = report.computed_steps
    data["real_margin"] = _margin([m.reg_distance for m in report.metrics], codebook)
    data["real_outputs"] = outs

    # fuzz: a threshold on (and next to) step 2's distance, which every schedule measures
    fuzz = []
    for seed in (1, 2):
        d2 = single({INF: 1}, N_FUZZ, seed=seed)[1].metrics[0].reg_distance   # same grid: same step 2
        for offset in FUZZ_OFFSETS:
            cb = {d2 * (1.0 + offset): 3, INF: 1}
            steps = single(cb, N_FUZZ, seed=seed)[1].computed_steps
            fuzz.append({"seed": seed, "offset": offset, "codebook": cb, "single_steps": steps})
    data["fuzz"] = fuzz
    data["single_seconds"] = time.perf_counter() - t0
    torch._dynamo.reset()
    torch.set_num_threads(threads)
    return data


_launches = {}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}proc")
def ranks(request, ref):
    world = request.param
    if world not in _launches:
        worker_ref = {"real_codebook": ref["real_codebook"], "fuzz": ref["fuzz"]}
        t0 = time.perf_counter()
        _launches[world] = launch(world, worker_ref, scenarios={"sp": _scenario_sp, "bp": _scenario_bp})
        print(f"\n{world} processes: {time.perf_counter() - t0:.1f} s (sp, bp per rank: "
              f"{[tuple(round(x, 1) for x in r['seconds']) for r in _launches[world]]}); "
              f"single-process references {ref['single_seconds']:.1f} s")
    return _launches[world]


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------
def _sp(r):
    """The SP results of one rank, complete (not skipped after a disagreement between ranks)."""
    assert not r["sp"]["aborted"], r["sp"]["aborted"]
    return r["sp"]


def _close(got, want, tol=1e-4):
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=tol, atol=tol)


def test_sp_caching_off_equals_single_process(ranks, ref):
    for r in ranks:
        assert r["sp"]["uncached"] == []
        assert r["sp"]["off_steps"] == list(range(1, 9))
        for got, want in zip(r["sp"]["off_outputs"], ref["off_outputs"]):
            _close(got, want, 1e-5)


def test_sp_ranks_measure_the_global_distance(ranks, ref):
    """Each rank holds a shard of the probe; the reduced sums give the single-process distance
    on every rank (a rank-local distance would differ from it)."""
    assert len(ref["off_distances"]) == 7
    for r in ranks:   # step 8's metric stays pending under a process group (no step follows it)
        assert r["sp"]["off_distances"] == pytest.approx(ref["off_distances"][:6], rel=1e-4)


def test_sp_process_group_found_from_graph(ranks):
    world = len(ranks)
    for r in ranks:
        assert r["sp"]["group_ranks"] == list(range(world))


def test_sp_fixed_codebook_skips_attention_and_communication(ranks, ref):
    """Per step, what reaches the gloo process group (profiler events of the backend itself):
    two all-to-alls per block on computed steps and none on reused ones; one all-gather of the
    model's outputs every step; one more (the metric's) at the start of the step after each
    measured step (2, 5, 8, 11 -> 3, 6, 9, 12; step 12's own stays pending)."""
    for r in ranks:
        sp = _sp(r)
        assert sp["fixed_steps"] == EXPECTED_FIXED
        assert sp["fixed_executions"] == len(EXPECTED_FIXED)   # block stack runs
        for step, counts in enumerate(sp["fixed_counts"], start=1):
            metric = 1 if step in METRIC_STEPS else 0
            a2a = 2 * sp["depth"] if step in EXPECTED_FIXED else 0
            assert counts == {"gloo:all_to_all": a2a, "gloo:all_gather": 1 + metric,
                              "c10d::_allgather_base_": metric}, step
        # the reused steps' outputs are the single-process run's (skeleton + cached delta)
        for got, want in zip(sp["fixed_outputs"], ref["fixed_outputs"]):
            _close(got, want)


def test_sp_real_codebook_ranks_agree_with_single_process(ranks, ref):
    assert ref["real_margin"] > FAR, "the derived codebook sits too close to a distance"
    assert len(ref["real_steps"]) < N_REAL, "the derived codebook does not skip"
    for r in ranks:
        assert _sp(r)["real_steps"] == ref["real_steps"]
        assert r["sp"]["real_distances"] == ranks[0]["sp"]["real_distances"]   # bitwise, every rank


def test_sp_fuzz_near_thresholds_ranks_agree(ranks, ref):
    for r in ranks:
        _sp(r)
    for i, trial in enumerate(ref["fuzz"]):
        steps0, dist0 = ranks[0]["sp"]["fuzz"][i]
        for r in ranks[1:]:
            steps, dists = r["sp"]["fuzz"][i]
            assert steps == steps0, f"ranks disagree in trial {trial}"
            assert dists == dist0
        if abs(trial["offset"]) >= FAR:
            assert steps0 == trial["single_steps"], f"trial {trial} differs from the single-process run"
    # both sides of the threshold were exercised
    assert len({tuple(ranks[0]["sp"]["fuzz"][i][0]) for i in range(len(ref["fuzz"]))}) >= 2


def test_sp_nan_on_one_rank_makes_all_compute(ranks, ref):
    assert ref["fixed_nan"] == EXPECTED_NAN
    for r in ranks:
        assert _sp(r)["nan_steps"] == EXPECTED_NAN


def test_bp_collectives_around_graph(ranks, ref):
    for r in ranks:
        bp = r["bp"]
        assert bp["uncached"] == []
        assert bp["group_is_world"]
        assert bp["real_steps"] == ref["real_steps"]
        for got, want in zip(bp["real_outputs"], ref["real_outputs"]):
            _close(got, want)


def test_bp_nan_on_one_rank_makes_all_compute(ranks, ref):
    assert ref["fixed_nan"] == EXPECTED_NAN
    for r in ranks:
        assert r["bp"]["nan_steps"] == EXPECTED_NAN
    # without the reduction, only the NaN rank computes the extra steps
    for r in ranks[:-1]:
        assert r["bp"]["nan_steps_no_reduction"] == EXPECTED_FIXED
    assert ranks[-1]["bp"]["nan_steps_no_reduction"] == EXPECTED_NAN

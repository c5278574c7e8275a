"""AdaCache under torch.distributed (CPU, gloo), 2 and 4 processes.

Two parallel layouts of the same small video DiT (examples/models/sp_dit.py):

* sequence parallel (SP): Ulysses all-to-all attention, functional collectives traced into
  the graph; every rank holds a spatial shard of every frame;
* batch parallel (BP): each rank runs the plain model on its rows of the batch, the outputs
  are all-gathered *around* the compiled model (no collective in the graph).

Checked: caching off equals the single-process model; with AdaCache every rank's
computed steps are identical and equal to a single-process run's; reused steps run no
all-to-all and one metric collective runs per computed step; the process group is found
from the graph (SP) or is the world (BP); decisions stay rank-identical for thresholds
placed on (and next to) the measured distance; a NaN on one rank makes every rank compute
(and without the all-reduce the ranks would diverge).

All processes of one world size run every scenario in one launch (startup and compiles
dominate on a 2-core machine). The launch has a hard timeout: a hang kills the
processes and fails the tests instead of blocking CI.
"""
import math
import os
import socket
import time
import traceback

import pytest
import torch


from examples.models.sp_dit import SPVideoDiT, make_inputs  # noqa: E402
from adacache_fx import AdaCacheConfig, adacache_backend  # noqa: E402
from helpers import timesteps  # noqa: E402

INF = float("inf")
LAUNCH_TIMEOUT_S = float(os.environ.get("ADACACHE_DIST_TEST_TIMEOUT", "300"))
BATCH = 4                 # BP splits it over up to 4 ranks
SP_BATCH = BATCH       # the same inputs for SP, BP and the single-process references
MOREG_NORM = 0.005        # the tiny model's motion score is ~0.005 (so m' is O(1), MoReg matters)
N_FIXED = 12
N_REAL = 12
N_FUZZ = 8
NAN_STEP = 5
EXPECTED_FIXED = [1, 2, 5, 8, 11, 12]          # {inf: 3}, N = 12 (the contract)
EXPECTED_NAN = [1, 2, 5, 6, 7, 10, 11, 12]     # NaN at step 5: steps 5 and 6 measure NaN -> rate 1
FUZZ_OFFSETS = [-1e-3, -1e-7, 0.0, 1e-7, 1e-3]  # relative offsets of the threshold from the distance
FAR = 1e-4                                      # |offset| >= FAR: must also agree with single process


def _config(codebook, num_steps, process_group="auto"):
    return AdaCacheConfig(codebook=dict(codebook), num_steps=num_steps, moreg_normalizer=MOREG_NORM,
                          process_group=process_group)


def _compile(model, config):
    torch._dynamo.reset()
    backend = adacache_backend(config, inner="eager")
    return torch.compile(model, backend=backend), backend


def _generation(backend, codebook, num_steps):
    """Start a new generation on an already compiled model with another codebook / N
    (one compile per process: compiles dominate the run time on this machine)."""
    backend.config.codebook = dict(codebook)
    backend.config.num_steps = num_steps
    backend.reset()


# ----------------------------------------------------------------------------------------------
# worker side (runs in each spawned rank)
# ----------------------------------------------------------------------------------------------
def _run(compiled, n, *, seed=0, noise=None, batch=SP_BATCH, rows=None, nan_at=None, gather=False):
    import torch.distributed as dist
    outs = []
    with torch.no_grad():
        for step, t in enumerate(timesteps(n), start=1):
            (x, ts, text), _ = make_inputs(batch, t, seed=seed, noise=noise)
            if rows is not None:
                x, ts, text = x[rows], ts[rows], text[rows]
            if nan_at == step:
                x = x.clone()
                x[0, 0, 0, -1, -1] = float("nan")   # the last spatial token: the last rank's SP shard
            out = compiled(x, ts, text)
            if gather:   # a collective around the compiled model
                parts = [torch.empty_like(out) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, out.contiguous())
                out = torch.cat(parts)
            outs.append(out.numpy().copy())
    return outs


def _count_metric_collectives(backend):
    """Wrap the scheduler's all-reduce to count the metric collectives."""
    import adacache_fx.runtime.scheduler as sched
    calls = []
    original = sched.all_reduce_sums

    def counting(sums, group):
        if group is not None:
            calls.append(1)
        return original(sums, group)
    sched.all_reduce_sums = counting
    return calls, lambda: setattr(sched, "all_reduce_sums", original)


def _scenario_sp(rank, world, ref):
    import torch.distributed as dist
    res = {}
    model = SPVideoDiT(sp_group=dist.group.WORLD).eval()
    compiled, backend = _compile(model, _config({INF: 1}, 8))

    # caching off: equals the single-process model
    res["off_outputs"] = _run(compiled, 8)
    res["off_steps"] = backend.report().computed_steps
    group = backend.scheduler.process_group
    res["group_ranks"] = None if group is None else dist.get_process_group_ranks(group)
    res["uncached"] = list(backend.uncached_graphs)

    # fixed codebook: the contract schedule, no all-to-all on reused steps, one metric
    # collective per computed step that has a metric
    _generation(backend, {INF: 3}, N_FIXED)
    executions = backend.report().block_executions
    calls, restore = _count_metric_collectives(backend)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _run(compiled, N_FIXED)
    finally:
        restore()
    counts = {e.key: e.count for e in prof.key_averages()}
    res["fixed_steps"] = backend.report().computed_steps
    res["fixed_executions"] = backend.report().block_executions - executions
    res["fixed_a2a"] = counts.get("_c10d_functional::all_to_all_single", 0)
    res["fixed_metric_collectives"] = len(calls)
    res["depth"] = len(model.blocks)

    # real codebook (MoReg on), then the fuzz
    _generation(backend, ref["real_codebook"], N_REAL)
    _run(compiled, N_REAL)
    res["real_steps"] = backend.report().computed_steps
    res["real_distances"] = [m.reg_distance for m in backend.report().metrics]
    fuzz = []
    for trial in ref["fuzz"]:
        _generation(backend, trial["codebook"], N_FUZZ)
        _run(compiled, N_FUZZ, seed=trial["seed"], noise=trial["noise"])
        report = backend.report()
        fuzz.append((report.computed_steps, [m.reg_distance for m in report.metrics]))
    res["fuzz"] = fuzz

    # NaN injected on the last rank only (it spreads through the all-to-all as well)
    _generation(backend, {INF: 3}, N_FIXED)
    _run(compiled, N_FIXED, nan_at=NAN_STEP if rank == world - 1 else None)
    res["nan_steps"] = backend.report().computed_steps
    return res


def _scenario_bp(rank, world, ref):
    """Batch parallel: rows of the batch per rank, the collective around the compiled model."""
    res = {}
    model = SPVideoDiT().eval()
    per = BATCH // world
    rows = slice(rank * per, (rank + 1) * per)

    compiled, backend = _compile(model, _config(ref["real_codebook"], N_REAL))
    res["real_outputs_last"] = _run(compiled, N_REAL, batch=BATCH, rows=rows, gather=True)[-1]
    res["real_steps"] = backend.report().computed_steps
    res["uncached"] = list(backend.uncached_graphs)
    res["group_is_world"] = backend.scheduler.process_group is not None

    # a NaN on the last rank only: only its partial sums are NaN
    _generation(backend, {INF: 3}, N_FIXED)
    _run(compiled, N_FIXED, batch=BATCH, rows=rows, nan_at=NAN_STEP if rank == world - 1 else None)
    res["nan_steps"] = backend.report().computed_steps
    # the same without the all-reduce: the ranks diverge (shows the test can fail)
    group, backend.scheduler.process_group = backend.scheduler.process_group, None
    _generation(backend, {INF: 3}, N_FIXED)
    _run(compiled, N_FIXED, batch=BATCH, rows=rows, nan_at=NAN_STEP if rank == world - 1 else None)
    res["nan_steps_no_group"] = backend.report().computed_steps
    backend.scheduler.process_group = group
    return res


def _worker(rank, world, port, ref, queue):
    import datetime

    import torch.distributed as dist
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
        t0 = time.perf_counter()
        out = {"sp": _scenario_sp(rank, world, ref)}
        t1 = time.perf_counter()
        out["bp"] = _scenario_bp(rank, world, ref)
        out["seconds"] = (t1 - t0, time.perf_counter() - t1)
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


def launch(world: int, ref: dict, timeout: float = LAUNCH_TIMEOUT_S) -> list:
    """Run ``_worker`` on ``world`` spawned processes; kill them and fail on a timeout."""
    import queue as queue_mod

    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, ref, q), daemon=True) for r in range(world)]
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
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [results[r] for r in range(world)]


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
    model = SPVideoDiT().eval()
    data = {}
    compiled, backend = _compile(model, _config({INF: 1}, 8))

    def single(codebook, n, seed=0, noise=None, nan_at=None):
        _generation(backend, codebook, n)
        outs = []
        with torch.no_grad():
            for step, t in enumerate(timesteps(n), start=1):
                (x, ts, text), _ = make_inputs(BATCH, t, seed=seed, noise=noise)
                if nan_at == step:
                    x = x.clone()
                    x[0, 0, 0, -1, -1] = float("nan")   # the last spatial token: the last rank's SP shard
                outs.append(compiled(x, ts, text).numpy().copy())
        return outs, backend.report()

    data["off_outputs"] = single({INF: 1}, 8)[0]
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
    data["real_last"] = outs[-1]

    # fuzz: a threshold on (and next to) step 2's distance, which every schedule measures
    fuzz = []
    for seed, noise in ((1, 0.004), (2, 0.03)):
        d2 = single({INF: 1}, 2, seed=seed, noise=noise)[1].metrics[0].reg_distance
        for offset in FUZZ_OFFSETS:
            cb = {d2 * (1.0 + offset): 3, INF: 1}
            steps = single(cb, N_FUZZ, seed=seed, noise=noise)[1].computed_steps
            fuzz.append({"seed": seed, "noise": noise, "offset": offset, "codebook": cb, "single_steps": steps})
    data["fuzz"] = fuzz
    data["single_seconds"] = time.perf_counter() - t0
    torch._dynamo.reset()
    return data


_launches = {}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}proc")
def ranks(request, ref):
    world = request.param
    if world not in _launches:
        worker_ref = {"real_codebook": ref["real_codebook"], "fuzz": ref["fuzz"]}
        t0 = time.perf_counter()
        _launches[world] = launch(world, worker_ref)
        print(f"\n{world} processes: {time.perf_counter() - t0:.1f} s (sp, bp per rank: "
              f"{[tuple(round(x, 1) for x in r['seconds']) for r in _launches[world]]}); "
              f"single-process references {ref['single_seconds']:.1f} s")
    return _launches[world]


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------
def test_sp_caching_off_equals_single_process(ranks, ref):
    for r in ranks:
        assert r["sp"]["uncached"] == []
        assert r["sp"]["off_steps"] == list(range(1, 9))
        for got, want in zip(r["sp"]["off_outputs"], ref["off_outputs"]):
            torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-5, atol=1e-5)


def test_sp_process_group_found_from_graph(ranks):
    world = len(ranks)
    for r in ranks:
        assert r["sp"]["group_ranks"] == list(range(world))


def test_sp_fixed_codebook_skips_attention_and_communication(ranks):
    for r in ranks:
        sp = r["sp"]
        assert sp["fixed_steps"] == EXPECTED_FIXED
        assert sp["fixed_executions"] == len(EXPECTED_FIXED)   # block stack runs
        # two all-to-alls per block per computed step, none on a reused step
        assert sp["fixed_a2a"] == 2 * sp["depth"] * len(EXPECTED_FIXED)
        # one metric collective per computed step with a metric, taken when the next step
        # begins: steps 2, 5, 8, 11 (step 12's stays pending: no step follows it)
        assert sp["fixed_metric_collectives"] == 4


def test_sp_real_codebook_ranks_agree_with_single_process(ranks, ref):
    assert ref["real_margin"] > FAR, "the derived codebook sits too close to a distance"
    assert len(ref["real_steps"]) < N_REAL, "the derived codebook does not skip"
    for r in ranks:
        assert r["sp"]["real_steps"] == ref["real_steps"]
        assert r["sp"]["real_distances"] == ranks[0]["sp"]["real_distances"]   # bitwise, every rank


def test_sp_fuzz_near_thresholds_ranks_agree(ranks, ref):
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


def test_sp_nan_on_one_rank_makes_all_compute(ranks):
    for r in ranks:
        assert r["sp"]["nan_steps"] == EXPECTED_NAN


def test_bp_collectives_around_graph(ranks, ref):
    for r in ranks:
        bp = r["bp"]
        assert bp["uncached"] == []
        assert bp["group_is_world"]
        assert bp["real_steps"] == ref["real_steps"]
        torch.testing.assert_close(torch.from_numpy(bp["real_outputs_last"]), torch.from_numpy(ref["real_last"]),
                                   rtol=1e-4, atol=1e-4)


def test_bp_nan_on_one_rank_makes_all_compute(ranks, ref):
    assert ref["fixed_nan"] == EXPECTED_NAN
    for r in ranks:
        assert r["bp"]["nan_steps"] == EXPECTED_NAN
    # without the all-reduce, only the NaN rank computes the extra steps
    assert ranks[0]["bp"]["nan_steps_no_group"] == EXPECTED_FIXED
    assert ranks[-1]["bp"]["nan_steps_no_group"] == EXPECTED_NAN

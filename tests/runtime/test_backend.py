"""The backend end to end on the core zoo (two reference models, diffusers DiT, PixArt,
Latte) and on toy models: caching off is exact, fixed codebooks follow the contract and
really skip the blocks, no recompiles, guidance branches, generations, fallbacks.

Every value check runs a flow-Euler loop (helpers.euler_loop: the latent changes every step
with the model's output) and compares reused steps with an independently computed
``skeleton(input) + cached delta`` (helpers.BlockStackReference, or by hand for a model whose
skeleton is the identity) and with the uncached model within a stated tolerance."""
import dataclasses
import math
import warnings

import pytest
import torch


import adacache_fx  # noqa: E402
from adacache_fx import AdaCacheConfig, AdaCacheWarning, adacache_backend, explain  # noqa: E402
from helpers import (INF, BlockStackReference, ProbeRecorder, assert_matches_reference, cached,  # noqa: E402
                     count_ops, distance_and_motion, euler_loop, moreg, no_recompiles, relative_l1,
                     label_branch, sample_loop, timesteps, zoo_block_paths)
from models.toy_models import NoBlocks, ToyDiT, ToyFlowDiT, ToyLatte, seeded  # noqa: E402
from zoo import get_case  # noqa: E402

CORE = ["ref_dit", "ref_stdit", "dit", "pixart", "latte"]
CONTRACT = [1, 2, 5, 8, 11, 12]   # {inf: 3} over 12 steps
# Reused steps approximate the uncached model: measured relative L1 errors are 0.2-3% per reused
# step and 0.02-0.3% on the final latents of a 12-step Euler loop ({inf: 3}); the bounds below
# leave a few times that. The exact check is the one against the independent reference.
REUSE_TOL = 0.1
FINAL_TOL = 0.02
VIDEO = {"ref_stdit", "latte"}
_models = {}


def model_of(name):
    if name not in _models:
        _models[name] = get_case(name).build()
    return _models[name]


@pytest.mark.parametrize("name", CORE)
def test_explain_finds_structure(name):
    case = get_case(name)
    args, kwargs = case.make_inputs(2, 500.0)
    ex = explain(model_of(name), *args, **kwargs)
    assert len(ex.graphs) == 1
    assert len(ex.regions) == 1
    region = ex.regions[0]
    assert len(region.blocks) == case.num_blocks
    assert len(region.streams) == 1
    assert ex.probe is not None and ex.probe.block in region.block_paths
    assert ex.timestep is not None
    if name in VIDEO:
        assert ex.frame_layout is not None
    else:
        assert ex.frame_layout is None
    text = str(ex)
    assert "probe" in text and "timestep input" in text and "MoReg" in text


@pytest.mark.parametrize("name", CORE)
def test_caching_off_equals_plain_compile(name):
    case = get_case(name)
    model = model_of(name)
    steps = timesteps(8, case.t_max)
    plain = euler_loop(torch.compile(model, backend="eager"), case.make_inputs, steps, output=case.output)
    compiled, backend = cached(model, {INF: 1}, num_steps=8)
    ours = euler_loop(compiled, case.make_inputs, steps, output=case.output)
    for a, b in zip(plain.outputs(), ours.outputs()):
        assert torch.equal(a, b)
    assert torch.equal(plain.final, ours.final)
    assert backend.report().computed_steps == list(range(1, 9))


@pytest.mark.parametrize("name", CORE)
def test_fixed_codebook_follows_contract_and_skips_blocks(name):
    case = get_case(name)
    model = model_of(name)
    steps = timesteps(12, case.t_max)
    compiled, backend = cached(model, {INF: 3}, num_steps=12)
    euler_loop(compiled, case.make_inputs, steps[:1], output=case.output)   # compile outside the count
    backend.reset()
    runs = []
    sdpa = count_ops(lambda: runs.append(euler_loop(compiled, case.make_inputs, steps, output=case.output)))
    (run,) = runs
    report = backend.report()
    assert report.computed_steps == CONTRACT
    assert report.block_executions == 1 + 6
    # an independent count: attention runs only on computed steps, once per block
    attention_per_step = count_ops(lambda: sample_loop(model, case.make_inputs, steps[:1], output=case.output))
    assert attention_per_step >= case.num_blocks
    assert sdpa == 6 * attention_per_step
    # every step equals the independent reference: the plain model on computed steps,
    # skeleton(input) + the delta of the last computed step on reused ones
    reference = BlockStackReference(model, zoo_block_paths(case, model), output=case.output)
    assert_matches_reference(run, reference.expected(run, CONTRACT))
    # and approximates the uncached model: close, but really reused
    for step, (call,) in enumerate(run.calls, start=1):
        error = relative_l1(call.output, reference.plain(call))
        if step in CONTRACT:
            assert error < 1e-5, step
        else:
            assert 1e-5 < error < REUSE_TOL, (step, error)
    uncached = euler_loop(model, case.make_inputs, steps, output=case.output)
    assert 1e-6 < relative_l1(run.final, uncached.final) < FINAL_TOL


def test_reused_step_is_input_plus_cached_delta():
    """A model whose skeleton is the identity (blocks only), two guidance branches, a flow-Euler
    loop: every reused output is exactly ``x_s + (out_p - x_p)`` of its own branch, computed from
    the loop's own inputs and outputs, and the computed steps are the plain model's."""
    model = seeded(ToyFlowDiT())
    x0 = torch.randn(2, 9, 12, generator=torch.Generator().manual_seed(0))

    def make(batch, t):
        return (x0, torch.full((batch,), t), torch.zeros(batch, dtype=torch.long)), {}
    compiled, backend = cached(model, {INF: 3}, num_steps=12)
    with no_recompiles():
        run = euler_loop(compiled, make, timesteps(12), branches=[label_branch(1), label_branch(3)])
    report = backend.report()
    assert report.computed_steps == CONTRACT and report.block_executions == 2 * 6
    last = {}
    for step, row in enumerate(run.calls, start=1):
        x = run.latents[step - 1]
        for b, call in enumerate(row):
            with torch.no_grad():
                plain = model(*call.args)
            if step in CONTRACT:
                torch.testing.assert_close(call.output, plain, rtol=1e-5, atol=1e-6)
                last[b] = (x, call.output)
                continue
            x_p, out_p = last[b]
            delta = out_p - x_p
            expected = x + delta
            torch.testing.assert_close(call.output, expected, rtol=1e-6, atol=1e-6,
                                       msg=lambda m, s=step, b=b: f"step {s}, branch {b}: {m}")
            # what a broken reuse path would return is far from it: the test can tell them apart
            other = last[1 - b][1] - last[1 - b][0]
            for wrong in (out_p, x, x + 2 * delta, x + other):
                assert (wrong - expected).abs().max() > 1e-3
            assert 1e-5 < relative_l1(call.output, plain) < REUSE_TOL


def test_metric_is_the_papers_formula():
    """Every metric of a MoReg video run equals the formulas computed by hand from the probe
    residual of the plain model: ``c = sum|r_s - r_p| / sum|r_p| / k``, the motion score over the
    frame axis, ``m'``, ``mg`` and ``c * (m' + |mg|)`` (probe: ``spatial.1``'s attention branch,
    frames = rows of its (B*F, S, C) layout)."""
    model = seeded(ToyLatte())
    x0 = torch.randn(2, 3, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    config = AdaCacheConfig(codebook={INF: 3}, num_steps=12, moreg_normalizer=0.05)
    compiled, backend = cached(model, config=config)
    run = euler_loop(compiled, lambda b, t: ((x0, torch.full((b,), t)), {}), timesteps(12))
    report = backend.report()
    assert report.computed_steps == CONTRACT
    assert report.regions[0].probe == "spatial.1"
    recorder = ProbeRecorder(model, "spatial.1.proj")
    probes = {s: recorder(run.calls[s - 1][0]) for s in CONTRACT}
    frames = lambda r: r.reshape(2, 3, -1)   # noqa: E731  rows b*F + f of (B*F, S, C)
    window = config.window_for(12)
    assert [m.step for m in report.metrics] == CONTRACT[1:]
    prev_reg = None
    for m in report.metrics:
        p = CONTRACT[CONTRACT.index(m.step) - 1]
        k = m.step - p
        c, motion = distance_and_motion(probes[m.step], probes[p], k, frames)
        reg, prev_reg = moreg(c, motion, prev_reg, k, window[0] <= m.step <= window[1], config)
        assert m.distance == pytest.approx(c, rel=1e-5), m
        assert m.motion == pytest.approx(motion, rel=1e-5), m
        assert m.reg_distance == pytest.approx(reg, rel=1e-4), m
        assert m.rate == 3 and m.next_step == m.step + 3
    assert len({round(m.distance, 6) for m in report.metrics}) == len(report.metrics)   # not constant


def test_no_recompile_over_30_steps():
    case = get_case("ref_stdit")
    model = model_of("ref_stdit")
    compiled, backend = cached(model, config=AdaCacheConfig.fast(30))
    with no_recompiles():
        euler_loop(compiled, case.make_inputs, timesteps(30))
        euler_loop(compiled, case.make_inputs, timesteps(30))   # a second generation too
    report = backend.report()
    assert len(backend.graphs) == 1 and not report.uncached_graphs
    assert report.computed_steps[:2] == [1, 2] and report.computed_steps[-2:] == [29, 30]
    assert len(report.metrics) == len(report.computed_steps) - 1
    assert all(m.motion is not None for m in report.metrics)   # video: MoReg active


def test_new_generation_from_timestep_and_reset():
    case = get_case("ref_dit")
    model = model_of("ref_dit")
    compiled, backend = cached(model, {INF: 3}, num_steps=12)
    first = euler_loop(compiled, case.make_inputs, timesteps(12))
    first_bytes = backend.report().cache_bytes
    assert first_bytes > 0
    again = euler_loop(compiled, case.make_inputs, timesteps(12))          # timestep jumps back up
    assert backend.report().computed_steps == CONTRACT
    # nothing carried over: the second generation is the first one again, value for value
    for a, b in zip(first.outputs(), again.outputs()):
        assert torch.equal(a, b)
    backend.reset()
    assert backend.report().cache_bytes == 0 and backend.report().computed_steps == []
    short = euler_loop(compiled, case.make_inputs, timesteps(5))
    assert backend.report().computed_steps == [1, 2, 5]
    reference = BlockStackReference(model, zoo_block_paths(case, model))
    assert_matches_reference(short, reference.expected(short, [1, 2, 5]))


def test_cache_holds_one_delta_per_stream_and_one_probe():
    case = get_case("ref_stdit")
    compiled, backend = cached(model_of("ref_stdit"), {INF: 3}, num_steps=12)
    euler_loop(compiled, case.make_inputs, timesteps(12))
    report = backend.report()
    (stream_shape,) = report.regions[0].streams
    assert report.cache_bytes == 2 * math.prod(stream_shape) * 4    # delta + probe, float32
    assert "computed steps" in str(report)


def test_batch_size_change_inside_a_generation_recomputes():
    """With dynamic=True one graph serves batch 2 and batch 3, so only the runtime's shape check
    stands between a reused step and a delta cached at the other batch size. Batches per step:
    2 2 | 3 3 3 3 3 | 2 2 2 2 2. Steps 3 and 8 are scheduled reuses at a new batch size: they
    must compute (the plain model's output); steps 4 and 7 reuse the batch-3 deltas of steps 3
    and 6. A step computed for a shape change keeps no probe, so the next scheduled computed
    step (5, 9) has no metric and keeps rate 1: scheduled steps 1 2 5 6 9 10 11 12."""
    model = seeded(ToyFlowDiT())
    compiled, backend = cached(model, {INF: 3}, num_steps=12, dynamic=True)
    steps = timesteps(12)
    batches = [2, 2, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2]
    x = torch.randn(2, 9, 12, generator=torch.Generator().manual_seed(0))
    extra = torch.randn(1, 9, 12, generator=torch.Generator().manual_seed(1))
    grid = steps + [0.0]
    rows = []
    with no_recompiles(), torch.no_grad():
        for i, (t, batch) in enumerate(zip(steps, batches)):
            if batch != x.shape[0]:   # a new tensor, not a view (a view input is another Dynamo guard)
                x = torch.cat([x, extra]) if batch > x.shape[0] else x[:batch].clone()
            args = (x, torch.full((batch,), t), torch.arange(batch) % 4)
            out = compiled(*args)
            rows.append((args, out))
            x = x + (grid[i + 1] - t) / 1000.0 * out
    assert len(backend.graphs) == 1, "one graph must serve both batch sizes (else the check is not exercised)"
    assert backend.report().computed_steps == [1, 2, 5, 6, 9, 10, 11, 12]
    ran = {1, 2, 3, 5, 6, 8, 9, 10, 11, 12}    # 3 and 8: forced by the batch-size change
    assert backend.report().block_executions == len(ran)
    last = None
    for step, (args, out) in enumerate(rows, start=1):
        with torch.no_grad():
            plain = model(*args)
        if step in ran:
            torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
            last = (args[0], out)
        else:
            assert last[0].shape == args[0].shape
            torch.testing.assert_close(out, args[0] + (last[1] - last[0]), rtol=1e-6, atol=1e-6)


def test_nan_metric_means_compute(monkeypatch):
    import adacache_fx.runtime.branch_store as runtime
    monkeypatch.setattr(runtime, "fused_cache_metrics",
                        lambda r, p, s=1: torch.full((r.shape[0], 5), float("nan")))
    case = get_case("ref_dit")
    compiled, backend = cached(model_of("ref_dit"), {INF: 3}, num_steps=12)   # last rate 3, not 1
    euler_loop(compiled, case.make_inputs, timesteps(12))
    assert backend.report().computed_steps == list(range(1, 13))
    assert all(m.rate == 1 for m in backend.report().metrics)


def test_model_without_blocks_runs_uncached_with_warning():
    model = seeded(NoBlocks())
    compiled, backend = cached(model, {INF: 3}, num_steps=4)
    x, t = torch.randn(2, 3, 5), torch.full((2,), 10.0)
    with pytest.warns(AdaCacheWarning, match="uncached"):
        out = compiled(x, t)
    torch.testing.assert_close(out, model(x, t))
    assert backend.report().uncached_graphs


def test_registered_backend_name():
    model = seeded(ToyDiT())
    x, t = torch.randn(2, 7, 5), torch.full((2,), 10.0)
    with torch.no_grad():
        out = torch.compile(model, backend="adacache")(x, t)
    torch.testing.assert_close(out, model(x, t), rtol=1e-4, atol=1e-4)
    assert adacache_fx.default_backend().graphs


def test_inductor_inner():
    case = get_case("ref_dit")
    model = model_of("ref_dit")
    steps = timesteps(6)
    plain = euler_loop(torch.compile(model), case.make_inputs, steps)
    compiled, backend = cached(model, {INF: 1}, num_steps=6, inner="inductor")
    ours = euler_loop(compiled, case.make_inputs, steps)
    for a, b in zip(plain.outputs(), ours.outputs()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    backend.reset()
    backend.set_config(dataclasses.replace(backend.config, codebook={INF: 3}))
    run = euler_loop(compiled, case.make_inputs, steps)
    assert backend.report().computed_steps == [1, 2, 5, 6]
    reference = BlockStackReference(model, zoo_block_paths(case, model))
    assert_matches_reference(run, reference.expected(run, [1, 2, 5, 6]), rtol=1e-4, atol=1e-4)


class _NoTimestep(torch.nn.Module):
    """Blocks but no sinusoidal timestep input."""

    def __init__(self):
        super().__init__()
        from models.toy_models import Block
        self.blocks = torch.nn.ModuleList([Block(8, use_t=False) for _ in range(3)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x, None)
        return x


def test_no_timestep_needs_num_steps_then_counts_calls():
    model = seeded(_NoTimestep())
    x = torch.randn(2, 3, 8)
    compiled, _ = cached(model, {INF: 3})
    with pytest.raises(Exception, match="num_steps"):
        with torch.no_grad():
            compiled(x)
    compiled, backend = cached(model, {INF: 3}, num_steps=6)
    outs = []
    with torch.no_grad():
        for _ in range(6):
            outs.append((x, compiled(x)))
            x = x + 0.1 * (outs[-1][1] - x)        # the input changes every call
    assert backend.report().computed_steps == [1, 2, 5, 6]
    # the skeleton is the identity: reused calls are x + (out - in) of the last computed call
    for i in (2, 3):
        torch.testing.assert_close(outs[i][1], outs[i][0] + outs[1][1] - outs[1][0], rtol=1e-6, atol=1e-6)


def test_config_that_does_not_fit_the_model_raises():
    model = seeded(ToyDiT())
    compiled, _ = cached(model, config=AdaCacheConfig(probe_block="no_such_block"))
    with pytest.raises(Exception, match="probe_block"):
        with torch.no_grad():
            compiled(torch.randn(2, 7, 5), torch.full((2,), 1.0))


def test_entry_point_is_declared():
    from importlib.metadata import entry_points
    names = [ep.name for ep in entry_points(group="torch_dynamo_backends")]
    assert "adacache" in names

"""The backend end to end on the core zoo (two reference models, diffusers DiT, PixArt,
Latte) and on toy models: caching off is exact, fixed codebooks follow the contract and
really skip the blocks, no recompiles, guidance branches, generations, fallbacks."""
import math
import warnings

import pytest
import torch


import adacache_fx  # noqa: E402
from adacache_fx import AdaCacheConfig, AdaCacheWarning, adacache_backend, explain  # noqa: E402
from helpers import INF, cached, count_ops, no_recompiles, sample_loop, timesteps  # noqa: E402
from toy_models import NoBlocks, ToyDiT, ToyLatte, seeded  # noqa: E402
from zoo import get_case  # noqa: E402

CORE = ["ref_dit", "ref_stdit", "dit", "pixart", "latte"]
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
    torch._dynamo.reset()
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
    torch._dynamo.reset()
    plain = sample_loop(torch.compile(model, backend="eager"), case.make_inputs, steps, output=case.output)
    compiled, backend = cached(model, {INF: 1}, num_steps=8)
    ours = sample_loop(compiled, case.make_inputs, steps, output=case.output)
    for a, b in zip(plain, ours):
        assert torch.equal(a, b)
    assert backend.report().computed_steps == list(range(1, 9))


@pytest.mark.parametrize("name", CORE)
def test_fixed_codebook_follows_contract_and_skips_blocks(name):
    case = get_case(name)
    model = model_of(name)
    steps = timesteps(12, case.t_max)
    compiled, backend = cached(model, {INF: 3}, num_steps=12)
    sample_loop(compiled, case.make_inputs, steps[:1], output=case.output)   # compile outside the count
    backend.reset()
    outs = []
    sdpa = count_ops(lambda: outs.extend(sample_loop(compiled, case.make_inputs, steps, output=case.output)))
    report = backend.report()
    assert report.computed_steps == [1, 2, 5, 8, 11, 12]
    assert report.block_executions == 1 + 6
    # an independent count: attention runs only on computed steps, once per block
    attention_per_step = count_ops(lambda: sample_loop(model, case.make_inputs, steps[:1], output=case.output))
    assert attention_per_step >= case.num_blocks
    assert sdpa == 6 * attention_per_step
    # reused steps are not the uncached output, but close to it
    reference = sample_loop(model, case.make_inputs, steps, output=case.output)
    assert torch.equal(outs[0], reference[0])
    assert not torch.equal(outs[2], reference[2])
    assert all(torch.isfinite(o).all() for o in outs)


def test_no_recompile_over_30_steps():
    case = get_case("ref_stdit")
    model = model_of("ref_stdit")
    compiled, backend = cached(model, config=AdaCacheConfig.fast(30))
    with no_recompiles():
        sample_loop(compiled, case.make_inputs, timesteps(30))
        sample_loop(compiled, case.make_inputs, timesteps(30))   # a second generation too
    report = backend.report()
    assert len(backend.graphs) == 1 and not report.uncached_graphs
    assert report.computed_steps[:2] == [1, 2] and report.computed_steps[-2:] == [29, 30]
    assert len(report.metrics) == len(report.computed_steps) - 1
    assert all(m.motion is not None for m in report.metrics)   # video: MoReg active


def test_reuse_path_is_exact_when_deltas_do_not_change():
    """Blocks that ignore the timestep see the same input every step: their delta is the
    same, so reused steps must reproduce the uncached output exactly (prologue and
    epilogue still depend on the timestep)."""
    for model in (seeded(ToyDiT(use_t=False)), seeded(ToyLatte(use_t=False))):
        x = torch.randn(2, 3, 3, 4, 5) if isinstance(model, ToyLatte) else torch.randn(2, 7, 5)

        def make_inputs(batch, t, x=x):
            return (x, torch.full((2,), t)), {}
        steps = timesteps(12)
        compiled, backend = cached(model, {INF: 3}, num_steps=12)
        ours = sample_loop(compiled, make_inputs, steps)
        reference = sample_loop(model, make_inputs, steps)
        assert backend.report().computed_steps == [1, 2, 5, 8, 11, 12]
        for a, b in zip(ours, reference):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_guidance_as_separate_calls_keeps_a_delta_per_branch():
    """cond and uncond as two calls with the same timestep: one decision per step, and each
    branch's outputs equal those of a backend that only ever saw that branch."""
    case = get_case("ref_dit")
    model = model_of("ref_dit")
    steps = timesteps(12)

    def branch_inputs(label):
        def make(batch, t):
            (x, tt, y), kw = case.make_inputs(batch, t)
            return (x, tt, torch.full_like(y, label)), kw
        return make

    compiled, backend = cached(model, {INF: 3}, num_steps=12)
    both = []
    with torch.no_grad():
        for t in steps:
            for label in (3, 10):
                args, kw = branch_inputs(label)(2, t)
                both.append(compiled(*args, **kw))
    report = backend.report()
    assert report.computed_steps == [1, 2, 5, 8, 11, 12]
    assert report.block_executions == 12
    for b, label in enumerate((3, 10)):
        single, _ = cached(model, {INF: 3}, num_steps=12)
        alone = sample_loop(single, branch_inputs(label), steps)
        for step, out in enumerate(alone):
            assert torch.equal(both[2 * step + b], out)


def test_new_generation_from_timestep_and_reset():
    case = get_case("ref_dit")
    compiled, backend = cached(model_of("ref_dit"), {INF: 3}, num_steps=12)
    sample_loop(compiled, case.make_inputs, timesteps(12))
    first_bytes = backend.report().cache_bytes
    assert first_bytes > 0
    sample_loop(compiled, case.make_inputs, timesteps(12))          # timestep jumps back up
    assert backend.report().computed_steps == [1, 2, 5, 8, 11, 12]
    backend.reset()
    assert backend.report().cache_bytes == 0 and backend.report().computed_steps == []
    sample_loop(compiled, case.make_inputs, timesteps(5))
    assert backend.report().computed_steps == [1, 2, 5]


def test_cache_holds_one_delta_per_stream_and_one_probe():
    case = get_case("ref_stdit")
    compiled, backend = cached(model_of("ref_stdit"), {INF: 3}, num_steps=12)
    sample_loop(compiled, case.make_inputs, timesteps(12))
    report = backend.report()
    (stream_shape,) = report.regions[0].streams
    assert report.cache_bytes == 2 * math.prod(stream_shape) * 4    # delta + probe, float32
    assert "computed steps" in str(report)


def test_batch_size_change_inside_a_generation_recomputes():
    model = seeded(ToyDiT())
    compiled, backend = cached(model, {INF: 3}, num_steps=12)
    steps = timesteps(12)
    with torch.no_grad():
        for i, t in enumerate(steps):
            batch = 3 if i == 2 else 2           # step 3 would be a reused step
            x = torch.randn(batch, 7, 5, generator=torch.Generator().manual_seed(i))
            out = compiled(x, torch.full((batch,), t))
            if i == 2:
                torch.testing.assert_close(out, model(x, torch.full((batch,), t)))


def test_nan_metric_means_compute(monkeypatch):
    import adacache_fx.runtime.cached_graph as runtime
    monkeypatch.setattr(runtime, "fused_cache_metrics",
                        lambda r, p, s=1: torch.full((r.shape[0], 5), float("nan")))
    case = get_case("ref_dit")
    compiled, backend = cached(model_of("ref_dit"), {INF: 3}, num_steps=12)
    sample_loop(compiled, case.make_inputs, timesteps(12))
    assert backend.report().computed_steps == list(range(1, 13))


def test_model_without_blocks_runs_uncached_with_warning():
    model = seeded(NoBlocks())
    compiled, backend = cached(model, {INF: 3}, num_steps=4)
    x, t = torch.randn(2, 3, 5), torch.full((2,), 10.0)
    with pytest.warns(AdaCacheWarning, match="uncached"):
        out = compiled(x, t)
    torch.testing.assert_close(out, model(x, t))
    assert backend.report().uncached_graphs


def test_registered_backend_name():
    torch._dynamo.reset()
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
    torch._dynamo.reset()
    plain = sample_loop(torch.compile(model), case.make_inputs, steps)
    compiled, backend = cached(model, {INF: 1}, num_steps=6, inner="inductor")
    ours = sample_loop(compiled, case.make_inputs, steps)
    for a, b in zip(plain, ours):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    backend.reset()
    backend.config.codebook = {INF: 3}
    sample_loop(compiled, case.make_inputs, steps)
    assert backend.report().computed_steps == [1, 2, 5, 6]


class _NoTimestep(torch.nn.Module):
    """Blocks but no sinusoidal timestep input."""

    def __init__(self):
        super().__init__()
        from toy_models import Block
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
    with torch.no_grad():
        for _ in range(6):
            compiled(x)
    assert backend.report().computed_steps == [1, 2, 5, 6]


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

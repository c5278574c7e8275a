"""The lifecycle in the ecosystem's shape (issue 27): ``enable_cache(obj)`` on a diffusers pipeline,
a transformer or any module; ``disable_cache(obj)`` restores it bit for bit; ``summary(obj)``;
enabling twice, disabling what was never enabled and enabling what has no block stack raise
clearly; ``with backend.generation(num_steps=...)`` scopes one generation of a raw loop; a
preset follows each pipeline call's step count."""
import io

import pytest
import torch

import adacache_fx
from adacache_fx import AdaCacheConfig, adacache_backend
from helpers import INF, euler_loop, timesteps
from models.toy_models import ToyDiT, seeded

CONTRACT_12 = [1, 2, 5, 8, 11, 12]


def _inputs(batch, t):
    x = torch.randn(batch, 9, 5, generator=torch.Generator().manual_seed(7))
    return (x, torch.full((batch,), t)), {}


def test_enable_cache_on_a_module_then_summary_then_disable_cache_bit_identical():
    model = seeded(ToyDiT().eval(), 0)
    with torch.no_grad():
        reference = euler_loop(model, _inputs, timesteps(12)).outputs()
    backend = adacache_fx.enable_cache(model, AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    euler_loop(model, _inputs, timesteps(12))
    out = io.StringIO()
    report = adacache_fx.summary(model, file=out)
    assert report.computed_steps == CONTRACT_12 and "6/12 steps computed" in out.getvalue()
    assert backend.report(model).computed_steps == CONTRACT_12
    with pytest.raises(RuntimeError, match="already enabled"):
        adacache_fx.enable_cache(model)
    adacache_fx.disable_cache(model)
    after = euler_loop(model, _inputs, timesteps(12)).outputs()
    assert all(torch.equal(a, b) for a, b in zip(after, reference))
    with pytest.raises(ValueError, match="never enabled"):
        adacache_fx.disable_cache(model)
    with pytest.raises(ValueError, match="not enabled"):
        adacache_fx.summary(model)


def test_enable_cache_says_what_it_found_on_bad_input():
    with pytest.raises(ValueError, match=r"no block stack.*children: \['Linear', 'ReLU'\]"):
        adacache_fx.enable_cache(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU()))
    with pytest.raises(TypeError, match="pipeline or an nn.Module, got int"):
        adacache_fx.enable_cache(3)


def test_a_generation_scope_restarts_the_schedule_where_the_timestep_cannot_tell():
    """Two generations in a row whose timesteps keep falling (the second starts below where the
    first ended): only the scope tells the clock a new generation began."""
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}), inner="eager")
    model = torch.compile(seeded(ToyDiT().eval(), 0), backend=backend)
    first = [1000.0 - 40.0 * i for i in range(12)]
    second = [500.0 - 40.0 * i for i in range(12)]
    for steps in (first, second):
        with backend.generation(num_steps=12):
            euler_loop(model, _inputs, steps)
        assert backend.report().computed_steps == CONTRACT_12
    assert backend.runtime.requested_num_steps is None   # the step count before the scope is back


def test_enable_cache_on_a_pipeline_follows_each_calls_step_count():
    pytest.importorskip("diffusers")
    from models.pipelines import run, tiny_dit_pipeline
    pipe = tiny_dit_pipeline()
    reference = run(pipe, 8)
    backend = adacache_fx.enable_cache(pipe, AdaCacheConfig.fast(30), inner="eager")
    with pytest.raises(RuntimeError, match="already enabled"):
        adacache_fx.enable_cache(pipe)
    run(pipe, 50)
    at_50 = backend.report().computed_steps
    adacache_fx.disable_cache(pipe)
    torch.testing.assert_close(run(pipe, 8), reference, rtol=0, atol=0)
    pipe_50 = tiny_dit_pipeline()
    backend_50 = adacache_fx.enable_cache(pipe_50, AdaCacheConfig.fast(50), inner="eager")
    run(pipe_50, 50)
    assert backend_50.report().computed_steps == at_50
    out = io.StringIO()
    assert adacache_fx.summary(pipe_50, file=out).num_steps == 50 and "50 steps" in out.getvalue()


def test_a_dropped_pipeline_is_freed():
    """A pipeline enabled, run and dropped without ``disable_cache`` is freed: Dynamo's code cache
    keeps the backend for the process's life, and the backend holds the pipeline's step clock."""
    import gc
    import weakref
    pytest.importorskip("diffusers")
    from models.pipelines import run, tiny_dit_pipeline
    pipe = tiny_dit_pipeline()
    adacache_fx.enable_cache(pipe, AdaCacheConfig(codebook={INF: 3}), inner="eager")
    run(pipe, 6)
    transformer, pipeline = weakref.ref(pipe.transformer), weakref.ref(pipe)
    del pipe
    gc.collect()
    assert pipeline() is None and transformer() is None

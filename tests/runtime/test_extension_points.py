"""The runtime's seams: a new forecaster and a new decision policy are each one class,
registered by name and chosen by a config field, with no change to the runtime; the probe is
resolved by one resolver for both guards; ``disable`` undoes every patch."""
import pytest
import torch
import torch.nn as nn

import adacache_fx
from adacache_fx import AdaCacheConfig, adacache_backend, compile_model, explain
from adacache_fx.passes.analysis.resolve_probe import resolve_probe_block
from adacache_fx.runtime.forecasters import Forecaster, register_forecaster
from adacache_fx.runtime.forecasters.registry import FORECASTERS
from adacache_fx.runtime.policies import Policy, StepMetric, register_policy
from adacache_fx.runtime.policies.registry import POLICIES
from helpers import INF, euler_loop, timesteps
from models.toy_models import Block, ToyDiT, seeded

CONTRACT = [1, 2, 5, 8, 11, 12]   # {inf: 3} over 12 steps


def _inputs(batch, t):
    x = torch.randn(batch, 7, 5, generator=torch.Generator().manual_seed(1))
    return (x, torch.full((batch,), t)), {}


def _generation(config, inner="eager", fused=True):
    backend = adacache_backend(config, inner=inner)
    compiled = torch.compile(seeded(ToyDiT()), backend=backend)

    def before_step(t):
        if not fused:   # reused steps piece by piece, the forecast applied eagerly
            for g in backend.graphs:
                g.reuse_step = None
    run = euler_loop(compiled, _inputs, timesteps(12), before_step=before_step)
    return run, backend


@pytest.fixture
def toy_forecaster():
    """A forecaster of one term whose coefficient is always 0: a reused step adds the last delta,
    as ``reuse="constant"``, through the forecast path (the term is kept and multiplied)."""
    calls = {"terms": 0, "coefficients": []}

    @register_forecaster("toy_zero_slope")
    class ZeroSlope(Forecaster):
        terms = 1

        def stream_terms(self, new, previous):
            calls["terms"] += 1
            return [new - previous]

        def coefficients(self, time, computed_time, span):
            calls["coefficients"].append(time)
            return (0.0,)
    yield calls
    FORECASTERS.unregister("toy_zero_slope")


@pytest.mark.parametrize("fused", [True, False])
def test_a_registered_forecaster_is_chosen_by_the_config(toy_forecaster, fused):
    config = AdaCacheConfig(codebook={INF: 3}, num_steps=12, reuse="toy_zero_slope")
    run, backend = _generation(config, fused=fused)
    assert sum(g.fused_reuses for g in backend.graphs) == (12 - len(CONTRACT) if fused else 0)
    assert backend.report().computed_steps == CONTRACT
    constant, _ = _generation(AdaCacheConfig(codebook={INF: 3}, num_steps=12, reuse="constant"))
    linear, _ = _generation(AdaCacheConfig(codebook={INF: 3}, num_steps=12, reuse="linear"))
    for step, (toy, const, lin) in enumerate(zip(run.outputs(), constant.outputs(), linear.outputs()), start=1):
        assert torch.equal(toy, const), f"step {step}"
    assert not torch.equal(run.final, linear.final)   # the config's forecaster, not the default
    # terms made at every computed step with a previous one in the cache (5, 8, 11, 12), coefficients on reused steps
    assert toy_forecaster["terms"] >= 4 and len(toy_forecaster["coefficients"]) >= 12 - len(CONTRACT)


@pytest.fixture
def toy_policy():
    """A policy that computes every other step whatever the metric says."""
    @register_policy("toy_every_other")
    class EveryOther(Policy):
        def measure(self, pending, sums, num_steps):
            return StepMetric(pending.step, float(sums[0]), None, None, None, float(sums[0]), 2, pending.step + 2)
    yield EveryOther
    POLICIES.unregister("toy_every_other")


def test_a_registered_policy_is_chosen_by_the_config(toy_policy):
    run, backend = _generation(AdaCacheConfig(num_steps=12, policy="toy_every_other"))
    report = backend.report()
    # the contract (first step, rate 1 until a metric, the last two) around the policy's rate 2
    assert report.computed_steps == [1, 2, 4, 6, 8, 10, 11, 12]
    assert [m.step for m in report.metrics] == [2, 4, 6, 8, 10, 11, 12] and {m.rate for m in report.metrics} == {2}
    assert report.block_executions == len(report.computed_steps) * len(backend.graphs[0].runners)


def test_unknown_names_are_config_errors_naming_the_field():
    with pytest.raises(ValueError, match="policy must be one of .*'adacache'.*got 'nope'"):
        AdaCacheConfig(policy="nope")
    with pytest.raises(ValueError, match="reuse must be one of .*'linear'.*got 'nope'"):
        AdaCacheConfig(reuse="nope")
    with pytest.raises(ValueError, match="already registered"):
        register_policy("adacache")(type("Other", (Policy,), {}))


# ----- one probe resolver ----------------------------------------------------------------------
def test_a_probe_path_names_its_own_list_not_a_suffix_of_another():
    paths = [["single_transformer_blocks.0", "single_transformer_blocks.1"], ["transformer_blocks.0", "transformer_blocks.1"]]
    assert resolve_probe_block("transformer_blocks.1", paths, 0) == (1, 1)
    assert resolve_probe_block("single_transformer_blocks.1", paths, 1) == (0, 1)
    assert resolve_probe_block("model.transformer_blocks.1".split(".", 1)[1], paths, 0) == (1, 1)
    assert resolve_probe_block(None, paths, 1) == (1, 1) and resolve_probe_block(-2, paths, 0) == (0, 0)
    with pytest.raises(adacache_fx.AdaCacheConfigError, match="names no cached block"):
        resolve_probe_block("blocks.1", paths, 0)   # the end of a name is no block: only at a dot
    with pytest.raises(adacache_fx.AdaCacheConfigError, match="out of range"):
        resolve_probe_block(2, paths, 0)


class TwoLists(nn.Module):
    """``single_transformer_blocks`` run before ``transformer_blocks``: a suffix match of
    ``"transformer_blocks.1"`` would find the single block first."""

    def __init__(self, c=16):
        super().__init__()
        self.embed = nn.Linear(5, c)
        self.single_transformer_blocks = nn.ModuleList([Block(c) for _ in range(2)])
        self.transformer_blocks = nn.ModuleList([Block(c) for _ in range(2)])
        self.out = nn.Linear(c, 5)

    def forward(self, x, timestep):
        temb = torch.sin(timestep[:, None] / 1000.0) * torch.ones(1, self.embed.out_features)
        h = self.embed(x)
        for block in self.single_transformer_blocks:
            h = block(h, temb)
        for block in self.transformer_blocks:
            h = block(h, temb)
        return self.out(h)


@pytest.mark.parametrize("guard", ["graph", "modules"])
def test_both_guards_resolve_the_probe_path_alike(guard):
    config = AdaCacheConfig(codebook={INF: 3}, num_steps=12, probe_block="transformer_blocks.1")
    x, t = torch.randn(2, 7, 5), torch.full((2,), 900.0)
    model = seeded(TwoLists())
    if guard == "graph":
        assert explain(model, x, t, config=config).probe.block == "transformer_blocks.1"
        return
    backend = compile_model(model, config, inner="eager", block_guard="modules")
    with torch.no_grad():
        model(x, t)
    (module_guard,) = backend.graphs
    r, j = module_guard.probe
    assert module_guard.regions[r].paths[j] == "transformer_blocks.1"


# ----- disable undoes every patch --------------------------------------------------------------
@pytest.mark.parametrize("guard", ["graph", "modules"])
def test_disable_restores_the_model_as_never_compiled(guard):
    model = seeded(ToyDiT())
    reference = seeded(ToyDiT())
    forwards = {name: m.__dict__.get("forward") for name, m in model.named_modules()}
    call_impl = model.__dict__.get("_compiled_call_impl")
    compile_model(model, AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager", block_guard=guard)
    run = euler_loop(model, _inputs, timesteps(12))
    if guard == "modules":   # the blocks' forwards were patched while caching ran
        assert any(m.__dict__.get("forward") is not None for m in model.blocks)
    adacache_fx.disable(model)
    assert model.__dict__.get("_compiled_call_impl") is call_impl
    assert {name: m.__dict__.get("forward") for name, m in model.named_modules()} == forwards
    with torch.no_grad():
        x, t = torch.randn(2, 7, 5), torch.full((2,), 500.0)
        assert torch.equal(model(x, t), reference(x, t))
    assert run.final is not None
    with pytest.raises(ValueError, match="never enabled"):
        adacache_fx.disable(model)
    compile_model(model, AdaCacheConfig(), inner="eager")   # enabled again after disable: allowed


@pytest.mark.parametrize("guard", ["graph", "modules"])
def test_disable_restores_a_diffusers_pipeline(guard):
    pytest.importorskip("diffusers")
    from adacache_fx.integrations.diffusers import enable
    from models.pipelines import run, tiny_dit_pipeline   # a tiny pipeline built from configs
    pipe = tiny_dit_pipeline()
    reference = run(pipe, 6)   # before enable: never compiled
    cls, step = type(pipe), pipe.scheduler.__dict__.get("step")
    forwards = {name: m.__dict__.get("forward") for name, m in pipe.transformer.named_modules()}
    enable(pipe, AdaCacheConfig(codebook={INF: 3}, timestep_arg="timestep"), inner="eager", block_guard=guard)
    cached = run(pipe, 6)
    assert type(pipe) is not cls and not torch.equal(cached, reference)   # caching ran
    adacache_fx.disable(pipe)
    assert type(pipe) is cls and pipe.scheduler.__dict__.get("step") is step
    assert pipe.transformer.__dict__.get("_compiled_call_impl") is None
    assert {name: m.__dict__.get("forward") for name, m in pipe.transformer.named_modules()} == forwards
    assert torch.equal(run(pipe, 6), reference)

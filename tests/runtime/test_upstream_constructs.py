"""Model code as its authors write it (issue 26), through ``compile_model(model, config)`` with no
mode flag, on toys written here that reproduce each construct (``models/upstream_style.py``):
STDiT3's alternating spatial / temporal lists with a dict through the blocks, a numpy position
embedding behind ``lru_cache`` and a block-diagonal mask from ``.tolist()``; Wan 2.1's per-sample
Python loop over ``grid_sizes.tolist()`` in every block; per-frame timesteps with a pinned clean
frame, and per-frame noise levels; checkpoint-wrapped blocks.

For every construct: caching off is bit-identical to plain ``torch.compile``; ``{inf: 3}`` over 12
steps computes 1, 2, 5, 8, 11, 12 and the blocks run only then (counted by the profiler, not by
the library); reused steps return ``skeleton(input) + delta`` (an independent reference); nothing
is compiled in a second generation; no more graph breaks than plain ``torch.compile``; the
cached regions hold at least 90% of the blocks' work."""
import warnings

import pytest
import torch

from adacache_fx import AdaCacheConfig, AdaCacheWarning, compile_model
from adacache_fx.runtime.step_clock import StepClock
from adacache_fx.runtime.timestep_source import TimestepSource, step_value
from helpers import (INF, BlockStackReference, assert_matches_reference, count_ops, dynamo_counts, euler_loop,
                     no_recompiles, timesteps)
from models.upstream_style import (BLOCK_ATTENTION, AlternatingDiT, CheckpointedDiT, PerFrameDiT, RotaryListDiT,
                                   alternating_inputs)

CONTRACT_12 = [1, 2, 5, 8, 11, 12]


def _alternating_inputs(batch, t):
    x, y, mask = alternating_inputs(batch=batch)
    return (x, torch.full((batch,), t), y, mask), {}


def _rotary_inputs(batch, t):
    x = torch.randn(batch, 6, 8, generator=torch.Generator().manual_seed(1))
    grid = torch.tensor([[4, 1, 1], [6, 1, 1], [5, 1, 1]][:batch])
    return (x, torch.full((batch,), t), grid), {}


def _pinned_inputs(batch, t):
    x = torch.randn(batch, 3, 4, 8, generator=torch.Generator().manual_seed(2))
    return (x, torch.tensor([[0.0, t, t]] * batch)), {}


def _checkpoint_inputs(batch, t):
    x = torch.randn(batch, 6, 8, generator=torch.Generator().manual_seed(3))
    return (x, torch.full((batch,), t)), {}


def _alternating_paths(model):
    return [p for i in range(len(model.spatial_blocks)) for p in (f"spatial_blocks.{i}", f"temporal_blocks.{i}")]


def _list_paths(model):
    return [f"blocks.{i}" for i in range(len(model.blocks))]


#: name -> (model factory, inputs, block paths in execution order, the guard the default must choose)
CASES = {
    "alternating_lists_dict_numpy_tolist": (lambda: AlternatingDiT(), _alternating_inputs, _alternating_paths, None),
    "alternating_checkpointed_by_flag": (lambda: AlternatingDiT(checkpointing=True), _alternating_inputs,
                                         _alternating_paths, None),
    "tolist_rotary_loop_in_every_block": (lambda: RotaryListDiT(), _rotary_inputs, _list_paths, "modules"),
    "per_frame_timestep_pinned_clean_frame": (lambda: PerFrameDiT(), _pinned_inputs, _list_paths, None),
    "checkpoint_non_reentrant": (lambda: CheckpointedDiT(), _checkpoint_inputs, _list_paths, None),
    "checkpoint_reentrant": (lambda: CheckpointedDiT(use_reentrant=True), _checkpoint_inputs, _list_paths, None),
}


def _model(make):
    torch.manual_seed(0)
    return make().eval()


def _compile(model, **config):
    config = {"codebook": {INF: 3}, "num_steps": 12, "reuse": "constant", "moreg": False, **config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdaCacheWarning)   # capture failing on a data-dependent view: said once
        return compile_model(model, AdaCacheConfig(**config), inner="eager")


def _loop(model, make_inputs, steps=12, batch=2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdaCacheWarning)
        return euler_loop(model, make_inputs, timesteps(steps), batch=batch)


@pytest.mark.parametrize("name", sorted(CASES))
def test_caching_off_is_bit_identical_to_plain_compile(name):
    make, make_inputs, _paths, _guard = CASES[name]
    model = _model(make)
    torch._dynamo.reset()
    plain = _loop(torch.compile(_model(make), backend="eager"), make_inputs, steps=5)
    torch._dynamo.reset()
    backend = _compile(model, codebook={INF: 1}, num_steps=5)
    ours = _loop(model, make_inputs, steps=5)
    assert backend.report(model).computed_steps == list(range(1, 6))
    for step, (a, b) in enumerate(zip(ours.outputs(), plain.outputs()), 1):
        assert torch.equal(a, b), f"step {step}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixed_schedule_runs_the_blocks_on_computed_steps_only(name):
    make, make_inputs, paths, guard = CASES[name]
    model = _model(make)
    reference = BlockStackReference(_model(make), paths(model))
    backend = _compile(model)
    _loop(model, make_inputs)   # traced, compiled and (under the module guard) observed outside the count
    assert [c.guard for c in backend.guard_choices] == [guard or "graph"], backend.guard_choices
    backend.reset()
    runs = []
    with no_recompiles():
        sdpa = count_ops(lambda: runs.append(_loop(model, make_inputs)))
    report = backend.report(model)
    assert report.computed_steps == CONTRACT_12
    assert sdpa == len(CONTRACT_12) * len(paths(model)) * BLOCK_ATTENTION[type(model).__name__]
    assert report.cached_flops_fraction >= 0.9, report.cached_flops_fraction
    assert_matches_reference(runs[0], reference.expected(runs[0], CONTRACT_12), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_more_graph_breaks_than_plain_compile_and_nothing_compiled_in_a_second_generation(name):
    make, make_inputs, _paths, _guard = CASES[name]

    def generation(model):
        _loop(model, make_inputs, steps=4)

    plain_graphs, plain_breaks, plain_again = dynamo_counts(lambda b: torch.compile(_model(make), backend=b), generation)

    def ours(counting):
        model = _model(make)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AdaCacheWarning)
            compile_model(model, AdaCacheConfig(codebook={INF: 3}, num_steps=4, moreg=False), inner=counting)
        return model

    _graphs, breaks, again = dynamo_counts(ours, generation)
    assert breaks <= plain_breaks
    assert again == 0 <= plain_again   # (plain torch.compile recompiles the blocks' call counter)


def test_the_default_guard_on_alternating_lists_is_the_graph_and_explain_says_why():
    from adacache_fx import explain
    model = _model(AlternatingDiT)
    args, kwargs = _alternating_inputs(2, 500.0)
    e = explain(model, *args, **kwargs)
    assert e.guard.guard == "graph" and "whole" in e.guard.why
    assert e.regions


def test_alternating_lists_form_one_region_under_the_module_guard():
    """spatial[i] -> temporal[i] -> spatial[i+1]: each list's calls feed the other list's, never
    their own: one region across both lists, the dict passed through, the probe by path."""
    model = _model(AlternatingDiT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdaCacheWarning)
        backend = compile_model(model, AdaCacheConfig(codebook={INF: 3}, num_steps=12, reuse="constant", moreg=False,
                                                       probe_block="temporal_blocks.1"),
                                inner="eager", block_guard="modules")
    reference = BlockStackReference(_model(AlternatingDiT), _alternating_paths(model))
    run = _loop(model, _alternating_inputs)
    guard = backend.graphs[0]
    assert [r.paths for r in guard.regions] == [_alternating_paths(model)], guard.describe()
    assert guard.regions[0].paths[guard.probe[1]] == "temporal_blocks.1"
    assert backend.report(model).computed_steps == CONTRACT_12
    assert_matches_reference(run, reference.expected(run, CONTRACT_12), rtol=1e-4, atol=1e-5)


def test_a_block_that_makes_its_own_side_state_runs_uncached_with_a_warning_naming_it():
    class NewDictBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x, state):
            for _ in range(int(x.abs().sum() > 0)):   # a Python loop on a value: no graph holds the block
                x = x + self.lin(x)
            return x, dict(state)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(NewDictBlock() for _ in range(3))
            self.t = torch.nn.Linear(8, 8)

        def forward(self, x, timestep):
            x = x + self.t(x) * timestep[:, None, None]
            state = {}
            for block in self.blocks:
                x, state = block(x, state)
            return x

    model = Model()
    compile_model(model, AdaCacheConfig(num_steps=3), inner="eager")
    with pytest.warns(AdaCacheWarning, match=r"runs uncached.*output 1 \(dict\) is neither a tensor nor one of its "
                                             r"arguments.*NewDictBlock.forward"):
        with torch.no_grad():
            model(torch.randn(2, 3, 8), torch.full((2,), 500.0))


# ----- the step clock on per-frame and per-token timesteps ------------------------------------------
def test_a_pinned_clean_frame_does_not_stop_the_step_clock():
    source, clock = TimestepSource(), StepClock(num_steps=None)
    ticks = [clock.tick(source.timestep(torch.tensor([[0.0, t, t], [0.0, t, t]])))
             for t in (1000.0, 1000.0, 900.0, 800.0, 800.0)]
    assert [(k.step, k.branch) for k in ticks] == [(1, 0), (1, 1), (2, 0), (3, 0), (3, 1)]
    restart = clock.tick(source.timestep(torch.tensor([[0.0, 1000.0, 1000.0]])))
    assert restart.restarted and restart.step == 1


def test_step_value_reads_the_timestep_as_a_whole():
    assert step_value(torch.tensor(7.0)) == 7.0
    assert step_value(torch.tensor([500.0, 500.0])) == 500.0
    pinned = [step_value(torch.tensor([0.0, t, t])) for t in (900.0, 800.0)]
    assert pinned[0] > pinned[1]
    # the forecasters' time ratios are the sampler's: the mean is affine in a pinned sampler's t
    a, b, c = (step_value(torch.tensor([0.0, t, t, t])) for t in (900.0, 700.0, 600.0))
    assert (c - b) / (b - a) == pytest.approx((600.0 - 700.0) / (700.0 - 900.0))


def test_diffusion_forcing_one_step_per_change_of_levels_a_new_chunk_is_a_new_generation():
    """Each frame at its own noise level: one step is one call whose levels differ from the previous
    call's (guidance branches repeat them); levels that rise (a new chunk of noisy frames enters)
    start a new generation, which computes its own first steps."""
    model = _model(PerFrameDiT)
    backend = _compile(model, num_steps=6)
    x = torch.randn(2, 3, 4, 8, generator=torch.Generator().manual_seed(4))

    def chunk(start):
        steps = []
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", AdaCacheWarning)
            for i in range(6):   # frames staggered by 300: the front one clean before the back one
                t = start - 150.0 * i
                levels = torch.tensor([[max(t - 300.0, 0.0), t, min(t + 300.0, 1000.0)]] * 2)
                model(x, levels)
                model(x, levels)   # a second guidance branch of the same step
            steps.append(backend.report(model).computed_steps)
        return steps[-1]

    first = chunk(900.0)
    assert first == [1, 2, 5, 6]
    second = chunk(900.0)   # the levels rise: a new generation with its own schedule
    assert second == [1, 2, 5, 6]
    assert backend.report(model).num_steps == 6


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_blocks_cache_under_the_module_guard_too(use_reentrant):
    model = _model(lambda: CheckpointedDiT(use_reentrant=use_reentrant))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdaCacheWarning)
        backend = compile_model(model, AdaCacheConfig(codebook={INF: 3}, num_steps=12, reuse="constant", moreg=False),
                                inner="eager", block_guard="modules")
    reference = BlockStackReference(_model(lambda: CheckpointedDiT(use_reentrant=use_reentrant)), _list_paths(model))
    _loop(model, _checkpoint_inputs)
    backend.reset()
    runs = []
    sdpa = count_ops(lambda: runs.append(_loop(model, _checkpoint_inputs)))
    assert backend.report(model).computed_steps == CONTRACT_12
    assert sdpa == len(CONTRACT_12) * 4
    assert_matches_reference(runs[0], reference.expected(runs[0], CONTRACT_12), rtol=1e-4, atol=1e-5)


def test_a_call_counter_on_the_blocks_recompiles_nothing_in_a_second_generation():
    """The blocks count their calls in a module attribute: Dynamo would guard on the int and
    recompile the blocks' shared forward at every computed step (until its recompile limit);
    under the module guard they are compiled with the counters as symbols."""
    model = _model(RotaryListDiT)
    backend = _compile(model)
    _loop(model, _rotary_inputs)
    backend.reset()
    with no_recompiles():
        _loop(model, _rotary_inputs)
    assert backend.report(model).computed_steps == CONTRACT_12
    assert all(block.fwd_id == 2 * len(CONTRACT_12) for block in model.blocks)   # the counters still count

"""Guidance branches keyed by name (issue 27): a call made under ``backend.cache_context(name)``,
or under diffusers' ``transformer.cache_context(name)`` on a model compiled by ``compile_model`` /
``enable_cache``, is the branch of that name whatever the call order; without a context the calls
of a step are branches by call order (tests/runtime/test_guidance.py).

The loops swap the order of the cond and uncond calls on every other step: keyed by call order,
a reused cond call would take the uncond call's delta."""
import contextlib
import io

import pytest
import torch

import adacache_fx
from adacache_fx import AdaCacheConfig
from helpers import (INF, BlockStackReference, Call, SamplerRun, assert_matches_reference, cached, label_branch,
                     no_recompiles, timesteps, zoo_block_paths)
from zoo import get_case

CONTRACT = [1, 2, 5, 8, 11, 12]
NAMES = ("cond", "uncond")


def _guided_loop(model, make_inputs, steps, enter, branches, swap=True):
    """A guided Euler loop (cond and uncond, ``branches[name]`` makes each call's inputs) whose
    calls, with ``swap``, go cond, uncond on odd steps and uncond, cond on even ones, each inside
    ``enter(name)`` (a context manager); ``run.calls[step]`` lists them cond first whatever order
    they ran in."""
    run, grid = SamplerRun(), [float(s) for s in steps] + [0.0]
    x = None
    with torch.no_grad():
        for step, (t, t_next) in enumerate(zip(grid, grid[1:]), start=1):
            args, kwargs = make_inputs(2, t)
            x = args[0].clone() if x is None else x
            args = (x,) + tuple(args[1:])
            calls = {}
            for name in (NAMES[::-1] if swap and step % 2 == 0 else NAMES):
                a, kw = branches[name](args, dict(kwargs))
                with enter(name):
                    calls[name] = Call(a, kw, model(*a, **kw))
            row = [calls[n] for n in NAMES]
            run.calls.append(row)
            v = row[1].output + 4.0 * (row[0].output - row[1].output)
            x = x + (t_next - t) / grid[0] * v[:, :x.shape[1]]
    return run


def test_named_branches_keep_their_deltas_whatever_the_call_order():
    case = get_case("ref_dit")
    model = case.build()
    compiled, backend = cached(model, {INF: 3}, num_steps=12)
    branches = {"cond": label_branch(3), "uncond": label_branch(10)}
    with no_recompiles():
        run = _guided_loop(compiled, case.make_inputs, timesteps(12), backend.cache_context, branches)
    assert backend.report().computed_steps == CONTRACT
    reference = BlockStackReference(model, zoo_block_paths(case, model), output=case.output)
    assert_matches_reference(run, reference.expected(run, CONTRACT))   # [step][0] is cond, [step][1] uncond


def test_without_names_the_swapped_order_swaps_the_deltas():
    """The control: the same loop with no context is keyed by call order, and a reused call takes
    the other branch's delta on the swapped steps (so the test above can fail)."""
    case = get_case("ref_dit")
    model = case.build()
    compiled, _ = cached(model, {INF: 3}, num_steps=12)
    branches = {"cond": label_branch(3), "uncond": label_branch(10)}
    run = _guided_loop(compiled, case.make_inputs, timesteps(12), lambda _n: contextlib.nullcontext(), branches)
    reference = BlockStackReference(model, zoo_block_paths(case, model), output=case.output)
    with pytest.raises(AssertionError):
        assert_matches_reference(run, reference.expected(run, CONTRACT))


def test_cache_context_rejects_a_name_that_is_not_a_string():
    _, backend = cached(get_case("ref_dit").build(), {INF: 3}, num_steps=12)
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        with backend.cache_context(0):
            pass


def test_diffusers_cache_context_on_a_transformer_keys_the_branches():
    """A diffusers transformer (CacheMixin) enabled with ``enable_cache``: its own
    ``cache_context("cond")`` names the branch. The swapped-order loop gives each name the outputs
    the fixed-order loop gives it, call for call; ``disable_cache`` restores the method."""
    diffusers = pytest.importorskip("diffusers")
    from zoo import randomize_
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    randomize_(transformer, seed=0)
    transformer.eval()
    g = torch.Generator().manual_seed(0)
    text = {"cond": torch.randn(2, 6, 16, generator=g), "uncond": torch.randn(2, 6, 16, generator=g)}

    def make_inputs(batch, t):
        x = torch.randn(batch, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        return (x, torch.full((batch,), t)), {}

    def branch(name):
        def call(args, kwargs):
            return args, {**kwargs, "encoder_hidden_states": text[name], "return_dict": False}
        return call
    branches = {n: branch(n) for n in NAMES}
    adacache_fx.enable_cache(transformer, AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    assert "cache_context" in transformer.__dict__
    outputs = []
    for swap in (False, True):
        run = _guided_loop(lambda *a, **kw: transformer(*a, **kw)[0], make_inputs, timesteps(12),
                           transformer.cache_context, branches, swap=swap)
        assert adacache_fx.summary(transformer, file=io.StringIO()).computed_steps == CONTRACT
        outputs.append(run)
    fixed, swapped = outputs
    for step, (a_row, b_row) in enumerate(zip(fixed.calls, swapped.calls), start=1):
        for name, a, b in zip(NAMES, a_row, b_row):
            torch.testing.assert_close(b.output, a.output, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, s=step, n=name: f"step {s}, {n}: {m}")
    adacache_fx.disable_cache(transformer)
    assert "cache_context" not in transformer.__dict__

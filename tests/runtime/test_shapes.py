"""Shapes and batches (issue 4): a second generation at another batch size works (compiled per
shape, or once with dynamic shapes) and cached deltas never mix shapes; torch.compile(dynamic=True)
keeps the MoReg frame layout with symbolic sizes.

Every loop is a flow-Euler loop (the latent changes every step); every step is checked against
the independent reference of helpers.BlockStackReference (the plain model on computed steps,
``skeleton(input) + the last computed step's delta`` on reused ones)."""
from __future__ import annotations


import pytest
import torch


from helpers import (INF, BlockStackReference, assert_matches_reference, cached, euler_loop,  # noqa: E402
                     no_recompiles, relative_l1, timesteps, zoo_block_paths)
from zoo import get_case  # noqa: E402

CONTRACT = [1, 2, 5, 8, 11, 12]


def reference(case, model, output=lambda o: o):
    return BlockStackReference(model, zoo_block_paths(case, model), output=output)


def test_second_generation_at_another_batch_size():
    case = get_case("ref_dit")
    model = case.build()
    compiled, backend = cached(model, {INF: 3}, num_steps=12)
    first = euler_loop(compiled, case.make_inputs, timesteps(12), batch=2)
    assert backend.report().computed_steps == CONTRACT
    second = euler_loop(compiled, case.make_inputs, timesteps(12), batch=3)
    report = backend.report()
    assert report.computed_steps == CONTRACT
    assert first.final.shape[0] == 2 and second.final.shape[0] == 3
    # nothing cached at batch 2 reaches batch 3: every step of the second generation is the
    # plain model or skeleton(input) + a batch-3 delta of this generation
    ref = reference(case, model)
    assert_matches_reference(second, ref.expected(second, CONTRACT))
    assert_matches_reference(first, ref.expected(first, CONTRACT))


def test_dynamic_shapes_keep_the_frame_layout():
    case = get_case("ref_stdit")
    model = case.build()
    compiled, backend = cached(model, {INF: 3}, num_steps=12, dynamic=True)
    euler_loop(compiled, case.make_inputs, timesteps(12), batch=2)
    report = backend.report()
    assert report.computed_steps == CONTRACT
    assert len(backend.graphs) == 1 and backend.graphs[0].frame_axis is not None
    assert report.metrics and all(m.motion is not None for m in report.metrics)
    with no_recompiles():   # another batch size: the same graph, a new generation, MoReg still on
        run = euler_loop(compiled, case.make_inputs, timesteps(12), batch=3)
    report = backend.report()
    assert report.computed_steps == CONTRACT and run.final.shape[0] == 3
    assert all(m.motion is not None for m in report.metrics)
    assert_matches_reference(run, reference(case, model).expected(run, CONTRACT))


def wan_inputs(frames: int, size: int):
    """Inputs of the tiny diffusers Wan case at another frame count / resolution."""
    def make(batch, t):
        g = torch.Generator().manual_seed(frames * 100 + size)
        x = torch.randn(batch, 4, frames, size, size, generator=g)
        text = torch.randn(batch, 6, 32, generator=g)
        return (x, torch.full((batch,), float(t))), dict(encoder_hidden_states=text, return_dict=False)
    return make


@pytest.mark.parametrize("dynamic", [False, True], ids=["compiled-per-shape", "dynamic"])
def test_generations_at_other_frame_counts_and_resolutions(dynamic):
    """Wan at (frames, size) = (3, 8), (5, 8), (6, 12): each generation follows the contract,
    MoReg finds the frames at each shape, and nothing cached at one shape reaches another
    (every step equals the independent reference built from this generation's own calls)."""
    from adacache_fx import AdaCacheConfig, adacache_backend

    case = get_case("wan")
    model = case.build()
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12, reuse="constant"), inner="eager")
    compiled = torch.compile(model, backend=backend, dynamic=True if dynamic else False)
    ref = reference(case, model, output=lambda o: o[0])
    for frames, size in [(3, 8), (5, 8), (6, 12)]:
        run = euler_loop(compiled, wan_inputs(frames, size), timesteps(12), output=lambda o: o[0])
        report = backend.report()
        assert report.computed_steps == CONTRACT, (frames, size)
        assert report.metrics and all(m.motion is not None for m in report.metrics), (frames, size)
        assert run.final.shape == (2, 4, frames, size, size)
        assert_matches_reference(run, ref.expected(run, CONTRACT))
        (call,) = run.calls[2]                    # step 3 is reused: close to the plain model, not it
        assert 1e-5 < relative_l1(call.output, ref.plain(call)) < 0.1
    assert all(g.frame_axis is not None for g in backend.graphs)
    if dynamic:
        assert len(backend.graphs) == 1   # one symbolic graph served every shape
    else:
        assert len(backend.graphs) == 3   # one graph per shape


def test_dynamic_shapes_with_batch_equal_to_frames():
    """dynamo duck-sizes equal dims to one symbol: with batch == frames == 2 a linear's token
    count comes out as ``(s**2 * h) // s``; the frame axis must still be found (MoReg on)."""
    case = get_case("wan")
    model = case.build()
    compiled, backend = cached(model, {INF: 3}, num_steps=12, dynamic=True)
    run = euler_loop(compiled, wan_inputs(2, 8), timesteps(12), batch=2, output=lambda o: o[0])
    assert backend.graphs[0].frame_axis is not None
    assert all(m.motion is not None for m in backend.report().metrics)
    assert_matches_reference(run, reference(case, model, output=lambda o: o[0]).expected(run, CONTRACT))

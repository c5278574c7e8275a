"""Shapes and batches (issue 4): a second generation at another batch size works (compiled per
shape, or once with dynamic shapes) and cached deltas never mix shapes; torch.compile(dynamic=True)
keeps the MoReg frame layout with symbolic sizes."""
from __future__ import annotations


import pytest
import torch


from helpers import INF, cached, no_recompiles, sample_loop, timesteps  # noqa: E402
from zoo import get_case  # noqa: E402

CONTRACT = [1, 2, 5, 8, 11, 12]


def test_second_generation_at_another_batch_size():
    case = get_case("ref_dit")
    model = case.build()
    compiled, backend = cached(model, {INF: 3}, num_steps=12)
    first = sample_loop(compiled, case.make_inputs, timesteps(12), batch=2)
    assert backend.report().computed_steps == CONTRACT
    second = sample_loop(compiled, case.make_inputs, timesteps(12), batch=3)
    report = backend.report()
    assert report.computed_steps == CONTRACT
    assert first[-1].shape[0] == 2 and second[-1].shape[0] == 3
    assert all(torch.isfinite(o).all() for o in second)
    # the step-1 output of the new generation is exactly the uncached model's
    with torch.no_grad():
        args, kwargs = case.make_inputs(3, timesteps(12)[0])
        torch.testing.assert_close(second[0], model(*args, **kwargs), rtol=1e-5, atol=1e-5)


def test_dynamic_shapes_keep_the_frame_layout():
    case = get_case("ref_stdit")
    model = case.build()
    torch._dynamo.reset()
    from adacache_fx import AdaCacheConfig, adacache_backend
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    compiled = torch.compile(model, backend=backend, dynamic=True)
    sample_loop(compiled, case.make_inputs, timesteps(12), batch=2)
    report = backend.report()
    assert report.computed_steps == CONTRACT
    assert len(backend.graphs) == 1 and backend.graphs[0].frame_axis is not None
    assert report.metrics and all(m.motion is not None for m in report.metrics)
    with no_recompiles():   # another batch size: the same graph, a new generation, MoReg still on
        out = sample_loop(compiled, case.make_inputs, timesteps(12), batch=3)
    report = backend.report()
    assert report.computed_steps == CONTRACT and out[-1].shape[0] == 3
    assert all(m.motion is not None for m in report.metrics)


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
    (the first step of each generation is exactly the uncached model's output)."""
    from adacache_fx import AdaCacheConfig, adacache_backend

    model = get_case("wan").build()
    torch._dynamo.reset()
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    compiled = torch.compile(model, backend=backend, dynamic=True if dynamic else False)
    for frames, size in [(3, 8), (5, 8), (6, 12)]:
        make = wan_inputs(frames, size)
        outs = sample_loop(compiled, make, timesteps(12), output=lambda o: o[0])
        report = backend.report()
        assert report.computed_steps == CONTRACT, (frames, size)
        assert report.metrics and all(m.motion is not None for m in report.metrics), (frames, size)
        assert outs[-1].shape == (2, 4, frames, size, size)
        with torch.no_grad():
            args, kwargs = make(2, timesteps(12)[0])
            torch.testing.assert_close(outs[0], model(*args, **kwargs)[0], rtol=1e-5, atol=1e-5)
            args, kwargs = make(2, timesteps(12)[2])     # step 3 is reused: not the uncached output
            assert not torch.allclose(outs[2], model(*args, **kwargs)[0], rtol=1e-5, atol=1e-5)
    assert all(g.frame_axis is not None for g in backend.graphs)
    if dynamic:
        assert len(backend.graphs) == 1   # one symbolic graph served every shape
    else:
        assert len(backend.graphs) == 3   # one graph per shape


def test_dynamic_shapes_with_batch_equal_to_frames():
    """dynamo duck-sizes equal dims to one symbol: with batch == frames == 2 a linear's token
    count comes out as ``(s**2 * h) // s``; the frame axis must still be found (MoReg on)."""
    from adacache_fx import AdaCacheConfig, adacache_backend

    model = get_case("wan").build()
    torch._dynamo.reset()
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    compiled = torch.compile(model, backend=backend, dynamic=True)
    sample_loop(compiled, wan_inputs(2, 8), timesteps(12), batch=2, output=lambda o: o[0])
    assert backend.graphs[0].frame_axis is not None
    assert all(m.motion is not None for m in backend.report().metrics)

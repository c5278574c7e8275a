"""Shapes and batches (issue 4): a second generation at another batch size works (compiled per
shape, or once with dynamic shapes) and cached deltas never mix shapes; torch.compile(dynamic=True)
keeps the MoReg frame layout with symbolic sizes."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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

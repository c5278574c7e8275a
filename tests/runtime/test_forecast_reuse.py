"""Forecast reuse (``AdaCacheConfig(reuse=...)``): on a reused step each stream's delta is
extrapolated from the deltas of the last two computed steps, in the sampler's own variable.

The model's skeleton is the identity (ToyFlowDiT), so every expected value is computed here from
the loop's own inputs and outputs: ``delta_s = out_s - x_s`` at computed steps, and a reused step
must return ``x + d1 + scale * (d1 - d0)`` with ``scale = damping * (t - t1) / (t1 - t0)``."""
import math

import pytest
import torch

from adacache_fx import AdaCacheConfig, adacache_backend
from helpers import INF, euler_loop, label_branch, no_recompiles, relative_l1, timesteps
from models.toy_models import ToyFlowDiT, seeded

CONTRACT = [1, 2, 5, 8, 11, 12]   # {inf: 3} over 12 steps


def _run(reuse, steps=None, damping=0.5, num_steps=12, codebook=None):
    torch._dynamo.reset()
    model = seeded(ToyFlowDiT())
    x0 = torch.randn(2, 9, 12, generator=torch.Generator().manual_seed(0))

    def make(batch, t):
        return (x0, torch.full((batch,), t), torch.zeros(batch, dtype=torch.long)), {}
    config = AdaCacheConfig(codebook=codebook or {INF: 3}, num_steps=num_steps, reuse=reuse, reuse_damping=damping)
    backend = adacache_backend(config, inner="eager")
    compiled = torch.compile(model, backend=backend)
    with no_recompiles():
        run = euler_loop(compiled, make, steps or timesteps(num_steps), branches=[label_branch(1), label_branch(3)])
    return model, run, backend


@pytest.mark.parametrize("reuse,damping", [("linear", 1.0), ("damped", 0.5), ("damped", 0.25)])
def test_reused_step_is_the_extrapolated_delta(reuse, damping):
    # a non-uniform grid (shifted, as flow samplers use): extrapolating in the step index would differ
    steps = [1000.0 * s / (1 + 2 * (1 - s)) for s in torch.linspace(1.0, 1 / 12, 12).tolist()]
    model, run, backend = _run(reuse, steps, damping if reuse == "damped" else 0.5)
    report = backend.report()
    assert report.computed_steps == CONTRACT and report.block_executions == 2 * 6
    scale_of = (lambda r: r) if reuse == "linear" else (lambda r: damping * r)
    history = {0: [], 1: []}   # per branch: [(t, delta)] of computed steps
    for step, row in enumerate(run.calls, start=1):
        x, t = run.latents[step - 1], steps[step - 1]
        for b, call in enumerate(row):
            if step in CONTRACT:
                with torch.no_grad():
                    torch.testing.assert_close(call.output, model(*call.args), rtol=1e-5, atol=1e-6)
                history[b].append((t, call.output - x))
                continue
            (t0, d0), (t1, d1) = history[b][-2:]
            expected = x + d1 + scale_of((t - t1) / (t1 - t0)) * (d1 - d0)
            torch.testing.assert_close(call.output, expected, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, s=step, b=b: f"step {s}, branch {b}: {m}")
            constant = x + d1
            assert (constant - expected).abs().max() > 1e-4   # the forecast is not constant reuse
            assert relative_l1(call.output, constant) > 1e-5


def test_caching_off_is_unchanged_by_forecast():
    _, run_const, _ = _run("constant", codebook={INF: 1})
    _, run_lin, backend = _run("linear", codebook={INF: 1})
    assert backend.report().computed_steps == list(range(1, 13))
    for a, b in zip(run_const.calls, run_lin.calls):
        for ca, cb in zip(a, b):
            assert torch.equal(ca.output, cb.output)


def test_forecast_keeps_two_tensors_per_stream_and_branch():
    stream = 2 * 9 * 12 * 4   # one float32 stream
    # per branch: delta + probe (constant); delta + slope + probe (forecast); two branches
    assert _run("constant")[2].report().cache_bytes == 2 * 2 * stream
    assert _run("linear")[2].report().cache_bytes == 2 * 3 * stream


def test_after_a_batch_size_change_reuse_is_constant_until_two_deltas_of_the_new_shape():
    """Steps 1-2 at batch 2, then batch 1: step 3 (a reused step under {inf: 3}) computes for
    the shape guard, and step 4 (reused) has no slope of the new shape (step 2's deltas are batch
    2): it adds step 3's delta unchanged. A slope across shapes would not even broadcast."""
    model = seeded(ToyFlowDiT())
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12, reuse="linear"), inner="eager")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    g = torch.Generator().manual_seed(0)
    x2, x1 = torch.randn(2, 9, 12, generator=g), torch.randn(1, 9, 12, generator=g)
    outs, inputs = [], []
    with torch.no_grad():
        for i, t in enumerate(timesteps(12)):
            x = (x2 if i < 2 else x1) + 0.01 * i
            inputs.append(x)
            args = (x, torch.full((x.shape[0],), t), torch.zeros(x.shape[0], dtype=torch.long))
            outs.append(compiled(*args))
            if i == 2:   # step 3 computed at the new shape: the plain model's output
                torch.testing.assert_close(outs[-1], model(*args), rtol=1e-5, atol=1e-6)
    d3 = outs[2] - inputs[2]
    torch.testing.assert_close(outs[3], inputs[3] + d3, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("field,value", [("reuse", "quadratic"), ("reuse", None), ("reuse_damping", 1.5),
                                         ("reuse_damping", -0.1), ("reuse_damping", math.nan)])
def test_bad_reuse_fields_raise(field, value):
    with pytest.raises(ValueError, match=field):
        AdaCacheConfig(**{field: value})

"""Guidance and sampler topologies (issue 4).

Guidance: batched in one call (cond and uncond concatenated), two calls per step with the same
timestep (Wan-style pipelines), three calls (image + text guidance). In every topology the step
follows one decision, and each branch keeps its own deltas and probe.

Samplers from diffusers: flow-matching Euler, DDIM, DPM-Solver++, UniPC (one call per step) and
Heun (two calls per interval with different timesteps). The documented behaviour: a step is a
distinct timestep. Heun's timesteps are ``t0, t1, t1, t2, t2, ...``: the correction that ends at
``t_i`` and the prediction that starts there are two branches of step ``i`` (one decision, separate
deltas), so a generation still has ``num_inference_steps`` steps.
"""
from __future__ import annotations


import pytest
import torch


from adacache_fx import AdaCacheConfig  # noqa: E402
from helpers import INF, cached, no_recompiles, timesteps  # noqa: E402
from zoo import get_case  # noqa: E402

CONTRACT = [1, 2, 5, 8, 11, 12]
_models = {}


def model_of(name):
    if name not in _models:
        _models[name] = get_case(name).build()
    return _models[name]


def branch_inputs(label):
    """ref_dit inputs for one guidance branch: the class label (10 is the null class) differs."""
    case = get_case("ref_dit")

    def make(batch, t):
        (x, tt, y), kw = case.make_inputs(batch, t)
        return (x, tt, torch.full_like(y, label)), kw
    return make


def run_branches(compiled, makers, steps, batch=2):
    """One call per branch per step, all with the step's timestep; outputs [step][branch]."""
    outs = []
    with torch.no_grad():
        for t in steps:
            row = []
            for make in makers:
                args, kw = make(batch, t)
                row.append(compiled(*args, **kw))
            outs.append(row)
    return outs


@pytest.mark.parametrize("labels", [(3, 10), (3, 7, 10)], ids=["two_calls", "three_calls"])
def test_guidance_as_separate_calls(labels):
    """Two or three calls per step with the same timestep: one decision per step, each branch its
    own deltas (its outputs equal those of a backend that only ever saw that branch)."""
    model = model_of("ref_dit")
    makers = [branch_inputs(label) for label in labels]
    steps = timesteps(12)
    compiled, backend = cached(model, {INF: 3}, num_steps=12)
    with no_recompiles():
        both = run_branches(compiled, makers, steps)
    report = backend.report()
    assert report.computed_steps == CONTRACT and report.num_steps == 12
    assert report.block_executions == 6 * len(labels)
    # one delta and one probe per branch, each the size of the stream
    (stream,) = report.regions[0].streams
    numel = 1
    for s in stream:
        numel *= s
    assert report.cache_bytes == len(labels) * 2 * numel * 4
    for b, make in enumerate(makers):
        single, _ = cached(model, {INF: 3}, num_steps=12)
        alone = run_branches(single, [make], steps)
        for step in range(len(steps)):
            assert torch.equal(both[step][b], alone[step][0]), (b, step)


def test_guidance_batched_in_one_call():
    """cond and uncond concatenated along the batch: one branch, the decision covers the batch."""
    model = model_of("ref_dit")
    case = get_case("ref_dit")
    steps = timesteps(12)

    def make(batch, t):
        (x, tt, y), kw = case.make_inputs(batch, t)
        return (torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, 10)])), kw
    compiled, backend = cached(model, {INF: 3}, num_steps=12)
    with no_recompiles():
        outs = run_branches(compiled, [make], steps)
    report = backend.report()
    assert report.computed_steps == CONTRACT and report.block_executions == 6
    assert outs[0][0].shape[0] == 4
    # caching off: the batched call matches the two branches run separately
    off, _ = cached(model, {INF: 1}, num_steps=12)
    batched = run_branches(off, [make], steps[:3])
    y = case.make_inputs(2, 0.0)[0][2]
    cond = lambda batch, t: ((case.make_inputs(batch, t)[0][0], torch.full((batch,), t), y), {})  # noqa: E731
    off2, _ = cached(model, {INF: 1}, num_steps=12)
    separate = run_branches(off2, [cond, branch_inputs(10)], steps[:3])
    for (b,), (c, u) in zip(batched, separate):
        torch.testing.assert_close(b, torch.cat([c, u]), rtol=1e-5, atol=1e-5)


def test_guidance_branches_share_metric_one_decision():
    """With a real codebook the decision is taken once per step from the probe distances of all
    branches (their sums), and every branch follows it."""
    model = model_of("ref_dit")
    makers = [branch_inputs(3), branch_inputs(10)]
    compiled, backend = cached(model, config=AdaCacheConfig.fast(30))
    run_branches(compiled, makers, timesteps(30))
    report = backend.report()
    assert report.computed_steps[:2] == [1, 2] and report.computed_steps[-2:] == [29, 30]
    assert len(report.metrics) == len(report.computed_steps) - 1
    assert report.block_executions == 2 * len(report.computed_steps)


# ----- samplers from diffusers -------------------------------------------------------------------

def _scheduler(name):
    import diffusers
    if name == "flow_euler":
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    if name == "ddim":
        return diffusers.DDIMScheduler()
    if name == "dpmpp":
        return diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")
    if name == "unipc":
        return diffusers.UniPCMultistepScheduler()
    if name == "heun":
        return diffusers.HeunDiscreteScheduler()
    if name == "euler":
        return diffusers.EulerDiscreteScheduler()
    raise KeyError(name)


def sample_with(name, compiled, steps, labels=(3,)):
    """A diffusers-style sampling loop (one call per branch per scheduler timestep, guidance
    scale 4 when two branches); returns (model calls' timesteps, final latents)."""
    case = get_case("ref_dit")
    scheduler = _scheduler(name)
    scheduler.set_timesteps(steps)
    (x, _t, y), _ = case.make_inputs(2, 0.0)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    seen = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            tt = torch.full((2,), float(t))
            seen.append(float(t))
            preds = [compiled(inp, tt, torch.full_like(y, label))[:, :4] for label in labels]
            pred = preds[0] if len(preds) == 1 else preds[1] + 4.0 * (preds[0] - preds[1])
            x = scheduler.step(pred, t, x).prev_sample
    return seen, x


SAMPLERS = ["flow_euler", "ddim", "dpmpp", "unipc", "euler", "heun"]


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_schedule(name):
    model = model_of("ref_dit")
    compiled, backend = cached(model, {INF: 3}, num_steps=12)
    with no_recompiles():
        seen, x = sample_with(name, compiled, 12)
    report = backend.report()
    assert len(set(seen)) == 12
    assert report.num_steps == 12 and report.computed_steps == CONTRACT
    calls_per_step = {}
    for t in seen:
        calls_per_step[t] = calls_per_step.get(t, 0) + 1
    if name == "heun":   # step 1 has one call, every later step two (correction + prediction)
        assert len(seen) == 23 and list(calls_per_step.values()) == [1] + [2] * 11
        assert report.block_executions == 1 + 2 * 5
    else:
        assert len(seen) == 12 and report.block_executions == 6
    assert torch.isfinite(x).all()
    # a second generation with the same sampler: the timestep jumps back, a new generation starts
    with no_recompiles():
        sample_with(name, compiled, 12)
    assert backend.report().computed_steps == CONTRACT


@pytest.mark.parametrize("name", ["flow_euler", "heun"])
def test_sampler_caching_off_is_exact(name):
    model = model_of("ref_dit")
    torch._dynamo.reset()
    _, plain = sample_with(name, torch.compile(model, backend="eager"), 8, labels=(3, 10))
    compiled, backend = cached(model, {INF: 1}, num_steps=8)
    _, ours = sample_with(name, compiled, 8, labels=(3, 10))
    assert torch.equal(plain, ours)
    assert backend.report().computed_steps == list(range(1, 9))

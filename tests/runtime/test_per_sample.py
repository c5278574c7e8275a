"""A schedule per sample (``AdaCacheConfig(per_sample=True)``): each sample of a batch keeps its
own scheduler, and on a step where only some compute, the blocks run on their rows alone.

The reference for every batched run is the same samples run one at a time: each sample's
computed steps must equal its own single-sample run's, and its outputs too (to float tolerance:
the sub-batched compute sums in another order). The loop is a sampler whose latent changes
every step with the model's output, plus a per-sample perturbation (seeded per sample, so a
sample's inputs do not depend on its batch): sample 0 is still, the last one changes fast.
"""
import copy
import warnings

import pytest
import torch

from adacache_fx import AdaCacheConfig, AdaCacheWarning, compile_model
from adacache_fx.runtime.per_sample_scheduler import PerSampleScheduler
from helpers import INF, no_recompiles, timesteps
from models.toy_models import ToyFlowDiT, seeded

STEPS = 12
NULL = 0   # the unconditional label
CODEBOOK = {0.02: 4, 0.05: 2, INF: 1}
MOTION = (0.0, 0.1, 0.6)   # per-sample perturbation per step: still, slow, fast


def _config(**overrides):
    values = dict(codebook=CODEBOOK, num_steps=STEPS, per_sample=True, reuse="constant")
    values.update(overrides)
    return AdaCacheConfig(**values)


def _generate(model, backend, samples, guidance, steps=STEPS, scale=3.0):
    """Euler sampling of ``samples`` (indices into MOTION) in one batch; ``guidance``:
    ``"batched"`` ([uncond, cond] in one call), ``"calls"`` (two calls per step) or None.
    Returns per step the conditional prediction per sample ``[step][i]``."""
    n = len(samples)
    x = torch.stack([torch.randn(9, 12, generator=torch.Generator().manual_seed(10 + s)) for s in samples])
    noise = [torch.Generator().manual_seed(100 + s) for s in samples]
    labels = torch.tensor([1 + s for s in samples])
    preds = []
    with torch.no_grad():
        for t in timesteps(steps):
            if backend is not None:
                backend.step(t)
            if guidance == "batched":
                out = model(torch.cat([x, x]), torch.full((2 * n,), t), torch.cat([torch.full((n,), NULL), labels]))
                uncond, cond = out.chunk(2)
            elif guidance == "calls":
                cond = model(x, torch.full((n,), t), labels)
                uncond = model(x, torch.full((n,), t), torch.full((n,), NULL))
            else:
                cond = uncond = model(x, torch.full((n,), t), labels)
            v = uncond + scale * (cond - uncond)
            preds.append([cond[i].clone() for i in range(n)])
            x = x - 0.08 * v
            x = x + torch.stack([MOTION[s] * torch.randn(9, 12, generator=g) for s, g in zip(samples, noise)])
    return preds


def _compiled(config, base):
    torch._dynamo.reset()
    model = copy.deepcopy(base)
    return model, compile_model(model, config, inner="eager")


@pytest.mark.parametrize("guidance", ["batched", "calls", None])
def test_each_sample_computes_and_returns_what_it_would_alone(guidance):
    base = seeded(ToyFlowDiT(classes=4))
    copies = 2 if guidance == "batched" else 1
    config = _config(guidance_in_batch=copies)
    singles = []
    for s in range(3):
        model, backend = _compiled(config, base)
        preds = _generate(model, backend, [s], guidance)
        singles.append((backend.scheduler.sample_computed_steps[0], [p[0] for p in preds]))
    model, backend = _compiled(config, base)
    preds = _generate(model, backend, [0, 1, 2], guidance)
    scheduler = backend.scheduler
    assert isinstance(scheduler, PerSampleScheduler)
    assert scheduler.sample_computed_steps == [steps for steps, _ in singles]
    assert len({tuple(s) for s in scheduler.sample_computed_steps}) > 1   # the samples differ
    for i, (_steps, outputs) in enumerate(singles):
        for step, (alone, batched) in enumerate(zip(outputs, (p[i] for p in preds)), start=1):
            torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, s=step, i=i: f"sample {i}, step {s}: {m}")


def test_blocks_run_on_the_computing_samples_rows_alone():
    base = seeded(ToyFlowDiT(classes=4))
    model, backend = _compiled(_config(guidance_in_batch=2), base)
    _generate(model, backend, [0, 1, 2], "batched")
    scheduler = backend.scheduler
    computing = [sum(step in steps for steps in scheduler.sample_computed_steps) for step in range(1, STEPS + 1)]
    rows = list(backend.graphs[0].runners[0].batch_rows)
    assert rows == [2 * k for k in computing if k]   # two guidance rows per computing sample
    assert any(0 < k < 3 for k in computing)         # some steps computed part of the batch
    assert scheduler.computed_steps == [s for s, k in enumerate(computing, start=1) if k]
    assert backend.report().block_executions == len(rows)


def test_one_computing_row_is_padded_to_the_traced_minimum():
    base = seeded(ToyFlowDiT(classes=4))
    model, backend = _compiled(_config(), base)
    _generate(model, backend, [0, 1, 2], None)
    rows = list(backend.graphs[0].runners[0].batch_rows)
    computing = [sum(step in steps for steps in backend.scheduler.sample_computed_steps) for step in range(1, STEPS + 1)]
    assert 1 in computing   # a step where one sample computed ...
    assert rows == [max(k, 2) for k in computing if k]   # ... ran 2 rows: Dynamo traces dynamic sizes for >= 2


def test_forecast_reuse_per_sample_equals_single_runs():
    base = seeded(ToyFlowDiT(classes=4))
    config = _config(reuse="linear", guidance_in_batch=2)
    singles = []
    for s in range(3):
        model, backend = _compiled(config, base)
        singles.append([p[0] for p in _generate(model, backend, [s], "batched")])
    model, backend = _compiled(config, base)
    preds = _generate(model, backend, [0, 1, 2], "batched")
    for i, outputs in enumerate(singles):
        for step, (alone, batched) in enumerate(zip(outputs, (p[i] for p in preds)), start=1):
            torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, s=step, i=i: f"sample {i}, step {s}: {m}")


def test_caching_off_equals_the_uncached_model():
    base = seeded(ToyFlowDiT(classes=4))
    model, backend = _compiled(_config(codebook={INF: 1}, guidance_in_batch=2), base)
    cached = _generate(model, backend, [0, 1, 2], "batched")
    plain = _generate(copy.deepcopy(base), None, [0, 1, 2], "batched")
    for row_a, row_b in zip(cached, plain):
        for a, b in zip(row_a, row_b):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert backend.scheduler.sample_computed_steps == [list(range(1, STEPS + 1))] * 3


def test_no_recompile_over_a_generation_with_varying_sub_batches():
    base = seeded(ToyFlowDiT(classes=4))
    model = copy.deepcopy(base)
    backend = compile_model(model, _config(guidance_in_batch=2), inner="inductor")
    _generate(model, backend, [0, 1, 2], "batched", steps=4)   # compiles
    backend.reset()
    with no_recompiles():
        _generate(model, backend, [0, 1, 2], "batched", steps=30)
    sizes = set(backend.graphs[0].runners[0].batch_rows)
    assert len(sizes) >= 2 and len(backend.graphs) == 1


def test_a_static_batch_keeps_the_schedules_and_computes_every_row():
    base = seeded(ToyFlowDiT(classes=4))
    model = copy.deepcopy(base)
    config = _config(guidance_in_batch=2)
    from adacache_fx import adacache_backend
    backend = adacache_backend(config, inner="eager")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        preds = _generate(compiled, backend, [0, 1, 2], "batched")
    assert any(issubclass(w.category, AdaCacheWarning) and "static batch of 6 rows" in str(w.message) for w in caught)
    scheduler = backend.scheduler
    assert len({tuple(s) for s in scheduler.sample_computed_steps}) > 1
    rows = list(backend.graphs[0].runners[0].batch_rows)
    assert rows == [] and backend.report().block_executions == len(scheduler.computed_steps)
    # a sample that reuses on a step another computes gets fresh blocks: never a wrong delta
    assert all(torch.isfinite(p).all() for row in preds for p in row)


def test_report_gives_computed_steps_per_sample():
    base = seeded(ToyFlowDiT(classes=4))
    model, backend = _compiled(_config(guidance_in_batch=2), base)
    _generate(model, backend, [0, 2], "batched")
    report = backend.report()
    assert report.sample_computed_steps == backend.scheduler.sample_computed_steps
    assert len(report.sample_computed_steps) == 2
    assert report.computed_steps == sorted(set().union(*map(set, report.sample_computed_steps)))
    assert "per sample" in str(report)


@pytest.mark.parametrize("field,value", [("per_sample", 1), ("guidance_in_batch", 0), ("guidance_in_batch", True)])
def test_bad_per_sample_fields_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AdaCacheConfig(**{field: value})


def _generate_video(model, backend, samples, steps=STEPS):
    """Euler sampling of (B, 3, 3, 4, 4) videos (ToyLatte); sample ``s`` drifts along the frames
    by MOTION[s] per step (its frames move apart: a larger motion score)."""
    x = torch.stack([torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(10 + s)) for s in samples])
    noise = [torch.Generator().manual_seed(100 + s) for s in samples]
    outs = []
    with torch.no_grad():
        for t in timesteps(steps):
            backend.step(t)
            out = model(x, torch.full((len(samples),), t))
            outs.append([out[i].clone() for i in range(len(samples))])
            x = x - 0.08 * out
            ramp = torch.arange(3.0).view(1, 3, 1, 1)
            x = x + torch.stack([MOTION[s] * ramp * torch.randn(3, 1, 4, 4, generator=g) for s, g in zip(samples, noise)])
    return outs


def test_video_samples_get_their_own_motion_score():
    from models.toy_models import ToyLatte
    base = seeded(ToyLatte())
    config = _config(codebook={0.1: 3, 0.25: 2, INF: 1}, moreg_normalizer=0.05, moreg_power=1.0)
    singles = []
    for s in range(3):
        model, backend = _compiled(config, base)
        outs = _generate_video(model, backend, [s])
        singles.append((backend.scheduler.sample_metrics[0], [o[0] for o in outs]))
    model, backend = _compiled(config, base)
    outs = _generate_video(model, backend, [0, 1, 2])
    metrics = backend.scheduler.sample_metrics
    assert backend.graphs[0].sub_batch is not None and backend.graphs[0].frame_axis is not None
    for i, (alone, outputs) in enumerate(singles):
        assert [m.step for m in metrics[i]] == [m.step for m in alone]
        for mine, ref in zip(metrics[i], alone):
            assert mine.motion is not None
            assert mine.motion == pytest.approx(ref.motion, rel=1e-4) and mine.rate == ref.rate
        for a, b in zip((o[i] for o in outs), outputs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    first = [sample[0].motion for sample in metrics]   # step 2: every sample measured
    assert len({round(m, 6) for m in first}) == 3        # each its own score, not the batch's
    assert len({tuple(m.step for m in sample) for sample in metrics}) > 1


class SeqFirstBlock(torch.nn.Module):
    """``x + attn(x) + mlp(x)`` on sequence-first tokens ``(N, B, C)`` (the layout of
    ``nn.MultiheadAttention`` without ``batch_first``): the residuals, and so the probe, have the
    sequence in dim 0 and the batch in dim 1."""

    def __init__(self, c):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(c), torch.nn.LayerNorm(c)
        self.qkv, self.proj = torch.nn.Linear(c, 3 * c), torch.nn.Linear(c, c)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(c, 2 * c), torch.nn.GELU(), torch.nn.Linear(2 * c, c))

    def forward(self, x, temb):
        q, k, v = self.qkv(self.norm1(x) * (1 + temb[None])).transpose(0, 1).chunk(3, dim=-1)
        x = x + self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(0, 1))
        return x + self.mlp(self.norm2(x))


class SeqFirstDiT(torch.nn.Module):
    def __init__(self, c=12, depth=4, classes=4):
        super().__init__()
        self.t_mlp = torch.nn.Sequential(torch.nn.Linear(c, c), torch.nn.SiLU(), torch.nn.Linear(c, c))
        self.label = torch.nn.Embedding(classes, c)
        self.blocks = torch.nn.ModuleList([SeqFirstBlock(c) for _ in range(depth)])
        self.c = c

    def forward(self, x, timestep, y):
        from models.toy_models import sinusoid
        temb = self.t_mlp(sinusoid(timestep, self.c)) + self.label(y)
        h = x.transpose(0, 1)
        for block in self.blocks:
            h = block(h, temb)
        return h.transpose(0, 1)


def test_a_probe_without_the_batch_in_dim_0_gives_one_schedule_for_the_batch():
    base = seeded(SeqFirstDiT())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, backend = _compiled(_config(), base)
        preds = _generate(model, backend, [0, 1, 2], None)
    assert any("probe's first dim does not hold the batch" in str(w.message) for w in caught)
    plain = _generate(copy.deepcopy(base), None, [0, 1, 2], None)
    assert backend.graphs[0].layout.batch_source is None
    assert backend.report().sample_computed_steps == [backend.report().computed_steps]   # one schedule
    torch.testing.assert_close(preds[0][0], plain[0][0])   # step 1 computed: the uncached output


def test_one_host_read_of_the_metric_per_step_for_every_sample(monkeypatch):
    base = seeded(ToyFlowDiT(classes=4))
    model, backend = _compiled(_config(guidance_in_batch=2), base)
    _generate(model, backend, [0, 1, 2], "batched", steps=3)   # compiles
    backend.reset()
    reads = []
    original = torch.Tensor.tolist

    def counted(self):
        if self.dim() == 2 and self.shape[-1] == 5:   # the metric's partial sums (the loop reads its timesteps)
            reads.append(tuple(self.shape))
        return original(self)
    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    _generate(model, backend, [0, 1, 2], "batched")
    backend.report()
    monkeypatch.undo()
    scheduler = backend.scheduler
    measured_steps = {m.step for sample in scheduler.sample_metrics for m in sample}
    # one read per step whose samples were measured, of all the measured samples' sums at once
    assert len(reads) == len(measured_steps)
    assert sum(shape[0] for shape in reads) == sum(len(sample) for sample in scheduler.sample_metrics)
    assert any(shape[0] > 1 for shape in reads)


def test_a_new_generation_may_have_another_batch():
    base = seeded(ToyFlowDiT(classes=4))
    fresh_model, fresh = _compiled(_config(guidance_in_batch=2), base)   # (torch._dynamo.reset() resets backends)
    want = _generate(fresh_model, fresh, [2, 0], "batched")
    want_steps = fresh.report().sample_computed_steps
    model, backend = _compiled(_config(guidance_in_batch=2), base)
    _generate(model, backend, [0, 1, 2], "batched")
    backend.reset()
    preds = _generate(model, backend, [2, 0], "batched")
    assert backend.report().sample_computed_steps == want_steps
    assert len(want_steps) == 2
    for row, ref in zip(preds, want):
        for a, b in zip(row, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_guidance_copies_that_do_not_divide_the_batch_warn():
    base = seeded(ToyFlowDiT(classes=4))
    model, backend = _compiled(_config(guidance_in_batch=2), base)
    with pytest.warns(UserWarning, match="guidance_in_batch=2 does not divide the batch of 3 rows"):
        _generate(model, backend, [0, 1, 2], None)
    assert len(backend.report().sample_computed_steps) == 3


def test_a_sub_batch_the_compiled_piece_refuses_falls_back_to_every_row():
    """A compiled piece may refuse a sub-batch at run time (inductor asserts its inputs' strides):
    the step is run again with every row, the graph computes every row from then on (warned), and
    every output equals the uncached model's where every row computed."""
    base = seeded(ToyFlowDiT(classes=4))
    model, backend = _compiled(_config(guidance_in_batch=2), base)
    _generate(model, backend, [0, 1, 2], "batched", steps=2)   # compiles (steps 1-2: every sample computes)
    runner = backend.graphs[0].runners[0]
    compute = runner.compute_fn

    def refuses_sub_batches(*args):
        if args[0].shape[0] < 6:
            raise AssertionError("expected size 6==2")
        return compute(*args)
    runner.compute_fn = refuses_sub_batches
    backend.reset()
    with pytest.warns(UserWarning, match="a region failed on a sub-batch"):
        _generate(model, backend, [0, 1, 2], "batched")
    assert backend.graphs[0].sub_batch is None
    scheduler = backend.scheduler
    assert len({tuple(s) for s in scheduler.sample_computed_steps}) > 1   # still a schedule per sample
    assert backend.report().block_executions - 2 >= len(scheduler.computed_steps)

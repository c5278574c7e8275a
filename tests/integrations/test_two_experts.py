"""Pipelines users run today (issue 30): two denoising experts (Wan 2.2 A14B's layout: a high-noise
``transformer`` and a low-noise ``transformer_2`` switched at ``boundary_ratio``) and few-step
sampling, on tiny diffusers ``WanPipeline``s built from configs (no download; guidance as two
transformer calls per step).

Each expert keeps its own schedule over the steps it runs: its own step 1 after the switch (its cache
is empty then), its own forced last steps where its share ends; the pipeline's step clock counts one
step per scheduler step. Block work is counted independently (attention ops in the profiler)."""
from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import adacache_fx  # noqa: E402
from adacache_fx import AdaCacheConfig  # noqa: E402
from adacache_fx.errors import AdaCacheWarning  # noqa: E402
from helpers import count_ops  # noqa: E402
from models.pipelines import tiny_wan_pipeline  # noqa: E402

INF = math.inf


def contract(n: int, rate: int = 3) -> list:
    """The schedule contract of ``{inf: rate}`` over ``n`` steps: 1, 2, then every ``rate``-th
    step, and the last two."""
    return sorted({1, 2, n - 1, n} & set(range(1, n + 1)) | set(range(2, n + 1, rate)))


def generate(pipe, embeds, steps, seed=0, output_type="pt"):
    """One generation (``output_type="latent"``: no VAE decode, whose attention the counts leave out)."""
    return pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=32, width=32, num_frames=5,
                num_inference_steps=steps, guidance_scale=4.0, generator=torch.Generator().manual_seed(seed),
                output_type=output_type).frames


def expert_shares(pipe) -> tuple:
    """How many of the last generation's timesteps each expert ran (from the scheduler, as the
    pipeline switches: ``t >= boundary_ratio * num_train_timesteps`` is the first expert's)."""
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    high = int((pipe.scheduler.timesteps >= boundary).sum())
    return high, len(pipe.scheduler.timesteps) - high


def attention_per_call(pipe, embeds) -> int:
    """Attention ops of one transformer call (self and cross attention of every block)."""
    x = torch.randn(1, 4, 2, 4, 4)
    with torch.no_grad():
        return count_ops(lambda: pipe.transformer(x, torch.tensor([500.0]), embeds[0], return_dict=False))


@pytest.fixture(scope="module")
def two_experts():
    pipe, embeds = tiny_wan_pipeline(experts=2, boundary_ratio=0.75)
    per_call = attention_per_call(pipe, embeds)
    return pipe, embeds, per_call, generate(pipe, embeds, 12)


def test_both_experts_cached_each_on_its_own_steps(two_experts):
    pipe, embeds, per_call, plain = two_experts
    assert expert_shares(pipe) == (6, 6)
    adacache_fx.enable_cache(pipe, AdaCacheConfig(codebook={INF: 1}), inner="eager")
    try:
        # caching off: bit for bit the uncached pipeline's video, both experts compiled
        assert torch.equal(generate(pipe, embeds, 12), plain)
        adacache_fx.disable_cache(pipe)
        torch._dynamo.reset()   # a new backend compiles anew: not a recompile of this one
        backend = adacache_fx.enable_cache(pipe, AdaCacheConfig(codebook={INF: 3}), inner="eager")
        runs = [generate(pipe, embeds, 12)]   # compiles (outside the count)
        with torch._dynamo.config.patch(error_on_recompile=True):
            attention = count_ops(lambda: generate(pipe, embeds, 12, output_type="latent"))
            runs.append(generate(pipe, embeds, 12))
        assert torch.equal(runs[0], runs[1])   # nothing carried over from the first generations
        out = io.StringIO()
        reports = adacache_fx.summary(pipe, file=out)
        high, low = reports["transformer"], reports["transformer_2"]
        # each expert: its own 6 steps, its own step 1 after the switch, its forced last steps
        assert high.computed_steps == low.computed_steps == contract(6) == [1, 2, 5, 6]
        assert high.pipeline_steps == [1, 2, 5, 6] and low.pipeline_steps == [7, 8, 11, 12]
        assert "transformer_2" in out.getvalue() and "pipeline steps 7-12: [7, 8, 11, 12]" in out.getvalue()
        # the blocks of both experts ran only on their computed steps, cond and uncond
        assert attention == per_call * 2 * (4 + 4)
        assert backend.report(pipe.transformer_2).cache_bytes > 0 and backend.report(pipe.transformer).cache_bytes > 0
        assert 1e-6 < (runs[0] - plain).abs().sum() / plain.abs().sum() < 0.05   # reused, and close

        # another generation: another step count and another boundary
        pipe.register_to_config(boundary_ratio=0.875)
        generate(pipe, embeds, 16)
        shares = expert_shares(pipe)
        assert shares[0] != shares[1]
        reports = adacache_fx.summary(pipe, file=io.StringIO())
        assert reports["transformer"].computed_steps == contract(shares[0])
        assert reports["transformer_2"].computed_steps == contract(shares[1])
        assert reports["transformer_2"].first_step == shares[0] + 1
    finally:
        pipe.register_to_config(boundary_ratio=0.75)
        adacache_fx.disable_cache(pipe)
    assert torch.equal(generate(pipe, embeds, 12), plain)   # every patched thing restored


def test_the_experts_share_one_compile():
    """Both experts are one class: one compiled graph serves both, each with its own schedule."""
    pipe, embeds = tiny_wan_pipeline(experts=2, boundary_ratio=0.75)
    torch._dynamo.reset()
    backend = adacache_fx.enable_cache(pipe, AdaCacheConfig(codebook={INF: 3}), inner="eager")
    generate(pipe, embeds, 12, output_type="latent")
    assert len(backend.graphs) == 1 and len(backend.runtime.schedulers) == 2
    adacache_fx.disable_cache(pipe)


@pytest.mark.parametrize("steps", [4, 8])
def test_few_steps(steps, monkeypatch):
    """4 steps: the forced steps cover them all (said once, in a warning and in the report), and the
    video is the uncached pipeline's; 8 steps: the contract over 8 steps."""
    import adacache_fx.runtime.policies.base as policy_base
    monkeypatch.setattr(policy_base, "_warned_counts", set())   # said once per process: not yet, here
    pipe, embeds = tiny_wan_pipeline()
    plain = generate(pipe, embeds, steps)
    backend = adacache_fx.enable_cache(pipe, AdaCacheConfig(codebook={INF: 3}), inner="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        video = generate(pipe, embeds, steps)
    report = backend.report()
    said = [str(w.message) for w in caught if issubclass(w.category, AdaCacheWarning) and "no step to skip" in
            str(w.message)]
    if steps == 4:
        assert report.computed_steps == [1, 2, 3, 4] and report.nothing_to_skip and "nothing to skip" in str(report)
        assert said and "from 5 steps on" in said[0]
        assert report.metrics == []   # nothing to decide: no metric taken, no forecast kept
        assert torch.equal(video, plain)
    else:
        assert report.computed_steps == contract(8) == [1, 2, 5, 7, 8] and not report.nothing_to_skip
        assert report.metrics
        assert not said
    adacache_fx.disable_cache(pipe)


def test_an_experts_preset_is_the_generations():
    """A preset's codebook for an expert is the one at the pipeline's step count (the expert's steps
    are as large as the whole generation's), while its forced last steps are its share's."""
    from adacache_fx.runtime import codebook_rate
    pipe, embeds = tiny_wan_pipeline(experts=2, boundary_ratio=0.875)
    torch._dynamo.reset()
    adacache_fx.enable_cache(pipe, AdaCacheConfig.fast(), inner="eager")
    generate(pipe, embeds, 20, output_type="latent")
    shares = expert_shares(pipe)
    reports = adacache_fx.summary(pipe, file=io.StringIO())
    generation = AdaCacheConfig.fast(20).codebook
    for (name, report), share in zip(reports.items(), shares):
        assert report.num_steps == share and report.computed_steps[-2:] == [share - 1, share]
        assert AdaCacheConfig.fast(share).codebook != generation   # the test tells the two apart
        for m in report.metrics:
            assert m.rate == codebook_rate(generation, m.reg_distance), (name, m)
    assert any(codebook_rate(AdaCacheConfig.fast(s).codebook, m.reg_distance) != m.rate
               for r, s in zip(reports.values(), shares) for m in r.metrics)
    adacache_fx.disable_cache(pipe)

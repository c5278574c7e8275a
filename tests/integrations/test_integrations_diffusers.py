"""adacache_fx.integrations.diffusers.enable on real diffusers pipelines built from tiny, randomly
initialised components (no download): the class-conditional DiTPipeline, whose classifier-free
guidance is batched in one call, and WanPipeline (prompt embeddings given, no text encoder), which
calls the transformer twice per step (cond, then uncond).

The pipelines update their own latents every step. Value checks: caching off equals the plain
pipeline; a cached run is reproducible, equals a fresh backend's run of the same request (nothing
carries over between requests or batch sizes) and stays within a stated tolerance of the plain
pipeline while really differing from it (reused steps ran). Per-call ``input + cached delta`` is
checked at model level (tests/runtime/test_backend.py, tests/runtime/test_guidance.py)."""
from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from adacache_fx import AdaCacheConfig  # noqa: E402
from adacache_fx.integrations.diffusers import backend_of, disable, enable  # noqa: E402

from helpers import relative_l1  # noqa: E402
from models.pipelines import run, run_wan, tiny_dit_pipeline, tiny_wan_pipeline  # noqa: E402

INF = math.inf
# relative L1 of a cached ({inf: 3}, 12 steps) pipeline output (decoded, in [0, 1]) against the
# plain pipeline's: measured 1e-3 (DiT, DDIM), 1.2e-5 (DiT, DPM-Solver++, batch 1) and 2.3e-5
# (Wan video); the upper bound leaves ten times the largest, the lower one (1e-6) says that
# steps were really reused
PIPE_TOL = 0.01


def test_enable_caching_off_matches_the_plain_pipeline():
    pipe = tiny_dit_pipeline()
    reference = run(pipe, 6)
    backend = enable(pipe, AdaCacheConfig(codebook={INF: 1}), inner="eager")
    assert backend_of(pipe) is backend and type(pipe).__name__ == "DiTPipeline"
    ours = run(pipe, 6)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    report = backend.report()
    assert report.computed_steps == list(range(1, 7)) and report.num_steps == 6
    assert len(backend.graphs) == 1 and not report.uncached_graphs
    disable(pipe)
    assert backend_of(pipe) is None and type(pipe) is diffusers.DiTPipeline
    torch.testing.assert_close(run(pipe, 6), reference, rtol=1e-5, atol=1e-5)


def test_enable_takes_num_steps_from_each_call_and_resets():
    pipe = tiny_dit_pipeline()
    backend = enable(pipe, AdaCacheConfig(codebook={INF: 3}), inner="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        run(pipe, 12)
        report = backend.report()
        assert report.num_steps == 12 and report.computed_steps == [1, 2, 5, 8, 11, 12]
        executions = report.block_executions
        assert executions == 6
        run(pipe, 7)                      # steps from this call's num_inference_steps: last two forced
        assert backend.report().computed_steps == [1, 2, 5, 6, 7]
        assert backend.report().block_executions == executions + 5
        first = run(pipe, 12, seed=3)
        second = run(pipe, 12, seed=3)   # a reset per call: nothing carries over between requests
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    disable(pipe)
    plain = run(pipe, 12, seed=3)
    assert 1e-6 < relative_l1(first, plain) < PIPE_TOL


def test_enable_with_other_batch_and_scheduler():
    pipe = tiny_dit_pipeline(diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"))
    plain_one = run(pipe, 12, labels=(4,))
    backend = enable(pipe, AdaCacheConfig(codebook={INF: 3}), inner="eager")
    run(pipe, 12, labels=(1, 2, 3))       # a batch of three (six rows with guidance)
    assert backend.report().computed_steps == [1, 2, 5, 8, 11, 12]
    out = run(pipe, 12, labels=(4,))      # another batch size: compiled for that shape, fresh cache
    assert out.shape[0] == 1
    assert backend.report().computed_steps == [1, 2, 5, 8, 11, 12]
    # nothing of the batch-of-three request reached this one: a backend that never saw it agrees
    disable(pipe)
    torch._dynamo.reset()
    fresh = enable(pipe, AdaCacheConfig(codebook={INF: 3}), inner="eager")
    torch.testing.assert_close(run(pipe, 12, labels=(4,)), out, rtol=0, atol=0)
    assert fresh.report().computed_steps == [1, 2, 5, 8, 11, 12]
    assert 1e-6 < relative_l1(out, plain_one) < PIPE_TOL


# ----- Wan-style guidance: two transformer calls per step (cond, then uncond) -------------------
def test_wan_pipeline_two_calls_per_step():
    pipe, embeds = tiny_wan_pipeline()
    reference = run_wan(pipe, embeds, 6)
    backend = enable(pipe, AdaCacheConfig(codebook={INF: 1}), inner="eager")
    torch.testing.assert_close(run_wan(pipe, embeds, 6), reference, rtol=1e-5, atol=1e-5)
    report = backend.report()
    assert report.computed_steps == list(range(1, 7)) and report.num_steps == 6   # 12 calls, 6 steps
    assert report.metrics and all(m.motion is not None for m in report.metrics)  # video: MoReg is on
    disable(pipe)

    torch._dynamo.reset()
    backend = enable(pipe, AdaCacheConfig(codebook={INF: 3}), inner="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        cached_video = run_wan(pipe, embeds, 12)
        report = backend.report()
        # one decision per step for both calls, each branch its own delta: the blocks ran
        # twice (cond and uncond) on each computed step and never on the others
        assert report.computed_steps == [1, 2, 5, 8, 11, 12]
        assert report.block_executions == 2 * 6
        again = run_wan(pipe, embeds, 12)            # a reset per pipeline call
    torch.testing.assert_close(again, cached_video, rtol=0, atol=0)
    # steps were really reused, and the video stays close to the plain pipeline's (per-branch
    # deltas are checked at model level in test_guidance)
    disable(pipe)
    plain = run_wan(pipe, embeds, 12)
    assert 1e-6 < relative_l1(cached_video, plain) < PIPE_TOL

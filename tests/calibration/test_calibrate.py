"""``adacache_fx.calibrate``: recorded trajectories predict the scheduler exactly, targets are met
(computed fraction, PSNR, MS-GMSD), MoReg's normaliser comes from the model's own motion, JSON round
trip, bad targets raise naming the field, and the backend changes config without recompiling."""
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from adacache_fx import AdaCacheConfig, CalibrationResult, adacache_backend, calibrate
from adacache_fx.calibration import ms_gmsd
from adacache_fx.calibration import TrajectoryRecorder, simulate
from adacache_fx.calibration.fit import MOREG_SPREAD, typical_motion
from helpers import INF, euler_loop, no_recompiles, timesteps
from models.toy_models import ToyLatte, seeded

STEPS = 20


def _video_model():
    torch._dynamo.reset()
    return seeded(ToyLatte(frames=4))


def _inputs(seed):
    x0 = torch.randn(1, 3, 4, 5, 5, generator=torch.Generator().manual_seed(seed))

    def make(batch, t):
        return (x0, torch.full((batch,), t)), {}
    return make


def _sampler(compiled):
    """sample(i): a seeded flow-Euler generation of STEPS steps (the latent follows the output)."""
    def sample(i):
        return euler_loop(compiled, _inputs(i), timesteps(STEPS), batch=1).final
    return sample


def _decoded_sampler(compiled):
    """sample(i) returning decoded frames, as a pipeline with a VAE does: the generation's latent
    (1, 3, 4, 5, 5) upsampled to 24x24 and squashed into [-1, 1] (MS-GMSD needs 17x17 or more)."""
    latent_sample = _sampler(compiled)

    def sample(i):
        out = latent_sample(i)
        n, c, f, h, w = out.shape
        frames = F.interpolate(out.reshape(n, c * f, h, w), size=(24, 24), mode="bilinear", align_corners=False)
        return torch.tanh(frames).reshape(n, c, f, 24, 24)
    return sample


def _compiled(config):
    model = _video_model()
    backend = adacache_backend(config, inner="eager")
    return model, torch.compile(model, backend=backend), backend


BASE = AdaCacheConfig.fast(num_steps=STEPS, reuse="constant")


def test_recorded_trajectory_predicts_the_scheduler_exactly():
    """With inputs that do not depend on the model's output, a computed step's probe is the same
    cached or uncached, so ``simulate`` on the uncached recording must give the cached run's
    computed steps exactly, for several codebooks, MoReg on."""
    _, compiled, backend = _compiled(AdaCacheConfig.no_cache(num_steps=STEPS))
    make = _inputs(0)
    recorder = TrajectoryRecorder(max_gap=6)
    backend.runtime.recorder = recorder
    recorder.start_run()
    with torch.no_grad():
        for t in timesteps(STEPS):
            compiled(*make(1, t)[0])
    recorder.finish_run()
    backend.runtime.recorder = None
    (trajectory,) = recorder.runs
    assert trajectory.num_steps == STEPS and trajectory.has_motion
    assert all((s, g) in trajectory.sums for s in range(2, STEPS + 1) for g in range(1, min(6, s - 1) + 1))
    schedules = set()
    for scale in (0.01, 0.03, 0.1, 1.0):
        config = AdaCacheConfig(codebook={thr * scale: r for thr, r in BASE.codebook.items()}, num_steps=STEPS,
                                moreg_normalizer=0.2)
        backend.set_config(config)
        with torch.no_grad(), no_recompiles():
            for t in timesteps(STEPS):
                compiled(*make(1, t)[0])
        actual = backend.report().computed_steps
        assert simulate(config, trajectory) == actual, scale
        schedules.add(tuple(actual))
    assert len(schedules) >= 3   # the scales really give different schedules


def test_computed_fraction_target_is_met_and_measured():
    _, compiled, backend = _compiled(BASE)
    result = calibrate(_sampler(compiled), backend, runs=2, computed_fraction=0.5, progress=False)
    assert result.met
    assert result.measured["computed_fraction"] <= 0.5
    assert result.predicted_computed_fraction <= 0.5
    # the backend now runs the calibrated config: rerunning the runs computes what was measured
    assert backend.config == result.config
    fractions = []
    for i in range(2):
        _sampler(compiled)(i)
        fractions.append(len(backend.report().computed_steps) / STEPS)
    assert statistics.mean(fractions) == pytest.approx(result.measured["computed_fraction"])
    # more compute allowed: a higher fraction, and not more than allowed
    looser = calibrate(_sampler(compiled), backend, runs=2, computed_fraction=0.8, progress=False)
    assert result.measured["computed_fraction"] <= looser.measured["computed_fraction"] <= 0.8


def test_min_psnr_target_is_met_with_the_least_compute_found():
    _, compiled, backend = _compiled(BASE)
    sample = _sampler(compiled)
    low = calibrate(sample, backend, runs=2, min_psnr=20.0, progress=False)
    high_target = low.measured["psnr_mean"] + 1.0     # what low's choice misses: another candidate
    high = calibrate(sample, backend, runs=2, min_psnr=high_target, progress=False)
    assert (high.threshold_scale, high.max_rate) != (low.threshold_scale, low.max_rate)
    for result, target in ((low, 20.0), (high, high_target)):
        assert result.met and result.measured["psnr_mean"] >= target
        # checked independently: rerun the chosen config and measure the PSNR here
        backend.set_config(AdaCacheConfig.no_cache(num_steps=STEPS, reuse="constant"))
        refs = [sample(i) for i in range(2)]
        backend.set_config(result.config)
        outs = [sample(i) for i in range(2)]
        psnrs = [10 * math.log10(float(r.max() - r.min()) ** 2 / float(((o - r) ** 2).mean())) for o, r in zip(outs, refs)]
        assert statistics.mean(psnrs) == pytest.approx(result.measured["psnr_mean"], rel=1e-6)
        # bisection: every candidate tried with less compute than the chosen one missed the target
        cheaper = [e for e in result.evaluations if e["predicted_computed_fraction"] < result.predicted_computed_fraction]
        assert all(e["psnr_mean"] < target for e in cheaper)
    assert [e for e in high.evaluations if e["psnr_mean"] < high_target]   # the target did bind


def test_max_ms_gmsd_target_is_met_with_the_least_compute_found(tmp_path):
    _, compiled, backend = _compiled(BASE)
    sample = _decoded_sampler(compiled)
    # both from BASE (not from the config the previous call left): the same candidates
    loose = calibrate(sample, backend, runs=2, max_ms_gmsd=0.05, base=BASE, progress=False)
    strict_target = loose.measured["ms_gmsd_mean"] / 2     # what loose's choice misses: another candidate
    strict = calibrate(sample, backend, runs=2, max_ms_gmsd=strict_target, base=BASE, progress=False)
    # a looser target is met with fewer computed steps
    assert loose.measured["computed_fraction"] < strict.measured["computed_fraction"]
    for result, target in ((loose, 0.05), (strict, strict_target)):
        assert result.target == {"max_ms_gmsd": target}
        assert result.met and result.measured["ms_gmsd_mean"] <= target
        # checked independently: rerun the chosen config and measure MS-GMSD here
        backend.set_config(AdaCacheConfig.no_cache(num_steps=STEPS, reuse="constant"))
        refs = [sample(i) for i in range(2)]
        backend.set_config(result.config)
        outs = [sample(i) for i in range(2)]
        scores = [ms_gmsd(o.double() - float(r.min()), r.double() - float(r.min()),
                          data_range=float(r.max() - r.min())).item() for o, r in zip(outs, refs)]
        assert result.measured["ms_gmsd"] == pytest.approx(scores, rel=1e-6)
        assert result.measured["ms_gmsd_mean"] == pytest.approx(statistics.mean(scores), rel=1e-6)
        assert result.measured["ms_gmsd_worst"] == pytest.approx(max(scores), rel=1e-6)
        # bisection: every candidate tried with less compute than the chosen one missed the target
        cheaper = [e for e in result.evaluations if e["predicted_computed_fraction"] < result.predicted_computed_fraction]
        assert all(e["ms_gmsd_mean"] > target for e in cheaper)
    assert [e for e in strict.evaluations if e["ms_gmsd_mean"] > strict_target]   # the target did bind
    assert "MS-GMSD vs uncached: mean" in strict.summary()
    # out of reach: with every rate at least 2 no candidate computes every step, so none gives the
    # uncached output; NOT met, and said so
    skipping = AdaCacheConfig(codebook={0.5: 3, INF: 4}, num_steps=STEPS, reuse="constant")
    unreachable = calibrate(sample, backend, runs=2, max_ms_gmsd=1e-9, base=skipping, max_checks=2, progress=False)
    assert not unreachable.met and unreachable.measured["ms_gmsd_mean"] > 1e-9
    assert all(e["ms_gmsd_mean"] > 1e-9 for e in unreachable.evaluations)
    assert "NOT met" in unreachable.summary()
    # JSON round trip, and a file saved before MS-GMSD was measured still loads
    path = tmp_path / "calibration.json"
    strict.save(path)
    loaded = CalibrationResult.load(path)
    assert loaded.measured == strict.measured and loaded.evaluations == strict.evaluations
    assert loaded.target == {"max_ms_gmsd": strict_target}
    old = strict.to_dict()
    for m in [old["measured"], *old["evaluations"]]:
        for key in ("ms_gmsd_mean", "ms_gmsd_worst", "ms_gmsd"):
            del m[key]
    path.write_text(json.dumps(old))
    assert "MS-GMSD vs uncached: not measured" in CalibrationResult.load(path).summary()


def test_max_ms_gmsd_needs_outputs_that_are_images():
    """Latents of 5x5 cannot be scored (MS-GMSD's four scales need 17x17): a clear error after
    the uncached runs, with the backend restored; other targets record MS-GMSD as not measured."""
    _, compiled, backend = _compiled(BASE)
    with pytest.raises(ValueError, match="at least 17x17 pixels; sample\\(i\\) returned shape \\(1, 3, 4, 5, 5\\)"):
        calibrate(_sampler(compiled), backend, runs=1, max_ms_gmsd=0.05, progress=False)
    assert backend.config == BASE and backend.runtime.recorder is None
    result = calibrate(_sampler(compiled), backend, runs=1, computed_fraction=0.5, progress=False)
    assert result.measured["ms_gmsd_mean"] is None and result.measured["ms_gmsd"] == [None]
    assert "MS-GMSD vs uncached: not measured" in result.summary()


def test_moreg_normalizer_is_the_models_typical_motion():
    _, compiled, backend = _compiled(BASE)
    result = calibrate(_sampler(compiled), backend, runs=3, computed_fraction=0.6, progress=False)
    assert result.moreg_normalizer == typical_motion(BASE, result.trajectories)
    assert result.config.moreg_normalizer == result.moreg_normalizer != BASE.moreg_normalizer
    window = BASE.window_for(STEPS)
    per_run = sorted(statistics.mean(t.motion(s) for s in range(window[0], window[1] + 1))
                     for t in result.trajectories)
    assert result.moreg_normalizer == pytest.approx(per_run[1])
    # the power maps the runs' spread to MOREG_SPREAD: the most-moving run's m' is that many times the least's
    assert result.config.moreg_power == result.moreg_power < BASE.moreg_power
    assert (per_run[-1] / per_run[0]) ** result.moreg_power == pytest.approx(MOREG_SPREAD)
    off = calibrate(_sampler(compiled), backend, runs=1, computed_fraction=0.6, progress=False,
                    base=AdaCacheConfig.fast(num_steps=STEPS, moreg=False, reuse="constant"))
    assert off.moreg_normalizer is None and off.config.moreg_normalizer == 0.385 and off.config.moreg_power == 8.0


def test_json_round_trip(tmp_path):
    _, compiled, backend = _compiled(BASE)
    lines = []
    result = calibrate(_sampler(compiled), backend, runs=1, computed_fraction=0.5, progress=lines.append)
    assert any("uncached run 1/1" in line for line in lines) and any("thresholds x" in line for line in lines)
    path = tmp_path / "calibration.json"
    result.save(path)
    loaded = CalibrationResult.load(path)
    assert loaded.config == result.config
    assert loaded.trajectories == result.trajectories
    assert loaded.measured == result.measured and loaded.evaluations == result.evaluations
    assert loaded.target == {"computed_fraction": 0.5}
    assert AdaCacheConfig.from_dict(AdaCacheConfig.no_cache(num_steps=4).to_dict()).codebook == {INF: 1}


@pytest.mark.parametrize("kwargs,field", [
    ({"computed_fraction": 0.0}, "computed_fraction"), ({"computed_fraction": 1.5}, "computed_fraction"),
    ({"computed_fraction": True}, "computed_fraction"), ({"min_psnr": -3.0}, "min_psnr"),
    ({"min_psnr": math.inf}, "min_psnr"), ({}, "exactly one target"),
    ({"computed_fraction": 0.5, "min_psnr": 30.0}, "exactly one target"),
    ({"max_ms_gmsd": 0.0}, "max_ms_gmsd"), ({"max_ms_gmsd": math.nan}, "max_ms_gmsd"),
    ({"max_ms_gmsd": True}, "max_ms_gmsd"), ({"min_psnr": 30.0, "max_ms_gmsd": 0.1}, "exactly one target"),
    ({"computed_fraction": 0.5, "runs": 0}, "runs"), ({"computed_fraction": 0.5, "data_range": -1}, "data_range"),
])
def test_bad_targets_raise_naming_the_field(kwargs, field):
    backend = adacache_backend(BASE, inner="eager")
    with pytest.raises(ValueError, match=field):
        calibrate(lambda i: None, backend, progress=False, **kwargs)


def test_a_model_that_caches_nothing_is_a_clear_error():
    backend = adacache_backend(BASE, inner="eager")   # never compiled into anything
    with pytest.raises(RuntimeError, match="caches nothing"):
        calibrate(lambda i: torch.zeros(3), backend, runs=1, computed_fraction=0.5, progress=False)
    assert backend.config == BASE and backend.runtime.recorder is None


def test_set_config_keeps_the_compiled_graphs_and_refuses_compile_time_fields():
    _, compiled, backend = _compiled(BASE)
    sample = _sampler(compiled)
    sample(0)
    graphs = len(backend.graphs)
    backend.set_config(AdaCacheConfig(codebook={INF: 3}, num_steps=STEPS, reuse="constant"))
    with no_recompiles():
        sample(1)
    assert len(backend.graphs) == graphs
    assert backend.report().computed_steps == [1, 2, 5, 8, 11, 14, 17, 19, 20]
    with pytest.raises(ValueError, match="probe_block"):
        backend.set_config(AdaCacheConfig(num_steps=STEPS, probe_block=0))
    with pytest.raises(ValueError, match="frames_arg"):
        backend.set_config(AdaCacheConfig(num_steps=STEPS, frames_arg="num_frames"))


def test_worked_example_on_the_reference_model(tmp_path):
    """``python -m examples.calibrate`` (the README's worked example), at 8 steps: it meets its
    target on the calibration prompts and writes a file whose calibration loads back."""
    pytest.importorskip("diffusers")
    import json

    from examples import calibrate as example

    out = tmp_path / "calibration.json"
    res = example.main(["--steps", "8", "--computed-fraction", "0.75", "--out", str(out)])
    assert res["result"].met and res["result"].measured["computed_fraction"] <= 0.75
    assert len(res["held_out"]) == len(example.HELD_OUT_PROMPTS)
    saved = json.loads(out.read_text())
    part = tmp_path / "part.json"
    part.write_text(json.dumps(saved["calibration"]))
    assert CalibrationResult.load(part).config == res["result"].config


def test_forced_steps_search_keeps_the_best_measured_split():
    """Each split tried is run at no more than the base split's predicted compute; the result is
    the best PSNR among the runs within the compute target, with that split's first / last steps
    in its config, and rerunning it gives what was measured."""
    _, compiled, backend = _compiled(BASE)
    sample = _sampler(compiled)
    splits = [(4, 0), (3, 1)]
    result = calibrate(sample, backend, runs=2, computed_fraction=0.5, base=BASE, forced_steps=splits, progress=False)
    tried = {(e["first_computed_steps"], e["last_computed_steps"]) for e in result.evaluations}
    assert tried == {(1, 2), *splits}
    base_runs = [e for e in result.evaluations if (e["first_computed_steps"], e["last_computed_steps"]) == (1, 2)]
    within = [e for e in result.evaluations if e["computed_fraction"] <= 0.5]
    best = max(within, key=lambda e: e["psnr_mean"])
    chosen = (result.config.first_computed_steps, result.config.last_computed_steps)
    assert chosen == (best["first_computed_steps"], best["last_computed_steps"])
    assert result.measured["psnr_mean"] == best["psnr_mean"] and result.met
    # every other split was run at no more predicted compute than the base split's choice
    base_choice = max(e["predicted_computed_fraction"] for e in base_runs if e["computed_fraction"] <= 0.5)
    assert all(e["predicted_computed_fraction"] <= base_choice + 1e-9 for e in result.evaluations if e not in base_runs)
    # the forced steps really are computed: rerun and read the schedule
    fractions = []
    for i in range(2):
        sample(i)
        steps = backend.report().computed_steps
        assert steps[:chosen[0]] == list(range(1, chosen[0] + 1))
        assert all(s in steps for s in range(STEPS - chosen[1] + 1, STEPS + 1))
        fractions.append(len(steps) / STEPS)
    assert statistics.mean(fractions) == pytest.approx(result.measured["computed_fraction"])
    assert f"the first {chosen[0]} step(s), the last {chosen[1]}" in result.summary()
    # None: only the base's split
    only = calibrate(sample, backend, runs=2, computed_fraction=0.5, base=BASE, forced_steps=None, progress=False)
    assert {(e["first_computed_steps"], e["last_computed_steps"]) for e in only.evaluations} == {(1, 2)}


def test_forced_steps_search_for_a_quality_target_takes_the_least_compute():
    """On this toy a warm-up of 2 without forced last steps meets 53 dB at the compute the base
    split needs, with a better PSNR; its cheaper candidates are then bisected (and miss here)."""
    _, compiled, backend = _compiled(BASE)
    sample = _sampler(compiled)
    result = calibrate(sample, backend, runs=2, min_psnr=53.0, base=BASE, forced_steps=[(2, 0)], progress=False)
    meeting = [e for e in result.evaluations if e["psnr_mean"] >= 53.0]
    assert result.met and meeting
    least = min(e["computed_fraction"] for e in meeting)
    assert result.measured["computed_fraction"] == least
    best_at_least = max(e["psnr_mean"] for e in meeting if e["computed_fraction"] == least)
    assert result.measured["psnr_mean"] == best_at_least
    assert (result.config.first_computed_steps, result.config.last_computed_steps) == (2, 0)
    split = [e for e in result.evaluations if (e["first_computed_steps"], e["last_computed_steps"]) == (2, 0)]
    assert len(split) >= 3 and all(e["psnr_mean"] < 53.0 for e in split if e["computed_fraction"] < least)


def test_forced_steps_search_skips_a_split_with_the_same_schedules():
    """Near full compute the forced steps are computed anyway: a split's candidate that takes the
    steps of one already run is not run again."""
    _, compiled, backend = _compiled(BASE)
    result = calibrate(_sampler(compiled), backend, runs=2, min_psnr=58.0, base=BASE, forced_steps=[(3, 1)],
                       progress=False)
    assert all((e["first_computed_steps"], e["last_computed_steps"]) == (1, 2) for e in result.evaluations)


@pytest.mark.parametrize("forced_steps", ["all", [(0, 2)], [(2, -1)], [(2,)], [(2.0, 1)], [(True, 1)]])
def test_bad_forced_steps_raise_naming_the_field(forced_steps):
    backend = adacache_backend(BASE, inner="eager")
    with pytest.raises(ValueError, match="forced_steps"):
        calibrate(lambda i: None, backend, computed_fraction=0.5, forced_steps=forced_steps, progress=False)


@pytest.mark.parametrize("steps,expected", [
    (30, [(1, 2), (3, 0), (3, 1), (4, 0), (4, 1), (6, 0), (6, 1)]),
    (50, [(1, 2), (5, 0), (5, 1), (7, 0), (7, 1), (10, 0), (10, 1)]),
    (8, [(1, 2), (2, 0), (2, 1)]),          # warm-ups of at least 2; the forced steps leave half the steps
    (5, [(1, 2), (2, 0)]),
])
def test_auto_forced_steps_are_warm_ups_of_10_to_20_percent(steps, expected):
    from adacache_fx.calibration.fit import forced_step_splits

    assert forced_step_splits(AdaCacheConfig(num_steps=steps), steps) == expected

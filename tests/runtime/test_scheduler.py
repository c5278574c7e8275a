"""The schedule contract of docs/concepts/adacache.md, rule by rule, on the scheduler alone."""
import math

import pytest
import torch

from adacache_fx import AdaCacheConfig
from adacache_fx.runtime import AdaCacheScheduler, codebook_rate
from adacache_fx.config import CODEBOOK_30_FAST

INF = math.inf


def sums(distance, motion=None):
    """(5,) partial sums that give ``distance`` (k=1) and motion score ``motion``."""
    if motion is None:
        return torch.tensor([distance, 1.0, 0.0, 0.0, 0.0])
    return torch.tensor([distance, 1.0, motion, 0.5, 0.5])


def run(config, timesteps, distance=lambda s: 0.01, branches=1, motion=None, per_step=True):
    """Drive the scheduler like a sampling loop; returns the decisions per call.

    ``distance(s)`` is the distance c the metric should see at step s (``per_step``), or
    the raw relative L1 before the division by k (``per_step=False``)."""
    sched = AdaCacheScheduler(config)
    decisions = []
    for t in timesteps:
        for _ in range(branches):
            d = sched.begin_call(float(t))
            decisions.append(d)
            if d.compute and len(sched.computed_steps) >= 2:
                m = motion(d.step) if motion else None
                k = sched.computed_steps[-1] - sched.computed_steps[-2] if per_step else 1
                sched.add_metric_sums(sums(distance(d.step) * k, m), has_motion=m is not None)
    sched.finalize()
    return sched, decisions


def countdown(n):
    return torch.linspace(1000, 0, n).tolist()


def test_rule4_inf1_computes_every_step():
    sched, _ = run(AdaCacheConfig(codebook={INF: 1}, num_steps=12), countdown(12))
    assert sched.computed_steps == list(range(1, 13))


def test_rule4_inf3_with_12_steps():
    sched, _ = run(AdaCacheConfig(codebook={INF: 3}, num_steps=12), countdown(12))
    assert sched.computed_steps == [1, 2, 5, 8, 11, 12]


def test_rule1_first_and_last_two_steps_forced():
    sched, _ = run(AdaCacheConfig(codebook={INF: 100}, num_steps=20), countdown(20))
    assert sched.computed_steps == [1, 2, 19, 20]


def test_rule1_without_num_steps_no_forced_tail():
    sched, _ = run(AdaCacheConfig(codebook={INF: 100}), countdown(20))
    assert sched.computed_steps == [1, 2]


def test_rule2_rate_starts_at_one_and_first_metric_at_step_2():
    sched, _ = run(AdaCacheConfig(codebook={INF: 4}, num_steps=30), countdown(30))
    assert sched.computed_steps[:3] == [1, 2, 6]
    assert sched.metrics[0].step == 2 and sched.metrics[0].rate == 4


def test_rule3_next_step_is_s_plus_tau_from_codebook():
    # distance 0.1 -> fast codebook rate 5 (0.1 < 0.16), distance 0.5 -> last rate 1
    cfg = AdaCacheConfig(codebook=CODEBOOK_30_FAST, num_steps=30, moreg=False)
    sched, _ = run(cfg, countdown(30), distance=lambda s: 0.1 if s <= 10 else 0.5)
    steps = sched.computed_steps
    assert steps == [1, 2, 7, 12] + list(range(13, 31))
    for m in sched.metrics:
        assert m.next_step == m.step + m.rate
        assert m.rate == codebook_rate(CODEBOOK_30_FAST, m.reg_distance)


def test_distance_is_divided_by_steps_since_previous():
    cfg = AdaCacheConfig(codebook={INF: 3}, num_steps=12, moreg=False)
    sched, _ = run(cfg, countdown(12), distance=lambda s: 0.3, per_step=False)
    by_step = {m.step: m for m in sched.metrics}
    assert by_step[2].distance == pytest.approx(0.3)       # k = 1
    assert by_step[5].distance == pytest.approx(0.1)       # k = 3


def test_codebook_lookup():
    cb = {0.08: 6, 0.16: 5, 0.24: 4, 0.32: 3, 0.40: 2, 1.00: 1}
    assert codebook_rate(cb, 0.0) == 6
    assert codebook_rate(cb, 0.08) == 5   # strict: c < threshold
    assert codebook_rate(cb, 0.39) == 2
    assert codebook_rate(cb, 5.0) == 1    # past every threshold: the last rate
    assert codebook_rate({0.1: 4, 0.2: 2}, 7.0) == 2
    # non-finite: rate 1, on codebooks whose last rate is not 1 (there "the last rate" would differ)
    for book in ({0.1: 4, 0.2: 2}, {INF: 3}, CODEBOOK_30_FAST):
        for bad in (math.nan, math.inf, -math.inf):
            assert codebook_rate(book, bad) == 1, (book, bad)


def test_nan_or_inf_metric_means_compute():
    cfg = AdaCacheConfig(codebook={INF: 5}, num_steps=12)   # last rate 5: "the last rate" would skip
    sched, _ = run(cfg, countdown(12), distance=lambda s: math.nan if s == 2 else 0.01)
    assert sched.computed_steps[:3] == [1, 2, 3]
    sched, _ = run(cfg, countdown(12), distance=lambda s: math.inf if s == 2 else 0.01)
    assert sched.computed_steps[:3] == [1, 2, 3]


def test_rule5_branches_share_one_decision():
    sched, decisions = run(AdaCacheConfig(codebook={INF: 3}, num_steps=12), countdown(12), branches=2)
    assert sched.computed_steps == [1, 2, 5, 8, 11, 12]
    for cond, uncond in zip(decisions[0::2], decisions[1::2]):
        assert (cond.step, cond.compute) == (uncond.step, uncond.compute)
        assert (cond.branch, uncond.branch) == (0, 1)


@pytest.mark.parametrize("order", ["cond_first", "uncond_first"])
def test_rule5_branch_sums_are_pooled(order):
    """Step 2: cond distance 0.2 (sums 0.2 / 1.0), uncond 1.0 (sums 3.0 / 3.0): pooled
    (0.2 + 3.0) / (1.0 + 3.0) = 0.8 (not the mean of the two distances, 0.6). Thresholds put the
    pooled distance, either branch alone and the mean in four different bins."""
    book = {0.5: 4, 0.7: 3, 0.9: 2, INF: 1}
    sched = AdaCacheScheduler(AdaCacheConfig(codebook=book, num_steps=10, moreg=False))
    for t in (900.0, 800.0):
        sched.begin_call(t)
        sched.begin_call(t)
    branches = [torch.tensor([0.2, 1.0, 0, 0, 0]), torch.tensor([3.0, 3.0, 0, 0, 0])]
    for sums in (branches if order == "cond_first" else branches[::-1]):
        sched.add_metric_sums(sums, False)
    decisions = [sched.begin_call(700.0), sched.begin_call(700.0)]   # step 3: both branches
    assert sched.metrics[-1].step == 2
    assert sched.metrics[-1].distance == pytest.approx(0.8)
    assert sched.metrics[-1].rate == 2 and sched.metrics[-1].next_step == 4
    assert [d.compute for d in decisions] == [False, False]
    assert [sched.begin_call(600.0).compute for _ in range(2)] == [True, True]   # step 4


def test_rule6_reset_when_timestep_goes_back_up():
    sched, _ = run(AdaCacheConfig(codebook={INF: 3}, num_steps=6), countdown(6))
    assert sched.computed_steps == [1, 2, 5, 6]
    d = sched.begin_call(1000.0)
    assert d.step == 1 and d.compute and sched.computed_steps == [1]
    assert d.generation == 1


def test_rule6_counting_up_direction_is_learnt():
    sched, decisions = run(AdaCacheConfig(codebook={INF: 3}, num_steps=6), torch.linspace(0, 1, 6).tolist())
    assert decisions[-1].step == 6 and sched.computed_steps == [1, 2, 5, 6]
    d = sched.begin_call(0.0)   # back down: a new generation
    assert d.step == 1


def test_explicit_reset():
    sched = AdaCacheScheduler(AdaCacheConfig(codebook={INF: 3}, num_steps=6))
    sched.begin_call(1000.0)
    sched.begin_call(800.0)
    sched.reset()
    assert sched.begin_call(600.0).step == 1


def test_no_timestep_counts_calls_and_needs_num_steps():
    sched = AdaCacheScheduler(AdaCacheConfig(codebook={INF: 3}))
    with pytest.raises(ValueError, match="num_steps"):
        sched.begin_call(None)
    sched = AdaCacheScheduler(AdaCacheConfig(codebook={INF: 3}, num_steps=12))
    steps = [sched.begin_call(None).step for _ in range(14)]
    assert steps == list(range(1, 13)) + [1, 2]


def test_a_graph_without_the_timestep_follows_the_step_of_the_one_with_it():
    """Graph breaks can leave the timestep input in one graph (Lumina2 under compile_model: the
    refiners' graph has it, the main blocks' graph does not): its calls join that step."""
    sched = AdaCacheScheduler(AdaCacheConfig(codebook={INF: 3}, num_steps=12))
    decisions = []
    for t in countdown(12):
        timed = sched.begin_call(float(t), key="prologue graph")
        untimed = sched.begin_call(None, key="blocks graph")
        assert (untimed.step, untimed.compute) == (timed.step, timed.compute)
        decisions.append(untimed)
        if untimed.compute and len(sched.computed_steps) >= 2:
            sched.add_metric_sums(sums(0.01), has_motion=False)
    assert [d.step for d in decisions if d.compute] == [1, 2, 5, 8, 11, 12]


def test_moreg_formula():
    cfg = AdaCacheConfig(codebook={INF: 1}, num_steps=30)
    assert cfg.window_for(30) == (4, 26)
    # motion m = 0.5 / (0.5 + 0.5) = 0.5 every step after 1 (see sums())
    sched, _ = run(cfg, countdown(30), distance=lambda s: 0.1, motion=lambda s: 0.5)
    by_step = {m.step: m for m in sched.metrics}
    outside, first_in, inside = by_step[3], by_step[4], by_step[5]
    assert outside.motion == pytest.approx(0.5) and outside.motion_reg == 1.0
    mreg = (0.5 / 0.385) ** 8
    assert first_in.motion_reg == pytest.approx(mreg)
    assert first_in.motion_grad == pytest.approx(10 * (mreg - 1.0) / 1)
    assert first_in.reg_distance == pytest.approx(0.1 * (mreg + abs(10 * (mreg - 1.0))))
    assert inside.motion_grad == pytest.approx(0.0)
    assert inside.reg_distance == pytest.approx(0.1 * mreg)


def test_moreg_off_leaves_distance():
    cfg = AdaCacheConfig(codebook={INF: 1}, num_steps=30, moreg=False)
    sched, _ = run(cfg, countdown(30), distance=lambda s: 0.1, motion=lambda s: 0.5)
    assert all(m.reg_distance == pytest.approx(m.distance) and m.motion is None for m in sched.metrics)


def test_high_motion_gets_more_compute():
    cfg = AdaCacheConfig.fast(30)
    calm, _ = run(cfg, countdown(30), distance=lambda s: 0.07, motion=lambda s: 0.30)
    busy, _ = run(cfg, countdown(30), distance=lambda s: 0.07, motion=lambda s: 0.45)
    assert len(busy.computed_steps) > len(calm.computed_steps)

"""Predict a config's schedule on recorded trajectories, and the family that calibration searches:
the base codebook with every threshold scaled by one factor and its rates capped, MoReg's
normaliser and power set from the model's own motion scores, and the steps always computed at the
start and the end (``first_computed_steps``, ``last_computed_steps``)."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..config import AdaCacheConfig
from ..runtime.scheduler import AdaCacheScheduler
from .record import Trajectory

# Threshold scales tried: 1/64 .. 64 on a log grid (2^(1/8) apart: about 9% per step).
SCALES = [2.0 ** (e / 8) for e in range(-48, 49)]


def simulate(config: AdaCacheConfig, trajectory: Trajectory) -> list:
    """The steps ``config`` computes on ``trajectory``, decided by the backend's own scheduler
    (driven as the cached graph drives it: one call per step, the recorded sums of the pair
    ``(s, s - p)`` after every computed step ``s`` with a previous computed step ``p``)."""
    n = trajectory.num_steps
    scheduler = AdaCacheScheduler(config)
    scheduler.set_num_steps(n)
    for s in range(1, n + 1):
        decision = scheduler.begin_call(float(n - s + 1))
        if decision.compute and len(scheduler.computed_steps) >= 2:
            gap = s - scheduler.computed_steps[-2]
            sums = trajectory.sums.get((s, gap))
            if sums is None:
                raise ValueError(f"the trajectory has no metric for step {s} at gap {gap}: "
                                 f"record with max_gap >= the codebook's largest rate")
            scheduler.add_metric_sums(torch.tensor(sums, dtype=torch.float64), has_motion=trajectory.has_motion)
    scheduler.finalize()
    return list(scheduler.computed_steps)


def computed_fraction(config: AdaCacheConfig, trajectories: list) -> float:
    """Mean over ``trajectories`` of the fraction of steps ``config`` computes."""
    return statistics.mean(len(simulate(config, t)) / t.num_steps for t in trajectories)


def scaled(base: AdaCacheConfig, scale: float, max_rate: Optional[int] = None, **overrides) -> AdaCacheConfig:
    """``base`` with every codebook threshold multiplied by ``scale`` (an infinite one stays) and
    every rate capped at ``max_rate`` (None: kept)."""
    codebook = {thr * scale if math.isfinite(thr) else thr: rate if max_rate is None else min(rate, max_rate)
                for thr, rate in base.codebook.items()}
    return replace(base, codebook=codebook, **overrides)


# MoReg's strength after calibration: the most-moving calibration run's distance is raised this
# many times the least-moving one's (``m'`` ratio). The official power 8 on a model whose motion
# scores span 2.6x (the reference model's prompts, still to fast) would make that ratio ~2000:
# still videos would then always get the longest gaps.
MOREG_SPREAD = 2.0


def run_motion(config: AdaCacheConfig, trajectories: list) -> list:
    """Each run's mean motion score inside the MoReg window (runs without one left out)."""
    per_run = []
    for t in trajectories:
        window = config.window_for(t.num_steps) or (1, t.num_steps)
        scores = [t.motion(s) for s in range(max(2, window[0]), window[1] + 1)]
        scores = [m for m in scores if math.isfinite(m)]
        if scores:
            per_run.append(statistics.mean(scores))
    return per_run


def typical_motion(config: AdaCacheConfig, trajectories: list):
    """The median of the runs' motion scores: the value MoReg's normaliser takes so that a typical
    video of this model keeps its distance (``m' = 1``), more motion raises it and less lowers it.
    None: no frame axis was recorded."""
    per_run = run_motion(config, trajectories)
    return statistics.median(per_run) if per_run else None


def moreg_power(config: AdaCacheConfig, trajectories: list) -> float:
    """The power that maps the runs' spread of motion scores (max / min) to ``MOREG_SPREAD``,
    at most ``config.moreg_power`` (the official 8); unchanged when the runs do not differ."""
    per_run = [m for m in run_motion(config, trajectories) if m > 0]
    if len(per_run) < 2 or max(per_run) / min(per_run) < 1.0 + 1e-6:
        return config.moreg_power
    return min(config.moreg_power, math.log(MOREG_SPREAD) / math.log(max(per_run) / min(per_run)))


@dataclass(frozen=True)
class Candidate:
    """One config of the calibrated family, with the compute it is predicted to take."""

    scale: float            # the base codebook's thresholds are multiplied by this
    max_rate: int           # its rates are capped at this
    predicted: float        # predicted computed fraction (mean over the recorded runs)
    first: int = 1          # first_computed_steps
    last: int = 2           # last_computed_steps

    def config(self, family: AdaCacheConfig, **overrides) -> AdaCacheConfig:
        """``family`` with this candidate's thresholds, rate cap and forced steps."""
        return scaled(family, self.scale, self.max_rate, first_computed_steps=self.first,
                      last_computed_steps=self.last, **overrides)


def candidates(base: AdaCacheConfig, trajectories: list) -> list:
    """The family over ``SCALES`` x rate caps 2 .. the base codebook's largest rate, one candidate
    per distinct predicted compute, ordered from most to least compute.

    For equal compute the lowest cap wins: the most even spacing of the computed steps. On the
    reference model even spacing gives a higher PSNR than long gaps where the distance is low and
    short ones where it is high (forecast reuse extrapolates worse over long gaps). Within a cap,
    the scales that predict the same compute form a plateau; the candidate takes its middle (the
    geometric median of the plateau's scales), the thresholds farthest from changing the schedule,
    since a cached run's own probes move its distances a little from the recorded ones."""
    plateaus: dict = {}   # (cap, predicted fraction) -> [scales]
    for max_rate in range(2, max(2, max(base.codebook.values())) + 1):
        for scale in SCALES:
            fraction = computed_fraction(scaled(base, scale, max_rate), trajectories)
            plateaus.setdefault((max_rate, round(fraction, 9)), []).append((scale, fraction))
    best: dict = {}   # predicted fraction -> candidate with the lowest cap
    for (max_rate, key), members in sorted(plateaus.items()):
        if key not in best:
            scale, fraction = members[len(members) // 2]
            best[key] = Candidate(scale, max_rate, fraction, base.first_computed_steps, base.last_computed_steps)
    return sorted(best.values(), key=lambda c: (-c.predicted, c.max_rate, c.scale))


# Warm-ups calibration tries, as shares of the generation's steps (3, 4 and 6 of 30), each with
# 0 and 1 forced last steps. On the reference model a reused step right after the start costs
# far more than one at the end, where the linear forecast holds: at 30 steps, 12 computed, the
# official split (first 1, last 2) gave 35.30 / 27.29 dB mean / worst PSNR and a warm-up of 4
# with no forced end 36.86 / 32.33; at 10 computed 32.11 / 21.00 vs 33.25 / 27.99
# (``benchmarks/results/schedule_study.md``, section 6). Peers warm up too: TaylorSeer computes the
# first 3 steps, MagCache the first 20%. But chosen by calibration among these on 4 prompts, with
# the codebook refitted, the winner did worse on 16 held-out prompts than the official split
# (``benchmarks/results/e2e_forced_steps/``): ``calibrate`` tries them only when asked.
WARMUP_SHARES = (0.1, 0.133, 0.2)


def forced_step_splits(base: AdaCacheConfig, num_steps: int) -> list:
    """``[(first_computed_steps, last_computed_steps)]`` that calibration tries at ``num_steps``:
    ``base``'s own first, then each warm-up of ``WARMUP_SHARES`` (at least 2 steps) with 0 and 1
    forced last steps, those that leave at least half the steps to decide."""
    splits = [(base.first_computed_steps, base.last_computed_steps)]
    for share in WARMUP_SHARES:
        first = max(2, round(share * num_steps))
        for last in (0, 1):
            if (first, last) not in splits and first + last <= num_steps // 2:
                splits.append((first, last))
    return splits

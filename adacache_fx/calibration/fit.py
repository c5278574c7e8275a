"""Predict a config's schedule on recorded trajectories, and the one-parameter family that
calibration searches: the base codebook with every threshold scaled by one factor (rates kept),
and MoReg's normaliser set to the model's own typical motion score."""
from __future__ import annotations

import math
import statistics
from dataclasses import replace

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


def scaled(base: AdaCacheConfig, scale: float, **overrides) -> AdaCacheConfig:
    """``base`` with every codebook threshold multiplied by ``scale`` (an infinite one stays)."""
    codebook = {thr * scale if math.isfinite(thr) else thr: rate for thr, rate in base.codebook.items()}
    return replace(base, codebook=codebook, **overrides)


def typical_motion(config: AdaCacheConfig, trajectories: list):
    """The median over runs of each run's mean motion score inside the MoReg window: the value
    MoReg's normaliser takes so that a typical video of this model keeps its distance
    (``m' = 1``), more motion raises it and less lowers it. None: no frame axis was recorded."""
    per_run = []
    for t in trajectories:
        window = config.window_for(t.num_steps) or (1, t.num_steps)
        scores = [t.motion(s) for s in range(max(2, window[0]), window[1] + 1)]
        scores = [m for m in scores if math.isfinite(m)]
        if scores:
            per_run.append(statistics.mean(scores))
    return statistics.median(per_run) if per_run else None


def candidates(base: AdaCacheConfig, trajectories: list) -> list:
    """``[(scale, predicted computed fraction)]`` over ``SCALES``, one per distinct prediction
    (the smallest scale giving it: the most conservative thresholds for that compute), ordered
    from most to least compute."""
    out, seen = [], set()
    for scale in SCALES:
        fraction = computed_fraction(scaled(base, scale), trajectories)
        key = round(fraction, 9)
        if key not in seen:
            seen.add(key)
            out.append((scale, fraction))
    return sorted(out, key=lambda c: (-c[1], c[0]))

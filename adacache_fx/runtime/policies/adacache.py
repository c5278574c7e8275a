"""The AdaCache + MoReg policy (arXiv 2411.02397; ``docs/concepts/adacache.md``).

After a computed step ``s`` with a previous computed step ``k`` steps before, the distance
``c = (sum|r_s - r_p| / sum|r_p|) / k`` between the probe residuals, raised by MoReg's motion
score ``m`` inside the MoReg window (``c * (m' + |mg|)``, ``m' = ((m / normalizer) ** power) /
divisor``, ``mg = gradient_scale * (m' - m'_prev) / k``), picks the cache rate ``tau`` from the
codebook: the next computed step is ``s + tau``. A NaN or Inf metric means compute (rate 1).
"""
from __future__ import annotations

import math
from typing import Optional

from .base import PendingMetric, Policy, StepMetric
from .registry import register_policy


@register_policy("adacache")
class AdaCachePolicy(Policy):
    def reset(self) -> None:
        super().reset()
        self.prev_motion_reg: Optional[float] = None

    def measure(self, pending: PendingMetric, sums: list, num_steps: Optional[int]) -> StepMetric:
        cfg = self.config
        s, k = pending.step, max(pending.k, 1)
        diff, base, motion_num, motion_a, motion_b = sums
        distance = _safe_div(diff, base) / k
        reg = distance
        motion = motion_reg = motion_grad = None
        if cfg.moreg and pending.has_motion:
            motion = motion_score((diff, base, motion_num, motion_a, motion_b))
            window = cfg.window_for(num_steps)
            in_window = window is None or window[0] <= s <= window[1]
            if in_window:
                motion_reg = ((motion / cfg.moreg_normalizer) ** cfg.moreg_power) / cfg.moreg_divisor
            else:
                motion_reg = 1.0
            prev = self.prev_motion_reg if self.prev_motion_reg is not None else motion_reg
            motion_grad = cfg.moreg_gradient_scale * (motion_reg - prev) / k
            self.prev_motion_reg = motion_reg
            reg = distance * (motion_reg + abs(motion_grad))
        # a preset follows the generation's step count (for an expert, the whole generation's)
        rate = codebook_rate(cfg.codebook_for(self.preset_steps or num_steps), reg)
        return StepMetric(s, distance, motion, motion_reg, motion_grad, reg, rate, s + rate)


def codebook_rate(codebook: dict, distance: float) -> int:
    """Cache rate for ``distance``: the rate of the first threshold with ``distance <
    threshold`` (thresholds ascending), else the last rate. Non-finite: rate 1."""
    if not math.isfinite(distance):
        return 1
    for threshold, rate in codebook.items():
        if distance < threshold:
            return rate
    return list(codebook.values())[-1]


def motion_score(sums) -> float:
    """MoReg's motion score from the metric's five partial sums:
    ``m = sum|r[f+1] - r[f]| / (sum|r[1:]| + sum|r[:-1]|)``."""
    return _safe_div(sums[2], sums[3] + sums[4])


def _safe_div(a: float, b: float) -> float:
    if b == 0.0:
        return math.nan if a == 0.0 else math.inf
    return a / b

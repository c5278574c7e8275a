"""The AdaCache + MoReg scheduler: host-side state that decides, per denoising step,
whether the cached regions are computed or reused.

It implements the formulas and the schedule contract of ``shared/docs/adacache.md``:

* step 1 is computed, and steps ``N-1`` and ``N`` whenever ``N`` is known;
* the rate starts at 1 (step 2 is computed, the first metric is taken there);
* after every computed step with a previous probe, the distance ``c`` (optionally
  MoReg-scaled) picks a cache rate ``tau`` from the codebook; the next computed step
  is ``s + tau``;
* calls with the same timestep are branches of one step and share its decision;
* a new generation starts on ``reset()`` or when the timestep moves against the
  direction learnt from the first two steps;
* a NaN or Inf metric means compute.

The metric's partial sums stay on the device until the next step begins: the
decision needs them only then, so a computed step costs one host sync (reading five
floats) and a reused step none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import AdaCacheConfig
from .collectives import all_reduce_sums


@dataclass
class StepMetric:
    """What the scheduler measured after one computed step."""

    step: int
    distance: float            # c = (sum|r_s - r_p| / sum|r_p|) / k, before MoReg
    motion: Optional[float]    # m (None: no frame axis, MoReg off)
    motion_reg: Optional[float]   # m' (1 outside the MoReg window)
    motion_grad: Optional[float]  # mg
    reg_distance: float        # c after MoReg (what the codebook saw)
    rate: int                  # tau
    next_step: int             # s + tau


@dataclass
class CallDecision:
    """The scheduler's answer to one model call."""

    step: int          # 1-indexed step of the current generation
    branch: int        # 0 for the first call of this step, 1 for the second (guidance), ...
    compute: bool      # run the blocks (True) or reuse the cached deltas (False)
    generation: int    # counts generations since the backend was created


@dataclass
class _PendingMetric:
    step: int
    k: int
    sums: Optional[torch.Tensor] = None   # (5,) float32 on the device, summed over branches
    has_motion: bool = False


class AdaCacheScheduler:
    """Host-side per-generation state. One per compiled model instance; shared by all its graphs."""

    def __init__(self, config: AdaCacheConfig):
        self.config = config
        self.generation = 0
        self.process_group = None   # set by the backend: sums are all-reduced over it
        self.requested_num_steps: Optional[int] = None   # set_num_steps: outlives reset()
        self.reset()

    # ----- lifecycle ---------------------------------------------------------
    def reset(self) -> None:
        """Forget the current generation: the next call is step 1."""
        if getattr(self, "step", 0):
            self.generation += 1
        self.step = 0
        self.num_steps: Optional[int] = (self.requested_num_steps if self.requested_num_steps is not None
                                         else self.config.num_steps)
        self.timestep: Optional[float] = None
        self.direction: int = 0
        self.branch_counts: dict = {}
        self.compute_now = True
        self.next_compute_step = 1
        self.last_computed_step = 0
        self.computed_steps: list[int] = []
        self.metrics: list[StepMetric] = []
        self.prev_motion_reg: Optional[float] = None
        self._pending: Optional[_PendingMetric] = None

    def set_num_steps(self, num_steps: Optional[int]) -> None:
        """Set ``N`` for the current generation and the following ones, until set again
        (``None``: back to ``config.num_steps``). The diffusers integration does this per call."""
        if num_steps is not None and (not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1):
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        self.requested_num_steps = num_steps
        self.num_steps = num_steps if num_steps is not None else self.config.num_steps

    # ----- per call ----------------------------------------------------------
    def begin_call(self, timestep: Optional[float], key: object = None) -> CallDecision:
        """Advance the step clock for one model call and return the decision.

        ``timestep`` is the call's timestep as a Python float, or None when the model
        has no timestep input (then every call is a step and ``num_steps`` bounds a
        generation). When a model's graph breaks leave the timestep input in one graph only,
        a call without it after one with it belongs to that call's step. ``key`` identifies the graph making the call, so that several
        graphs of one forward count their branches separately.
        """
        if timestep is None and self.timestep is not None:
            pass  # a graph without the timestep input, after one with it (graph breaks): same step
        elif timestep is None:
            if self.num_steps is None:
                raise ValueError(
                    "adacache: the model has no timestep input that could be found, so every "
                    "call is a step; set AdaCacheConfig(num_steps=...) or timestep_arg=...")
            if self.step >= self.num_steps:
                self.reset()
            self._advance()
        elif self.step == 0 or self.timestep is None:
            # the first call of a generation, or the first timed one after untimed calls
            if self.step == 0:
                self._advance()
            self.timestep = timestep
        elif timestep == self.timestep:
            pass  # another branch of the current step
        else:
            move = 1 if timestep > self.timestep else -1
            if self.direction == 0 or move == self.direction:
                self.direction = move
                self.timestep = timestep
                self._advance()
            else:  # the timestep moved back: a new generation
                self.reset()
                self.timestep = timestep
                self._advance()
        branch = self.branch_counts.get(key, 0)
        self.branch_counts[key] = branch + 1
        return CallDecision(self.step, branch, self.compute_now, self.generation)

    def add_metric_sums(self, sums: torch.Tensor, has_motion: bool) -> None:
        """Accumulate one branch's ``(5,)`` partial sums for the current computed step."""
        pending = self._pending
        if pending is None or pending.step != self.step:
            return
        pending.sums = sums if pending.sums is None else pending.sums + sums
        pending.has_motion = pending.has_motion or has_motion

    def finalize(self) -> None:
        """Turn the pending sums of the last computed step into the next decision.

        Called by ``report()``. Under a process group it leaves sums that need the
        collective pending: ``report()`` on one rank alone (``if rank == 0``) must not enter
        a collective that the other ranks skip; the next step does it on every rank.
        """
        if self.process_group is not None and self._pending is not None and self._pending.sums is not None:
            return
        self._finalize()

    def _finalize(self) -> None:
        """``finalize`` at the start of a step, where every rank takes part."""
        pending = self.take_pending()
        if pending is not None:
            sums = all_reduce_sums(pending.sums, self.process_group)
            self.conclude(pending, [float(v) for v in sums.tolist()])

    def take_pending(self) -> Optional[_PendingMetric]:
        """The last computed step's sums still to be read (None: none; without sums the rate
        stays 1 and nothing is left to read). ``PerSampleScheduler`` reads many samples' at once."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending.sums is None:  # no previous probe: the rate stays 1
            self.next_compute_step = pending.step + 1
            return None
        return pending

    def conclude(self, pending: _PendingMetric, sums: list) -> None:
        """The decision from ``pending``'s five sums, reduced and read on the host."""
        metric = self._metric(pending, sums)
        self.metrics.append(metric)
        self.next_compute_step = metric.next_step

    # ----- internals ---------------------------------------------------------
    def _advance(self) -> None:
        self._finalize()
        self.step += 1
        self.branch_counts = {}
        s, n, cfg = self.step, self.num_steps, self.config
        forced = s <= cfg.first_computed_steps or (n is not None and s > n - cfg.last_computed_steps)
        self.compute_now = forced or s >= self.next_compute_step
        if self.compute_now:
            k = s - self.last_computed_step if self.last_computed_step else 0
            self._pending = _PendingMetric(step=s, k=k)
            self.last_computed_step = s
            self.computed_steps.append(s)

    def _metric(self, pending: _PendingMetric, sums: list) -> StepMetric:
        cfg = self.config
        s, k = pending.step, max(pending.k, 1)
        diff, base, motion_num, motion_a, motion_b = sums
        distance = _safe_div(diff, base) / k
        reg = distance
        motion = motion_reg = motion_grad = None
        if cfg.moreg and pending.has_motion:
            motion = motion_score((diff, base, motion_num, motion_a, motion_b))
            window = cfg.window_for(self.num_steps)
            in_window = window is None or window[0] <= s <= window[1]
            if in_window:
                motion_reg = ((motion / cfg.moreg_normalizer) ** cfg.moreg_power) / cfg.moreg_divisor
            else:
                motion_reg = 1.0
            prev = self.prev_motion_reg if self.prev_motion_reg is not None else motion_reg
            motion_grad = cfg.moreg_gradient_scale * (motion_reg - prev) / k
            self.prev_motion_reg = motion_reg
            reg = distance * (motion_reg + abs(motion_grad))
        rate = codebook_rate(cfg.codebook, reg)
        return StepMetric(s, distance, motion, motion_reg, motion_grad, reg, rate, s + rate)


def sampler_time(scheduler) -> float:
    """The sampler's variable at the current step: the host timestep, else the step index."""
    return float(scheduler.timestep) if scheduler.timestep is not None else float(scheduler.step)


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

"""What every decision policy shares: the schedule contract's bookkeeping.

A policy decides, once per step, whether the cached regions compute. The contract
(``docs/concepts/adacache.md``) is kept here for every policy alike:

* the first ``first_computed_steps`` steps compute, and the last ``last_computed_steps`` whenever
  the generation's step count ``N`` is known;
* otherwise step ``s`` computes when ``s >= next_compute_step``; a computed step with no previous
  probe (the first of a generation) leaves the rate at 1, so the next step computes too;
* after a computed step with a previous probe, the metric's five partial sums (pooled over the
  guidance branches, reduced over the ranks, read on the host once) go to :meth:`Policy.measure`,
  which returns the step's :class:`StepMetric` and with it the next computed step.

A new rule is a subclass that implements :meth:`measure` (and :meth:`reset` for state of its own),
registered by name (``policies/registry.py``) and chosen with ``AdaCacheConfig(policy=name)``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from ...errors import AdaCacheWarning


@dataclass
class StepMetric:
    """What the policy measured after one computed step."""

    step: int
    distance: float            # c = (sum|r_s - r_p| / sum|r_p|) / k, before MoReg
    motion: Optional[float]    # m (None: no frame axis, MoReg off)
    motion_reg: Optional[float]   # m' (1 outside the MoReg window)
    motion_grad: Optional[float]  # mg
    reg_distance: float        # c after MoReg (what the codebook saw)
    rate: int                  # tau
    next_step: int             # s + tau


@dataclass
class PendingMetric:
    """A computed step's partial sums, on the device until the next step reads them."""

    step: int
    k: int                                # steps since the previous computed step (0: none)
    sums: Optional[torch.Tensor] = None   # (5,) float32 on the device, summed over branches
    has_motion: bool = False


class Policy:
    """The decisions of one schedule (a model instance's, or one sample's)."""

    name = "base"

    def __init__(self, config):
        self.config = config
        self.reset()

    #: the step count a preset's codebook is taken at when it is not ``num_steps`` (a model that runs a
    #: share of a generation's steps: the generation's count), set by the scheduler before each decision
    preset_steps: Optional[int] = None

    def reset(self) -> None:
        """Forget the current generation."""
        self.next_compute_step = 1
        self.last_computed_step = 0
        self.computed_steps: list = []
        self.metrics: list = []
        self._pending: Optional[PendingMetric] = None

    def decide(self, step: int, num_steps: Optional[int]) -> bool:
        """Whether step ``step`` computes (called once per step, after the previous step's sums
        were concluded)."""
        cfg = self.config
        if step == 1 and num_steps is not None and cfg.fitted_steps not in (None, num_steps):
            _warn_fitted_steps(cfg.fitted_steps, num_steps)
        forced_count = forced_step_count(cfg)
        if step == 1 and num_steps is not None and num_steps <= forced_count:
            _warn_nothing_to_skip(num_steps, forced_count)
        forced = step <= cfg.first_computed_steps or (num_steps is not None and step > num_steps - cfg.last_computed_steps)
        compute = forced or step >= self.next_compute_step
        if compute:
            k = step - self.last_computed_step if self.last_computed_step else 0
            self._pending = PendingMetric(step=step, k=k)
            self.last_computed_step = step
            self.computed_steps.append(step)
        return compute

    def add_metric_sums(self, sums: torch.Tensor, has_motion: bool, step: int) -> None:
        """Accumulate one branch's ``(5,)`` partial sums for computed step ``step``."""
        pending = self._pending
        if pending is None or pending.step != step:
            return
        pending.sums = sums if pending.sums is None else pending.sums + sums
        pending.has_motion = pending.has_motion or has_motion

    @property
    def has_sums(self) -> bool:
        """Sums are waiting to be read (a collective is due before the next decision)."""
        return self._pending is not None and self._pending.sums is not None

    def take_pending(self) -> Optional[PendingMetric]:
        """The last computed step's sums still to be read (None: none; without sums the rate
        stays 1 and nothing is left to read)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending.sums is None:  # no previous probe: the rate stays 1
            self.next_compute_step = pending.step + 1
            return None
        return pending

    def conclude(self, pending: PendingMetric, sums: list, num_steps: Optional[int]) -> None:
        """The decision from ``pending``'s five sums, reduced and read on the host."""
        metric = self.measure(pending, sums, num_steps)
        self.metrics.append(metric)
        self.next_compute_step = metric.next_step

    def measure(self, pending: PendingMetric, sums: list, num_steps: Optional[int]) -> StepMetric:
        """The step's metric and rate from its five host sums: what a policy decides."""
        raise NotImplementedError(f"{type(self).__name__}.measure")


def forced_step_count(config) -> int:
    """Steps computed in every generation whatever the metric: the first ones, the second (the
    rate starts at 1) and the last ones. A generation of at most this many steps skips nothing."""
    return max(config.first_computed_steps, 2) + config.last_computed_steps


_warned_counts: set = set()


def _warn_fitted_steps(fitted: int, num_steps: int) -> None:
    """Once per pair: a calibrated codebook used at another step count than it was fitted at."""
    if (fitted, num_steps) in _warned_counts:
        return
    _warned_counts.add((fitted, num_steps))
    warnings.warn(f"adacache: this codebook was calibrated at {fitted} steps and this generation has {num_steps}: "
                  "its thresholds and rates were fitted to that step count; calibrate again at "
                  f"{num_steps} steps (or use the presets, which follow the step count)", AdaCacheWarning, stacklevel=4)


def _warn_nothing_to_skip(num_steps: int, forced_count: int) -> None:
    """Once per step count: the forced steps cover the whole generation (few-step sampling)."""
    if ("nothing to skip", num_steps) in _warned_counts:
        return
    _warned_counts.add(("nothing to skip", num_steps))
    warnings.warn(f"adacache: a generation of {num_steps} steps has no step to skip: the first, the second and the "
                  "last steps are always computed (first_computed_steps, last_computed_steps), so caching only "
                  f"adds its overhead; steps can be skipped from {forced_count + 1} steps on", AdaCacheWarning, stacklevel=4)

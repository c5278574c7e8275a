"""A schedule: a step clock (``step_clock.py``: which step and branch a call is) and a decision
policy (``policies/``: compute or reuse at that step), host-side state in the compiled callable.

``AdaCacheScheduler`` is the schedule of one model instance (one policy for the batch);
``per_sample_scheduler.PerSampleScheduler`` is one clock with a policy per sample. Both follow the
contract of ``docs/concepts/adacache.md``: calls with the same timestep are branches of one step
and share its decision; the metric's partial sums stay on the device until the next step
begins, so a computed step costs one host read (five floats) and a reused step none.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .collectives import all_reduce_sums
from .policies import make_policy
from .policies.base import forced_step_count
from .step_clock import StepClock


@dataclass
class CallDecision:
    """The schedule's answer to one model call."""

    step: int          # 1-indexed step of the current generation
    branch: int        # 0 for the first call of this step, 1 for the second (guidance), ...
    compute: bool      # run the blocks (True) or reuse the cached deltas (False)
    generation: int    # counts generations since the backend was created


class AdaCacheScheduler:
    """One model instance's schedule: its clock and its policy, shared by all its graphs."""

    def __init__(self, config):
        self.clock = StepClock(config.num_steps)
        self.policy = make_policy(config)
        self.process_group = None   # set by the guard: sums are all-reduced over it
        self.compute_now = True

    @property
    def config(self):
        return self.policy.config

    @config.setter
    def config(self, config) -> None:
        """A new config from the next generation on (``backend.set_config`` resets after it)."""
        self.policy.config = config
        self.clock.default_num_steps = config.num_steps

    # ----- what the guards and report() read ---------------------------------------------
    @property
    def computed_steps(self) -> list:
        return self.policy.computed_steps

    @property
    def metrics(self) -> list:
        return self.policy.metrics

    @property
    def last_computed_step(self) -> int:
        return self.policy.last_computed_step

    # one schedule for the batch: no per-sample steps (``PerSampleScheduler`` has them)
    sample_computed_steps = None
    sample_metrics = None

    # ----- lifecycle -------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the current generation: the next call is step 1."""
        self.clock.reset()
        self.policy.reset()
        self.compute_now = True

    def set_num_steps(self, num_steps: Optional[int]) -> None:
        """Set ``N`` for the current generation and the following ones, until set again
        (``None``: back to ``config.num_steps``). The diffusers integration does this per call."""
        self.clock.set_num_steps(num_steps)

    @property
    def nothing_to_skip(self) -> bool:
        """This generation's step count leaves no step to skip (few-step sampling): the cache's
        bookkeeping (the metric, the forecast terms) has nothing to decide."""
        n = self.clock.num_steps
        return n is not None and n <= forced_step_count(self.config)

    # ----- per call ------------------------------------------------------------------------
    def begin_call(self, timestep: Optional[float], key: object = None, name: Optional[str] = None) -> CallDecision:
        """Place one model call on the clock and return the step's decision (``timestep``: the
        call's host timestep, None for a model without one; ``key``: the graph making the call;
        ``name``: the cache context the call is made under, None for none)."""
        tick = self.clock.tick(timestep, key, name)
        if tick.restarted:
            self.policy.reset()
        if tick.advanced:
            self._finalize()
            self.policy.preset_steps = self.clock.preset_steps
            self.compute_now = self.policy.decide(tick.step, self.clock.num_steps)
        return CallDecision(tick.step, tick.branch, self.compute_now, tick.generation)

    def add_metric_sums(self, sums: torch.Tensor, has_motion: bool) -> None:
        """Accumulate one branch's ``(5,)`` partial sums for the current computed step."""
        self.policy.add_metric_sums(sums, has_motion, self.clock.step)

    def finalize(self) -> None:
        """Turn the pending sums of the last computed step into the next decision.

        Called by ``report()``. Under a process group it leaves sums that need the
        collective pending: ``report()`` on one rank alone (``if rank == 0``) must not enter
        a collective that the other ranks skip; the next step does it on every rank.
        """
        if self.process_group is not None and self.policy.has_sums:
            return
        self._finalize()

    def _finalize(self) -> None:
        """``finalize`` at the start of a step, where every rank takes part."""
        pending = self.policy.take_pending()
        if pending is not None:
            sums = all_reduce_sums(pending.sums, self.process_group)
            self.policy.conclude(pending, [float(v) for v in sums.tolist()], self.clock.num_steps)

"""A schedule per sample of the batch (``AdaCacheConfig(per_sample=True)``): one step clock,
a decision policy per sample.

AdaCache's premise is that each video needs its own amount of compute; a batch of several
requests shares one decision in every other cache (the metric summed over the batch). Here
each sample keeps its own policy (distance, motion score and gradient, rate, next computed
step) on the one clock every sample shares (the step, the guidance branches, the generation).
The contract (``docs/concepts/adacache.md``) holds per sample, since each sample's policy keeps it.

The metric needs one host read per step that has computed samples: the pending sums of every
sample are stacked, reduced over the process group in one collective, and read at once.

A sample is the group of batch rows ``{i, i + S, ..., i + (g - 1) S}`` for ``g =
AdaCacheConfig.guidance_in_batch`` copies of ``S`` samples (``[uncond, cond]``: ``g = 2``);
guidance branches that are separate calls share their sample's decision as branches do.
A change of the sample count inside a generation restarts the generation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .collectives import all_reduce_sums
from .policies import make_policy
from .policies.base import forced_step_count
from .scheduler import CallDecision
from .step_clock import StepClock


@dataclass
class SampleDecision(CallDecision):
    """A call's decision, with each sample's: ``compute`` is True when any sample computes."""

    samples: tuple = ()   # per sample: compute (True) or reuse


class PerSampleScheduler:
    """Host-side state of one model instance whose batch samples each get a schedule."""

    def __init__(self, config):
        self._config = config
        self.clock = StepClock(config.num_steps)
        self.samples: list = []                  # [Policy], one per sample
        self.computed_steps: list = []           # steps where at least one sample computed
        self.process_group = None
        self._flags: tuple = ()                  # the current step's decision per sample

    @property
    def config(self):
        return self._config

    @config.setter
    def config(self, config) -> None:
        self._config = config
        self.clock.default_num_steps = config.num_steps
        for policy in self.samples:
            policy.config = config

    # ----- what report() and the runtime read ----------------------------------
    @property
    def metrics(self) -> list:
        """A batch of one sample (or one schedule for the batch): its metrics; else see ``sample_metrics``."""
        return list(self.samples[0].metrics) if len(self.samples) == 1 else []

    @property
    def last_computed_step(self) -> int:
        return self.computed_steps[-1] if self.computed_steps else 0

    @property
    def sample_computed_steps(self) -> list:
        return [list(s.computed_steps) for s in self.samples]

    @property
    def sample_metrics(self) -> list:
        return [list(s.metrics) for s in self.samples]

    # ----- lifecycle -------------------------------------------------------------
    def reset(self) -> None:
        self.clock.reset()
        self.samples = []
        self.computed_steps = []

    def set_num_steps(self, num_steps: Optional[int]) -> None:
        self.clock.set_num_steps(num_steps)

    def _new_sample(self):
        """A fresh policy for one sample."""
        return make_policy(self.config)

    @property
    def nothing_to_skip(self) -> bool:
        """This generation's step count leaves no step to skip (few-step sampling): the cache's
        bookkeeping (the metric, the forecast terms) has nothing to decide."""
        n = self.clock.num_steps
        return n is not None and n <= forced_step_count(self.config)

    # ----- per call ------------------------------------------------------------------
    def begin_call(self, timestep: Optional[float], key: object = None,
                   num_samples: Optional[int] = None, name: Optional[str] = None) -> SampleDecision:
        """``num_samples``: the call's sample count (None: a graph that does not know it, which follows
        the current samples). A count that changes at a new step restarts the generation; within a
        step (another graph of the model), the decision's ``samples`` keep the current count and the
        caller computes every row."""
        tick = self.clock.tick(timestep, key, name)
        restarted = tick.restarted
        if num_samples is None:
            num_samples = len(self.samples) or 1
        elif self.samples and len(self.samples) != num_samples and not restarted and tick.advanced:
            self.clock.reset()   # the batch changed inside a generation: start a new one
            tick, restarted = self.clock.tick(timestep, key, name), True
        if restarted or not self.samples:
            self.samples = [self._new_sample() for _ in range(num_samples)]
            self.computed_steps = []
        if tick.advanced:
            self._finalize_samples()   # before the samples decide: one read for all of them
            for policy in self.samples:
                policy.preset_steps = self.clock.preset_steps
            self._flags = tuple(policy.decide(tick.step, self.clock.num_steps) for policy in self.samples)
            if any(self._flags):
                self.computed_steps.append(tick.step)
        return SampleDecision(tick.step, tick.branch, any(self._flags), tick.generation, samples=self._flags)

    def add_metric_sums(self, sums: torch.Tensor, has_motion: bool, samples: Optional[list] = None) -> None:
        """Accumulate one branch's per-sample ``(S, 5)`` partial sums for the measured ``samples``
        (default: all). ``(5,)``: the batch's sums, one schedule (a graph without per-sample rows)."""
        if sums.dim() == 1:
            sums = sums.unsqueeze(0).expand(len(self.samples), -1)
        for i in (range(len(self.samples)) if samples is None else samples):
            self.samples[i].add_metric_sums(sums[i], has_motion, self.clock.step)

    def finalize(self) -> None:
        """As ``AdaCacheScheduler.finalize``: under a process group, sums that need the collective
        stay pending for the next step, where every rank takes part."""
        if self.process_group is not None and any(policy.has_sums for policy in self.samples):
            return
        self._finalize_samples()

    def _finalize_samples(self) -> None:
        taken = [(policy, pending) for policy in self.samples for pending in [policy.take_pending()]
                 if pending is not None]
        if not taken:
            return
        stacked = torch.stack([pending.sums.to(torch.float64) for _policy, pending in taken])
        host = all_reduce_sums(stacked, self.process_group).tolist()   # one collective, one host read
        for (policy, pending), sums in zip(taken, host):
            policy.conclude(pending, [float(v) for v in sums], self.clock.num_steps)

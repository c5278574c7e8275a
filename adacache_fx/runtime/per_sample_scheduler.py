"""A schedule per sample of the batch (``AdaCacheConfig(per_sample=True)``).

AdaCache's premise is that each video needs its own amount of compute; a batch of several
requests shares one decision in every other cache (the metric summed over the batch). Here
each sample keeps its own ``AdaCacheScheduler`` (distance, motion score and gradient, rate,
next computed step), and one more scheduler is the clock that every sample shares: the step,
the guidance branches, the generation. All of them see the same calls, so their clocks move in
lockstep; only the compute decisions differ. The contract (``shared/docs/adacache.md``) holds
per sample, since each sample's scheduler is the plain one.

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

from ..config import AdaCacheConfig
from .collectives import all_reduce_sums
from .scheduler import AdaCacheScheduler, CallDecision


@dataclass
class SampleDecision(CallDecision):
    """A call's decision, with each sample's: ``compute`` is True when any sample computes."""

    samples: tuple = ()   # per sample: compute (True) or reuse


class PerSampleScheduler:
    """Host-side state of one model instance whose batch samples each get a schedule."""

    def __init__(self, config: AdaCacheConfig):
        self.clock = AdaCacheScheduler(config)   # step, branches, generation (its own decisions unused)
        self.samples: list = []                  # [AdaCacheScheduler], one per sample
        self.computed_steps: list = []           # steps where at least one sample computed
        self.process_group = None

    # ----- what report() and the runtime read ----------------------------------
    @property
    def config(self) -> AdaCacheConfig:
        return self.clock.config

    @config.setter
    def config(self, config: AdaCacheConfig) -> None:
        for scheduler in [self.clock, *self.samples]:
            scheduler.config = config

    step = property(lambda self: self.clock.step)
    timestep = property(lambda self: self.clock.timestep)
    generation = property(lambda self: self.clock.generation)
    num_steps = property(lambda self: self.clock.num_steps)
    # per sample: ``sample_metrics``; a batch of one sample (or one schedule for the batch): its metrics
    metrics = property(lambda self: list(self.samples[0].metrics) if len(self.samples) == 1 else [])

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
        for scheduler in [self.clock, *self.samples]:
            scheduler.set_num_steps(num_steps)

    def _new_sample(self) -> AdaCacheScheduler:
        sample = AdaCacheScheduler(self.clock.config)
        sample.set_num_steps(self.clock.requested_num_steps)
        sample.process_group = self.process_group
        return sample

    # ----- per call ------------------------------------------------------------------
    def begin_call(self, timestep: Optional[float], key: object = None,
                   num_samples: Optional[int] = None) -> SampleDecision:
        """``num_samples``: the call's sample count (None: a graph that does not know it, which follows
        the current samples). A count that changes at a new step restarts the generation; within a
        step (another graph of the model), the decision's ``samples`` keep the current count and the
        caller computes every row."""
        before = (self.clock.generation, self.clock.step)
        decision = self.clock.begin_call(timestep, key)
        advanced = (self.clock.generation, self.clock.step) != before
        if num_samples is None:
            num_samples = len(self.samples) or 1
        elif self.samples and len(self.samples) != num_samples and decision.generation == before[0] and advanced:
            self.clock.reset()   # the batch changed inside a generation: start a new one
            decision = self.clock.begin_call(timestep, key)
        if decision.generation != before[0] or not self.samples:
            self.samples = [self._new_sample() for _ in range(num_samples)]
            self.computed_steps = []
        advanced = (self.clock.generation, self.clock.step) != before
        if advanced:
            self._finalize_samples()   # before the samples advance: one read for all of them
        flags = tuple(s.begin_call(timestep, key).compute for s in self.samples)
        if advanced and any(flags):
            self.computed_steps.append(self.clock.step)
        return SampleDecision(decision.step, decision.branch, any(flags), decision.generation, samples=flags)

    def add_metric_sums(self, sums: torch.Tensor, has_motion: bool, samples: Optional[list] = None) -> None:
        """Accumulate one branch's per-sample ``(S, 5)`` partial sums for the measured ``samples``
        (default: all). ``(5,)``: the batch's sums, one schedule (a graph without per-sample rows)."""
        if sums.dim() == 1:
            sums = sums.unsqueeze(0).expand(len(self.samples), -1)
        for i in (range(len(self.samples)) if samples is None else samples):
            self.samples[i].add_metric_sums(sums[i], has_motion)

    def finalize(self) -> None:
        """As ``AdaCacheScheduler.finalize``: under a process group, sums that need the collective
        stay pending for the next step, where every rank takes part."""
        if self.process_group is not None and any(s._pending is not None and s._pending.sums is not None
                                                  for s in self.samples):
            return
        self._finalize_samples()

    def _finalize_samples(self) -> None:
        taken = [(s, p) for s in self.samples for p in [s.take_pending()] if p is not None]
        if not taken:
            return
        stacked = torch.stack([p.sums.to(torch.float64) for _s, p in taken])
        host = all_reduce_sums(stacked, self.process_group).tolist()   # one collective, one host read
        for (sample, pending), sums in zip(taken, host):
            sample.conclude(pending, [float(v) for v in sums])

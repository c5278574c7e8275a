"""Per-backend runtime state: one scheduler per compiled model instance, and the step clock.

Dynamo reuses one compiled graph for every instance of a model class whose backends compare
equal (every ``torch.compile(m, backend="adacache")`` does), so a graph cannot own a schedule.
Each ``CachedGraph`` numbers the model instances it sees by their weights, in order of first
call, and asks this state for instance ``i``'s scheduler: the fragments of one model (graph
breaks) all see it as the same instance and share its scheduler; two models served side by side
get one each.
"""
from __future__ import annotations

from typing import Optional

from ..config import AdaCacheConfig
from .clock import StepClock
from .per_sample_scheduler import PerSampleScheduler
from .scheduler import AdaCacheScheduler


class RuntimeState:
    def __init__(self, config: AdaCacheConfig):
        self.config = config
        self.clock = StepClock()
        self.schedulers: list = []
        self.last_instance = 0
        self.requested_num_steps: Optional[int] = None
        self.recorder = None   # a calibration.TrajectoryRecorder while adacache_fx.calibrate records

    def scheduler(self, instance: int):
        """Instance ``instance``'s ``AdaCacheScheduler`` (a ``PerSampleScheduler`` with ``per_sample``)."""
        while len(self.schedulers) <= instance:
            scheduler = (PerSampleScheduler if self.config.per_sample else AdaCacheScheduler)(self.config)
            if self.requested_num_steps is not None:
                scheduler.set_num_steps(self.requested_num_steps)
            self.schedulers.append(scheduler)
        self.last_instance = instance
        return self.schedulers[instance]

    def set_config(self, config: AdaCacheConfig) -> None:
        self.config = config
        for scheduler in self.schedulers:
            scheduler.config = config

    def reset(self) -> None:
        self.clock.reset()
        for scheduler in self.schedulers:
            scheduler.reset()

    def set_num_steps(self, num_steps: Optional[int]) -> None:
        AdaCacheScheduler(self.config).set_num_steps(num_steps)   # validates before anything changes
        self.requested_num_steps = num_steps
        for scheduler in self.schedulers:
            scheduler.set_num_steps(num_steps)

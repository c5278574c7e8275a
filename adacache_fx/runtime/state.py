"""Per-backend runtime state: one schedule per compiled model instance, and where the calls'
timesteps come from.

Dynamo reuses one compiled graph for every instance of a model class whose backends compare
equal (every ``torch.compile(m, backend="adacache")`` does), so a graph cannot own a schedule.
Each ``CachedGraph`` numbers the model instances it sees by their weights, in order of first
call, within its owner (the class whose ``forward`` Dynamo traced it from); the fragments of one
model (graph breaks) share the owner and the numbering, so they share the schedule. This state
turns ``(owner, that number)`` into one backend-wide model instance (:meth:`instance`): two
models of different classes on one backend, or two instances of one class, each get their own
schedule, whatever graph they run and in whatever order they were compiled.
"""
from __future__ import annotations

from typing import Optional

from .per_sample_scheduler import PerSampleScheduler
from .scheduler import AdaCacheScheduler
from .step_clock import StepClock
from .timestep_source import TimestepSource


class RuntimeState:
    def __init__(self, config):
        self.config = config
        self.timesteps = TimestepSource()
        self.schedulers: list = []
        self.instances: dict = {}   # (owner, the owner's own instance number) -> backend-wide instance
        self.last_instance = 0
        self.requested_num_steps: Optional[int] = None
        self.context_name: Optional[str] = None   # the cache context the coming calls are made under
        self.recorder = None   # a calibration.TrajectoryRecorder while adacache_fx.calibrate records

    def instance(self, key) -> int:
        """The backend-wide model instance of ``key`` (``(owner, number)``), numbered on first use."""
        found = self.instances.get(key)
        if found is None:
            found = self.instances[key] = len(self.instances)
        return found

    def scheduler(self, instance: int):
        """Instance ``instance``'s schedule: an ``AdaCacheScheduler``, or with ``per_sample`` a
        ``PerSampleScheduler`` (one clock, a policy per sample)."""
        while len(self.schedulers) <= instance:
            scheduler = (PerSampleScheduler if self.config.per_sample else AdaCacheScheduler)(self.config)
            if self.requested_num_steps is not None:
                scheduler.set_num_steps(self.requested_num_steps)
            self.schedulers.append(scheduler)
        self.last_instance = instance
        return self.schedulers[instance]

    def set_config(self, config) -> None:
        self.config = config
        for scheduler in self.schedulers:
            scheduler.config = config

    def reset(self) -> None:
        self.timesteps.reset()
        for scheduler in self.schedulers:
            scheduler.reset()

    def set_num_steps(self, num_steps: Optional[int]) -> None:
        StepClock().set_num_steps(num_steps)   # validates before anything changes
        self.requested_num_steps = num_steps
        for scheduler in self.schedulers:
            scheduler.set_num_steps(num_steps)

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

A model handed to ``compile_model`` (or named in ``backend.set_num_steps(n, model=...)``) is
registered by its weights (weakly) before it runs: its instance is then that model's, whichever
graph sees it first, so a step count can be given to it alone (the experts of a two-expert
pipeline each run their own share of the steps).
"""
from __future__ import annotations

import weakref
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
        self.registered: dict = {}  # id(weight) -> (weakref to it, key): models registered before they run
        self.models_registered = 0
        self.instance_num_steps: dict = {}   # instance -> its own step count (set_num_steps(n, instance))
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

    def register_model(self, model) -> tuple:
        """Register ``model`` by its parameters and buffers (held weakly): a graph that sees one of
        them numbers the call as this model's instance (:meth:`registered_key`). Returns its key."""
        for tensor in list(model.parameters()) + list(model.buffers()):
            entry = self.registered.get(id(tensor))
            if entry is not None and entry[0]() is tensor:
                return entry[1]   # registered already (weights are never shared by two models here)
        key = ("model", self.models_registered)
        self.models_registered += 1
        for tensor in list(model.parameters()) + list(model.buffers()):
            self.registered[id(tensor)] = (weakref.ref(tensor), key)
        return key

    def registered_key(self, weight) -> Optional[tuple]:
        """The key of the registered model ``weight`` belongs to (None: not registered)."""
        entry = self.registered.get(id(weight))
        return entry[1] if entry is not None and entry[0]() is weight else None

    def scheduler(self, instance: int):
        """Instance ``instance``'s schedule: an ``AdaCacheScheduler``, or with ``per_sample`` a
        ``PerSampleScheduler`` (one clock, a policy per sample)."""
        while len(self.schedulers) <= instance:
            scheduler = (PerSampleScheduler if self.config.per_sample else AdaCacheScheduler)(self.config)
            steps = self.instance_num_steps.get(len(self.schedulers), self.requested_num_steps)
            if steps is not None:
                scheduler.set_num_steps(steps)
            if len(self.schedulers) in self.instance_num_steps:
                scheduler.clock.preset_steps = self.requested_num_steps
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

    def set_num_steps(self, num_steps: Optional[int], instance: Optional[int] = None) -> None:
        """``num_steps`` for every model instance (clearing their own counts), or for ``instance``
        alone: the steps it runs of the generation's (its forced last steps and MoReg window follow
        its count; a preset's codebook, the generation's step size, follows the backend-wide count)."""
        StepClock().set_num_steps(num_steps)   # validates before anything changes
        if instance is not None:
            self.instance_num_steps[instance] = num_steps
            if instance < len(self.schedulers):
                self.schedulers[instance].set_num_steps(num_steps)
                self.schedulers[instance].clock.preset_steps = self.requested_num_steps
            return
        self.requested_num_steps = num_steps
        self.instance_num_steps.clear()
        for scheduler in self.schedulers:
            scheduler.set_num_steps(num_steps)
            scheduler.clock.preset_steps = None

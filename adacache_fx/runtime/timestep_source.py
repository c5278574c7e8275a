"""Where a call's timestep comes from, without a device sync.

The step clock (``step_clock.py``) needs each call's timestep as a host float (to tell steps and branches apart).
In order of preference:

1. a value announced with ``backend.step(t)`` (a raw sampling loop: one call per step);
2. a source callable (``integrations.diffusers.enable`` reads the pipeline scheduler's
   timesteps, copied to the host once per generation, at the scheduler's step index);
3. the timestep input itself: free when it is a CPU tensor or a Python number; a CUDA tensor
   costs a host sync on every call, reused steps included, so that case warns once.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from ..errors import AdaCacheSyncWarning


class TimestepSource:
    def __init__(self):
        self.announced: Optional[float] = None
        self.source: Optional[Callable[[], Optional[float]]] = None
        self.host_reads = 0   # calls whose timestep tensor was read on the host
        self._warned = False

    def announce(self, timestep) -> None:
        if timestep is None:
            self.announced = None
            return
        if isinstance(timestep, torch.Tensor):
            if timestep.device.type != "cpu":
                raise ValueError("backend.step(t): pass the timestep as a Python number or a CPU tensor "
                                 "(reading a device tensor is the host sync that step() avoids)")
            timestep = timestep.reshape(-1)[0]
        self.announced = float(timestep)

    def reset(self) -> None:
        self.announced = None

    def timestep(self, value) -> Optional[float]:
        """The host timestep of a call whose timestep input is ``value`` (None: no input)."""
        if self.announced is not None:
            return self.announced
        if self.source is not None:
            t = self.source()
            if t is not None:
                return float(t)
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            self.host_reads += 1
            if value.device.type != "cpu" and not self._warned:
                self._warned = True
                warnings.warn(
                    f"adacache: the timestep is a {value.device.type} tensor, read on the host at every call "
                    "(a device sync, reused steps included); pass CPU timesteps, call backend.step(t) before "
                    "each step, or use adacache_fx.integrations.diffusers.enable", AdaCacheSyncWarning, stacklevel=3)
            return float(value.reshape(-1)[0])
        return float(value)

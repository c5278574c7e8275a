"""Where a call's timestep comes from, without a device sync.

The step clock (``step_clock.py``) needs each call's timestep as a host float (to tell steps and branches apart).
In order of preference:

1. a value announced with ``backend.step(t)`` (a raw sampling loop: one call per step);
2. a source callable (``integrations.diffusers.enable`` reads the pipeline scheduler's
   timesteps, copied to the host once per generation, at the scheduler's step index);
3. the timestep input itself: free when it is a CPU tensor or a Python number; a CUDA tensor
   costs a host sync on every call, reused steps included, so that case warns once.

A timestep of several values is read as a whole (:func:`step_value`): per-sample rows, per-frame or
per-token timesteps, where a clean conditioning frame pinned at 0 (image-to-video) never moves.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch

from ..errors import AdaCacheSyncWarning


def step_value(timestep: torch.Tensor) -> float:
    """The host value that places a call on the step clock: the mean of the timestep's values.

    One value (the usual ``()`` / ``(B,)`` timestep of equal rows) is itself. Per-frame or per-token
    timesteps move as a whole: a frame pinned at 0 (the clean conditioning frame of image-to-video)
    shifts the mean by a constant, so it still advances, in the sampler's direction, exactly when
    some value moves; the mean is affine in a pinned sampler's timestep, so the forecasters' time
    ratios are the sampler's. Diffusion forcing (each frame at its own noise level): one step is one
    call whose levels differ from the previous call's; levels that rise (a new chunk of noisy
    frames) start a new generation. Reading the first element instead stops the clock at a pinned
    frame. An exact sum (``math.fsum``) of the host values, so branches of one step (equal
    tensors) read equal values."""
    if timestep.numel() == 1:
        return float(timestep.reshape(()))
    values = timestep.detach().reshape(-1).tolist()
    return math.fsum(values) / len(values)


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
            timestep = step_value(timestep)
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
            return step_value(value)
        return float(value)

"""The step clock: which step of which generation a model call belongs to, and which guidance
branch of that step it is. It decides nothing (the policy does, ``policies/``).

* calls with the same timestep are branches of one step; ``key`` tells apart several graphs of
  one forward (graph breaks), which count their branches separately; a call made under a named
  cache context (diffusers' ``cache_context("cond")``, ``backend.cache_context``) is the branch
  of that name whatever the call order (``(name, k)`` for its k-th call in the step: Heun's two
  calls per step under one name stay two branches);
* a new generation starts on :meth:`StepClock.reset` or when the timestep moves against the
  direction learnt from the first two steps;
* a model without a timestep input advances one step per call, and ``num_steps`` bounds a
  generation; a graph without the timestep input after one with it (graph breaks leave the
  input in one graph) belongs to that call's step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class Tick:
    """Where one call falls."""

    step: int          # 1-indexed step of the current generation
    branch: object     # 0 for the first call of this step (with this key), 1 for the second ...;
                       # (name, k) for the k-th call under the cache context ``name``
    generation: int    # generations since the clock was made
    advanced: bool     # this call began its step
    restarted: bool    # this call began a new generation (the timestep moved back, or past num_steps)


class StepClock:
    def __init__(self, num_steps: Optional[int] = None):
        self.default_num_steps = num_steps            # the config's
        self.requested_num_steps: Optional[int] = None   # set_num_steps: outlives reset()
        # the generation's step count when this model runs a share of it (an expert): a preset's
        # codebook follows the generation's step size, not the share's length; outlives reset()
        self.preset_steps: Optional[int] = None
        self.generation = 0
        self.step = 0
        self.reset()

    def reset(self) -> None:
        """Forget the current generation: the next call is step 1."""
        if self.step:
            self.generation += 1
        self.step = 0
        self.num_steps: Optional[int] = (self.requested_num_steps if self.requested_num_steps is not None
                                         else self.default_num_steps)
        self.timestep: Optional[float] = None
        self.direction: int = 0
        self.branch_counts: dict = {}

    def set_num_steps(self, num_steps: Optional[int]) -> None:
        """``N`` for the current generation and the following ones, until set again (``None``:
        back to the config's)."""
        if num_steps is not None and (not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1):
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        self.requested_num_steps = num_steps
        self.num_steps = num_steps if num_steps is not None else self.default_num_steps

    @property
    def time(self) -> float:
        """The sampler's variable at the current step: the host timestep, else the step index."""
        return float(self.timestep) if self.timestep is not None else float(self.step)

    def tick(self, timestep: Optional[float], key: object = None, name: Optional[str] = None) -> Tick:
        """Place one model call whose host timestep is ``timestep`` (None: no timestep input);
        ``name``: the cache context it is made under (None: branches by call order)."""
        before = (self.generation, self.step)
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
        count = self.branch_counts.get((key, name), 0)
        self.branch_counts[(key, name)] = count + 1
        branch = count if name is None else (name, count)
        return Tick(self.step, branch, self.generation, advanced=(self.generation, self.step) != before,
                    restarted=self.generation != before[0])

    def _advance(self) -> None:
        self.step += 1
        self.branch_counts = {}

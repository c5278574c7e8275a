"""Record the metric's trajectory of uncached generations: at every step, the partial sums of the
fused metric op between the probe there and the probe of each of the ``max_gap`` steps before it.

That table is all the scheduler ever reads: a cached generation whose last computed step is ``p``
takes, at its next computed step ``s``, the sums of the pair ``(s, s - p)``, and every gap a
codebook can produce is at most its largest rate. So one uncached generation predicts the schedule
of every codebook whose rates stay within ``max_gap`` (on the uncached trajectory: a cached run
perturbs its own probes a little, which ``calibrate`` checks by running the result).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from ..ops import fused_cache_metrics
from ..runtime.policies import motion_score


@dataclass
class Trajectory:
    """The recorded metric of one uncached generation."""

    num_steps: int = 0
    has_motion: bool = False
    sums: dict = field(default_factory=dict)   # (step, gap) -> [5 partial sums], branches summed

    def motion(self, step: int) -> float:
        """MoReg's motion score ``m`` of the probe at ``step`` (NaN: not recorded, or no frames)."""
        sums = self.sums.get((step, 1))
        if sums is None or not self.has_motion:
            return float("nan")
        return motion_score(sums)

    def to_dict(self) -> dict:
        return {"num_steps": self.num_steps, "has_motion": self.has_motion,
                "sums": [[s, g, *v] for (s, g), v in sorted(self.sums.items())]}

    @classmethod
    def from_dict(cls, d: dict) -> "Trajectory":
        return cls(int(d["num_steps"]), bool(d["has_motion"]),
                   {(int(row[0]), int(row[1])): [float(v) for v in row[2:]] for row in d["sums"]})


class TrajectoryRecorder:
    """Installed on a backend's runtime while ``calibrate`` runs uncached generations.

    Keeps the last ``max_gap`` probes per graph and guidance branch (memory: ``max_gap`` probe
    tensors, during calibration only)."""

    def __init__(self, max_gap: int):
        if not isinstance(max_gap, int) or max_gap < 1:
            raise ValueError(f"max_gap must be a positive integer, got {max_gap!r}")
        self.max_gap = max_gap
        self.runs: list = []
        self._pending: dict = {}    # (step, gap) -> device tensor of sums, for the run in flight
        self._probes: dict = {}     # (graph, branch) -> deque of (step, probe view)

    def start_run(self) -> None:
        self.finish_run()
        self.runs.append(Trajectory())
        self._probes.clear()

    def finish_run(self) -> None:
        """Read the sums of the run in flight on the host (one sync per run)."""
        if self.runs and self._pending:
            run = self.runs[-1]
            for key, sums in self._pending.items():
                run.sums[key] = [float(v) for v in sums.tolist()]
        self._pending = {}

    def record(self, key, step: int, probe: torch.Tensor, stride: int, has_motion: bool) -> None:
        """A computed step's probe (viewed ``(B, frames, inner)``) of graph/branch ``key``."""
        if not self.runs:
            self.start_run()
        run = self.runs[-1]
        kept = self._probes.setdefault(key, deque(maxlen=self.max_gap))
        for previous_step, previous in kept:
            gap = step - previous_step
            if 1 <= gap <= self.max_gap and previous.shape == probe.shape:
                sums = fused_cache_metrics(probe, previous, stride).sum(0)
                old = self._pending.get((step, gap))
                self._pending[(step, gap)] = sums if old is None else old + sums
        kept.append((step, probe.detach().clone()))
        run.num_steps = max(run.num_steps, step)
        run.has_motion = run.has_motion or has_motion

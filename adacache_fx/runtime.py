"""The guarded cache-or-compute runtime of one rewritten graph.

``CachedGraph.__call__`` is what Dynamo calls in place of the graph. It asks the
scheduler for the step's decision (host-side state: no graph break, no recompile),
runs the top-level split module whose region pieces are ``RegionRunner``s, then keeps
the deltas and feeds the probe to the metric op. On a reused step it touches no
device value on the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import sympy
import torch

from .scheduler import AdaCacheScheduler
from .triton_kernels import fused_cache_metrics


@dataclass
class BranchCache:
    """What one guidance branch keeps between steps."""

    generation: int
    step: int                       # the computed step the deltas belong to
    deltas: list                    # per region: [delta per stream]
    stream_shapes: list             # shapes of the graph's activation inputs when cached
    probe: Optional[torch.Tensor]   # probe residual at ``step`` (None: no metric next time)

    def nbytes(self) -> int:
        tensors = [d for region in self.deltas for d in region]
        if self.probe is not None:
            tensors.append(self.probe)
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class CallState:
    compute: bool = True
    deltas: list = field(default_factory=list)


class RegionRunner(torch.nn.Module):
    """Stands in for a region piece: computes it, or rebuilds its outputs from the cache."""

    def __init__(self, index: int, compute_fn, reuse_fn, state: CallState):
        super().__init__()
        self.index = index
        self.compute_fn = compute_fn
        self.reuse_fn = reuse_fn
        self.state = state
        self.executions = 0   # how often the blocks really ran (tests count this)

    def forward(self, *args):
        if self.state.compute:
            self.executions += 1
            return self.compute_fn(*args)
        return self.reuse_fn(*args, *self.state.deltas[self.index])


class CachedGraph:
    """Callable returned to Dynamo for a graph with cacheable regions."""

    def __init__(self, *, top, runners: list, scheduler: AdaCacheScheduler, state: CallState,
                 cache_outputs, timestep_index: Optional[int], frame_axis, symbol_sources: dict,
                 moreg_stride: int, analysis):
        self.top = top
        self.runners = runners
        self.scheduler = scheduler
        self.state = state
        self.outputs = cache_outputs
        self.timestep_index = timestep_index
        self.frame_axis = frame_axis
        self.symbol_sources = symbol_sources   # sympy symbol -> (arg index, dim) for dynamic shapes
        self.moreg_stride = moreg_stride
        self.analysis = analysis
        self.branches: dict = {}
        self.activation_indices: list = []     # graph inputs that are not parameters

    # ----- helpers -----------------------------------------------------------
    def _timestep(self, args) -> Optional[float]:
        if self.timestep_index is None:
            return None
        t = args[self.timestep_index]
        if isinstance(t, torch.Tensor):
            return float(t.reshape(-1)[0])  # one host read per call; free for CPU timesteps
        return float(t)

    def _eval(self, expr, args) -> int:
        if isinstance(expr, (int, sympy.Integer)):
            return int(expr)
        subs = {}
        for sym in expr.free_symbols:
            src = self.symbol_sources.get(sym)
            if src is None:
                raise ValueError(f"cannot bind symbol {sym}")
            idx, dim = src
            a = args[idx]
            subs[sym] = a.shape[dim] if dim is not None else int(a)
        return int(expr.subs(subs))

    def _probe_view(self, probe: torch.Tensor, args) -> torch.Tensor:
        if self.frame_axis is None:
            return probe.reshape(probe.shape[0] if probe.dim() > 1 else 1, 1, -1)
        axis = self.frame_axis
        if axis.segmented:  # text tokens around the video tokens: measure the video tokens only
            start = self._eval(axis.offset, args)
            length = self._eval(axis.span, args) if axis.span is not None else probe.shape[axis.dim] - start
            probe = probe.narrow(axis.dim, start, length)
        frames = self._eval(axis.frames, args)
        inner = self._eval(axis.inner, args) * math.prod(probe.shape[axis.dim + 1:])
        return probe.reshape(-1, frames, inner)

    # ----- the guarded call -----------------------------------------------------
    def __call__(self, *args):
        decision = self.scheduler.begin_call(self._timestep(args), key=self)
        cache = self.branches.get(decision.branch)
        compute = decision.compute
        if not compute:
            valid = (cache is not None and cache.generation == decision.generation
                     and cache.step == self.scheduler.last_computed_step)
            compute = not valid
        self.state.compute = compute
        self.state.deltas = cache.deltas if (cache is not None and not compute) else []
        if not compute and self._shape_changed(cache, args):
            self.state.compute = compute = True
        result = self.top(*args)
        n = self.outputs.num_user_outputs
        if compute:
            self._store(decision, cache, result, args)
        user = result[:n]
        if not self.outputs.user_output_is_tuple:
            return user[0]
        return list(user) if isinstance(result, list) else tuple(user)

    def _shape_changed(self, cache: BranchCache, args) -> bool:
        return cache.stream_shapes != self._current_shapes(args)

    def _current_shapes(self, args) -> list:
        # Deltas are only valid for the input shapes they were computed at (a batch-size
        # change inside a generation must recompute, not add a wrong-shaped delta).
        return [tuple(args[i].shape) if isinstance(args[i], torch.Tensor) else args[i]
                for i in self.activation_indices]

    def _store(self, decision, cache: Optional[BranchCache], result, args) -> None:
        deltas: list = [[] for _ in self.runners]
        for (r, _s, index) in self.outputs.deltas:
            deltas[r].append(result[index])
        probe = result[self.outputs.probe_index]
        scheduled = decision.compute
        step = self.scheduler.last_computed_step
        if scheduled and cache is not None and cache.probe is not None and cache.generation == decision.generation \
                and len(self.scheduler.computed_steps) >= 2 and cache.step == self.scheduler.computed_steps[-2]:
            current = self._probe_view(probe, args)
            previous = self._probe_view(cache.probe, args)
            if current.shape == previous.shape:
                sums = fused_cache_metrics(current, previous, self.moreg_stride).sum(0)
                self.scheduler.add_metric_sums(sums, has_motion=self.frame_axis is not None)
        self.branches[decision.branch] = BranchCache(
            generation=decision.generation, step=step, deltas=deltas,
            stream_shapes=self._current_shapes(args),
            probe=probe.detach() if scheduled else None)

    def reset(self) -> None:
        self.branches.clear()

    def cache_bytes(self) -> int:
        return sum(c.nbytes() for c in self.branches.values())

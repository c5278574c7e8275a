"""Guard: the cache-or-compute runtime of one rewritten graph.

``CachedGraph.__call__`` is what Dynamo calls in place of the graph. It finds which model
instance the call belongs to (by the weights it received), asks that instance's scheduler
for the step's decision (host-side state: no graph break, no recompile), runs the split top
level whose region pieces are ``RegionRunner``s, then keeps the deltas and feeds the probe to
the metric op (under a shard of the frames, with the frame pairs across the shard boundary:
``collectives.shard_boundary_sums``). Its caches and how a computed step is stored are the
``BranchStore``'s (``branch_store.py``), shared with the block-list guard; a schedule per sample
runs through ``PerSampleCalls``. On a reused step it reads no device value on the host.
"""
from __future__ import annotations

import collections
import logging
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Optional

import sympy
import torch

from .branch_store import BranchCache, BranchStore
from .collectives import shard_boundary_sums
from .per_sample_calls import PerSampleCalls, exception_summary
from .state import RuntimeState
from .sub_batch import gather, narrow_rows, scatter

logger = logging.getLogger(__name__)


@dataclass
class CallState:
    """The decision of the call in flight, read by the region runners."""

    compute: bool = True
    deltas: list = field(default_factory=list)
    rows: Optional[torch.Tensor] = None     # compute only these batch rows (per-sample schedules)
    padded: Optional[torch.Tensor] = None   # ``rows`` padded to the traced minimum batch
    batch: int = 0                          # batch rows of the call
    plan: object = None                     # sub_batch.SubBatchPlan of the graph


class RegionRunner(torch.nn.Module):
    """Stands in for a region piece: computes it, or rebuilds its outputs from the cache."""

    def __init__(self, index: int, compute_fn, reuse_fn, state: CallState, probe_position: Optional[int] = None):
        super().__init__()
        self.index = index
        self.compute_fn = compute_fn
        self.reuse_fn = reuse_fn
        self.state = state
        self.probe_position = probe_position   # where the probe is among this piece's outputs
        self.executions = 0   # how often the blocks really ran (tests count this)
        # batch rows of each recent execution under per-sample schedules (tests and benchmarks count them)
        self.batch_rows: collections.deque = collections.deque(maxlen=4096)
        self.layouts: list = []   # (shape, stride) of each output on the last computed call

    def forward(self, *args):
        state = self.state
        if state.compute and state.rows is None:
            self.executions += 1
            outputs = self.compute_fn(*args)
            self.layouts = [(o.shape, o.stride()) if isinstance(o, torch.Tensor) else None for o in outputs]
            if state.plan is not None:
                self.batch_rows.append(state.batch)
            return outputs
        outputs = self.reuse_fn(*args, *state.deltas[self.index])
        if state.compute:   # some samples compute: their rows alone, scattered into the reused outputs
            outputs = self._some_rows(args, outputs)
        return tuple(_same_layout(o, layout) for o, layout in zip(outputs, self.layouts))

    def _some_rows(self, args, reused):
        state, plan = self.state, self.state.plan
        self.executions += 1
        self.batch_rows.append(state.padded.numel())
        sub = self.compute_fn(*[gather(a, spec, state.padded, state.batch)
                                for a, spec in zip(args, plan.inputs[self.index])])
        outputs = []
        for position, (full, part, spec) in enumerate(zip(reused, sub, plan.outputs[self.index])):
            if position == self.probe_position:   # the probe of the computed rows only (the reuse path has none)
                outputs.append(narrow_rows(part, spec, state.rows.numel(), state.padded.numel()))
            else:
                outputs.append(scatter(full, part, spec, state.rows, state.batch))
        return tuple(outputs)


def _same_layout(value, layout):
    """``value`` with the strides the compute path gave that output (a stream that is a strided
    view there, Flux's image tokens sliced out of the joint sequence, comes out of ``in + delta``
    dense): the pieces after the region are compiled for one layout (inductor asserts strides)."""
    if layout is None or not isinstance(value, torch.Tensor):
        return value
    shape, stride = layout
    if value.shape != shape or value.stride() == stride:
        return value
    out = torch.empty_strided(shape, stride, dtype=value.dtype, device=value.device)
    return out.copy_(value)


@dataclass
class GraphLayout:
    """What the runtime needs to know about the graph's inputs and outputs."""

    num_user_outputs: int
    user_output_is_tuple: bool
    deltas: list                     # [(region, stream, output index)]
    probe_index: int
    timestep_index: Optional[int]    # graph input holding the timestep
    activation_indices: list         # graph inputs that are not parameters
    parameter_index: Optional[int]   # first parameter input: identifies the model instance
    frame_axis: object               # FrameAxis of the probe (None: no MoReg)
    symbol_sources: dict             # sympy symbol -> (input index, dim) for dynamic shapes
    moreg_stride: int = 1
    batch_source: Optional[tuple] = None   # (input index, dim) whose size is the batch rows (per-sample schedules)
    gather_index: Optional[int] = None     # graph input holding the video tokens' positions (FrameAxis.gather)

    def deltas_of_region(self, region: int) -> list:
        """The graph output index of each of ``region``'s deltas, in stream order."""
        return [index for (r, _s, index) in self.deltas if r == region]


class CachedGraph:
    """Callable returned to Dynamo for a graph with cacheable regions."""

    def __init__(self, *, top, regions: dict, layout: GraphLayout, runtime: RuntimeState,
                 process_group=None, region_info: Optional[list] = None, probe_positions: Optional[dict] = None,
                 sub_batch=None, flops=None, owner=None):
        self.top = top
        self.owner = owner             # the class (or function) Dynamo traced this graph from: RuntimeState.instance
        self.layout = layout
        self.runtime = runtime
        self.process_group = process_group
        self.region_info = region_info or []   # [(blocks, streams, probe block or None)]
        self.call = CallState()
        self.runners = []
        self.sub_batch = sub_batch     # SubBatchPlan: regions run on some samples' rows
        for r in sorted(regions):
            name, compute, reuse = regions[r]
            runner = RegionRunner(r, compute, reuse, self.call, (probe_positions or {}).get(r))
            setattr(top, name, runner)
            self.runners.append(runner)
        top.recompile()
        self.store = BranchStore(runtime, self)
        # a schedule per sample: the calls that run some rows (a graph whose batch is known)
        self.per_sample = PerSampleCalls(self) if runtime.config.per_sample and layout.batch_source is not None else None
        self._flops = flops            # () -> (FLOPs inside the regions, FLOPs of the graph), counted when asked
        self._instances: dict = {}     # id(weight) -> (weakref to it, instance index)
        self._values: dict = {}        # (sympy expression, the sizes it reads) -> its value
        self.reuse_step = None         # the fused reused step (rewrite.fuse_reuse), compiled; None: piece by piece
        self.reuse_step_inputs: list = []   # [(region, stream)]: the cached deltas it takes, in order
        self.reuse_step_terms = 0      # forecast terms it takes per delta (then one coefficient tensor)
        self.fused_reuses = 0          # reused calls that ran the fused step (tests count this)

    def fuse_reused_steps(self, reuse_step, delta_inputs: list, terms: int) -> None:
        """Run reused calls (every row reusing) as ``reuse_step(*graph inputs, *deltas and their
        forecast terms, coefficients)``: one compiled graph instead of the split top level piece by piece."""
        self.reuse_step = reuse_step
        self.reuse_step_inputs = list(delta_inputs)
        self.reuse_step_terms = terms

    @property
    def frame_axis(self):
        return self.layout.frame_axis

    @property
    def region_flops(self) -> int:
        """FLOPs of one call inside the cached regions (counted on the first ask)."""
        return self._counted_flops()[0]

    @property
    def total_flops(self) -> int:
        """FLOPs of one call of the whole graph (counted on the first ask)."""
        return self._counted_flops()[1]

    def _counted_flops(self) -> tuple:
        if callable(self._flops):
            self._flops = self._flops()
        return self._flops or (0, 0)

    # ----- which model, which step ----------------------------------------------
    def _instance(self, args) -> int:
        """The backend-wide model instance of this call: by the graph's first weight, the registered
        model's it belongs to, else numbered in order of first call within the graph's owner
        (``RuntimeState.instance``)."""
        index = self.layout.parameter_index
        if index is None:
            return self.runtime.instance((self.owner, 0))
        weight = args[index]
        entry = self._instances.get(id(weight))
        if entry is None or entry[0]() is not weight:
            key = self.runtime.registered_key(weight) or (self.owner, len(self._instances))
            entry = (weakref.ref(weight), self.runtime.instance(key))
            self._instances[id(weight)] = entry
        return entry[1]

    def _eval(self, expr, args) -> int:
        """A symbolic size of the graph at this call, from the inputs' sizes; evaluated once per
        set of sizes (the sizes rarely change, and sympy's substitution is slow on a hot path)."""
        if isinstance(expr, (int, sympy.Integer)):
            return int(expr)
        values = []
        for sym in sorted(expr.free_symbols, key=str):
            src = self.layout.symbol_sources.get(sym)
            if src is None:
                raise ValueError(f"cannot bind symbol {sym}")
            idx, dim = src
            a = args[idx]
            values.append((sym, a.shape[dim] if dim is not None else int(a)))
        key = (expr, tuple(v for _s, v in values))
        value = self._values.get(key)
        if value is None:
            value = self._values[key] = expr.subs(dict(values))
        if not value.is_integer:
            raise ValueError(f"{expr} = {value} at this call: not a whole number")
        return int(value)

    def _probe_view(self, probe: torch.Tensor, args) -> tuple:
        """``(view, has_frames)``: the probe as ``(B', frames, inner)`` for the metric op; without
        frames ``(B, 1, -1)``: no frame axis, or sizes that do not split into whole frames at this
        call (a shard holding part of a frame; every rank has the same sizes, so every rank then
        measures without motion alike). The distance never depends on the view."""
        axis = self.layout.frame_axis
        if axis is not None:
            try:
                return self._frame_view(probe, axis, args), True
            except ValueError:
                logger.debug("adacache: the probe does not split into whole frames at this call: no motion score")
        return probe.reshape(probe.shape[0] if probe.dim() > 1 else 1, 1, -1), False

    def _frame_view(self, probe: torch.Tensor, axis, args) -> torch.Tensor:
        if axis.segmented:  # text tokens around the video tokens: measure the video tokens only
            start = self._eval(axis.offset, args)
            length = self._eval(axis.span, args) if axis.span is not None else probe.shape[axis.dim] - start
            probe = probe.narrow(axis.dim, start, length)
            if axis.gather is not None:   # the video tokens sit at the positions an input holds
                probe = probe.index_select(axis.dim, args[self.layout.gather_index])
        if axis.shard is None:
            frames = self._eval(axis.frames, args)
        else:   # from the split's unsplit sizes (the rules never change ``frames``): alike on every rank
            _index, count, total, frame_size = axis.shard
            total, frame_size = self._eval(total, args), self._eval(frame_size, args)
            if total % (count * frame_size):
                raise ValueError(f"{count} shards of {total} elements do not hold whole frames of {frame_size}")
            frames = total // (count * frame_size)
        inner = self._eval(axis.inner, args)
        return probe.reshape(-1, frames, inner * math.prod(probe.shape[axis.dim + 1:]))

    # ----- the guarded call -----------------------------------------------------
    def __call__(self, *args):
        instance = self._instance(args)
        branches = self.store.branches(instance)
        scheduler = self.runtime.scheduler(instance)
        if scheduler.process_group is None:
            scheduler.process_group = self.process_group
        ts = self.layout.timestep_index
        timestep = self.runtime.timesteps.timestep(args[ts] if ts is not None else None)
        if self.per_sample is not None:
            return self._user_outputs(self.per_sample(args, scheduler, branches, timestep))
        decision = scheduler.begin_call(timestep, key=self, name=self.runtime.context_name)
        cache = branches.get(decision.branch)
        compute = decision.compute or not (cache is not None and cache.generation == decision.generation
                                           and cache.step == scheduler.last_computed_step)
        # Deltas are only valid for the input shapes they were computed at (a batch-size
        # change inside a generation must recompute, not add a wrong-shaped delta).
        if not compute and cache.stream_shapes != self._current_shapes(args):
            compute = True
        self.call.compute = compute
        if not compute and self.reuse_step is not None:
            fused = self._fused_reuse(args, cache, scheduler.clock.time)
            if fused is not None:
                return self._user_outputs(fused)
        self.call.deltas = [] if compute else self.store.reused_deltas(cache, scheduler.clock.time)
        result = self.top(*args)
        if compute:
            branches[decision.branch] = self._store(scheduler, decision, cache, result, args)
        return self._user_outputs(result)

    def _fused_reuse(self, args, cache: BranchCache, time: float):
        """The reused call as one compiled graph, the forecast inside it; None if the forecaster's
        terms are not the graph's (``set_config`` changed ``reuse``) or it fails (then this graph
        reuses piece by piece from now on, with a warning: the split top level is the tested path)."""
        terms = self.reuse_step_terms
        if self.store.forecaster.terms != terms:
            return None
        inputs = []
        for r, s in self.reuse_step_inputs:
            delta = cache.deltas[r][s]
            inputs.append(delta.contiguous())
            # no terms yet (the first computed step of a generation): the delta, with coefficient 0
            inputs.extend(t.contiguous() for t in (cache.terms[r][s] if cache.terms is not None else [delta] * terms))
        if terms:
            coefficients = self.store.coefficients(cache, time) or (0.0,) * terms
            inputs.append(torch.tensor(coefficients, dtype=torch.float32).to(inputs[0].device, non_blocking=True))
        try:
            result = self.reuse_step(*args, *inputs)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"adacache: the fused reused step failed ({exception_summary(exc)}); this graph "
                          "reuses piece by piece from now on", UserWarning, stacklevel=3)
            self.reuse_step = None
            return None
        self.fused_reuses += 1
        return result

    def _user_outputs(self, result):
        user = result[:self.layout.num_user_outputs]
        if not self.layout.user_output_is_tuple:
            return user[0]
        return list(user) if isinstance(result, list) else tuple(user)

    def _current_shapes(self, args) -> list:
        return [tuple(args[i].shape) if isinstance(args[i], torch.Tensor) else args[i]
                for i in self.layout.activation_indices]

    def _store(self, scheduler, decision, cache: Optional[BranchCache], result, args) -> BranchCache:
        deltas: list = [[] for _ in self.runners]
        for (r, _s, index) in self.layout.deltas:
            deltas[r].append(result[index])
        return self.store.store(scheduler, decision, cache, deltas, result[self.layout.probe_index],
                                lambda probe: self._probe_view(probe, args), self._current_shapes(args),
                                boundary=self._shard_boundary)

    def _shard_boundary(self, sums: torch.Tensor, current: torch.Tensor, has_frames: bool) -> tuple:
        """This rank's frames of a sharded video: add the frame pairs across its shard's boundary."""
        shard = self.layout.frame_axis.shard if self.layout.frame_axis is not None else None
        if shard is None:
            return sums, has_frames
        stride = self.layout.moreg_stride
        if current.shape[1] < stride:   # fewer frames per shard than the stride (alike on every rank)
            return sums, False
        return sums + shard_boundary_sums(current, stride, shard[:2], self.process_group), has_frames

    # ----- state ----------------------------------------------------------------
    def reset(self) -> None:
        self.store.reset()

    def cache_bytes(self, instance: Optional[int] = None) -> int:
        return self.store.nbytes(instance)

    def instance_of(self, weights) -> Optional[int]:
        """The instance index of a model whose parameters include one of ``weights``."""
        for w in weights:
            entry = self._instances.get(id(w))
            if entry is not None and entry[0]() is w:
                return entry[1]
        return None

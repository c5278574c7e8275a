"""Guard at the block-list level: the cache-or-compute runtime for a model whose Dynamo graph
breaks inside its blocks (``compile_model(model, config, block_guard="modules")``).

No graph holds a whole block there, so the guard sits at the blocks' calls instead of inside a
graph. The first call runs eagerly and is observed (``passes/analysis/find_module_blocks.py``: which
module lists hold blocks, their streams, the regions); then each block of a region gets a
``forward`` that Dynamo does not trace (``torch._dynamo.disable``: the model's graph breaks at
each block call, as it already broke inside each block) and that decides, from the step's
decision taken once per model call:

    computed step   block i runs its own compiled forward (``torch.compile`` with the inner
                    compiler; one compile serves every block of a class); the region's first
                    block's stream inputs and last block's outputs give one delta per stream
    reused step     no block runs (nor its Python): each block but the last returns the streams
                    it receives, and the last returns the region's input (kept at its first block)
                    plus the delta (or its forecast). The model's own code between the calls runs
                    as it does on a computed step; its effect is inside the delta, so it is not
                    counted twice (the last block ignores what it receives)

Streams are keyed by the block's parameter names (a stream passed by position on one call and
by keyword on the next is the same), and the guard keeps no tensor of the observed call.
The probe is the ``probe_branch``-th residual (0: the attention's) that the probe block adds to its
first stream, as under the graph guard: that block runs its own forward eagerly on computed steps,
followed by ``residual_probe.StreamResidual`` (its output delta when no such add is seen, said in
``describe``). The probe block is the middle block of the longest region, or ``probe_block`` (a
module path, ``"temporal_blocks.1"``, or an index over that region). MoReg needs the frame count: ``frames_arg``,
with the video tokens frame-major in dim 1 of the probe. The schedule is the scheduler's, with
the same contract as the graph-level guard: the decision is taken once per model call, before any
block runs.
"""
from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..passes.analysis.find_module_blocks import (BlockCall, bind_arguments, block_containers, group_calls,
                                                  output_tensors, side_outputs, tensor_inputs, without_tensors)
from ..errors import AdaCacheConfigError
from ..passes.analysis.find_timestep import is_timestep_name
from ..passes.analysis.process_group import resolve_process_group
from ..passes.analysis.resolve_probe import resolve_probe_block
from .branch_store import BranchCache, BranchStore
from .residual_probe import StreamResidual, run_with_residual

logger = logging.getLogger(__name__)


class RegionExecutions:
    """How often a region's blocks really ran (``report().block_executions``)."""

    def __init__(self):
        self.executions = 0


@dataclass
class _Call:
    """The model call in flight."""

    active: bool = False
    compute: bool = True           # the blocks run (the schedule's decision, or no valid cache)
    decision: object = None        # the scheduler's CallDecision
    cache: Optional[BranchCache] = None
    deltas: list = field(default_factory=list)   # per region: what a reused region's last block adds
    computing: list = field(default_factory=list)  # per region: its blocks run on this call
    inputs: dict = field(default_factory=dict)     # region -> its first block's stream inputs
    outputs: dict = field(default_factory=dict)    # region -> its last block's stream outputs
    probe: Optional[torch.Tensor] = None
    frames: Optional[int] = None
    reuse_inputs: dict = field(default_factory=dict)   # region -> its first block's streams on a reused step
    executions: list = field(default_factory=list)     # the runners' counts when the call began (a retry)


class ModuleBlockGuard:
    """Installed by ``compile_model(block_guard="modules")``; one per compiled model."""

    def __init__(self, model: torch.nn.Module, runtime, compile_block: Callable[[Callable], Callable]):
        self.runtime = runtime
        self.compile_block = compile_block
        self.containers = block_containers(model)
        self._model = weakref.ref(model)
        self._weights = {id(p) for p in model.parameters()}
        self.signature = inspect.signature(model.forward)
        self.regions: list = []
        self.notes: list = []          # why observed calls are no region
        self.observed = False
        self.why_uncached: Optional[str] = None   # set when the observed call found no region
        self.runners: list = []        # RegionExecutions per region
        self.region_info: list = []    # [(blocks, streams, probe block or None)] as CachedGraph's
        self.region_flops = 0
        self.total_flops = 0
        self.probe: Optional[tuple] = None   # (region, position in it)
        self.probe_forward: Optional[Callable] = None   # the probe block's own forward (eager)
        self.timestep_name: Optional[str] = None
        self.call = _Call()
        # one model instance: its own backend-wide schedule (the registered model's, if it is)
        self.instance = runtime.instance(runtime.register_model(model))
        self.store = BranchStore(runtime, self)
        self.originals: list = []      # (block, its forward attribute before install or None): the undo record
        if not self.containers:
            raise AdaCacheConfigError(
                f"block_guard='modules': {type(model).__name__} has no module list of blocks (a ModuleList, "
                "Sequential or ModuleDict of modules of one class); use block_guard='graph'")

    # ----- the first call: observe, then install the block forwards --------------
    def observe(self, run: Callable, args: tuple, kwargs: dict, frames: Optional[int] = None):
        """Run the model eagerly (``run``) with hooks on the candidate blocks, find the regions,
        and install the guarded forwards. Returns the call's output: the generation's first
        computed step, whose deltas and probe are kept."""
        calls, handles, depth, flops = [], [], [0], FlopCounterMode(display=False)
        starts: dict = {}
        recorders: list = []   # the residual recorder of the block call in flight (the probe is not chosen yet)
        for container, members in self.containers.items():
            for index, (path, module) in enumerate(members):
                handles.append(module.register_forward_pre_hook(
                    self._pre_hook(depth, flops, starts, path, recorders), with_kwargs=True))
                handles.append(module.register_forward_hook(
                    self._post_hook(depth, flops, starts, calls, container, index, path, recorders), with_kwargs=True))
        try:
            with flops:
                output = run(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            while recorders:   # a block that raised: its recorder is still entered
                recorders.pop().__exit__(None, None, None)
        regions, notes = group_calls(calls)
        self.notes = notes
        if not regions:
            self.observed = True
            self.why_uncached = ("block_guard='modules': no module list whose calls continue their inputs "
                                 "(streams): " + "; ".join(notes or ["no candidate block was called"]))
            return output
        # what can raise (the user's config against the model) before any state changes: a
        # failed first call leaves the guard unobserved, and the next call observes again
        timestep_name = self._timestep_argument(args, kwargs)
        probe = self._choose_probe(regions)
        self.timestep_name, self.probe = timestep_name, probe
        self.total_flops = flops.get_total_flops()
        self.region_flops = sum(c.flops for region in regions for c in region.calls)
        self.regions = [without_tensors(region) for region in regions]   # the guard holds no tensor of this call
        self.observed = True
        self._install()
        self.begin_call(args, kwargs, frames)
        self._store_observed(regions)
        self.end_call()
        return output

    def _pre_hook(self, depth, flops, starts, path, recorders):
        branch = self.runtime.config.probe_branch

        def hook(module, args, kwargs):
            depth[0] += 1
            starts[path] = flops.get_total_flops()
            if depth[0] == 1:   # each floating input may be the stream the block continues: follow all
                arguments = bind_arguments(_signature(module.forward), args, kwargs)
                streams = {key: t for key, t in tensor_inputs(arguments) if t.is_floating_point() and t.dim() >= 2}
                recorders.append(StreamResidual(streams, branch).__enter__())
        return hook

    def _post_hook(self, depth, flops, starts, calls, container, index, path, recorders):
        def hook(module, args, kwargs, output):
            depth[0] -= 1
            residuals = {}
            if depth[0] == 0 and recorders:
                recorder = recorders.pop()
                recorder.__exit__(None, None, None)
                residuals = recorder.residuals
            if depth[0] == 0:   # a candidate called inside another one's call is part of that block
                arguments = bind_arguments(_signature(module.forward), args, kwargs)
                sides, why_not = side_outputs(output, arguments)
                if why_not:
                    why_not = f"{why_not} ({_where(module)})"
                calls.append(BlockCall(container, index, path, tensor_inputs(arguments),
                                       None if why_not else output_tensors(output), why_not=why_not, sides=sides,
                                       structure=type(output), flops=flops.get_total_flops() - starts[path],
                                       residuals=residuals))
        return hook

    def _timestep_argument(self, args, kwargs) -> Optional[str]:
        """The forward argument that carries the timestep: ``timestep_arg``, else the one floating
        tensor of one value per batch row (or one value), else None (each call is a step)."""
        config = self.runtime.config
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        if config.timestep_arg is not None:
            if config.timestep_arg not in self.signature.parameters:
                raise AdaCacheConfigError(f"adacache: timestep_arg={config.timestep_arg!r} names no argument of "
                                          f"forward{self.signature}")
            return config.timestep_arg
        tensors = [v for v in bound.values() if isinstance(v, torch.Tensor) and v.dim()]
        batch = tensors[0].shape[0] if tensors else 1
        found = [name for name, v in bound.items()
                 if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() <= 1 and v.numel() in (1, batch)]
        if not found:   # per-frame or per-token timesteps ((B, F), (B, N)): a 2-D / 3-D one named like a timestep
            found = [name for name, v in bound.items()
                     if isinstance(v, torch.Tensor) and v.is_floating_point() and 2 <= v.dim() <= 3
                     and v.shape[0] in (1, batch) and is_timestep_name(name)]
        if len(found) > 1:   # the timestep beside fps / height / width conditioning: the one named like it
            found = [name for name in found if is_timestep_name(name)] or found
        if len(found) > 1:
            raise AdaCacheConfigError(f"adacache: block_guard='modules': several arguments could be the timestep "
                                      f"({found}); name it with AdaCacheConfig(timestep_arg=...)")
        if not found and config.num_steps is None:
            raise AdaCacheConfigError("adacache: no timestep argument found (a floating tensor of one value per "
                                      "batch row), so every call is a step and AdaCacheConfig(num_steps=...) is "
                                      "required (or name it with timestep_arg=...)")
        return found[0] if found else None

    def _choose_probe(self, regions: list) -> tuple:
        """``(region, position)``: the middle block of the longest region, or ``probe_block`` (an
        index over that region's blocks, negative from the end, or a module path)."""
        longest = max(range(len(regions)), key=lambda i: (len(regions[i].paths), -i))
        return resolve_probe_block(self.runtime.config.probe_block, [region.paths for region in regions], longest)

    def _install(self) -> None:
        model = self._model()
        modules = dict(model.named_modules())
        self.runners = [RegionExecutions() for _ in self.regions]
        for r, region in enumerate(self.regions):
            for j, path in enumerate(region.paths):
                module = modules[path]
                signature = _signature(module.forward)
                self.originals.append((module, module.__dict__.get("forward")))
                if self.probe == (r, j):   # runs its own forward on computed steps, its residual followed
                    self.probe_forward = module.forward
                module.forward = self._guarded_forward(r, j, self.compile_block(module.forward), signature)
        self.region_info = [(region.paths, region.shapes,
                             region.paths[self.probe[1]] if self.probe[0] == r else None)
                            for r, region in enumerate(self.regions)]

    def _store_observed(self, regions: list) -> None:
        """The observed call (``regions`` with its tensors) is the generation's first computed step:
        record its calls as a computed call's blocks record theirs."""
        for r, region in enumerate(regions):
            last = len(region.calls) - 1
            for j, call in enumerate(region.calls):
                residual = None
                if self.probe == (r, j):   # its residual on its stream, followed while the call ran
                    key = next((k for k in call.streams if k is not None), None)
                    residual = call.residuals.get(key)
                    if residual is None:
                        self.notes.append(f"probe {call.path}: no residual branch {self.runtime.config.probe_branch} "
                                          "added to its stream was seen; its output delta is the probe")
                self._record(r, j, last, self.probe == (r, j), call.streams, dict(call.inputs), call.outputs, residual)

    # ----- per model call ----------------------------------------------------------
    def begin_call(self, args: tuple, kwargs: dict, frames: Optional[int] = None) -> None:
        """The step's decision, taken once for the whole call, before any block runs."""
        if not self.regions:   # nothing to guard: the model runs as compiled
            return
        scheduler = self.runtime.scheduler(self.instance)
        if scheduler.process_group is None:   # "auto": the world (no graph holds the model's collectives)
            scheduler.process_group = resolve_process_group(self.runtime.config.process_group)
        value = None
        if self.timestep_name is not None:
            value = self.signature.bind_partial(*args, **kwargs).arguments.get(self.timestep_name)
        timestep = self.runtime.timesteps.timestep(value)
        decision = scheduler.begin_call(timestep, key=self, name=self.runtime.context_name)
        cache = self.store.branches(self.instance).get(decision.branch)
        valid = (cache is not None and cache.generation == decision.generation
                 and cache.step == scheduler.last_computed_step)
        compute = decision.compute or not valid
        self.call = _Call(active=True, compute=compute, decision=decision, cache=cache,
                          computing=[compute] * len(self.regions), frames=frames,
                          executions=[runner.executions for runner in self.runners])
        if not compute:
            self.call.deltas = self.store.reused_deltas(cache, scheduler.clock.time)

    def restart_call(self) -> None:
        """The call is run again (traced without data-dependent capture): forget what it recorded."""
        call = self.call
        call.inputs, call.outputs, call.reuse_inputs, call.probe = {}, {}, {}, None
        for runner, count in zip(self.runners, call.executions):
            runner.executions = count

    def end_call(self) -> None:
        call, self.call = self.call, _Call()
        if call.compute and self.regions and all(call.computing):
            self._store(call)

    def abort_call(self) -> None:
        self.call = _Call()

    # ----- the block forwards ----------------------------------------------------------
    def _guarded_forward(self, r: int, j: int, compiled: Callable, signature: Optional[inspect.Signature]):
        region = self.regions[r]   # without tensors
        last = len(region.paths) - 1
        region_streams, streams = list(region.streams), region.calls[j].streams
        structure, sides = region.calls[j].structure, region.calls[j].sides
        is_probe = self.probe == (r, j)
        path = region.paths[j]

        def compute(args, kwargs, arguments):
            """Run the block and record it: the probe block its own forward, its residual followed."""
            if is_probe:
                output, residual = self._probe_residual(self.probe_forward, streams, arguments, args, kwargs)
            else:
                output, residual = compiled(*args, **kwargs), None
            self._record(r, j, last, is_probe, streams, arguments, output, residual)
            return output

        @torch._dynamo.disable   # the decision is host state: Dynamo breaks the graph at the call
        def forward(*args, **kwargs):
            call = self.call
            if not call.active:
                return compiled(*args, **kwargs)
            if call.computing[r]:   # the inputs matter to the first block and the probe only
                return compute(args, kwargs, bind_arguments(signature, args, kwargs) if j == 0 or is_probe else {})
            arguments = bind_arguments(signature, args, kwargs)
            if j == 0 and not self._reusable(r, arguments):
                call.computing[r] = True   # the streams changed shape: this region computes (when in doubt)
                return compute(args, kwargs, arguments)
            if j == 0:   # the region's input, kept for its last block (a copy: glue may work in place)
                call.reuse_inputs[r] = [None if key is None else (arguments[key] if last == 0 else arguments[key].clone())
                                        for key in region_streams]
            if j < last:   # pass the streams on: the region's result comes from its last block
                values = [None if key is None else _stream(arguments, key, path) for key in streams]
            else:          # the region's input plus the deltas, whatever glue ran between the blocks
                deltas = iter(call.deltas[r])
                values = [None if value is None else value + next(deltas) for value in call.reuse_inputs.pop(r)]
            for k, key in sides.items():   # side state passed through (a dict the blocks hand on)
                values[k] = arguments.get(key)
            return _rebuild(structure, values)

        return forward

    def _reusable(self, r: int, arguments: dict) -> bool:
        region = self.regions[r]
        deltas = iter(self.call.deltas[r])
        for key in region.streams:
            if key is None:
                continue
            value = arguments.get(key)
            if not isinstance(value, torch.Tensor) or value.shape != next(deltas).shape:
                return False
        return True

    def _probe_residual(self, forward, streams: list, arguments: dict, args: tuple, kwargs: dict) -> tuple:
        """``(output, residual)`` of the probe block: its ``probe_branch``-th residual on its first stream."""
        key = next((k for k in streams if k is not None), None)
        stream = arguments.get(key) if key is not None else None
        return run_with_residual(forward, stream if isinstance(stream, torch.Tensor) else None,
                                 self.runtime.config.probe_branch, args, kwargs)

    def _record(self, r, j, last, is_probe, streams, arguments: dict, output, residual=None) -> None:
        call = self.call
        if j == 0:
            self.runners[r].executions += 1
            call.inputs[r] = [None if key is None else arguments.get(key) for key in self.regions[r].streams]
        if j == last:
            call.outputs[r] = output_tensors(output)
        if is_probe:
            call.probe = residual if residual is not None else _block_delta(output_tensors(output), arguments, streams)

    # ----- after a computed call: deltas, probe, metric -------------------------------
    def _store(self, call: _Call) -> None:
        scheduler = self.runtime.scheduler(self.instance)
        deltas = []
        for r in range(len(self.regions)):
            ins, outs = call.inputs.get(r), call.outputs.get(r)
            if ins is None or outs is None or len(ins) != len(outs) or any(
                    (i is None) != (o is None) or (i is not None and i.shape != o.shape) for i, o in zip(ins, outs)):
                logger.debug("adacache: region %d's streams changed shape inside the call: nothing cached", r)
                return
            deltas.append([(o - i).detach() for i, o in zip(ins, outs) if i is not None])
        frames, stride = call.frames, self.runtime.config.moreg_stride
        self.store.branches(self.instance)[call.decision.branch] = self.store.store(
            scheduler, call.decision, call.cache, deltas, call.probe, lambda probe: _probe_view(probe, frames, stride), [])

    # ----- the interface of CachedGraph that the backend's report and reset read ---------
    def reset(self) -> None:
        self.store.reset()

    def cache_bytes(self, instance: Optional[int] = None) -> int:
        return self.store.nbytes() if instance in (None, self.instance) else 0

    def uninstall(self) -> None:
        """Give every guarded block its own forward back (the undo record of ``_install``)."""
        for module, forward in reversed(self.originals):
            if forward is None:
                module.__dict__.pop("forward", None)   # the class's forward is seen again
            else:
                module.forward = forward
        self.originals = []

    def instance_of(self, weights) -> Optional[int]:
        return self.instance if any(id(w) in self._weights for w in weights) else None

    def describe(self) -> str:
        lines = [f"block guard (modules): {len(self.regions)} region(s)"]
        for r, region in enumerate(self.regions):
            probe = f", probe {region.paths[self.probe[1]]} (its output delta)" if self.probe[0] == r else ""
            lines.append(f"region {r}: {len(region.paths)} blocks ({region.paths[0]} .. {region.paths[-1]}), "
                         f"streams {[s for s in region.shapes if s is not None]}{probe}")
        lines.extend(f"not a region: {note}" for note in self.notes)
        return "\n".join(lines)


def _where(module: torch.nn.Module) -> str:
    """``Class.forward at file:line``: where a block that cannot be guarded is written."""
    forward = type(module).forward
    try:
        line = inspect.getsourcelines(forward)[1]
        return f"{type(module).__name__}.forward at {inspect.getsourcefile(forward)}:{line}"
    except (OSError, TypeError):
        return f"{type(module).__name__}.forward"


def _rebuild(structure: type, values: list):
    """A block's output of type ``structure`` from its values (a tensor, a tuple, a named tuple, a list)."""
    if issubclass(structure, torch.Tensor):
        return values[0]
    return structure(*values) if hasattr(structure, "_fields") else structure(values)


def _signature(forward: Callable) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(forward)
    except (TypeError, ValueError):
        return None


def _stream(arguments: dict, key, path: str) -> torch.Tensor:
    """A reused step's stream argument ``key`` of block ``path``; the blocks after a region's first
    one cannot compute instead (the ones before them did not run), so a missing one is an error."""
    value = arguments.get(key)
    if not isinstance(value, torch.Tensor):
        raise RuntimeError(f"adacache: block {path} was called without its stream argument {key!r} on a reused "
                           "step (the model calls its blocks differently from its first call); use "
                           "block_guard='graph' or call the blocks the same way on every step")
    return value


def _block_delta(outputs: Optional[list], inputs: dict, streams: list) -> Optional[torch.Tensor]:
    """A block's output minus the input it continues, on its first stream."""
    for out, key in zip(outputs or [], streams):
        if out is not None and key is not None and inputs.get(key) is not None:
            return (out - inputs[key]).detach()
    return None


def _probe_view(probe: torch.Tensor, frames: Optional[int], stride: int) -> tuple:
    """``(view, has_frames)``: ``(B, frames, -1)`` when ``frames`` splits dim 1 of the probe (video
    tokens frame-major there: ``frames_arg``), else ``(B, 1, -1)``; a motion score needs more
    frames than the frame stride."""
    if frames and probe.dim() >= 3 and probe.shape[1] % frames == 0:
        return probe.reshape(probe.shape[0], frames, -1), frames > stride
    return probe.reshape(probe.shape[0] if probe.dim() > 1 else 1, 1, -1), False

"""Find the block stack on the module tree and in one observed forward, for a model whose graph
breaks inside its blocks (``compile_model(model, config, block_guard="modules")``).

A graph-level region needs a Dynamo graph that holds whole blocks. When the graph breaks inside
every block (a Python loop over per-expert token counts: no capture setting keeps it in the
graph), no graph does, and the blocks are found on the module tree and at their calls instead:

    candidates   every ModuleList / Sequential / ModuleDict whose members are modules of one
                 class with submodules of their own (blocks, not ``nn.Linear`` lists), outermost
                 only (experts inside a block are no candidates)
    observe      one forward runs eagerly with forward hooks on the candidates' members: each
                 call of a member is recorded with its tensor inputs and outputs
    match        each tensor output of a call is matched to the input it continues, its stream:
                 an input of the same shape and dtype, the nearest one when several are
                 (a block changes its stream by a residual update, not into another stream)
    chain        a call feeds the next when each of the next call's streams holds the previous
                 call's output at that position (the same tensor, or at least a quarter of its
                 elements exactly equal: HiDream-Image appends each block's own text states to the
                 stream and slices them off after, so only part of the stream is passed on
                 unchanged) and is not the previous call's own input (blocks side by side)
    group        consecutive calls, each feeding the next, whose every tensor output has a stream
                 form a region, whatever list each member belongs to (STDiT3 alternates
                 ``spatial_blocks.i`` and ``temporal_blocks.i``); its streams are the first call's
                 inputs that the last call's outputs continue. A container called several times
                 whose calls neither feed nor are fed by any call holds no blocks (per-layer
                 projections of the text); one called once is a list of one block
    sides        an output that is no tensor (a dict of side state, Open-Sora's ``ada_dict``) must
                 be one of the call's arguments, passed through: a reused step returns what the
                 block receives there; state a block makes cannot be given back without running it

Before (observed calls)                      After (regions)
    spatial_blocks.0 (x, y, t, d) -> (x', d)     region 0: spatial_blocks.0, temporal_blocks.0,
    temporal_blocks.0 (x', y, t, d) -> (x'', d)            spatial_blocks.1 ..., stream (x)
    spatial_blocks.1 (x'', y, t, d) -> ...

    double_blocks.0 (h, enc) -> (h', enc')       region 0: double_blocks.0 .. 1, streams (h, enc)
    double_blocks.1 (h', cat(enc', t)) -> ...    region 1: single_blocks.0 .. 1, stream (x)
    single_blocks.0 (cat(h, enc)) -> x'
    single_blocks.1 (x') -> x''
    caption_proj.0 (llama_0) -> (B, L, D)        no region: its calls do not feed each other
    caption_proj.1 (llama_1) -> (B, L, D)

What the model does between two calls (HiDream-Image concatenates each block's own text states
to the stream and slices them off after) stays its own: on a reused step it still runs, on the
inputs the guard returns.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["BlockCall", "ModuleRegion", "bind_arguments", "block_containers", "group_calls", "tensor_inputs",
           "output_tensors"]

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def block_containers(model: nn.Module) -> dict:
    """``{container path: [(member path, member)]}``: the module lists that may hold blocks."""
    found: dict = {}
    inside: list = []   # member paths of the containers found: nothing under them is a candidate
    for path, module in model.named_modules():
        if not isinstance(module, _CONTAINERS) or any(path.startswith(p + ".") for p in inside):
            continue
        members = list(module.named_children())
        classes = {type(m) for _n, m in members}
        if not members or len(classes) != 1 or not all(any(True for _ in m.children()) for _n, m in members):
            continue
        found[path] = [(f"{path}.{name}" if path else name, m) for name, m in members]
        inside.extend(p for p, _m in found[path])
    return found


def bind_arguments(signature: Optional[inspect.Signature], args: tuple, kwargs: dict) -> dict:
    """A call's arguments by parameter name (``**kwargs`` entries by their own names, ``*args``
    entries as ``"*i"``), so that a stream passed by position on one call and by keyword on the
    next is the same stream; by position / keyword as given when the call does not bind."""
    try:
        bound = signature.bind(*args, **kwargs).arguments if signature is not None else None
    except TypeError:
        bound = None
    if bound is None:
        return {**dict(enumerate(args)), **kwargs}
    out: dict = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            out.update({f"*{i}": v for i, v in enumerate(value)})
        else:
            out[name] = value
    return out


def tensor_inputs(arguments: dict) -> list:
    """``[(key, tensor)]``: a call's top-level tensor arguments (``bind_arguments``)."""
    return [(key, value) for key, value in arguments.items() if isinstance(value, torch.Tensor)]


def output_tensors(output) -> Optional[list]:
    """A block's outputs as a list of tensors, with None for every other element (a None, or side
    state such as a dict passed through: ``side_outputs``), or None when the structure is not a
    tensor or a tuple / list."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [o if isinstance(o, torch.Tensor) else None for o in output]
    return None


def side_outputs(output, arguments: dict) -> tuple:
    """``(sides, why_not)``: for each element of a tuple / list output that is neither a tensor
    nor None, the key of the argument it is (side state the block receives and returns, as
    Open-Sora's ``ada_dict``): a reused step returns what the block receives there. An element
    that is no argument (state the block makes) cannot be given back without running the block:
    ``why_not`` says so."""
    sides: dict = {}
    if not isinstance(output, (tuple, list)):
        return sides, ""
    for k, value in enumerate(output):
        if value is None or isinstance(value, torch.Tensor):
            continue
        key = next((key for key, arg in arguments.items() if arg is value), None)
        if key is None:
            return {}, (f"its output {k} ({type(value).__name__}) is neither a tensor nor one of its "
                        "arguments passed through")
        sides[k] = key
    return sides, ""


@dataclass
class BlockCall:
    """One observed call of a candidate member."""

    container: str
    index: int                     # position of the member in its container
    path: str                      # the member's module path
    inputs: list                   # [(key, tensor)]
    outputs: Optional[list]        # [tensor or None], None: not a tensor structure
    streams: Optional[list] = None  # per output: the key of the input it continues (None for a None output)
    why_not: str = ""              # why it is no block call (no stream for an output, ...)
    structure: type = tuple        # the type of the block's output (a tensor, a tuple, a list)
    flops: int = 0                 # FLOPs of the call (torch.utils.flop_counter)
    sides: dict = field(default_factory=dict)   # output position -> the argument key it passes through
    residuals: dict = field(default_factory=dict)   # input key -> the probe_branch-th residual added to it


@dataclass
class ModuleRegion:
    """Consecutive calls of one container's members, guarded as one region."""

    container: str
    paths: list                    # the blocks' module paths, in call order
    streams: list                  # per output position: the key of the first call's input it continues
    shapes: list                   # per output position: the stream's shape (None for a None output)
    calls: list = field(default_factory=list)   # [BlockCall] of the observed forward


def match_streams(call: BlockCall) -> None:
    """Set ``call.streams``: for each tensor output, the input it continues."""
    if call.outputs is None:
        call.why_not = call.why_not or "its output is not a tensor or a tuple / list"
        return
    if not any(o is not None for o in call.outputs):
        call.why_not = "its output holds no tensor"
        return
    used: set = set()
    streams = []
    for k, out in enumerate(call.outputs):
        if out is None:
            streams.append(None)
            continue
        same = [(key, t) for key, t in call.inputs if key not in used and t.shape == out.shape and t.dtype == out.dtype]
        if not same:
            call.why_not = f"its output {k} {tuple(out.shape)} continues none of its inputs (no input of that shape)"
            return
        key = min(same, key=lambda item: _relative_distance(out, item[1]))[0] if len(same) > 1 else same[0][0]
        used.add(key)
        streams.append(key)
    call.streams = streams


def _relative_distance(out: torch.Tensor, inp: torch.Tensor) -> float:
    diff = (out.detach().double() - inp.detach().double()).norm()
    return float(diff / inp.detach().double().norm().clamp_min(1e-30))


def _feeds(previous: BlockCall, call: BlockCall) -> bool:
    """Whether each of ``call``'s streams holds ``previous``'s output at its position (see the
    module docstring) and is not ``previous``'s own input (blocks applied side by side)."""
    inputs, before = dict(call.inputs), dict(previous.inputs)
    fed = False
    for out, key, was in zip(previous.outputs, call.streams, previous.streams):
        if out is None:
            continue
        value = inputs.get(key) if key is not None else None
        if value is None or value.shape != out.shape or value is before.get(was):
            return False
        if not (value is out or _equal_fraction(out, value) >= 0.25):
            return False
        fed = True
    return fed


def _equal_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    equal = (a.detach() == b.detach()) & (a.detach() != 0)
    return float(equal.float().mean()) if a.numel() else 0.0


def _links(calls: list) -> tuple:
    """``(fed, feeding)``: ids of the calls fed by the call before them, and of the calls feeding the next."""
    links = [(p, c) for p, c in zip(calls, calls[1:])
             if c.streams is not None and p.streams is not None and _feeds(p, c)]
    return {id(c) for _p, c in links}, {id(p) for p, _c in links}


def group_calls(calls: list) -> tuple:
    """``(regions, notes)``: the regions of an observed forward's calls, and why the other
    calls are none."""
    for call in calls:
        match_streams(call)
    # consecutive calls, whatever list each member belongs to (spatial and temporal blocks alternate)
    fed, feeding = _links(calls)
    per_container: dict = {}
    for call in calls:
        per_container.setdefault(call.container, []).append(call)
    # a list called several times whose calls neither feed nor are fed by any call (per-layer
    # projections called between the blocks); lists whose calls are no block calls say why below
    unchained = {name for name, own in per_container.items()
                 if len(own) > 1 and any(c.streams is not None for c in own)
                 and not any(id(c) in fed or id(c) in feeding for c in own)}
    notes = [f"{name}: its {len(per_container[name])} calls do not feed each other (no call's streams hold the "
             "previous call's outputs; no block list)" for name in sorted(unchained)]
    calls = [c for c in calls if c.container not in unchained]
    fed, _feeding = _links(calls)   # the blocks on either side of those calls are consecutive now
    regions, run, said = [], [], set()

    def close():
        if run:
            first, last = run[0], run[-1]
            shapes = [tuple(o.shape) if o is not None else None for o in last.outputs]
            containers = list(dict.fromkeys(c.container for c in run))
            regions.append(ModuleRegion(container=" + ".join(containers), paths=[c.path for c in run],
                                        streams=list(first.streams), shapes=shapes, calls=list(run)))
            run.clear()

    for call in calls:
        if call.streams is None:
            close()
            if (call.container, call.why_not) not in said:   # once per list and reason
                said.add((call.container, call.why_not))
                notes.append(f"{call.path}: {call.why_not}")
            continue
        continues = (run and id(call) in fed
                     and len(call.outputs) == len(run[-1].outputs)
                     and [s is None for s in call.streams] == [s is None for s in run[-1].streams]
                     and all(o is None or o.shape == p.shape for o, p in zip(call.outputs, run[-1].outputs)))
        if not continues:
            close()
        run.append(call)
    close()
    seen: set = set()
    for region in regions:   # a member called twice in one forward (weight sharing) is guarded once per call
        if seen & set(region.paths):
            notes.append(f"{region.container}: its blocks are called more than once per forward")
            return [], notes
        seen |= set(region.paths)
    return regions, notes


def without_tensors(region: ModuleRegion) -> ModuleRegion:
    """``region`` keeping only what the guard reads (streams, structures, shapes): the observed
    call's tensors are not held for the model's lifetime."""
    return replace(region, calls=[replace(c, inputs=[], outputs=None, residuals={}) for c in region.calls])

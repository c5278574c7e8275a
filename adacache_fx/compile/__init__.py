"""Compile: each rewritten piece, once, with the inner compiler.

The pieces' example inputs come from running the split top level on the graph's fake inputs
(``FakeTensorProp``); the inputs are read from the placeholders' metadata (what Dynamo
recorded), or faked from the real example inputs when a placeholder has none.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils.flop_counter import FlopCounterMode

from ..analysis.graph_nodes import example_value
from ..rewrite import Rewrite
from .inner import resolve_inner

__all__ = ["CompiledPieces", "compile_pieces", "count_flops", "flops_by_node", "graph_inputs", "resolve_inner"]


@dataclass
class CompiledPieces:
    top: fx.GraphModule                          # prologue/epilogue pieces replaced by compiled callables
    regions: dict = field(default_factory=dict)  # region index -> (attribute name, compute fn, reuse fn)
    fake_inputs: list = field(default_factory=list)
    flops: dict = field(default_factory=dict)    # attribute name -> FLOPs of one call (0 where not counted)


class _Compiled(torch.nn.Module):
    """A compiled piece, installed as a submodule of the top level."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def graph_inputs(gm: fx.GraphModule, example_inputs) -> list:
    """The graph's inputs as fake values: Dynamo's placeholder metadata, else faked here."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [example_value(n) for n in placeholders]
    if all(f is not None for f in fakes):
        return fakes
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    return [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]


def _fake_mode(fakes: list):
    return next((f.fake_mode for f in fakes if hasattr(f, "fake_mode")), None) or detect_fake_mode(fakes)


def _piece_inputs(top: fx.GraphModule, fakes: list) -> dict:
    """attribute name -> example inputs of that piece (fake)."""
    FakeTensorProp(top, _fake_mode(fakes)).propagate_dont_convert_inputs(*fakes)
    return {node.target: [a.meta.get("val") if isinstance(a, fx.Node) else a for a in node.args]
            for node in top.graph.nodes if node.op == "call_module"}


def count_flops(module, inputs: list, mode=None) -> int:
    """FLOPs of one call of ``module`` on fake ``inputs`` (``torch.utils.flop_counter``: matmuls,
    convolutions and attention; 0 if the count fails)."""
    mode = mode or _fake_mode(inputs)
    try:
        with FlopCounterMode(display=False) as counter, mode:
            module(*inputs)
    except Exception:  # counting is informative only: never let it stop the rewrite
        return 0
    return _hint(counter.get_total_flops())


def _hint(value) -> int:
    """An int from a FLOP count without a shape guard: ``int()`` on a SymInt would specialise a
    dynamic shape (and recompile for every other one), so symbolic counts are read by their hint."""
    if isinstance(value, torch.SymInt):
        hint = getattr(value.node, "hint", None)
        return int(hint) if hint is not None else 0
    return int(value)


class _FlopsByNode(fx.Interpreter):
    def __init__(self, gm, counter):
        super().__init__(gm)
        self.counter = counter
        self.flops: dict = {}

    def run_node(self, n):
        before = self.counter.get_total_flops()
        out = super().run_node(n)
        self.flops[n] = _hint(self.counter.get_total_flops()) - _hint(before)
        return out


def flops_by_node(gm: fx.GraphModule, example_inputs) -> dict:
    """node -> FLOPs of one call, counted on fake inputs ({} if the count fails)."""
    fakes = graph_inputs(gm, example_inputs)
    try:
        with FlopCounterMode(display=False) as counter, _fake_mode(fakes):
            interpreter = _FlopsByNode(gm, counter)
            interpreter.run(*fakes)
    except Exception:  # informative only
        return {}
    return interpreter.flops


def compile_pieces(rw: Rewrite, example_inputs, inner: Callable) -> CompiledPieces:
    top = rw.split.top
    fakes = graph_inputs(rw.gm, example_inputs)
    inputs = _piece_inputs(top, fakes)
    result = CompiledPieces(top=top, fake_inputs=fakes)
    result.flops = {name: count_flops(getattr(top, name), args, _fake_mode(fakes)) for name, args in inputs.items()}
    for r, name in rw.split.region_submods.items():
        result.regions[r] = (name, inner(getattr(top, name), inputs[name]), rw.reuse[r])
    for name in rw.split.other_submods:
        setattr(top, name, _Compiled(inner(getattr(top, name), inputs[name])))
    return result

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

from ..analysis.graph_nodes import example_value
from ..rewrite import Rewrite
from .inner import resolve_inner

__all__ = ["CompiledPieces", "compile_pieces", "graph_inputs", "resolve_inner"]


@dataclass
class CompiledPieces:
    top: fx.GraphModule                          # prologue/epilogue pieces replaced by compiled callables
    regions: dict = field(default_factory=dict)  # region index -> (attribute name, compute fn, reuse fn)
    fake_inputs: list = field(default_factory=list)


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


def _piece_inputs(top: fx.GraphModule, fakes: list) -> dict:
    """attribute name -> example inputs of that piece (fake)."""
    mode = next((f.fake_mode for f in fakes if hasattr(f, "fake_mode")), None) or detect_fake_mode(fakes)
    FakeTensorProp(top, mode).propagate_dont_convert_inputs(*fakes)
    return {node.target: [a.meta.get("val") if isinstance(a, fx.Node) else a for a in node.args]
            for node in top.graph.nodes if node.op == "call_module"}


def compile_pieces(rw: Rewrite, example_inputs, inner: Callable) -> CompiledPieces:
    top = rw.split.top
    fakes = graph_inputs(rw.gm, example_inputs)
    inputs = _piece_inputs(top, fakes)
    result = CompiledPieces(top=top, fake_inputs=fakes)
    for r, name in rw.split.region_submods.items():
        result.regions[r] = (name, inner(getattr(top, name), inputs[name]), rw.reuse[r])
    for name in rw.split.other_submods:
        setattr(top, name, _Compiled(inner(getattr(top, name), inputs[name])))
    return result

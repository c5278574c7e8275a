"""Compile: each rewritten piece, once, with the inner compiler.

A piece's example inputs are the values Dynamo recorded for the nodes that feed it
(``split_module`` copies that metadata onto the piece's placeholders); only where a value is
missing is the split top level run on the graph's fake inputs (``FakeTensorProp``). FLOPs are
counted per node with ``torch.utils.flop_counter`` on those recorded values, so a graph with
data-dependent sizes (captured ``.item()`` / ``nonzero``) is counted without re-deriving them;
they are a report's figure, so they are counted when a report or ``explain`` asks, not at
compile time (``CompiledPieces.count_flops``).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils.flop_counter import FlopCounterMode

from ..passes.analysis.graph_nodes import example_value
from ..passes.rewrite import Rewrite
from .compile_blocks import CompiledPiece, compile_region
from .inner import resolve_inner

logger = logging.getLogger("adacache_fx")

__all__ = ["CompiledPieces", "compile_pieces", "count_flops", "flops_by_node", "graph_inputs", "resolve_inner"]


@dataclass
class CompiledPieces:
    top: fx.GraphModule                          # prologue/epilogue pieces replaced by compiled callables
    regions: dict = field(default_factory=dict)  # region index -> (attribute name, compute fn, reuse fn)
    fake_inputs: list = field(default_factory=list)
    example_inputs: dict = field(default_factory=dict)   # attribute name -> the piece's example inputs (fake)
    reuse_step: Optional[Callable] = None   # the fused reused step, compiled (None: piece by piece)
    graph: Optional[fx.GraphModule] = None       # the rewritten graph the pieces were cut from
    piece_nodes: dict = field(default_factory=dict)   # attribute name -> names of the piece's op nodes
    block_compiles: dict = field(default_factory=dict)   # region index -> BlockCompile (compile_blocks="once")

    def count_flops(self) -> tuple:
        """``(FLOPs inside the regions, FLOPs of the graph)`` of one call (0 where not counted)."""
        per_node = {n.name: f for n, f in flops_by_node(self.graph, self.fake_inputs).items()}
        per_piece = {name: sum(per_node.get(n, 0) for n in nodes) for name, nodes in self.piece_nodes.items()}
        return sum(per_piece.get(name, 0) for name, _c, _r in self.regions.values()), sum(per_piece.values())


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


def _fresh_unbacked_ok(mode):
    """A graph that captured ``.item()`` or ``nonzero`` (data-dependent sizes) makes fresh unbacked
    sizes when it is run again on fake inputs, piece by piece or to count FLOPs, and some of them
    are not among a piece's outputs. Expected here: only the shapes are needed."""
    shape_env = getattr(mode, "shape_env", None)
    return shape_env.ignore_fresh_unbacked_symbols() if shape_env is not None else contextlib.nullcontext()


def _piece_inputs(top: fx.GraphModule, fakes: list) -> dict:
    """attribute name -> example inputs of that piece (fake): what Dynamo recorded for the nodes
    that feed it (split_module copies that metadata onto the piece's placeholders), else found by
    running the split top level on the fake inputs. Dynamo's own values are preferred: a graph
    with data-dependent sizes does not always propagate again on fresh unbacked sizes."""
    pieces = [n for n in top.graph.nodes if n.op == "call_module"]
    recorded = {}
    for node in pieces:
        values = [example_value(p) for p in getattr(top, node.target).graph.nodes if p.op == "placeholder"]
        if any(v is None for v in values):
            break
        recorded[node.target] = values
    else:
        return recorded
    mode = _fake_mode(fakes)
    with _fresh_unbacked_ok(mode):
        FakeTensorProp(top, mode).propagate_dont_convert_inputs(*fakes)
    return {node.target: [a.meta.get("val") if isinstance(a, fx.Node) else a for a in node.args] for node in pieces}


def count_flops(gm: fx.GraphModule, example_inputs) -> int:
    """FLOPs of one call of ``gm`` (``torch.utils.flop_counter``: matmuls, convolutions and
    attention; 0 if the count fails)."""
    return sum(flops_by_node(gm, example_inputs).values())


def _hint(value) -> int:
    """An int from a FLOP count without a shape guard: ``int()`` on a SymInt would specialise a
    dynamic shape (and recompile for every other one), so symbolic counts are read by their hint.
    Sizes that depend on data (unbacked: a captured ``.item()`` or ``nonzero``, e.g. the tokens
    routed to each expert) have no hint: their terms count as 0, so the FLOPs of work sized by
    the data are left out of both the cached and the total count."""
    if not isinstance(value, torch.SymInt):
        return int(value)
    hint = getattr(value.node, "hint", None)
    if hint is not None:
        return int(hint)
    expr, shape_env = value.node.expr, value.node.shape_env
    unbacked = {s: 0 for s in free_unbacked_symbols(expr)}
    try:
        return int(shape_env.optimization_hint(expr.xreplace(unbacked)))
    except Exception:  # informative only
        return 0


class _FlopsByNode(fx.Interpreter):
    """Runs each node on fake inputs under a FLOP counter. A node's inputs are the values Dynamo
    recorded for them where it did (so data-dependent sizes keep Dynamo's symbols and ranges),
    else the values computed here; a node that fails on them counts 0 and yields its recorded
    value."""

    def __init__(self, gm, counter):
        super().__init__(gm)
        self.counter = counter
        self.flops: dict = {}

    def run_node(self, n):
        if n.op in ("placeholder", "output", "get_attr"):
            return super().run_node(n)
        recorded = lambda a: example_value(a) if example_value(a) is not None else self.env[a]  # noqa: E731
        args = fx.map_arg(n.args, recorded)
        kwargs = fx.map_arg(n.kwargs, recorded)
        before = self.counter.get_total_flops()
        try:
            out = getattr(self, n.op)(n.target, args, kwargs)
        except Exception:   # informative only: keep counting the rest
            if example_value(n) is None:
                raise
            self.flops[n] = 0
            return example_value(n)
        self.flops[n] = _hint(self.counter.get_total_flops()) - _hint(before)
        return out


def flops_by_node(gm: fx.GraphModule, example_inputs) -> dict:
    """node -> FLOPs of one call, counted on fake inputs ({} if the count fails)."""
    fakes = graph_inputs(gm, example_inputs)
    try:
        mode = _fake_mode(fakes)
        with FlopCounterMode(display=False) as counter, mode, _fresh_unbacked_ok(mode):
            interpreter = _FlopsByNode(gm, counter)
            interpreter.run(*fakes)
    except Exception:  # informative only
        return {}
    return interpreter.flops


def _fused_inputs(fused, fakes: list) -> list:
    """The fused step's extra inputs: the deltas and their forecast terms as dense tensors (the
    runtime passes them contiguous: a stream can be a strided view, Flux's image tokens sliced
    out of the joint sequence, and inductor asserts its inputs' strides; the placeholders'
    metadata follows), then the forecast coefficients, ``(terms,)`` float32 beside the deltas."""
    mode = _fake_mode(fakes)
    placeholders = fused.delta_placeholders()
    with mode if mode is not None else contextlib.nullcontext():
        dense = [torch.empty_like(example_value(n), memory_format=torch.contiguous_format) for n in placeholders]
        if fused.terms:
            dense.append(torch.empty(fused.terms, dtype=torch.float32, device=dense[0].device))
    for node, value in zip(placeholders, dense):
        node.meta.update({k: value for k in ("val", "example_value") if k in node.meta})
    return dense


def compile_pieces(rw: Rewrite, example_inputs, inner: Callable) -> CompiledPieces:
    top = rw.split.top
    fakes = graph_inputs(rw.gm, example_inputs)
    inputs = _piece_inputs(top, fakes)
    # a piece's op nodes keep their names from the graph (its placeholders are named after the
    # producers of its inputs, so only op nodes are looked up when FLOPs are counted)
    nodes = {name: [n.name for n in getattr(top, name).graph.nodes if n.op in ("call_function", "call_method",
                                                                                 "call_module")] for name in inputs}
    result = CompiledPieces(top=top, fake_inputs=fakes, example_inputs=inputs, graph=rw.gm, piece_nodes=nodes)
    for r, name in rw.split.region_submods.items():
        if rw.analysis.config.compile_blocks != "whole":
            blocks = [{n.name for n in block.nodes} for block in rw.analysis.regions[r].blocks]
            compute, result.block_compiles[r] = compile_region(getattr(top, name), blocks, inputs[name], inner,
                                                               rw.analysis.config.compile_blocks == "auto")
        else:
            compute = inner(getattr(top, name), inputs[name])
        result.regions[r] = (name, compute, rw.reuse[r])
    # where the blocks were worth compiling once, the rest runs as traced (compile_blocks.py says
    # why); elsewhere the prologue and epilogue are compiled, and the reused step fused: one call
    # instead of a few matters on a small model
    by_block = any(info.by_block for info in result.block_compiles.values())
    if rw.fused is not None and not by_block:
        try:
            result.reuse_step = inner(rw.fused.gm, list(fakes) + _fused_inputs(rw.fused, fakes))
        except Exception:  # noqa: BLE001 - reused steps then run piece by piece, as before
            logger.debug("adacache: compiling the fused reused step failed", exc_info=True)
    for name in ([] if by_block else rw.split.other_submods):   # by block: the traced pieces stay
        setattr(top, name, CompiledPiece(inner(getattr(top, name), inputs[name])))
    return result

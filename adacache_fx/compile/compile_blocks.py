"""Compile each repeated block once: a region's piece cut into one subgraph per block, the blocks
whose subgraphs are the same compiled once and the compiled code called for each with its own
weights (what diffusers' ``compile_repeated_blocks`` does by hand, found here from the graph).

Before (the region's piece, every block inlined; the inner compiler sees N copies)::

    x1 = block0(x0, w0, temb); x2 = block1(x1, w1, temb); ...; delta = xN - x0

After (``split_module`` by block; one compile for every block whose graph matches block 0's)::

    x1 = compiled_block(x0, w0, temb)     # block 0's subgraph, compiled
    x2 = compiled_block(x1, w1, temb)     # the same compiled code, block 1's weights
    ...
    delta = glue(xN, x0)                   # what is not a block: run as traced, uncompiled

Blocks match when their subgraphs have the same nodes (ops, targets, arguments by position) and
their inputs the same metadata (shape, stride, dtype, device): the weights differ only as inputs.
A region whose blocks' nodes interleave in the graph, or whose split fails, is compiled whole.

What is not a block (the glue here; the prologue, the epilogue and the reused step around the
region, ``compile/__init__.py``) runs uncompiled where the blocks are compiled once, as under
``compile_repeated_blocks``: at the Wan 1.3B size on a CPU the inner compiler took 0.9 s for the
one-op glue, 1.8 s for the 4-op epilogue and 4.6 s for the prologue, and a fused reused step
compiled them all again, for a warm step that was not measurably faster
(``benchmarks/results/compile_time.md``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

from ..passes.analysis.graph_nodes import example_value

logger = logging.getLogger("adacache_fx")

__all__ = ["BlockCompile", "COMPILE_ONCE_MIN_BLOCKS", "compile_region"]

#: ``compile_blocks="auto"`` compiles block by block when at least this many blocks share one graph:
#: below it the compile time saved is small, and a call per block may cost a small model's step a
#: few percent (``benchmarks/results/overhead.md``: -1% to +7% on a 6 + 6 block STDiT)
COMPILE_ONCE_MIN_BLOCKS = 8


@dataclass
class BlockCompile:
    """How a region's piece was compiled: by block, or whole (and why)."""

    by_block: bool
    compiles: int = 0                 # inner compiles this region took
    blocks: int = 0
    shared: list = field(default_factory=list)   # per distinct block graph: how many blocks share it
    why_whole: Optional[str] = None


class CompiledPiece(torch.nn.Module):
    """A compiled piece (or block subgraph), installed as a submodule of the split graph calling it."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _partition(piece: fx.GraphModule, block_nodes: list) -> Optional[dict]:
    """node name -> partition id: block ``i``'s span of nodes (first to last of its nodes, in graph
    order) is partition ``2i + 1``, the glue before it ``2i`` (None: the spans interleave)."""
    order = {n.name: k for k, n in enumerate(piece.graph.nodes)}
    spans = []
    for names in block_nodes:
        found = [order[n] for n in names if n in order]
        if not found:
            return None
        spans.append((min(found), max(found)))
    if any(a[1] >= b[0] for a, b in zip(spans, spans[1:])):
        return None
    ids, block = {}, 0
    for k, node in enumerate(piece.graph.nodes):
        while block < len(spans) and k > spans[block][1]:
            block += 1
        inside = block < len(spans) and spans[block][0] <= k <= spans[block][1]
        ids[node.name] = 2 * block + 1 if inside else 2 * block
    return ids


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"T{tuple(value.shape)}{tuple(value.stride())}{value.dtype}{value.device}"
    return type(value).__name__ if isinstance(value, torch.SymInt) else repr(value)


def graph_signature(gm: fx.GraphModule, example_inputs: list) -> tuple:
    """``(body, outputs)``: what makes two subgraphs the same compiled code (their nodes, arguments
    by position, and their inputs' metadata; None where a constant attribute of its own is never
    shared), and which of their nodes they return (the probe block returns one node more)."""
    index, items, inputs = {}, [], iter(example_inputs)
    outputs: tuple = ()
    for k, node in enumerate(gm.graph.nodes):
        index[node] = k
        if node.op == "placeholder":
            items.append(f"in {_describe(next(inputs, None))}")
        elif node.op == "get_attr":
            return None, ()
        elif node.op == "output":
            value = node.args[0]
            outputs = tuple(index[v] for v in value)   # a tuple: _return_tuple made it one
        else:
            target = getattr(node.target, "__qualname__", None) or str(node.target)
            args = fx.map_arg((node.args, node.kwargs), lambda a: f"%{index[a]}")
            items.append(f"{node.op} {getattr(node.target, '__module__', '')}.{target} {args!r}")
    return "\n".join(items), outputs


def _return_tuple(sub: fx.GraphModule) -> bool:
    """Make ``sub`` return a tuple (compilers such as ``aot_eager`` take only graphs that do);
    True when it returned one value (its caller then takes the tuple's element)."""
    output = next(n for n in reversed(sub.graph.nodes) if n.op == "output")
    if isinstance(output.args[0], (tuple, list)):
        return False
    output.args = ((output.args[0],),)
    sub.recompile()
    return True


def _first(fn: Callable) -> Callable:
    return lambda *args: fn(*args)[0]


def _selecting(fn: Callable, positions: tuple) -> Callable:
    """``fn`` (a compiled subgraph returning more) returning what another subgraph returns: the
    outputs at ``positions``."""
    return lambda *args: tuple(fn(*args)[p] for p in positions)


def _is_block(attribute: str) -> bool:
    """Whether ``split_module``'s ``submod_<partition>`` is a block's (``_partition``: odd ids)."""
    return int(attribute.rsplit("_", 1)[1]) % 2 == 1


def _inputs_of(top: fx.GraphModule, name: str) -> Optional[list]:
    values = [example_value(p) for p in getattr(top, name).graph.nodes if p.op == "placeholder"]
    return None if any(v is None for v in values) else values


def compile_region(piece: fx.GraphModule, block_nodes: list, example_inputs: list,
                   inner: Callable, auto: bool = False) -> tuple:
    """``(callable, BlockCompile)``: ``piece`` compiled block by block (``block_nodes``: per block of
    the region, the names of its nodes), or whole where it cannot be split (``auto``: or where
    fewer than ``COMPILE_ONCE_MIN_BLOCKS`` blocks share one graph)."""
    def whole(why: str):
        return inner(piece, example_inputs), BlockCompile(False, compiles=1, blocks=len(block_nodes), why_whole=why)

    if len(block_nodes) < 2:
        return whole("one block")
    ids = _partition(piece, block_nodes)
    if ids is None:
        return whole("the blocks' nodes interleave")
    try:
        top = split_module(piece, None, lambda node: ids[node.name], keep_original_order=True)
    except Exception as exc:  # noqa: BLE001 - compiled whole, as before
        return whole(f"split_module failed ({type(exc).__name__}: {exc})")
    info = BlockCompile(True, blocks=len(block_nodes))
    subs = []   # (attribute, body signature, outputs, example inputs, returns one value)
    for node in top.graph.nodes:
        if node.op != "call_module" or not _is_block(node.target):
            continue   # glue stays the traced subgraph split_module made (module docstring)
        inputs = _inputs_of(top, node.target)
        if inputs is None:
            return whole(f"no example inputs recorded for {node.target}")
        single = _return_tuple(getattr(top, node.target))
        body, outputs = graph_signature(getattr(top, node.target), inputs)
        subs.append((node.target, body, outputs, inputs, single))
    # per body, the member returning the most nodes is compiled; a member whose outputs are among
    # them calls that code and picks its own (the probe block returns its residual as well)
    widest: dict = {}
    for name, body, outputs, _inputs, _single in subs:
        if body is not None and len(outputs) > len(widest.get(body, (None, ()))[1]):
            widest[body] = (name, outputs)
    if auto:
        counts: dict = {}
        for _name, body, _outputs, _inputs, _single in subs:
            counts[body] = counts.get(body, 0) + (body is not None)
        if max(counts.values(), default=0) < COMPILE_ONCE_MIN_BLOCKS:
            return whole(f"fewer than {COMPILE_ONCE_MIN_BLOCKS} blocks share one graph (compile_blocks='auto')")
    compiled: dict = {}
    shared: dict = {}
    for name, body, outputs, inputs, single in subs:
        rep = widest.get(body)
        wide = rep[1] if rep is not None else ()
        if rep is None or not set(outputs) <= set(wide):
            fn = inner(getattr(top, name), inputs)   # a block of its own
            info.compiles += 1
            shared[name] = 1
        else:
            if body not in compiled:
                compiled[body] = inner(getattr(top, rep[0]), inputs)
                info.compiles += 1
            fn = compiled[body]
            if outputs != rep[1]:
                fn = _selecting(fn, tuple(wide.index(o) for o in outputs))
            shared[body] = shared.get(body, 0) + 1
        setattr(top, name, CompiledPiece(_first(fn) if single else fn))
    info.shared = sorted(shared.values(), reverse=True)
    top.recompile()
    logger.debug("adacache: region compiled by block: %d blocks, %d compiles", info.blocks, info.compiles)
    return top.forward, info   # a callable, as the inner compiler returns (not a submodule of the runner)

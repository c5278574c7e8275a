"""Plan how each region piece runs on a sub-batch (``AdaCacheConfig(per_sample=True)``).

With a schedule per sample (``AdaCacheConfig(per_sample=True)``), a step where only some
samples compute runs each region piece on those samples' rows alone; the other rows come from
the reuse piece (``in + delta``). One compiled piece serves every sub-batch size: the graph is
traced with a symbolic batch size (``compile_model`` marks dim 0 of the call's tensors dynamic;
with ``torch.compile`` pass ``dynamic=True`` or ``torch._dynamo.mark_dynamic(x, 0)``), so no
sub-batch recompiles. The plan is read from the pieces' recorded example values:

* a tensor whose size along one dim is ``batch * m`` (batch-major) is gathered along that dim;
* a size (SymInt) proportional to the batch is scaled;
* everything else (weights, rotary tables, a batch-free mask) passes unchanged.

Rows are assumed independent (a sample's output does not depend on the other rows), as in
every diffusion transformer. The plan is checked at compile time by running each region piece
on fake inputs of a sub-batch; a piece that fails there, a size that depends on the batch
otherwise than in proportion, or a graph traced with a static batch leaves the graph with the
schedule per sample but computing every row whenever any sample computes (said in a warning).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from ..passes.analysis.graph_nodes import example_value


SCALED = "scaled"   # spec of a size proportional to the batch


@dataclass
class SubBatchPlan:
    """How each region piece of one graph runs on a subset of the batch rows."""

    symbol: sympy.Symbol
    inputs: dict = field(default_factory=dict)    # runner index -> [spec per input]
    outputs: dict = field(default_factory=dict)   # runner index -> [spec per output]
    graph_outputs: dict = field(default_factory=dict)   # graph output index -> spec (deltas, probe)
    min_rows: int = 1                              # sub-batches are padded to this many rows


def _expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def _proportional(expr, symbol) -> bool:
    return symbol in expr.free_symbols and symbol not in sympy.simplify(expr / symbol).free_symbols


def batch_spec(value, symbol):
    """None (batch-free), the dim holding the rows, or ``SCALED``; ``ValueError`` when the value
    depends on the batch in another way."""
    if isinstance(value, torch.Tensor):
        dims = [d for d, size in enumerate(value.shape) if symbol in _expr(size).free_symbols]
        if not dims:
            return None
        if len(dims) > 1 or not _proportional(_expr(value.shape[dims[0]]), symbol):
            raise ValueError(f"a tensor of shape {tuple(value.shape)} depends on the batch size {symbol} "
                             "in more than one dim, or not in proportion")
        return dims[0]
    if isinstance(value, torch.SymInt) and symbol in value.node.expr.free_symbols:
        if not _proportional(value.node.expr, symbol):
            raise ValueError(f"a size {value.node.expr} depends on the batch size {symbol} not in proportion")
        return SCALED
    return None


def batch_symbol(first_input) -> Optional[sympy.Symbol]:
    """The batch size's symbol: dim 0 of the model's first tensor input (the dim
    ``compile_model`` marks dynamic), when it is one symbol (None: a static batch)."""
    if not isinstance(first_input, torch.Tensor) or first_input.dim() == 0:
        return None
    expr = _expr(first_input.shape[0])
    return expr if isinstance(expr, sympy.Symbol) else None


def _hints(values) -> dict:
    for v in values:
        mode = getattr(v, "fake_mode", None)
        if mode is not None and getattr(mode, "shape_env", None) is not None:
            env = mode.shape_env
            return dict(getattr(env, "backed_var_to_val", None) or env.var_to_val)
    return {}


def _concrete_size(size, symbol, rows, hints) -> int:
    expr = _expr(size).xreplace({symbol: sympy.Integer(rows)}).xreplace(hints)
    if not expr.is_Integer:
        raise ValueError(f"size {_expr(size)} has no value at a sub-batch (a data-dependent size)")
    return int(expr)


def _concrete(value, symbol, rows, hints, mode):
    if isinstance(value, torch.Tensor):
        shape = [_concrete_size(s, symbol, rows, hints) for s in value.shape]
        with mode:
            return torch.empty(shape, dtype=value.dtype, device=value.device)
    if isinstance(value, torch.SymInt):
        return _concrete_size(value, symbol, rows, hints)
    return value


def check_piece(piece: fx.GraphModule, inputs: list, symbol, rows: int) -> None:
    """Run ``piece`` on fake inputs of ``rows`` batch rows; raises where the sub-batch would fail
    (a batch-sized value the plan does not gather, a size fixed at the traced batch)."""
    hints = _hints(inputs)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [_concrete(v, symbol, rows, hints, mode) for v in inputs]
    with mode:
        piece(*fakes)


def plan_sub_batches(symbol, pieces: dict, graph_outputs: dict) -> SubBatchPlan:
    """The plan for region pieces ``{runner index: (piece, example inputs, example outputs)}``
    and the graph's cache outputs ``{output index: example value}``; ``ValueError`` saying why a
    piece cannot run on a sub-batch."""
    values = [v for _piece, inputs, _outputs in pieces.values() for v in inputs]
    plan = SubBatchPlan(symbol=symbol, min_rows=min_rows(symbol, values))
    for index, (piece, inputs, outputs) in pieces.items():
        plan.inputs[index] = [batch_spec(v, symbol) for v in inputs]
        plan.outputs[index] = [batch_spec(v, symbol) for v in outputs]
        try:
            check_piece(piece, inputs, symbol, plan.min_rows)
        except Exception as exc:  # noqa: BLE001 - any failure means: do not sub-batch this graph
            raise ValueError(f"region {index} fails on a sub-batch of {plan.min_rows} rows "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    plan.graph_outputs = {i: batch_spec(v, symbol) for i, v in graph_outputs.items()}
    return plan


def min_rows(symbol, values) -> int:
    """The smallest batch the graph was traced for (Dynamo assumes a dynamic size is >= 2)."""
    for v in values:
        mode = getattr(v, "fake_mode", None)
        env = getattr(mode, "shape_env", None) if mode is not None else None
        if env is not None and symbol in env.var_to_range:
            return max(1, int(env.var_to_range[symbol].lower))
    return 2


def _size_hint(size) -> int:
    """A size's value at the traced call, without a shape guard (``int()`` on a SymInt would
    specialise the graph to it)."""
    if not isinstance(size, torch.SymInt):
        return int(size)
    hint = size.node.hint
    return int(hint) if hint is not None else 1


def _outputs(gm: fx.GraphModule) -> list:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [example_value(v) if isinstance(v, fx.Node) else v for v in out]


# a reason without a plan, continued: what the graph does instead, and how to get sub-batches
_EVERY_ROW = (", so every row computes on a step where any sample does (the schedules stay per sample); trace a "
              "dynamic batch (adacache_fx.compile_model marks it, or torch.compile(..., dynamic=True)) to run the "
              "blocks on the computing samples alone")


def plan_per_sample(rw, pieces, placeholders: list, layout, guidance_in_batch: int) -> tuple:
    """``(batch source, plan, why)`` of a rewritten graph under ``per_sample``: the graph input
    ``(index, dim)`` whose size is the batch (None: no per-sample schedules in this graph), the
    sub-batch plan (None: every row computes when any sample does) and why there is no plan
    (None: there is, or nothing to say: a static batch of one sample)."""
    # the batch is dim 0 of the model's first tensor input (the one compile_model marks dynamic)
    source = next((i for i in layout.activation_indices if isinstance(example_value(placeholders[i]), torch.Tensor)
                   and example_value(placeholders[i]).dim()), None)
    if source is None:
        return None, None, "no tensor input gives the batch size: one schedule for the batch"
    symbol = batch_symbol(example_value(placeholders[source]))
    graph_values = _outputs(rw.gm)
    probe = graph_values[rw.outputs.probe_index]
    if symbol is None or symbol not in layout.symbol_sources:   # a static batch (or a folded one: B*F)
        rows = _size_hint(example_value(placeholders[source]).shape[0])
        if not isinstance(probe, torch.Tensor) or not probe.dim() or _size_hint(probe.shape[0]) % rows:
            return None, None, (f"the probe's first dim does not hold the batch of {rows} rows: one schedule for "
                                "the batch")
        why = f"the graph was traced with a static batch of {rows} rows{_EVERY_ROW}" \
            if rows // guidance_in_batch > 1 else None
        return (source, 0), None, why
    source = layout.symbol_sources[symbol]
    try:
        probe_dim = batch_spec(probe, symbol)
    except ValueError:
        probe_dim = None
    if probe_dim != 0:
        return None, None, "the probe's first dim does not hold the batch: one schedule for the batch"
    outputs = {index: graph_values[index] for (_r, _s, index) in rw.outputs.deltas}
    outputs[rw.outputs.probe_index] = probe
    region_pieces = {r: (getattr(pieces.top, name), pieces.example_inputs[name], _outputs(getattr(pieces.top, name)))
                     for r, (name, _compute, _reuse) in pieces.regions.items()}
    try:
        return source, plan_sub_batches(symbol, region_pieces, outputs), None
    except ValueError as exc:
        return source, None, f"{exc}{_EVERY_ROW}"

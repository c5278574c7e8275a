"""Run a region on some samples of the batch: gather their rows, compute, scatter back.

With a schedule per sample (``AdaCacheConfig(per_sample=True)``), a step where only some
samples compute runs each region piece on those samples' rows alone; the other rows come from
the reuse piece (``in + delta``). The plan (which input and output holds the rows along which
dim) is made at compile time (``compile/sub_batch_plan.py``); here it is applied.

Rows are assumed independent (a sample's output does not depend on the other rows), as in
every diffusion transformer.
"""
from __future__ import annotations

import torch

from ..compile.sub_batch_plan import SCALED



def gather(value, spec, rows: torch.Tensor, batch: int):
    """``value`` restricted to batch rows ``rows`` (a 1-D index tensor)."""
    if spec is None or value is None:
        return value
    if spec == SCALED:
        return int(value) // batch * rows.numel()
    grouped = value.unflatten(spec, (batch, -1))
    picked = grouped.index_select(spec, rows.to(value.device)).flatten(spec, spec + 1)
    if value.is_contiguous() or 0 in value.stride():
        return picked
    # a strided view (text tokens sliced off a joint sequence): the same strides, which the compiled
    # piece asserts (inductor checks every input's size and stride)
    out = torch.empty_strided(picked.shape, value.stride(), dtype=value.dtype, device=value.device)
    return out.copy_(picked)


def scatter(full, sub, spec, rows: torch.Tensor, batch: int):
    """``full`` with its rows ``rows[:k]`` replaced by the first ``k`` rows of ``sub`` (``k`` =
    ``len(rows)`` without padding: ``sub`` may hold padded rows after them). Out of place: a
    reuse piece passes cached deltas through."""
    if spec is None or spec == SCALED or full is None:
        return full
    k = rows.numel()
    grouped = sub.unflatten(spec, (-1, full.shape[spec] // batch)).narrow(spec, 0, k)
    return full.unflatten(spec, (batch, -1)).index_copy(spec, rows.to(full.device), grouped).flatten(spec, spec + 1)


def replace_rows(full, source, spec, rows: torch.Tensor, batch: int):
    """``full`` with its rows ``rows`` taken from ``source`` (both of the whole batch)."""
    return scatter(full, gather(source, spec, rows, batch), spec, rows, batch)


def narrow_rows(sub, spec, k: int, batch_rows_of_sub: int):
    """The first ``k`` batch rows of a sub-batch output (drops the padding rows)."""
    if spec is None or spec == SCALED or sub is None or batch_rows_of_sub == k:
        return sub
    return sub.unflatten(spec, (batch_rows_of_sub, -1)).narrow(spec, 0, k).flatten(spec, spec + 1)

"""Rank-consistent cache decisions under torch.distributed.

Every rank must take the same decision, or some ranks enter a collective that the
others skip and the job hangs. The metric's partial sums (a ``(5,)`` tensor) are
all-reduced (summed) across the process group before the codebook lookup: one small
collective per computed step, none per reused step. A NaN or Inf on any rank
propagates through the sum, so every rank computes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def resolve_process_group(setting, graph=None):
    """The group to all-reduce over: ``None`` (single process), an explicit group, or
    for ``"auto"`` the world when torch.distributed is initialised with several ranks."""
    if setting is None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if setting == "auto":
        return dist.group.WORLD if dist.get_world_size() > 1 else None
    return setting


def all_reduce_sums(sums: torch.Tensor, group) -> torch.Tensor:
    """Sum ``sums`` over ``group`` (in place on a copy); a no-op without a group."""
    if group is None:
        return sums
    out = sums.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out

"""Which process group the metric is reduced over, found in the traced graph (analysis).

Every rank must take the same decision, or some ranks enter a collective that the others skip
and the job hangs: the metric's partial sums are summed across a process group before the
codebook lookup (``runtime/collectives.py``). The default group
(``AdaCacheConfig(process_group="auto")``) is the group of the model's own collectives found in
the traced graph (the sequence-parallel group of a Ulysses or ring-attention model), else the
world. ``shard_problem`` says whether MoReg under a shard of the frames can use that group.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional", "_dtensor")


def _namespace(target) -> Optional[str]:
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[0]
    return None


def is_collective(node) -> bool:
    """Whether an FX node is a functional collective (``_c10d_functional.*``: all-to-all,
    all-gather, reduce-scatter, all-reduce, ``wait_tensor``, isend/irecv...)."""
    return node.op == "call_function" and _namespace(node.target) in _COLLECTIVE_NAMESPACES[:2]


def collective_group_name(node) -> Optional[str]:
    """The ``group_name`` argument of a functional collective node, or None."""
    if not is_collective(node):
        return None
    if "group_name" in node.kwargs:
        return node.kwargs["group_name"]
    target = node.target
    op = target if isinstance(target, torch._ops.OpOverload) else getattr(target, "default", None)
    schema = getattr(op, "_schema", None)
    if schema is None:
        return None
    for i, arg in enumerate(schema.arguments):
        if arg.name == "group_name":
            value = node.args[i] if i < len(node.args) else None
            return value if isinstance(value, str) else None
    return None


def _group_from_name(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


def graph_process_groups(graph) -> list:
    """The process groups of the functional collectives in ``graph``, most used first."""
    counts: dict = {}
    for node in graph.nodes:
        name = collective_group_name(node)
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    groups = []
    for name in sorted(counts, key=lambda n: -counts[n]):
        try:
            groups.append(_group_from_name(name))
        except Exception:  # an unknown name: cannot be resolved on this process
            logger.debug("adacache: cannot resolve process group %r", name)
    return groups


def _ranks(group) -> frozenset:
    return frozenset(dist.get_process_group_ranks(group))


def resolve_process_group(setting, graph=None):
    """The group to sum the metric over.

    * ``None``: no collective (each process decides alone; only for independent jobs).
    * an explicit ``ProcessGroup``: that group (a group of one rank: no collective).
    * ``"world"``: the default world group.
    * ``"auto"`` (default): the group of the model's own collectives in ``graph`` (the
      sequence-parallel group); when they use several groups, the one whose ranks
      contain all the others' ranks, else the world; with no collective in the graph
      (collectives around the compiled model, or data/guidance parallel), the world.

    Returns None when torch.distributed is not initialised or the group has one rank.
    Every rank traces the same model, so every rank resolves the same group.
    """
    if setting is None or not (dist.is_available() and dist.is_initialized()):
        return None
    if setting == "world":
        group = dist.group.WORLD
    elif setting == "auto":
        group = dist.group.WORLD
        found = graph_process_groups(graph) if graph is not None else []
        if found:
            union = frozenset().union(*(_ranks(g) for g in found))
            covering = [g for g in found if _ranks(g) == union]
            if covering:
                group = covering[0]
            else:
                logger.warning("adacache: the model's collectives use several process groups that no one "
                               "group covers; cache decisions are all-reduced over the world")
    elif isinstance(setting, str):
        raise ValueError(f"process_group must be 'auto', 'world', None or a ProcessGroup, got {setting!r}")
    else:
        group = setting
    return group if dist.get_world_size(group) > 1 else None


def shard_problem(shard: Optional[tuple], group, frames, stride: int) -> Optional[str]:
    """Why sharded MoReg cannot run with this group (None: it can)."""
    if shard is None:
        return None
    index, count = shard[:2]
    if group is None:
        return (f"the probe holds shard {index} of {count} of the frames, but no process group reduces the metric "
                "(process_group=None, or torch.distributed is not initialised)")
    if dist.get_world_size(group) != count or dist.get_rank(group) != index:
        return (f"the probe holds shard {index} of {count} of the frames, but this rank is rank "
                f"{dist.get_rank(group)} of a metric group of {dist.get_world_size(group)}; pass the "
                "sequence-parallel group as AdaCacheConfig(process_group=...)")
    if getattr(frames, "is_number", True) and int(frames) < stride:
        return (f"each shard holds {int(frames)} frames, fewer than moreg_stride={stride}: the frame pairs would "
                "span more than the neighbour shard")
    return None

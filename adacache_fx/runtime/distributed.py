"""Rank-consistent cache decisions under torch.distributed.

Every rank must take the same decision, or some ranks enter a collective that the
others skip and the job hangs. The metric's partial sums (a ``(5,)`` tensor: each
rank's L1 sums over its own shard of the probe) are summed across the process group
before the codebook lookup: one small collective per computed step (at the start of
the next step), none per reused step. A NaN or Inf on any rank propagates through the
sum, so every rank sees a non-finite distance and computes.

The sum is taken as an all-gather of the ``(P, 5)`` partial sums followed by the same
float64 sum in rank order on every rank: the result is bitwise identical on every rank
by construction, whatever reduction order the backend's all-reduce uses (ring, tree,
...). A decision whose distance lands exactly on a codebook threshold can then differ
from a single-process run's (float rounding of the partial sums), never between ranks.

The default group (``AdaCacheConfig(process_group="auto")``) is the group of the
model's own collectives found in the traced graph (the sequence-parallel group of a
Ulysses or ring-attention model), else the world.

MoReg under a shard of the frames (context parallelism splits the frame tokens across the
ranks): each rank's sums miss the frame pairs across its shard's boundaries; a halo exchange
of the next rank's first frames on computed steps adds them (``shard_boundary_sums``), so the
reduced motion score is the single-process one up to float rounding.
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


def _comm_device(group, device: torch.device) -> torch.device:
    """Where ``group``'s collectives run: CUDA for NCCL, the CPU for gloo."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if device.type == "cuda" else device


def _next_shard_head(head: torch.Tensor, index: int, count: int, group) -> Optional[torch.Tensor]:
    """Halo exchange: send ``head`` to shard ``index - 1``, receive shard ``index + 1``'s head
    (None on the last shard). Point to point: each rank sends and receives one head."""
    device = _comm_device(group, head.device)
    send = head.detach().to(device).contiguous()
    received = torch.empty_like(send) if index < count - 1 else None
    ops = []
    if index > 0:
        ops.append(dist.P2POp(dist.isend, send, dist.get_global_rank(group, index - 1), group))
    if received is not None:
        ops.append(dist.P2POp(dist.irecv, received, dist.get_global_rank(group, index + 1), group))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return received.to(head.device) if received is not None else None


def shard_boundary_sums(r: torch.Tensor, stride: int, shard: tuple, group) -> torch.Tensor:
    """What the metric's ``(5,)`` sums of this rank's frames miss when the frames are sharded.

    ``r`` is this rank's probe ``(B, F_local, N)``, shard ``index`` of ``count``: global frames
    ``[index * F_local, (index + 1) * F_local)``. Summed over the ranks, local sums plus these
    equal the sums of the whole video (``ops.cache_metrics``, frame stride ``s``):

    * ``out[2]``: the frame pairs across the boundary with the next shard,
      ``sum |next[:, :s] - r[:, -s:]|`` (the next rank's first ``s`` frames: a halo exchange);
    * ``out[3]`` (``sum |r[s:]|``): a shard after the first also counts its first ``s`` frames;
    * ``out[4]`` (``sum |r[:-s]|``): a shard before the last also counts its last ``s`` frames.

    The distance sums (0, 1) need nothing. Every rank of ``group`` must call this on the same
    step (it is called where the metric is, on computed steps, which every rank agrees on), with
    shard ``index`` on rank ``index`` of ``group`` (the analysis checks it: ``shard_problem``)."""
    index, count = shard
    if r.shape[1] < stride:
        raise ValueError(f"shard_boundary_sums: each shard holds {r.shape[1]} frames, fewer than the frame "
                         f"stride {stride}")
    head, tail = r[:, :stride], r[:, r.shape[1] - stride:]
    following = _next_shard_head(head, index, count, group)
    out = torch.zeros(5, dtype=torch.float32, device=r.device)
    if index > 0:
        out[3] = head.to(torch.float32).abs().sum()
    if following is not None:
        out[2] = (following.to(torch.float32) - tail.to(torch.float32)).abs().sum()
        out[4] = tail.to(torch.float32).abs().sum()
    return out


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


def all_reduce_sums(sums: torch.Tensor, group) -> torch.Tensor:
    """Sum ``sums`` over ``group``; a no-op without a group.

    All-gathers the ``(P, *sums.shape)`` partial sums and sums them in float64 in rank
    order, so every rank gets the same bits (see the module docstring). The gather runs
    on the group's device: CUDA for NCCL, the CPU for gloo.
    """
    if group is None:
        return sums
    world = dist.get_world_size(group)
    device = sums.device
    comm_device = _comm_device(group, device)
    local = sums.detach().to(device=comm_device, dtype=torch.float64).reshape(-1).contiguous()
    gathered = torch.empty(world * local.numel(), dtype=torch.float64, device=comm_device)
    dist.all_gather_into_tensor(gathered, local, group=group)
    gathered = gathered.reshape((world,) + tuple(sums.shape))
    total = gathered[0].clone()
    for r in range(1, world):
        total += gathered[r]
    return total.to(device)

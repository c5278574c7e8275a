"""Rank-consistent cache decisions under torch.distributed: the run-time collectives.

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

The group is chosen at analysis time (``passes/analysis/process_group.py``): the group of
the model's own collectives found in the traced graph, else the world.

MoReg under a shard of the frames (context parallelism splits the frame tokens across the
ranks): each rank's sums miss the frame pairs across its shard's boundaries; a halo exchange
of the next rank's first frames on computed steps adds them (``shard_boundary_sums``), so the
reduced motion score is the single-process one up to float rounding.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


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

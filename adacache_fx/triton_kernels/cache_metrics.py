"""The CUDA kernel of ``adacache_fx::cache_metrics``: one pass over ``r`` and ``p`` in Triton.

Imported only where triton is installed (``cache_metrics.py`` registers the launcher as the
op's CUDA kernel); the semantics are those of ``cache_metrics.py``.

Determinism: no atomics. Each program writes one partial row (``partials[B, s * n_blocks,
5]``) and a fixed-order reduction sums them; the block size depends only on the shapes
(never on the device or on autotuning), so the same inputs give bit-identical sums on every
call and on every rank of the same GPU model.

Layouts: the kernel indexes ``r`` and ``p`` through their own strides, so the strided probe
views a DiT produces are read in place. After merging element axes that are contiguous with
each other, up to two element axes are supported without a copy:

* Latte spatial ``(B*F, S, C)`` -> ``x.view(B, F, S, C)`` (or ``.view(B, F, S*C)``),
* Latte temporal ``(B*S, F, C)`` -> ``x.view(B, S, F, C).permute(0, 2, 1, 3)``,
* STDiT ``(B, F*S, C)`` -> ``x.view(B, F, S, C)`` or ``x.view(B, F, S*C)``.

Anything needing more than two element axes is copied with ``reshape`` once. Element-wise
terms are accumulated in float32 per element over the frames, then each block and the
per-program partials in float32.

On CPU tensors the kernel runs under the Triton interpreter (``interpret=True`` or
``TRITON_INTERPRET=1``): that is how the CPU test suite checks the kernel itself.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops.metric_layout import NUM_METRICS

__all__ = ["cache_metrics_triton", "triton_launch_config"]


# ----------------------------------------------------------------------------------
# layout helpers
# ----------------------------------------------------------------------------------
def _merge_element_dims(
    sizes: Sequence[int], strides_list: Sequence[Sequence[int]]
) -> Tuple[list, list]:
    """Merge trailing (element) axes that are contiguous with each other in *all*
    tensors. Axes of size 1 are dropped. Returns (sizes, [strides per tensor])."""
    dims = [i for i, s in enumerate(sizes) if s != 1]
    out_sizes: list = []
    out_strides: list = [[] for _ in strides_list]
    for i in dims:
        if out_sizes and all(
            st[-1] == sizes[i] * strides[i] for st, strides in zip(out_strides, strides_list)
        ):
            out_sizes[-1] *= sizes[i]
            for st, strides in zip(out_strides, strides_list):
                st[-1] = strides[i]
        else:
            out_sizes.append(sizes[i])
            for st, strides in zip(out_strides, strides_list):
                st.append(strides[i])
    return out_sizes, out_strides


# ----------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------
# The kernel sticks to Triton builtins (tl.full, tl.reduce with triton's own sum
# combiner, not the @jit helpers tl.zeros / tl.sum), so that it can be re-wrapped
# for the interpreter even when triton was imported without TRITON_INTERPRET=1.
_sum_combine = getattr(getattr(tl, "standard", None), "_sum_combine", None)
if _sum_combine is None:  # pragma: no cover - older/newer triton layouts

    @triton.jit
    def _sum_combine(a, b):
        return a + b

@triton.jit
def _cache_metrics_kernel(
    r_ptr,
    p_ptr,
    part_ptr,
    F,
    N,
    N2,
    sr_b,
    sr_f,
    sr_1,
    sr_2,
    sp_b,
    sp_f,
    sp_1,
    sp_2,
    n_blocks,
    FRAME_STRIDE,
    BLOCK_N: tl.constexpr,
    INNER_2D: tl.constexpr,
):
    """One program = one (sample b, frame phase j, element block). It walks the
    frames j, j+s, j+2s, ... of its element block, keeping the previous frame of the
    same phase in registers, so every element of r and p is loaded exactly once.
    Partial sums go to part[b, j * n_blocks + block, 0:5] (no atomics)."""
    pid_n = tl.program_id(0)
    pid_bj = tl.program_id(1)
    b = pid_bj // FRAME_STRIDE
    j = pid_bj % FRAME_STRIDE

    offs = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    if INNER_2D:
        i1 = offs // N2
        i2 = offs % N2
        off_r = i1 * sr_1 + i2 * sr_2
        off_p = i1 * sp_1 + i2 * sp_2
    else:
        off_r = offs * sr_2
        off_p = offs * sp_2
    r_base = r_ptr + b.to(tl.int64) * sr_b + off_r
    p_base = p_ptr + b.to(tl.int64) * sp_b + off_p

    acc_d = tl.full([BLOCK_N], 0.0, tl.float32)
    acc_p = tl.full([BLOCK_N], 0.0, tl.float32)
    acc_m = tl.full([BLOCK_N], 0.0, tl.float32)
    acc_hi = tl.full([BLOCK_N], 0.0, tl.float32)
    acc_lo = tl.full([BLOCK_N], 0.0, tl.float32)
    prev = tl.full([BLOCK_N], 0.0, tl.float32)
    # Pointers advance by one phase step per frame (64-bit pointer arithmetic).
    r_ptrs = r_base + j.to(tl.int64) * sr_f
    p_ptrs = p_base + j.to(tl.int64) * sp_f
    r_step = FRAME_STRIDE * sr_f
    p_step = FRAME_STRIDE * sp_f
    for f in range(j, F, FRAME_STRIDE):
        rv = tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        pv = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
        r_ptrs += r_step
        p_ptrs += p_step
        acc_d += tl.abs(rv - pv)
        acc_p += tl.abs(pv)
        ar = tl.abs(rv)
        has_prev = f >= FRAME_STRIDE
        has_next = f < F - FRAME_STRIDE
        # tl.where (not a 0/1 weight) so that a NaN in an excluded frame stays out.
        acc_m = tl.where(has_prev, acc_m + tl.abs(rv - prev), acc_m)
        acc_hi = tl.where(has_prev, acc_hi + ar, acc_hi)
        acc_lo = tl.where(has_next, acc_lo + ar, acc_lo)
        prev = rv

    out = part_ptr + (pid_bj.to(tl.int64) * n_blocks + pid_n) * 5
    tl.store(out + 0, tl.reduce(acc_d, 0, _sum_combine))
    tl.store(out + 1, tl.reduce(acc_p, 0, _sum_combine))
    tl.store(out + 2, tl.reduce(acc_m, 0, _sum_combine))
    tl.store(out + 3, tl.reduce(acc_hi, 0, _sum_combine))
    tl.store(out + 4, tl.reduce(acc_lo, 0, _sum_combine))


_MAX_BLOCK_N = 2048
_MIN_BLOCK_N = 64
_MIN_PROGRAMS = 512


def triton_launch_config(
    B: int, F: int, N: int, frame_stride: int, interpret: bool = False
) -> Tuple[int, int]:
    """Block size and warps for the Triton kernel (documented rule, no autotuning, so
    that the reduction order - hence the bits - depends only on the shapes):

    * ``BLOCK_N = next_pow2(N)`` clamped to ``[64, 2048]``;
    * halved (not below 256) while the grid ``B * s * cdiv(N, BLOCK_N)`` has fewer than
      512 programs, to keep the SMs busy on small batches (not in interpreter mode,
      which runs programs one after another: fewer, larger blocks are faster there);
    * ``num_warps = clamp(BLOCK_N // 256, 1, 8)`` (8 fp32 elements per thread per tile).
    """
    block = 1 << max(0, (max(N, 1) - 1).bit_length())
    block = max(_MIN_BLOCK_N, min(_MAX_BLOCK_N, block))
    while not interpret and block > 256 and B * frame_stride * math.ceil(N / block) < _MIN_PROGRAMS:
        block //= 2
    num_warps = max(1, min(8, block // 256))
    return block, num_warps


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_KERNEL_VARIANTS: dict = {}


def _kernel(interpret: bool):
    """The jitted kernel, or its interpreter twin. ``triton.jit`` decides at decoration
    time (import time) whether to interpret, so a process that imported this module
    before setting TRITON_INTERPRET=1 still gets an interpreted kernel here."""
    from triton.runtime.interpreter import InterpretedFunction

    is_interp = isinstance(_cache_metrics_kernel, InterpretedFunction)
    if interpret == is_interp:
        return _cache_metrics_kernel
    if interpret not in _KERNEL_VARIANTS:
        fn = _cache_metrics_kernel.fn
        if interpret:
            _KERNEL_VARIANTS[interpret] = InterpretedFunction(fn)
        else:
            from triton.runtime.jit import JITFunction

            _KERNEL_VARIANTS[interpret] = JITFunction(fn)
    return _KERNEL_VARIANTS[interpret]


def _kernel_layout(r: Tensor, p: Tensor):
    """(r, p, N, N2, r_strides4, p_strides4, inner_2d) for the kernel: element axes
    merged where possible, at most two left; otherwise both are copied once."""
    sizes = list(r.shape[2:])
    m_sizes, (m_sr, m_sp) = _merge_element_dims(sizes, [list(r.stride()[2:]), list(p.stride()[2:])])
    if len(m_sizes) > 2:
        B, F = r.shape[0], r.shape[1]
        r = r.reshape(B, F, -1).contiguous()
        p = p.reshape(B, F, -1).contiguous()
        m_sizes, m_sr, m_sp = [r.shape[2]], [1], [1]
    if len(m_sizes) == 0:
        m_sizes, m_sr, m_sp = [1], [0], [0]
    if len(m_sizes) == 1:
        N = N2 = m_sizes[0]
        sr1, sr2, sp1, sp2 = 0, m_sr[0], 0, m_sp[0]
        inner_2d = False
    else:
        N = m_sizes[0] * m_sizes[1]
        N2 = m_sizes[1]
        sr1, sr2 = m_sr
        sp1, sp2 = m_sp
        inner_2d = True
    return r, p, N, N2, (r.stride(0), r.stride(1), sr1, sr2), (p.stride(0), p.stride(1), sp1, sp2), inner_2d


def cache_metrics_triton(
    r: Tensor,
    p: Tensor,
    frame_stride: int = 1,
    *,
    block_n: Optional[int] = None,
    num_warps: Optional[int] = None,
    interpret: Optional[bool] = None,
) -> Tensor:
    """Host launcher of ``_cache_metrics_kernel``: launches, reduces the per-program
    partials in a fixed order and returns float32 ``(B, 5)``. Inputs as validated by
    ``fused_cache_metrics`` (the op's entry point, which validates once).

    Runs on CUDA tensors, or on CPU tensors with the Triton interpreter
    (``interpret=True``, or ``TRITON_INTERPRET=1`` in the environment) - that is how the
    CPU test suite exercises the kernel itself. ``block_n``/``num_warps`` override
    :func:`triton_launch_config` (``block_n`` must be a power of two).
    """
    if interpret is None:
        interpret = _interpret_requested() or r.device.type == "cpu"
    if r.device.type == "cpu" and not interpret:
        raise ValueError("cache_metrics_triton: CPU tensors need interpret=True (TRITON_INTERPRET=1)")
    B, F = r.shape[0], r.shape[1]
    s = frame_stride
    r, p, N, N2, sr, sp, inner_2d = _kernel_layout(r, p)
    cfg_block, cfg_warps = triton_launch_config(B, F, N, s, interpret)
    if block_n is not None:
        if block_n < 1 or block_n & (block_n - 1):
            raise ValueError(f"cache_metrics_triton: block_n must be a power of two, got {block_n}")
        cfg_block = block_n
    if num_warps is not None:
        cfg_warps = num_warps
    n_blocks = max(1, math.ceil(N / cfg_block))
    if B == 0:
        return torch.zeros(0, NUM_METRICS, dtype=torch.float32, device=r.device)
    if B * s > 65535:
        raise ValueError(
            f"cache_metrics_triton: B * frame_stride = {B * s} exceeds the grid limit 65535; "
            "split the batch"
        )
    partials = torch.empty(B, s * n_blocks, NUM_METRICS, dtype=torch.float32, device=r.device)
    grid = (n_blocks, B * s)
    _kernel(interpret)[grid](
        r, p, partials, F, N, N2, *sr, *sp, n_blocks, s,
        BLOCK_N=cfg_block, INNER_2D=inner_2d, num_warps=cfg_warps,
    )
    # Fixed-order reduction over the programs of each sample (deterministic).
    return partials.sum(dim=1)

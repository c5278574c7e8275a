"""Fused AdaCache distance + MoReg motion partial sums (one pass over r and p).

Public entry point: :func:`fused_cache_metrics` (``torch.ops.adacache_fx.cache_metrics``).

Semantics
---------
``r`` (probe residual of this computed step) and ``p`` (probe residual of the previous
computed step) have the same shape ``(B, F, *E)``: a batch-like axis, the frame axis,
then one or two element axes (``(B, F, N)`` or ``(B, F, S, C)``; more trailing axes are
accepted too). For each sample ``b`` the op returns five float32 partial sums::

    out[b, 0] = sum |r[b] - p[b]|                         # AdaCache distance numerator
    out[b, 1] = sum |p[b]|                                # AdaCache distance denominator
    out[b, 2] = sum |r[b, s:] - r[b, :-s]|                # MoReg numerator
    out[b, 3] = sum |r[b, s:]|                            # MoReg denominator, part 1
    out[b, 4] = sum |r[b, :-s]|                           # MoReg denominator, part 2

with ``s = frame_stride``. When ``F < s + 1`` (images, one frame, or fewer frames than
the stride) there is no frame pair and the three motion sums are exactly ``0``.
Accumulation is in float32 for every input dtype (fp32, bf16, fp16); NaN and Inf
propagate into the sums whose terms contain them. The scheduler sums the rows over the
batch (``out.sum(0)``) to get the whole-tensor L1 norms of the paper's formulas.

Determinism: no atomics anywhere. The Triton kernel writes one partial row per program
(``partials[B, S * n_blocks, 5]``) and a fixed-order reduction sums them; the block
size depends only on the shapes (never on the device or on autotuning), so the same
inputs give bit-identical sums on every call and on every rank of the same GPU model.

Layouts: the kernel indexes ``r`` and ``p`` through their own strides, so the strided
probe views a DiT produces are read in place. After merging element axes that are
contiguous with each other, up to two element axes are supported without a copy:

* Latte spatial ``(B*F, S, C)`` -> ``x.view(B, F, S, C)`` (or ``.view(B, F, S*C)``),
* Latte temporal ``(B*S, F, C)`` -> ``x.view(B, S, F, C).permute(0, 2, 1, 3)``
  (a ``(B, F, S, C)`` view with non-mergeable ``S``/``C`` strides: read in place),
* STDiT ``(B, F*S, C)`` -> ``x.view(B, F, S, C)`` or ``x.view(B, F, S*C)``.

Anything needing more than two element axes is copied with ``reshape`` once.

Backends
--------
* CUDA + Triton: ``_cache_metrics_kernel`` (registered through
  :func:`torch.library.triton_op`, so inductor sees the kernel inside compiled graphs).
* CPU: a one-pass C kernel compiled on first use when a C compiler is available (see
  ``cpu_cache_metrics.py``), otherwise the multi-pass torch implementation
  :func:`cache_metrics_torch`; both sit behind the opaque custom op
  ``adacache_fx::cache_metrics_cpu``, so eager and compiled graphs produce the same bits.
* CUDA without Triton: :func:`cache_metrics_torch`.

The backends agree to float32 rounding, not bitwise (their summation orders differ):
all ranks of one job must use the same backend (they do: same device type, same
shapes), which is what the scheduler's "every rank takes the same decision" needs.
Element-wise terms are accumulated in float32 per element over the frames; the Triton
kernel then sums each block in float32 and the per-program partials in float32, the
CPU kernel combines its per-strip float32 sums in float64.

Triton is an optional import.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

try:  # Triton is optional: the CPU path and the CUDA torch fallback work without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "NUM_METRICS",
    "SUPPORTED_DTYPES",
    "fused_cache_metrics",
    "cache_metrics_reference",
    "cache_metrics_torch",
    "cache_metrics_triton",
    "triton_launch_config",
]

NUM_METRICS = 5
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------
# validation and layout helpers
# ----------------------------------------------------------------------------------
def _validate(r: Tensor, p: Tensor, frame_stride: int) -> None:
    if not isinstance(r, Tensor) or not isinstance(p, Tensor):
        raise TypeError(
            f"fused_cache_metrics: r and p must be torch.Tensor, got {type(r).__name__} "
            f"and {type(p).__name__}"
        )
    if isinstance(frame_stride, bool) or not isinstance(frame_stride, int):
        raise TypeError(
            f"fused_cache_metrics: frame_stride must be an int, got {type(frame_stride).__name__}"
        )
    if frame_stride < 1:
        raise ValueError(f"fused_cache_metrics: frame_stride must be >= 1, got {frame_stride}")
    if r.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"fused_cache_metrics: r has dtype {r.dtype}; supported dtypes are "
            "torch.float32, torch.bfloat16 and torch.float16"
        )
    if p.dtype != r.dtype:
        raise TypeError(
            f"fused_cache_metrics: r and p must have the same dtype, got r {r.dtype} and p {p.dtype}"
        )
    if r.dim() < 3:
        raise ValueError(
            "fused_cache_metrics: r must have shape (B, F, N) (or (B, F, S, C)), got a "
            f"{r.dim()}-d tensor of shape {tuple(r.shape)}; add the missing axes with "
            "unsqueeze (e.g. an image is F = 1)"
        )
    if p.shape != r.shape:
        raise ValueError(
            f"fused_cache_metrics: r and p must have the same shape, got r {tuple(r.shape)} "
            f"and p {tuple(p.shape)}"
        )
    if p.device != r.device:
        raise ValueError(
            f"fused_cache_metrics: r and p must be on the same device, got r on {r.device} "
            f"and p on {p.device}"
        )


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
# float64 reference and torch implementation
# ----------------------------------------------------------------------------------
def cache_metrics_reference(r: Tensor, p: Tensor, frame_stride: int = 1) -> Tensor:
    """Float64 reference of :func:`fused_cache_metrics`: returns float64 ``(B, 5)`` on
    r's device. Straightforward separate passes (like the public AdaCache code), meant
    for tests and benchmarks, not for speed."""
    _validate(r, p, frame_stride)
    s = frame_stride
    B, F = r.shape[0], r.shape[1]
    r64 = r.to(torch.float64).reshape(B, F, -1)
    p64 = p.to(torch.float64).reshape(B, F, -1)
    out = torch.zeros(B, NUM_METRICS, dtype=torch.float64, device=r.device)
    out[:, 0] = (r64 - p64).abs().sum(dim=(1, 2))
    out[:, 1] = p64.abs().sum(dim=(1, 2))
    if F >= s + 1:
        hi, lo = r64[:, s:], r64[:, :-s]
        out[:, 2] = (hi - lo).abs().sum(dim=(1, 2))
        out[:, 3] = hi.abs().sum(dim=(1, 2))
        out[:, 4] = lo.abs().sum(dim=(1, 2))
    return out


def cache_metrics_torch(r: Tensor, p: Tensor, frame_stride: int = 1) -> Tensor:
    """Pure-torch implementation (any device, fp32 accumulation). Used for CUDA without
    Triton, for CPU when no C compiler is available, and as the traceable body."""
    _validate(r, p, frame_stride)
    s = frame_stride
    B, F = r.shape[0], r.shape[1]
    rf = r.reshape(B, F, -1).to(torch.float32)
    pf = p.reshape(B, F, -1).to(torch.float32)
    d = (rf - pf).abs().sum(dim=(1, 2))
    pn = pf.abs().sum(dim=(1, 2))
    if F >= s + 1:
        hi, lo = rf[:, s:], rf[:, :-s]
        m = (hi - lo).abs().sum(dim=(1, 2))
        h = hi.abs().sum(dim=(1, 2))
        lw = lo.abs().sum(dim=(1, 2))
    else:
        m = h = lw = torch.zeros_like(d)
    return torch.stack([d, pn, m, h, lw], dim=1)


# ----------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------
if HAS_TRITON:
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

else:  # pragma: no cover
    _cache_metrics_kernel = None


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
    if not HAS_TRITON:
        raise RuntimeError("fused_cache_metrics: triton is not installed")
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
    _wrap=None,
) -> Tensor:
    """Host launcher of ``_cache_metrics_kernel``. Validates, launches, reduces the
    per-program partials in a fixed order and returns float32 ``(B, 5)``.

    Runs on CUDA tensors, or on CPU tensors with the Triton interpreter
    (``interpret=True``, or ``TRITON_INTERPRET=1`` in the environment) - that is how the
    CPU test suite exercises the kernel itself. ``block_n``/``num_warps`` override
    :func:`triton_launch_config` (``block_n`` must be a power of two).
    """
    _validate(r, p, frame_stride)
    if not HAS_TRITON:
        raise RuntimeError("cache_metrics_triton: triton is not installed")
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
    kernel = _kernel(interpret)
    if _wrap is not None:
        kernel = _wrap(kernel)
    kernel[grid](
        r, p, partials, F, N, N2, *sr, *sp, n_blocks, s,
        BLOCK_N=cfg_block, INNER_2D=inner_2d, num_warps=cfg_warps,
    )
    # Fixed-order reduction over the programs of each sample (deterministic).
    return partials.sum(dim=1)


# ----------------------------------------------------------------------------------
# CPU implementation
# ----------------------------------------------------------------------------------
def _cache_metrics_cpu_impl(r: Tensor, p: Tensor, frame_stride: int) -> Tensor:
    from . import cpu_cache_metrics

    return cpu_cache_metrics.cache_metrics_cpu(r, p, frame_stride)


@torch.library.custom_op("adacache_fx::cache_metrics_cpu", mutates_args=())
def _cache_metrics_cpu_op(r: Tensor, p: Tensor, frame_stride: int) -> Tensor:
    return _cache_metrics_cpu_impl(r, p, frame_stride)


@_cache_metrics_cpu_op.register_fake
def _(r: Tensor, p: Tensor, frame_stride: int) -> Tensor:
    return r.new_empty((r.shape[0], NUM_METRICS), dtype=torch.float32)


# ----------------------------------------------------------------------------------
# the public op
# ----------------------------------------------------------------------------------
def _cache_metrics_body(r: Tensor, p: Tensor, frame_stride: int) -> Tensor:
    if r.device.type == "cuda":
        if HAS_TRITON:
            from torch.library import wrap_triton

            return cache_metrics_triton(r, p, frame_stride, interpret=False, _wrap=wrap_triton)
        return cache_metrics_torch(r, p, frame_stride)
    if r.device.type == "cpu":
        return torch.ops.adacache_fx.cache_metrics_cpu(r, p, frame_stride)
    return cache_metrics_torch(r, p, frame_stride)


if HAS_TRITON:

    @torch.library.triton_op("adacache_fx::cache_metrics", mutates_args=())
    def _cache_metrics_op(r: Tensor, p: Tensor, frame_stride: int) -> Tensor:
        return _cache_metrics_body(r, p, frame_stride)

    # Eager CPU calls go straight to the CPU kernel (one custom-op layer less, ~60 us);
    # traced graphs still decompose the body into adacache_fx::cache_metrics_cpu.
    _cache_metrics_op.register_kernel("cpu")(_cache_metrics_cpu_impl)

else:  # pragma: no cover

    @torch.library.custom_op("adacache_fx::cache_metrics", mutates_args=())
    def _cache_metrics_op(r: Tensor, p: Tensor, frame_stride: int) -> Tensor:
        return _cache_metrics_body(r, p, frame_stride)

    @_cache_metrics_op.register_fake
    def _(r: Tensor, p: Tensor, frame_stride: int) -> Tensor:
        return r.new_empty((r.shape[0], NUM_METRICS), dtype=torch.float32)


def fused_cache_metrics(r: Tensor, p: Tensor, frame_stride: int = 1) -> Tensor:
    """Per-sample partial sums for the AdaCache distance and the MoReg motion score,
    in one pass over ``r`` and ``p``.

    Args:
        r: probe residual of this computed step, shape ``(B, F, N)`` (or ``(B, F, S, C)``),
            fp32/bf16/fp16, any strides.
        p: probe residual of the previous computed step, same shape and dtype.
        frame_stride: MoReg frame stride ``s`` (>= 1).

    Returns:
        float32 ``(B, 5)`` on r's device: ``[sum|r-p|, sum|p|, sum|r[:,s:]-r[:,:-s]|,
        sum|r[:,s:]|, sum|r[:,:-s]|]`` per sample; the motion sums are 0 when
        ``F < s + 1``. Sum over dim 0 for whole-batch norms.

    Calls ``torch.ops.adacache_fx.cache_metrics`` (no graph break under torch.compile).
    """
    _validate(r, p, frame_stride)
    return torch.ops.adacache_fx.cache_metrics(r, p, frame_stride)

"""CPU implementation of the fused cache metrics: the same single pass as the Triton
kernel, written in C and compiled on first use.

Why C and not the torch composite: the composite (``(r - p).abs().sum()`` and friends)
reads r and p several times and materialises temporaries; on a CPU that is memory-bound
work, so one pass is several times faster. The C source below is compiled once per
machine with the system C compiler (``$CC``, else ``cc``/``gcc``) into a small shared
library, cached under ``$ADACACHE_FX_CACHE_DIR`` (default
``~/.cache/adacache_fx/kernels``), and called through ``ctypes`` (the GIL is released
during the call). It has no torch headers, so it compiles in well under a second.

If no compiler is available (or compilation fails, or ``ADACACHE_FX_DISABLE_CPU_KERNEL=1``)
the torch implementation :func:`cache_metrics_torch` is used instead: same semantics,
several passes.

Same semantics as the Triton kernel: per (sample, frame phase, element block) work item,
the frames of the phase are walked in order with the previous frame kept in an L1
buffer; per-element float32 accumulators; per-item partials combined in a fixed order
(float64, then rounded to float32). Work items are split across
``torch.get_num_threads()`` pthreads, but the combination order does not depend on the
thread count, so the result is bit-identical for any number of threads. No -ffast-math:
NaN and Inf propagate.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Optional

import torch
from torch import Tensor

__all__ = ["cache_metrics_cpu", "cpu_kernel_available", "CPU_BLOCK"]

CPU_BLOCK = 2048  # elements per work item along the innermost element axis

_C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <pthread.h>

#define BLK %(BLOCK)d

static inline float ld_f32(const float *p) { return *p; }
static inline float ld_bf16(const uint16_t *p) {
    uint32_t u = ((uint32_t)(*p)) << 16; float f; memcpy(&f, &u, 4); return f;
}
#ifdef __FLT16_MAX__
static inline float ld_f16(const _Float16 *p) { return (float)(*p); }
#else
static inline float ld_f16(const uint16_t *p) {
    uint32_t h = *p, sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu, u;
    if (e == 0) {
        if (m == 0) { u = sign; }
        else { e = 127 - 15 + 1; while (!(m & 0x400u)) { m <<= 1; e--; } m &= 0x3ffu; u = sign | (e << 23) | (m << 13); }
    } else if (e == 31) { u = sign | 0x7f800000u | (m << 13); }
    else { u = sign | ((e + 127 - 15) << 23) | (m << 13); }
    float f; memcpy(&f, &u, 4); return f;
}
#endif

typedef struct {
    const void *r, *p;
    double *part;                 /* [items, 5] */
    int64_t F, N1, N2, s;
    int64_t sr_b, sr_f, sr_1, sr_2, sp_b, sp_f, sp_1, sp_2;   /* element strides */
    int64_t n2_blocks, items;
    int64_t begin, end;           /* item range of one thread */
} job_t;

/* One work item = (sample b, frame phase j, element row i1, block of BLK elements).
   Loop 1 reads r and p (the only loads from memory) into per-element float32
   accumulators and an L1 copy of the r row; loop 2 does the motion terms from the L1
   copies of this frame and the previous frame of the same phase. Splitting keeps the
   arrays each loop touches inside L1; both loops vectorise. */
#define DEFINE_ITEM(NAME, T, LD)                                                       \
static void item_##NAME(const job_t *J, int64_t item) {                                \
    int64_t nb = item %% J->n2_blocks, t = item / J->n2_blocks;                         \
    int64_t i1 = t %% J->N1; t /= J->N1;                                                \
    int64_t j = t %% J->s, b = t / J->s;                                                \
    int64_t n0 = nb * BLK, len = J->N2 - n0 < BLK ? J->N2 - n0 : BLK;                  \
    float ad[BLK], ap[BLK], am[BLK], ah[BLK], al[BLK], buf0[BLK], buf1[BLK];           \
    float *cur = buf0, *prev = buf1, *tmp;                                              \
    for (int64_t i = 0; i < len; i++) { ad[i] = 0.f; ap[i] = 0.f; am[i] = 0.f; ah[i] = 0.f; al[i] = 0.f; } \
    const T *rb = (const T *)J->r + b * J->sr_b + i1 * J->sr_1 + n0 * J->sr_2;         \
    const T *pb = (const T *)J->p + b * J->sp_b + i1 * J->sp_1 + n0 * J->sp_2;         \
    const int64_t s = J->s, F = J->F, sr2 = J->sr_2, sp2 = J->sp_2;                     \
    for (int64_t f = j; f < F; f += s) {                                                \
        const T *rr = rb + f * J->sr_f, *pp = pb + f * J->sp_f;                         \
        if (sr2 == 1 && sp2 == 1) {                                                     \
            for (int64_t i = 0; i < len; i++) {                                         \
                float rv = LD(rr + i), pv = LD(pp + i);                                 \
                ad[i] += fabsf(rv - pv); ap[i] += fabsf(pv); cur[i] = rv;               \
            }                                                                           \
        } else {                                                                        \
            for (int64_t i = 0; i < len; i++) {                                         \
                float rv = LD(rr + i * sr2), pv = LD(pp + i * sp2);                     \
                ad[i] += fabsf(rv - pv); ap[i] += fabsf(pv); cur[i] = rv;               \
            }                                                                           \
        }                                                                               \
        if (f >= s) {                                                                   \
            for (int64_t i = 0; i < len; i++) {                                         \
                am[i] += fabsf(cur[i] - prev[i]); ah[i] += fabsf(cur[i]);               \
            }                                                                           \
        }                                                                               \
        if (f < F - s) {                                                                \
            for (int64_t i = 0; i < len; i++) al[i] += fabsf(cur[i]);                   \
        }                                                                               \
        tmp = prev; prev = cur; cur = tmp;                                              \
    }                                                                                   \
    double sd = 0, sp = 0, sm = 0, sh = 0, sl = 0;                                      \
    for (int64_t i = 0; i < len; i++) { sd += ad[i]; sp += ap[i]; sm += am[i]; sh += ah[i]; sl += al[i]; } \
    double *o = J->part + item * 5;                                                     \
    o[0] = sd; o[1] = sp; o[2] = sm; o[3] = sh; o[4] = sl;                              \
}

DEFINE_ITEM(f32, float, ld_f32)
DEFINE_ITEM(bf16, uint16_t, ld_bf16)
#ifdef __FLT16_MAX__
DEFINE_ITEM(f16, _Float16, ld_f16)
#else
DEFINE_ITEM(f16, uint16_t, ld_f16)
#endif

typedef void (*item_fn)(const job_t *, int64_t);
typedef struct { job_t job; item_fn fn; } thread_arg_t;

static void *run_range(void *arg) {
    thread_arg_t *a = (thread_arg_t *)arg;
    for (int64_t it = a->job.begin; it < a->job.end; it++) a->fn(&a->job, it);
    return 0;
}

/* dtype: 0 = float32, 1 = bfloat16, 2 = float16. Returns 0 on success. */
int adacache_cache_metrics(const void *r, const void *p, double *part, double *out, int dtype,
                           int64_t F, int64_t N1, int64_t N2, int64_t s,
                           int64_t sr_b, int64_t sr_f, int64_t sr_1, int64_t sr_2,
                           int64_t sp_b, int64_t sp_f, int64_t sp_1, int64_t sp_2,
                           int64_t B, int nthreads) {
    item_fn fn = dtype == 0 ? item_f32 : dtype == 1 ? item_bf16 : dtype == 2 ? item_f16 : 0;
    if (!fn) return 1;
    job_t J;
    J.r = r; J.p = p; J.part = part; J.F = F; J.N1 = N1; J.N2 = N2; J.s = s;
    J.sr_b = sr_b; J.sr_f = sr_f; J.sr_1 = sr_1; J.sr_2 = sr_2;
    J.sp_b = sp_b; J.sp_f = sp_f; J.sp_1 = sp_1; J.sp_2 = sp_2;
    J.n2_blocks = (N2 + BLK - 1) / BLK;
    J.items = B * s * N1 * J.n2_blocks;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 256) nthreads = 256;
    if (nthreads > J.items) nthreads = (int)(J.items > 0 ? J.items : 1);
    thread_arg_t args[256];
    pthread_t tids[256];
    for (int t = 0; t < nthreads; t++) {
        args[t].job = J; args[t].fn = fn;
        args[t].job.begin = J.items * t / nthreads;
        args[t].job.end = J.items * (t + 1) / nthreads;
    }
    int started = 0;
    for (int t = 1; t < nthreads; t++) {
        if (pthread_create(&tids[t], 0, run_range, &args[t]) != 0) break;
        started = t;
    }
    run_range(&args[0]);
    for (int t = started + 1; t < nthreads; t++) run_range(&args[t]);   /* not started */
    for (int t = 1; t <= started; t++) pthread_join(tids[t], 0);
    /* fixed-order combination: out[b, k] = sum over the items of sample b, in order */
    int64_t per_b = J.items / (B > 0 ? B : 1);
    for (int64_t b = 0; b < B; b++) {
        double acc[5] = {0, 0, 0, 0, 0};
        for (int64_t it = b * per_b; it < (b + 1) * per_b; it++)
            for (int k = 0; k < 5; k++) acc[k] += part[it * 5 + k];
        for (int k = 0; k < 5; k++) out[b * 5 + k] = acc[k];
    }
    return 0;
}
"""

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lib_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_lib_error: Optional[str] = None


def _cache_dir() -> str:
    d = os.environ.get("ADACACHE_FX_CACHE_DIR")
    if not d:
        d = os.path.join(os.path.expanduser("~"), ".cache", "adacache_fx", "kernels")
    return d


def _cpu_signature() -> str:
    """Identifies the CPU type, so a -march=native build is never reused elsewhere."""
    info = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "flags")):
                    info += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return info


def _compiler() -> Optional[str]:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    src = _C_SOURCE % {"BLOCK": CPU_BLOCK}
    flag_sets = [
        ["-O3", "-march=native", "-fno-math-errno"],
        ["-O3", "-fno-math-errno"],
    ]
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256(
            (src + cc + " ".join(flags) + _cpu_signature()).encode()
        ).hexdigest()[:20]
        out_dir = _cache_dir()
        so_path = os.path.join(out_dir, f"cache_metrics_{key}.so")
        if not os.path.exists(so_path):
            os.makedirs(out_dir, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
                c_path = os.path.join(tmp, "cache_metrics.c")
                tmp_so = os.path.join(tmp, "cache_metrics.so")
                with open(c_path, "w") as fh:
                    fh.write(src)
                cmd = [cc, *flags, "-std=gnu11", "-shared", "-fPIC", "-pthread", c_path, "-o", tmp_so, "-lm"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[-500:]}")
                    continue
                os.replace(tmp_so, so_path)  # atomic: concurrent builders are fine
        lib = ctypes.CDLL(so_path)
        fn = lib.adacache_cache_metrics
        fn.restype = ctypes.c_int
        fn.argtypes = (
            [ctypes.c_void_p] * 4 + [ctypes.c_int]
            + [ctypes.c_int64] * 4
            + [ctypes.c_int64] * 8
            + [ctypes.c_int64, ctypes.c_int]
        )
        return lib
    raise RuntimeError("compiling the CPU cache-metrics kernel failed: " + " | ".join(errors))


def _get_lib() -> Optional[ctypes.CDLL]:
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    with _lib_lock:
        if _lib is None and _lib_error is None:
            if os.environ.get("ADACACHE_FX_DISABLE_CPU_KERNEL", "0") == "1":
                _lib_error = "disabled by ADACACHE_FX_DISABLE_CPU_KERNEL=1"
            else:
                try:
                    _lib = _build()
                except Exception as exc:  # no compiler, read-only cache dir, ...
                    _lib_error = f"{type(exc).__name__}: {exc}"
    return _lib


def cpu_kernel_available() -> bool:
    """True when the compiled one-pass CPU kernel can be used (compiles it if needed)."""
    return _get_lib() is not None


def _work_items(B: int, s: int, N1: int, N2: int) -> int:
    return B * s * N1 * max(1, -(-N2 // CPU_BLOCK))


def cache_metrics_cpu(
    r: Tensor, p: Tensor, frame_stride: int = 1, *, num_threads: Optional[int] = None
) -> Tensor:
    """One-pass CPU implementation; float32 ``(B, 5)``. Falls back to the torch
    implementation when the C kernel is unavailable."""
    from .cache_metrics import NUM_METRICS, _kernel_layout, _validate, cache_metrics_torch

    _validate(r, p, frame_stride)
    if r.device.type != "cpu":
        raise ValueError(f"cache_metrics_cpu: expected CPU tensors, got {r.device}")
    lib = _get_lib()
    if lib is None:
        return cache_metrics_torch(r, p, frame_stride)
    B, F = r.shape[0], r.shape[1]
    s = frame_stride
    if B == 0:
        return torch.zeros(0, NUM_METRICS, dtype=torch.float32)
    r, p, N, N2, sr, sp, inner_2d = _kernel_layout(r, p)
    N1 = N // N2 if inner_2d else 1
    if not inner_2d:
        N2 = N
    if r.numel() == 0:
        return torch.zeros(B, NUM_METRICS, dtype=torch.float32)
    items = _work_items(B, s, N1, N2)
    part = torch.empty(items, NUM_METRICS, dtype=torch.float64)
    if num_threads is None:
        num_threads = torch.get_num_threads()
    # Small inputs: thread start-up costs more than it saves (~64k elements per thread).
    num_threads = max(1, min(num_threads, (r.numel() >> 16) or 1))
    out = torch.empty(B, NUM_METRICS, dtype=torch.float64)
    rc = lib.adacache_cache_metrics(
        r.data_ptr(), p.data_ptr(), part.data_ptr(), out.data_ptr(), _DTYPE_CODE[r.dtype],
        F, N1, N2, s, *sr, *sp, B, num_threads,
    )
    if rc != 0:  # pragma: no cover
        raise RuntimeError(f"cache_metrics_cpu: kernel returned {rc}")
    return out.to(torch.float32)

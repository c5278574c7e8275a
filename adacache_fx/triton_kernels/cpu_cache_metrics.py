"""CPU implementation of the fused cache metrics: the same single pass as the Triton
kernel, written in C and compiled on first use.

Why C and not the torch composite: the composite (``(r - p).abs().sum()`` and friends)
reads r and p several times and materialises temporaries; on a CPU that is memory-bound
work, so one pass is several times faster. (It is also more accurate: on CPU, torch's
single-threaded ``norm(p=1)`` of 10^7-10^8 elements loses up to tens of percent in
float32 and bfloat16 - see benchmarks/results/kernels_cpu.md.) The C source below is compiled once per
machine with the system C compiler (``$CC``, else ``cc``/``gcc``) into a small shared
library, cached under ``$ADACACHE_FX_CACHE_DIR`` (default
``~/.cache/adacache_fx/kernels``), and called through ``ctypes`` (the GIL is released
during the call). It has no torch headers, so it compiles in well under a second.

If no compiler is available (or compilation fails, or ``ADACACHE_FX_DISABLE_CPU_KERNEL=1``)
the torch implementation :func:`cache_metrics_torch` is used instead: same semantics,
several passes.

Same semantics as the Triton kernel. A work item is (sample, frame phase, element row,
block of CPU_BLOCK elements); the block is walked in strips of 16 elements (two AVX2
vectors) and, for each strip, the frames of the phase in order, with the float32
accumulators and the previous frame in registers (the |r| sums of the first and last
frame of a phase are kept apart, so only 8 accumulators stay live: no spills): every
element of r and p is loaded exactly once. Frames are taken in chunks of 4 (the strip state waits in a small
L1/L2-resident array between chunks) so that at most 8 memory streams are live at a time,
which the hardware prefetchers follow far better than one stream per frame (about 2x
from DRAM for 15-21 frames). Per-strip float32 sums are combined in a fixed order
(float32 over groups of 16 strips, then float64 lanes, then a fixed tree), and the
per-item partials are summed per sample in item order (float64, rounded to float32 at
the end). Work items are split across
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

/* Vector helpers (GCC/Clang vector extensions: AVX2 with -march=native, SSE otherwise). */
typedef float vf __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef uint16_t vh __attribute__((vector_size(16)));
#define VL 8          /* floats per vector */
#define W (2 * VL)    /* elements per strip: two vectors per accumulator */
#define PF_BYTES 512  /* software prefetch distance along a frame row */

static inline vf vabs(vf x) {
    vu u; memcpy(&u, &x, sizeof u);
    u &= (vu){0x7fffffffu, 0x7fffffffu, 0x7fffffffu, 0x7fffffffu,
              0x7fffffffu, 0x7fffffffu, 0x7fffffffu, 0x7fffffffu};
    memcpy(&x, &u, sizeof x); return x;
}
static inline vf ldv_f32(const float *q) { vf v; memcpy(&v, q, sizeof v); return v; }
#if defined(__AVX2__)
#include <immintrin.h>
static inline vf ldv_bf16(const uint16_t *q) {
    __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)q)), 16);
    vf v; memcpy(&v, &u, sizeof v); return v;
}
#else
static inline vf ldv_bf16(const uint16_t *q) {
    vh h; memcpy(&h, q, sizeof h); vu u = __builtin_convertvector(h, vu) << 16;
    vf v; memcpy(&v, &u, sizeof v); return v;
}
#endif
#if defined(__F16C__) && defined(__AVX__)
#ifndef __AVX2__
#include <immintrin.h>
#endif
static inline vf ldv_f16(const void *q) {
    __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)q)); vf v; memcpy(&v, &f, sizeof v); return v;
}
#elif defined(__FLT16_MAX__)
typedef _Float16 vhf __attribute__((vector_size(16)));
static inline vf ldv_f16(const _Float16 *q) { vhf h; memcpy(&h, q, sizeof h); return __builtin_convertvector(h, vf); }
#else
static inline vf ldv_f16(const uint16_t *q) {
    float t[VL]; for (int k = 0; k < VL; k++) t[k] = ld_f16(q + k);
    vf v; memcpy(&v, t, sizeof v); return v;
}
#endif

/* One work item = (sample b, frame phase j, element row i1, block of BLK elements).
   The block is walked in strips of W elements; for each strip the frames j, j+s, ...
   are walked in order with all five accumulators and the previous frame in registers,
   so each element of r and p is loaded exactly once and nothing else touches memory.
   Per lane the sums are float32 over the frames of G consecutive strips (in order);
   each group is added into W float64 lanes in order and the lanes are combined in a
   fixed tree, so
   the result depends on nothing but the shapes (not on threads, not on timing). */
#define STEP(HAS_PREV, HAS_NEXT)                                                        \
    if (contig) {                                                                       \
        __builtin_prefetch((const char *)rq + PF_BYTES);                                \
        __builtin_prefetch((const char *)pq + PF_BYTES);                                \
        r0 = LDV(rq); r1 = LDV(rq + VL); p0 = LDV(pq); p1 = LDV(pq + VL);              \
    } else {                                                                            \
        r0 = LDVS(rq, sr2); r1 = LDVS(rq + VL * sr2, sr2);                              \
        p0 = LDVS(pq, sp2); p1 = LDVS(pq + VL * sp2, sp2);                              \
    }                                                                                   \
    ad0 += vabs(r0 - p0); ad1 += vabs(r1 - p1); ap0 += vabs(p0); ap1 += vabs(p1);       \
    if (HAS_PREV) { am0 += vabs(r0 - pr0); am1 += vabs(r1 - pr1); }                     \
    /* |r| of frames with a previous and a next frame goes to mid (kept in registers); \
       the edge frames of a phase go to head / tail, updated in memory */              \
    if ((HAS_PREV) && (HAS_NEXT)) { md0 += vabs(r0); md1 += vabs(r1); }                 \
    else if (HAS_PREV) { A->v[10] += vabs(r0); A->v[11] += vabs(r1); }                  \
    else if (HAS_NEXT) { A->v[8] += vabs(r0); A->v[9] += vabs(r1); }                    \
    pr0 = r0; pr1 = r1;

/* state of one strip, float32, two vectors each: sum|r-p|, sum|p|, motion, mid, head,
   tail, previous frame. mid = |r| of frames with a previous and a next frame of the
   phase, head = first frames (no previous), tail = last frames (no next); then
   sum|r[s:]| = mid + tail and sum|r[:-s]| = head + mid, so a NaN in an edge frame only
   reaches the sums whose frames contain it. Only 8 accumulators live in registers in
   the inner loop (no spills with 16 AVX2 registers). */
typedef struct { vf v[14]; } acc_t;
#define G 16          /* strips per float32 combination group */
#define FC 4          /* frames per chunk: 2 * FC memory streams at a time */

#define SCALAR_STEP(HAS_PREV, HAS_NEXT)                                                 \
    rv = LD1(rq); pv = LD1(pq);                                                         \
    ad += fabsf(rv - pv); ap += fabsf(pv);                                              \
    if (HAS_PREV) { am += fabsf(rv - pr); ah += fabsf(rv); }                            \
    if (HAS_NEXT) al += fabsf(rv);                                                      \
    pr = rv;

#define DEFINE_ITEM(NAME, T, LD, LDV)                                                   \
static inline vf ldvs_##NAME(const T *q, int64_t st) {                                  \
    float t[VL]; for (int k = 0; k < VL; k++) t[k] = LD(q + k * st);                    \
    vf v; memcpy(&v, t, sizeof v); return v;                                            \
}                                                                                       \
static inline __attribute__((always_inline)) void strip_##NAME(                         \
        const T *rq, const T *pq, int64_t srf, int64_t spf, int64_t sr2, int64_t sp2,   \
        int64_t fb, int64_t fe, int64_t F, int64_t s, acc_t *A, vf *g, const int contig, \
        const int first, const int last) {                                              \
    const vf z = {0};                                                                   \
    vf ad0, ad1, ap0, ap1, am0, am1, md0, md1, pr0, pr1, r0, r1, p0, p1;                \
    if (first) {                                                                        \
        ad0 = ad1 = ap0 = ap1 = am0 = am1 = md0 = md1 = pr0 = pr1 = z;                  \
        A->v[8] = A->v[9] = A->v[10] = A->v[11] = z;                                    \
    } else {                                                                            \
        ad0 = A->v[0]; ad1 = A->v[1]; ap0 = A->v[2]; ap1 = A->v[3]; am0 = A->v[4];      \
        am1 = A->v[5]; md0 = A->v[6]; md1 = A->v[7]; pr0 = A->v[12]; pr1 = A->v[13];    \
    }                                                                                   \
    const int64_t rstep = s * srf, pstep = s * spf;                                     \
    int64_t f = fb;                                                                     \
    rq += f * srf; pq += f * spf;                                                       \
    if (f < s) {          /* first frame of the phase: no previous frame */             \
        STEP(0, f < F - s)                                                              \
        f += s; rq += rstep; pq += pstep;                                               \
    }                                                                                   \
    const int64_t mid = fe < F - s ? fe : F - s;                                        \
    for (; f < mid; f += s, rq += rstep, pq += pstep) {                                 \
        STEP(1, 1)                                                                      \
    }                                                                                   \
    for (; f < fe; f += s, rq += rstep, pq += pstep) {                                  \
        STEP(1, 0)                                                                      \
    }                                                                                   \
    if (last) {   /* fold into the strip group's sums (fixed strip order) */            \
        g[0] += ad0; g[1] += ad1; g[2] += ap0; g[3] += ap1; g[4] += am0; g[5] += am1;   \
        g[6] += md0 + A->v[10]; g[7] += md1 + A->v[11];   /* hi = mid + tail */          \
        g[8] += A->v[8] + md0;  g[9] += A->v[9] + md1;    /* lo = head + mid */          \
    } else {                                                                            \
        A->v[0] = ad0; A->v[1] = ad1; A->v[2] = ap0; A->v[3] = ap1; A->v[4] = am0;     \
        A->v[5] = am1; A->v[6] = md0; A->v[7] = md1; A->v[12] = pr0; A->v[13] = pr1;    \
    }                                                                                   \
}                                                                                       \
static void item_##NAME(const job_t *J, int64_t item) {                                 \
    int64_t nb = item %% J->n2_blocks, t = item / J->n2_blocks;                          \
    int64_t i1 = t %% J->N1; t /= J->N1;                                                 \
    int64_t j = t %% J->s, b = t / J->s;                                                 \
    int64_t n0 = nb * BLK, len = J->N2 - n0 < BLK ? J->N2 - n0 : BLK;                   \
    const int64_t s = J->s, F = J->F, sr2 = J->sr_2, sp2 = J->sp_2;                     \
    const int64_t srf = J->sr_f, spf = J->sp_f;                                         \
    const T *rb = (const T *)J->r + b * J->sr_b + i1 * J->sr_1 + n0 * sr2;              \
    const T *pb = (const T *)J->p + b * J->sp_b + i1 * J->sp_1 + n0 * sp2;              \
    double lane[5][W];                                                                  \
    memset(lane, 0, sizeof lane);                                                       \
    int64_t i = 0;                                                                      \
    if (j < F) {                                                                        \
        const int contig = sr2 == 1 && sp2 == 1;                                        \
        const int64_t nstrips = len / W;                                                \
        acc_t A[BLK / W];                                                               \
        vf gs[BLK / W / G + 1][10];                                                     \
        memset(gs, 0, sizeof gs);                                                       \
        /* frames in chunks of FC (fewer concurrent memory streams); the strip state    \
           (accumulators + previous frame) waits in A[] between chunks; after the last  \
           chunk each strip is folded into the float32 sums of its group of G strips */ \
        for (int64_t fb = j; fb < F; fb += FC * s) {                                    \
            int64_t fe = fb + FC * s < F ? fb + FC * s : F;                             \
            const int first = fb == j, last = fe == F;                                  \
            if (contig) {                                                               \
                for (int64_t k = 0; k < nstrips; k++)                                   \
                    strip_##NAME(rb + k * W, pb + k * W, srf, spf, 1, 1, fb, fe, F, s,  \
                                 &A[k], gs[k / G], 1, first, last);                     \
            } else {                                                                    \
                for (int64_t k = 0; k < nstrips; k++)                                   \
                    strip_##NAME(rb + k * W * sr2, pb + k * W * sp2, srf, spf, sr2, sp2, \
                                 fb, fe, F, s, &A[k], gs[k / G], 0, first, last);       \
            }                                                                           \
        }                                                                               \
        /* fixed order: the float32 group sums go into float64 lanes, group by group */ \
        for (int64_t k0 = 0; k0 < nstrips; k0 += G) {                                   \
            const vf *g = gs[k0 / G];                                                   \
            for (int m = 0; m < 5; m++)                                                 \
                for (int q = 0; q < VL; q++) {                                          \
                    lane[m][q] += g[2 * m][q]; lane[m][VL + q] += g[2 * m + 1][q];      \
                }                                                                       \
        }                                                                               \
        i = nstrips * W;                                                                \
        for (; i < len; i++) {    /* tail: same algorithm, one element at a time */     \
            const T *rq = rb + i * sr2 + j * srf, *pq = pb + i * sp2 + j * spf;         \
            float ad = 0, ap = 0, am = 0, ah = 0, al = 0, pr = 0, rv, pv;               \
            int64_t f = j;                                                              \
            SCALAR_STEP(0, f < F - s)                                                   \
            for (f += s, rq += s * srf, pq += s * spf; f < F; f += s, rq += s * srf, pq += s * spf) { \
                SCALAR_STEP(1, f < F - s)                                               \
            }                                                                           \
            lane[0][0] += ad; lane[1][0] += ap; lane[2][0] += am; lane[3][0] += ah; lane[4][0] += al; \
        }                                                                               \
    }                                                                                   \
    double *o = J->part + item * 5;                                                     \
    for (int m = 0; m < 5; m++) {                                                       \
        double a[W];                                                                    \
        for (int k = 0; k < W; k++) a[k] = lane[m][k];                                  \
        for (int w = W / 2; w >= 1; w /= 2)                                             \
            for (int k = 0; k < w; k++) a[k] = a[k] + a[k + w];                         \
        o[m] = a[0];                                                                    \
    }                                                                                   \
}

#define LDV ldv_f32
#define LD1 ld_f32
#define LDVS ldvs_f32
DEFINE_ITEM(f32, float, ld_f32, ldv_f32)
#undef LDV
#undef LDVS
#undef LD1
#define LDV ldv_bf16
#define LD1 ld_bf16
#define LDVS ldvs_bf16
DEFINE_ITEM(bf16, uint16_t, ld_bf16, ldv_bf16)
#undef LDV
#undef LDVS
#undef LD1
#define LDV ldv_f16
#define LD1 ld_f16
#define LDVS ldvs_f16
#ifdef __FLT16_MAX__
DEFINE_ITEM(f16, _Float16, ld_f16, ldv_f16)
#else
DEFINE_ITEM(f16, uint16_t, ld_f16, ldv_f16)
#endif
#undef LDV
#undef LDVS
#undef LD1

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
        ["-O3", "-fno-math-errno", "-Wno-psabi"],
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

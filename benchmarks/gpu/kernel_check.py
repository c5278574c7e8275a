"""Part 1: correctness of the compiled Triton kernel of ``torch.ops.adacache_fx.cache_metrics`` on CUDA.

Against a float64 torch reference (the five sums written out pass by pass): odd shapes
(N in {1, 7, 1023, 4097}, F in {1, 2, 3, 17}, B in {1, 2, 3}, frame_stride {1, 2}), fp32 /
bf16 / fp16, contiguous, sliced and transposed layouts of r and p; the real probe sizes
(Open-Sora 480p, Wan 1.3B 480p) in the DiT layouts the kernel reads in place; explicit block
sizes / warps; NaN / Inf propagation; bitwise determinism over repeated calls and over fresh
copies of the inputs; that the op dispatches to the Triton kernel on CUDA; the op inside an
inductor-compiled graph. Checks run most informative first, each group under the soft
budget (what did not fit is listed as not run).

``--dry-run``: CPU tensors, the same kernel under the Triton interpreter (run.sh sets
TRITON_INTERPRET=1), smaller shapes.
"""
from __future__ import annotations

import itertools
import os
import time
import traceback
import zlib

import torch

from ._common import PartReport, base_parser, fmt, md_table, run_part, tail

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# as tests/kernels/test_kernels.py: the reference sees the same rounded inputs in float64, so what is
# left is the float32 accumulation of the kernel
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-5, atol=1e-5),
       torch.float16: dict(rtol=2e-5, atol=1e-5)}
LAYOUTS = ["contiguous", "sliced", "transposed"]


def reference(r, p, s):
    """The float64 reference, pass by pass (adacache_fx.ops.cache_metrics_reference)."""
    from adacache_fx.ops import cache_metrics_reference
    return cache_metrics_reference(r, p, s)


def make(B, F, N, dtype, layout, seed, device):
    g = torch.Generator(device=device).manual_seed(seed)
    if layout == "contiguous":
        return torch.randn(B, F, N, generator=g, device=device).to(dtype)
    if layout == "sliced":
        x = torch.randn(B + 1, F + 2, N + 5, generator=g, device=device).to(dtype)
        return x[1:, 1:-1, 3:3 + N]
    if layout == "transposed":
        return torch.randn(B, N, F, generator=g, device=device).to(dtype).transpose(1, 2)
    raise ValueError(layout)


def dit_view(kind, B, F, S, C, dtype, seed, device):
    """The probe views DiTs produce (read in place by the kernel)."""
    g = torch.Generator(device=device).manual_seed(seed)
    if kind == "stdit":          # (B, F*S, C) -> (B, F, S, C)
        return torch.randn(B, F * S, C, generator=g, device=device).to(dtype).view(B, F, S, C)
    if kind == "latte_temporal":  # (B*S, F, C) -> (B, S, F, C).permute(0, 2, 1, 3)
        return torch.randn(B * S, F, C, generator=g, device=device).to(dtype).view(B, S, F, C).permute(0, 2, 1, 3)
    if kind == "flat":            # (B, F, S*C) contiguous
        return torch.randn(B, F, S * C, generator=g, device=device).to(dtype)
    raise ValueError(kind)


def rel_err(out, ref):
    """Largest relative error over the finite reference entries (absolute where ref == 0)."""
    o, r = out.double().cpu(), ref.double().cpu()
    fin = torch.isfinite(r)
    if not fin.any():
        return 0.0
    d = (o[fin] - r[fin]).abs() / r[fin].abs().clamp_min(1e-30)
    d = torch.where(r[fin] == 0, (o[fin] - r[fin]).abs(), d)
    return float(d.max())


def close(out, ref, dtype, rtol_scale=1.0):
    tol = TOL[dtype]
    if out.dtype != torch.float32 or out.shape != ref.shape:
        return False
    try:
        torch.testing.assert_close(out.double().cpu(), ref.cpu(), equal_nan=True,
                                   rtol=tol["rtol"] * rtol_scale, atol=tol["atol"])
        return True
    except AssertionError:
        return False


def main(argv):
    ap = base_parser(__doc__)
    args = ap.parse_args(argv)
    return PartReport("kernel_check", "Part 1: Triton kernel correctness (compiled kernel on CUDA vs a float64 reference)",
                     args).run(_run)


def _run(rep: PartReport, args, device):
    from adacache_fx._compat import triton_installed
    from adacache_fx.ops import cache_metrics_torch, fused_cache_metrics

    if not triton_installed():
        raise RuntimeError("triton is not installed: the CUDA op runs the torch composite, there is no kernel to check")
    import triton

    from adacache_fx.triton_kernels import cache_metrics as cm
    from adacache_fx.triton_kernels.cache_metrics import cache_metrics_triton, triton_launch_config

    interpret = device.type == "cpu"
    if not interpret and os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set on a CUDA run: unset it, the compiled kernel is what is checked")

    def kernel(r, p, s, **kw):
        return cache_metrics_triton(r, p, s, interpret=interpret, **kw)

    rep.add(f"- kernel: `adacache_fx/ops/cache_metrics_triton.py`, {'Triton INTERPRETER on CPU tensors' if interpret else 'compiled by Triton ' + triton.__version__ + ' for this GPU'}",
            "- reference: float64 torch, pass by pass; tolerances as tests/kernels/test_kernels.py "
            "(fp32 rtol 1e-5, bf16/fp16 rtol 2e-5, atol 1e-5; 2x rtol for the multi-million-element probe sizes)",
            "")
    groups = []   # (name, done, total, max rel err by dtype, seconds)
    errors = []   # tracebacks of cases that raised
    skipped = []

    def group(name, cases, fn):
        """Run ``fn(case) -> (dtype or None, err or None)`` over cases inside the budget."""
        t0 = time.monotonic()
        done, errs = 0, {}
        for case in cases:
            if rep.remaining() < 3:
                skipped.append(f"{name}: {len(cases) - done} of {len(cases)} cases not run (budget)")
                break
            try:
                dtype, err = fn(case)
            except Exception as exc:  # noqa: BLE001 - one case's error (e.g. out of resources) is a failed check
                rep.check(False, f"{name}: case {case!r} raised {type(exc).__name__}: {str(exc)[:300]}")
                dtype, err = None, None
                errors.append(traceback.format_exc())
            done += 1
            if dtype is not None and err is not None:
                key = str(dtype).split(".")[-1]
                errs[key] = max(errs.get(key, 0.0), err)
        groups.append((name, done, len(cases), errs, time.monotonic() - t0))
        rep.section("groups", md_table(
            ["check group", "cases run", "max rel err vs float64", "seconds"],
            [(g[0], f"{g[1]}/{g[2]}", ", ".join(f"{k} {v:.1e}" for k, v in g[3].items()) or "-", f"{g[4]:.1f}")
             for g in groups]) + [""])

    # --- 1. dispatch: on CUDA the op runs the Triton kernel (bitwise equal to the launcher) ----------
    def dispatch_case(dtype):
        r = make(2, 5, 3000, dtype, "sliced", 11, device)
        p = make(2, 5, 3000, dtype, "transposed", 12, device)
        out_op = fused_cache_metrics(r, p, 1)
        out_k = kernel(r, p, 1)
        ref = reference(r, p, 1)
        if device.type == "cuda":
            rep.check(torch.equal(out_op, out_k), f"dispatch {dtype}: the op on CUDA is not bitwise the Triton launcher")
        rep.check(close(out_k, ref, dtype), f"dispatch {dtype}: kernel vs reference")
        rep.check(close(out_op, ref, dtype), f"dispatch {dtype}: op vs reference")
        return dtype, rel_err(out_k, ref)

    group("op -> Triton dispatch (op bitwise == launcher on CUDA)", list(DTYPES.values()), dispatch_case)

    # --- 2. determinism ------------------------------------------------------------------------------
    if args.dry_run:
        det_shape = (2, 5, 4 * 96)
    else:
        det_shape = (2, 21, 1560 * 1536)   # the Wan 1.3B 480p probe

    def det_case(case):
        dtype, s = case
        B, F, N = det_shape
        r = make(B, F, N, dtype, "contiguous", 21, device)
        p = make(B, F, N, dtype, "sliced", 22, device)
        first = kernel(r, p, s)
        repeats = 3 if args.dry_run else 20
        same = all(torch.equal(kernel(r, p, s), first) for _ in range(repeats))
        rep.check(same, f"determinism {dtype} s={s}: repeated calls differ bitwise")
        r2, p2 = r.clone(), p.contiguous().clone()   # fresh addresses, p now contiguous
        same_copy = torch.equal(kernel(r2, p2, s), first)
        rep.check(same_copy, f"determinism {dtype} s={s}: fresh copies of the inputs give different bits")
        op_same = torch.equal(fused_cache_metrics(r, p, s), fused_cache_metrics(r, p, s))
        rep.check(op_same, f"determinism {dtype} s={s}: the op differs over two calls")
        ref = reference(r, p, s)
        rep.check(close(first, ref, dtype, 2.0), f"determinism shape {dtype} s={s}: vs reference")
        return dtype, rel_err(first, ref)

    group(f"bitwise determinism {det_shape}: {3 if args.dry_run else 20} repeats + fresh copies",
          [(d, s) for d in DTYPES.values() for s in (1, 2)], det_case)

    # --- 3. NaN / Inf ----------------------------------------------------------------------------------
    def nan_case(dtype):
        B, F, N = 2, 3, 37
        g = torch.Generator(device=device).manual_seed(5)
        r = torch.randn(B, F, N, generator=g, device=device).to(dtype)
        p = torch.randn(B, F, N, generator=g, device=device).to(dtype)
        r[0, 0, 5] = float("nan")
        p[1, 2, 3] = float("inf")
        for fn_name, fn in (("kernel", kernel), ("op", fused_cache_metrics)):
            out = fn(r, p, 1).cpu()
            rep.check(close(out, reference(r, p, 1), dtype), f"nan/inf {dtype} {fn_name}: vs reference")
            rep.check(bool(torch.isnan(out[0, [0, 2, 4]]).all()), f"nan {dtype} {fn_name}: NaN not propagated")
            rep.check(bool(torch.isfinite(out[0, [1, 3]]).all()), f"nan {dtype} {fn_name}: NaN leaked from an excluded frame")
            rep.check(bool(torch.isinf(out[1, 0]) and torch.isinf(out[1, 1])), f"inf {dtype} {fn_name}: Inf not propagated")
            rep.check(bool(torch.isfinite(out[1, 2:]).all()), f"inf {dtype} {fn_name}: Inf leaked")
            r2 = r.clone()
            r2[1, 2, 3] = float("inf")   # inf - inf = nan
            out2 = fn(r2, p, 1).cpu()
            rep.check(bool(torch.isnan(out2[1, 0])), f"inf-inf {dtype} {fn_name}: not NaN")
        return dtype, None

    group("NaN / Inf propagation (kernel and op)", list(DTYPES.values()), nan_case)

    # --- 4. the real probe sizes, DiT layouts -----------------------------------------------------------
    if args.dry_run:
        real = [("opensora-like", 2, 5, 6, 32), ("wan-like", 2, 7, 5, 48)]
    else:
        real = [("Open-Sora 1.2 480p (B2, F15, 1620 tok x 1152)", 2, 15, 1620, 1152),
                ("Wan 1.3B 480p 81 fr (B2, F21, 1560 tok x 1536)", 2, 21, 1560, 1536)]
    real_cases = [(size, kind, dtype, s) for size in real for kind in ("stdit", "latte_temporal", "flat")
                  for dtype in DTYPES.values() for s in (1, 2)]
    real_rows = []

    def real_case(case):
        (label, B, F, S, C), kind, dtype, s = case
        seed = zlib.crc32(f"{label}{kind}{dtype}{s}".encode()) % 10_000
        r = dit_view(kind, B, F, S, C, dtype, seed, device)
        p = dit_view(kind, B, F, S, C, dtype, seed + 1, device)
        r2, p2, *_ = cm._kernel_layout(r, p)
        in_place = r2 is r and p2 is p
        rep.check(in_place, f"{label} {kind}: the kernel copied the inputs (expected in place)")
        out = kernel(r, p, s)
        ref = reference(r, p, s)
        ok = rep.check(close(out, ref, dtype, 2.0), f"{label} {kind} {dtype} s={s}: vs reference (rel err {rel_err(out, ref):.1e})")
        if device.type == "cuda":
            rep.check(torch.equal(fused_cache_metrics(r, p, s), out), f"{label} {kind} {dtype} s={s}: op != launcher")
        comp = cache_metrics_torch(r, p, s)
        err = rel_err(out, ref)
        real_rows.append((label, kind, str(dtype).split(".")[-1], s, f"{err:.1e}", f"{rel_err(comp, ref):.1e}",
                          "yes" if in_place else "no", "ok" if ok else "FAIL"))
        del r, p, ref
        return dtype, err

    group("real probe sizes x DiT layouts x dtypes x stride", real_cases, real_case)
    rep.add("Real probe sizes (kernel vs float64 reference, op == kernel bitwise on CUDA; the torch composite's error for comparison):", "")
    rep.table(["size", "layout", "dtype", "s", "kernel rel err", "composite rel err", "read in place", "check"], real_rows)

    # --- 5. the odd-shape grid (as tests/kernels/test_kernels.py) -----------------------------------------------
    sizes_n = [1, 7, 1023, 4097] + ([] if args.dry_run else [65537])
    sizes_f = [1, 2, 3, 17]
    grid = []   # dtype innermost: a budget cut still leaves every dtype covered
    for N, F, dtype in itertools.product(sizes_n, sizes_f, DTYPES.values()):
        for k, (B, s) in enumerate(itertools.product([1, 2, 3], [1, 2])):
            grid.append((dtype, N, F, B, s, LAYOUTS[k % 3], LAYOUTS[(k + 1) % 3]))

    def grid_case(case):
        dtype, N, F, B, s, lay_r, lay_p = case
        seed = N * 1000 + F * 10 + B
        r = make(B, F, N, dtype, lay_r, seed, device)
        p = make(B, F, N, dtype, lay_p, seed + 1, device)
        out = kernel(r, p, s)
        ref = reference(r, p, s)
        rep.check(close(out, ref, dtype), f"grid {dtype} B{B} F{F} N{N} s{s} {lay_r}/{lay_p}: kernel vs reference "
                                          f"(rel err {rel_err(out, ref):.1e})")
        if device.type == "cuda":
            rep.check(torch.equal(fused_cache_metrics(r, p, s), out), f"grid {dtype} B{B} F{F} N{N} s{s}: op != launcher")
        if F < s + 1:
            rep.check(bool(torch.equal(out[:, 2:].cpu(), torch.zeros(B, 3))), f"grid F{F} s{s}: motion sums not exactly 0")
        return dtype, rel_err(out, ref)

    group(f"odd-shape grid N {sizes_n} x F {sizes_f} x B {{1,2,3}} x s {{1,2}} x layouts", grid, grid_case)

    # --- 6. explicit launch configs ---------------------------------------------------------------------
    cfgs = [(64, 1), (128, 1), (256, 2), (1024, 4), (2048, 8)] + ([] if args.dry_run else [(4096, 8), (8192, 16)])

    def cfg_case(case):
        block, warps = case
        r = make(2, 5, 10_000 if not args.dry_run else 1000, torch.bfloat16, "sliced", 31, device)
        p = make(2, 5, r.shape[2], torch.bfloat16, "transposed", 32, device)
        out = kernel(r, p, 2, block_n=block, num_warps=warps)
        ref = reference(r, p, 2)
        rep.check(close(out, ref, torch.bfloat16), f"block_n={block} num_warps={warps}: vs reference")
        return torch.bfloat16, rel_err(out, ref)

    group(f"explicit (block_n, num_warps) {cfgs}", cfgs, cfg_case)

    # --- 7. the op in an inductor graph (fullgraph): same kernel, same bits --------------------------------
    def compiled_case(dtype):
        import torch._dynamo as dynamo

        dynamo.reset()
        backend = "aot_eager" if args.dry_run else "inductor"
        fn = torch.compile(lambda r, p: fused_cache_metrics(r, p, 1) * 1.0, fullgraph=True, backend=backend, dynamic=False)
        r = make(2, 5, 4096, dtype, "contiguous", 41, device)
        p = make(2, 5, 4096, dtype, "sliced", 42, device)
        out = fn(r, p)
        rep.check(torch.equal(out, fused_cache_metrics(r, p, 1)),
                  f"op under torch.compile({backend}, fullgraph) != eager op bitwise ({dtype})")
        ref = reference(r, p, 1)
        rep.check(close(out, ref, dtype), f"op under torch.compile ({dtype}) vs reference")
        return dtype, rel_err(out, ref)

    group("op inside torch.compile(fullgraph) (inductor on GPU)", [torch.bfloat16], compiled_case)

    # --- headline ----------------------------------------------------------------------------------------
    total_run = sum(g[1] for g in groups)
    total = sum(g[2] for g in groups)
    worst = {}
    for g in groups:
        for k, v in g[3].items():
            worst[k] = max(worst.get(k, 0.0), v)
    rep.result(f"{'interpreted' if interpret else 'compiled'} Triton kernel: {rep.num_checks - len(rep.failed_checks)} of "
               f"{rep.num_checks} checks passed over {total_run}/{total} cases ({len(groups)} groups)")
    rep.result("max rel err vs float64: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())))
    b, w = triton_launch_config(2, 21, 1560 * 1536, 1)
    rep.result(f"launch config at the Wan probe (B2 F21 N{1560 * 1536}): BLOCK_N={b}, num_warps={w}")
    if skipped:
        rep.result("not run (budget): " + "; ".join(skipped))
    if errors:
        rep.result(f"{len(errors)} case(s) raised; the first traceback is below")
        rep.add("", "First traceback:", "", "```", tail(errors[0], 30), "```")
    rep.add("", f"Total: {fmt(rep.elapsed(), 1)} s (includes Triton's compiles of every specialisation)")


if __name__ == "__main__":
    run_part(main)

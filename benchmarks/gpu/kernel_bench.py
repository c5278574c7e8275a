"""Part 2: microbenchmark of the metric op (Triton kernel on CUDA) vs the torch composite.

Providers, on real probe residual sizes (batch 2 = classifier-free guidance), frame stride 1:

* ``op``        - ``fused_cache_metrics`` = ``torch.ops.adacache_fx.cache_metrics`` (the Triton kernel
                  on CUDA: one pass over r and p, then a small fixed-order reduction of the partials),
* ``composite`` - ``adacache_fx.ops.cache_metrics_torch`` (eager torch: float32 copies, separate sums),
* ``compiled``  - the composite under ``torch.compile`` (inductor), for the sizes in --compiled,
* ``copy``      - ``torch.empty_like(r).copy_(r)``: reads and writes as many bytes as the op reads
                  (r and p once), so ``copy ms / op ms`` is the op's share of copy bandwidth.

Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every run), median, three
interleaved rounds per provider, median of the rounds. GB/s = (bytes of r + bytes of p) / time.

Sizes: Open-Sora 1.2 (51 frames -> 15 latent frames; 480p 30x54 = 1620 tokens, 720p 45x80 = 3600
tokens; hidden 1152), Latte 512x512 16 frames (1024 tokens, 1152), Wan 2.1 1.3B 480p 81 frames
(21 latent frames, 30x52 = 1560 tokens, hidden 1536).

``--dry-run``: tiny sizes on the CPU, ``time.perf_counter`` medians, no Triton (the op runs the
composite on CPU): it checks the wiring only.
"""
from __future__ import annotations

import statistics
import time

import torch

from ._common import PartReport, base_parser, run_part

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# name -> (B, F, tokens per frame, hidden, description)
SIZES = {
    "small": (2, 4, 256, 1152, "small (B2, F4, 256 tok x 1152)"),
    "latte512": (2, 16, 1024, 1152, "Latte 512x512 16 fr (B2, F16, 1024 x 1152)"),
    "opensora480p": (2, 15, 1620, 1152, "Open-Sora 1.2 480p 2 s (B2, F15, 1620 x 1152)"),
    "wan480p": (2, 21, 1560, 1536, "Wan 2.1 1.3B 480p 81 fr (B2, F21, 1560 x 1536)"),
    "opensora720p": (2, 15, 3600, 1152, "Open-Sora 1.2 720p 2 s (B2, F15, 3600 x 1152)"),
}
DRY_SIZES = {
    "tiny": (2, 4, 16, 64, "tiny (B2, F4, 16 x 64)"),
    "tiny-wan": (2, 5, 30, 96, "tiny wan-like (B2, F5, 30 x 96)"),
}
DEFAULT_PLAN = ("small:bf16,latte512:bf16,opensora480p:bf16,wan480p:bf16,opensora720p:bf16,"
                "wan480p:fp32,opensora480p:fp32,wan480p:fp16")
DRY_PLAN = "tiny:bf16,tiny-wan:bf16,tiny-wan:fp32"


def bench_cuda(fn, rounds_ms=(25, 100)):
    import triton.testing

    q = triton.testing.do_bench(fn, warmup=rounds_ms[0], rep=rounds_ms[1], quantiles=[0.5, 0.2, 0.8])
    return q[0]


def bench_cpu(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv):
    ap = base_parser(__doc__)
    ap.add_argument("--plan", default=None, help=f"size:dtype list (default {DEFAULT_PLAN})")
    ap.add_argument("--compiled", default="wan480p:bf16", help="size:dtype list also timed with the composite under "
                                                               "torch.compile (inductor compiles take ~10 s each)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    return PartReport("kernel_bench", "Part 2: metric op microbenchmark (Triton kernel vs torch composite vs copy bandwidth)",
                     args).run(_run)


def _run(rep: PartReport, args, device):
    from adacache_fx._compat import triton_installed

    cuda = device.type == "cuda"
    if cuda and not triton_installed():
        rep.add("**triton is not installed: the op runs the torch composite on CUDA too.**", "")
    sizes = DRY_SIZES if args.dry_run else SIZES
    plan = [item.split(":") for item in (args.plan or (DRY_PLAN if args.dry_run else DEFAULT_PLAN)).split(",")]
    compiled_set = set() if args.dry_run else {tuple(x.split(":")) for x in args.compiled.split(",") if x}
    bench = bench_cuda if cuda else bench_cpu
    timer = ("triton.testing.do_bench (CUDA events, L2 flushed per run), median; "
             if cuda else "time.perf_counter, median of 5 calls (CPU, dry run); ")
    rep.add(f"- timing: {timer}{args.rounds} interleaved rounds per provider, median of the rounds",
            "- GB/s: bytes that must move (r and p read once) / time; copy: `torch.empty_like(r).copy_(r)` moves "
            "the same number of bytes (read r + write its copy); % of copy BW = copy ms / provider ms",
            "")
    rows = []
    torch.manual_seed(0)
    for sname, dname in plan:
        if rep.remaining() < 8:
            rep.result(f"not run (budget): {sname}:{dname} and the rest of the plan")
            break
        try:
            _size(rep, args, device, sizes, sname, dname, compiled_set, bench, rows)
        except Exception as exc:  # noqa: BLE001 - one size failing (e.g. out of memory) does not stop the rest
            import traceback

            rep.check(False, f"{sname}:{dname} raised {type(exc).__name__}: {str(exc)[:300]}")
            rep.add("", f"{sname}:{dname} raised:", "", "```", traceback.format_exc()[-3000:], "```", "")
        if cuda:
            torch.cuda.empty_cache()
    if cuda:
        from adacache_fx.triton_kernels.cache_metrics import triton_launch_config

        cfgs = []
        for sname, (B, F, T, C, _desc) in sizes.items():
            bl, w = triton_launch_config(B, F, T * C, 1)
            cfgs.append(f"{sname}: BLOCK_N {bl}, {w} warps, {B * -(-T * C // bl)} programs")
        rep.add("", "Launch configs (s = 1): " + "; ".join(cfgs))


def _size(rep, args, device, sizes, sname, dname, compiled_set, bench, rows):
    from adacache_fx.ops import cache_metrics_torch, fused_cache_metrics

    B, F, T, C, desc = sizes[sname]
    dtype = DTYPES[dname]
    N = T * C
    g = torch.Generator(device=device).manual_seed(0)
    r = torch.randn(B, F, N, generator=g, device=device).to(dtype)
    p = (r.float() + 0.1 * torch.randn(B, F, N, generator=g, device=device)).to(dtype)
    nbytes = 2 * r.numel() * r.element_size()
    providers = {
        "op": lambda: fused_cache_metrics(r, p, 1),
        "composite": lambda: cache_metrics_torch(r, p, 1),
        "copy": lambda: torch.empty_like(r).copy_(r),
    }
    if (sname, dname) in compiled_set:
        import torch._dynamo as dynamo

        dynamo.reset()
        compiled = torch.compile(cache_metrics_torch, dynamic=False)
        t0 = time.perf_counter()
        compiled(r, p, 1)
        rep.add(f"- {desc} {dname}: inductor compiled the composite in {time.perf_counter() - t0:.1f} s")
        providers["compiled"] = lambda: compiled(r, p, 1)
    # correctness before timing: the op against the composite (both float32 sums)
    op_out, comp_out = providers["op"]().double(), providers["composite"]().double()
    err = float(((op_out - comp_out).abs() / comp_out.abs().clamp_min(1e-30)).max())
    rep.check(err < 1e-4, f"{desc} {dname}: op and composite disagree (max rel diff {err:.1e})")
    times = {k: [] for k in providers}
    for _ in range(args.rounds):
        for k, fn in providers.items():
            times[k].append(bench(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in providers:
        if k == "copy":
            continue
        gbs = nbytes / (med[k] * 1e-3) / 1e9
        rows.append((desc, dname, f"{nbytes / 1e6:.3g}", k, f"{med[k]:.4f}",
                     f"{min(times[k]):.4f}-{max(times[k]):.4f}", f"{gbs:.0f}",
                     f"{100 * med['copy'] / med[k]:.0f}%", f"{med['composite'] / med[k]:.2f}x", f"{err:.1e}"))
    copy_gbs = nbytes / (med["copy"] * 1e-3) / 1e9
    rows.append((desc, dname, f"{nbytes / 1e6:.3g}", "copy (reference)", f"{med['copy']:.4f}",
                 f"{min(times['copy']):.4f}-{max(times['copy']):.4f}", f"{copy_gbs:.0f}", "100%",
                 f"{med['composite'] / med['copy']:.2f}x", "-"))
    op_gbs = nbytes / (med["op"] * 1e-3) / 1e9
    line = (f"{desc} {dname}: op {med['op']:.3f} ms = {op_gbs:.0f} GB/s = {100 * med['copy'] / med['op']:.0f}% of copy "
            f"({copy_gbs:.0f} GB/s); composite {med['composite']:.3f} ms (op speedup {med['composite'] / med['op']:.2f}x)")
    if "compiled" in med:
        line += f"; inductor-compiled composite {med['compiled']:.3f} ms"
    rep.result(line)
    rep.section("table", ["| size | dtype | MB read | provider | median ms | min-max ms (rounds) | GB/s | % of copy BW "
                          "| speedup vs composite | op vs composite rel diff |",
                          "|---|---|---|---|---|---|---|---|---|---|"]
                + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""])
    del r, p, providers


if __name__ == "__main__":
    run_part(main)

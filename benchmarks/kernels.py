"""Microbenchmark of the fused cache-metrics op against the composite it replaces.

Providers, measured in one run and interleaved (round-robin, one call each per round):

* ``eager``    - the composite as the public AdaCache code computes it (separate
                 ``.norm(p=1)`` passes, frame-shifted slices, materialised temporaries),
* ``compiled`` - the same composite under ``torch.compile`` (inductor's own fusion),
* ``op``       - ``fused_cache_metrics`` (``torch.ops.adacache_fx.cache_metrics``).

Bytes that must move: r and p read once (``2 * numel * itemsize``); GB/s = that / median
time. The machine's memory bandwidth is measured in the same run by a large copy
(``dst.copy_(src)``, counted as read + write), interleaved with the providers.

Sizes are real probe residuals (batch 2 = classifier-free guidance):

* Open-Sora 1.2, 2 s clip = 51 frames at 24 fps. Its VAE maps each 17-frame micro clip
  to 5 latent frames (about 4x temporal; 51 -> 15) and 8x spatially; STDiT3 patch
  (1, 2, 2), hidden 1152. 480p (480x854): latent 60x107 -> 30x54 = 1620 tokens/frame;
  720p (720x1280): latent 90x160 -> 45x80 = 3600 tokens/frame.
* Latte 512x512, 16 frames: latent 64x64, patch 2 -> 1024 tokens/frame, hidden 1152.
* Wan 2.1 1.3B, 480p (480x832), 81 frames: VAE 4x temporal (1 + 80/4 = 21 latent
  frames), 8x spatial (60x104), patch (1, 2, 2) -> 30x52 = 1560 tokens/frame, hidden 1536.
* small: 2 x 4 frames x 256 tokens x 1152.

On CPU the process runs single-threaded (OMP_NUM_THREADS=1, torch.set_num_threads(1)):
the machine is shared. On CUDA the timings use ``triton.testing.do_bench``.

Usage (from the repository root)::

    python -m benchmarks.kernels --sizes small,latte512,opensora480p --dtypes bf16,fp32 \
        --out benchmarks/results/kernels_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from adacache_fx.ops import cache_metrics_reference, fused_cache_metrics  # noqa: E402

# name -> (B, F, tokens per frame, hidden, description)
SIZES = {
    "small": (2, 4, 256, 1152, "small (2 x 4 x 256 tok x 1152)"),
    "latte512": (2, 16, 32 * 32, 1152, "Latte 512x512, 16 frames"),
    "opensora480p": (2, 15, 30 * 54, 1152, "Open-Sora 1.2 480p, 2 s (51 fr -> 15 latent)"),
    "wan480p": (2, 21, 30 * 52, 1536, "Wan 2.1 1.3B 480p, 81 frames (21 latent)"),
    "opensora720p": (2, 15, 45 * 80, 1152, "Open-Sora 1.2 720p, 2 s (51 fr -> 15 latent)"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def composite(r: torch.Tensor, p: torch.Tensor, s: int = 1):
    """What the public AdaCache code does, pass by pass (whole-tensor L1 norms)."""
    dist_num = (p - r).norm(p=1)
    dist_den = p.norm(p=1)
    motion_num = (r[:, s:] - r[:, :-s]).norm(p=1)
    motion_den_hi = r[:, s:].norm(p=1)
    motion_den_lo = r[:, :-s].norm(p=1)
    return dist_num, dist_den, motion_num, motion_den_hi, motion_den_lo


def _time_cpu(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def run_size(name, dtype, device, repeats, warmup, copy_mib):
    B, F, T, C, desc = SIZES[name]
    N = T * C
    g = torch.Generator(device="cpu").manual_seed(0)
    r = torch.randn(B, F, N, generator=g).to(device=device, dtype=dtype)
    p = (r.float() + 0.1 * torch.randn(B, F, N, generator=g).to(device)).to(dtype)
    nbytes = 2 * r.numel() * r.element_size()
    torch._dynamo.reset()  # one compile per size, never the recompile limit
    compiled = torch.compile(composite, dynamic=False)

    src = torch.empty(copy_mib * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)

    providers = {
        "eager": lambda: composite(r, p, 1),
        "compiled": lambda: compiled(r, p, 1),
        "op": lambda: fused_cache_metrics(r, p, 1),
        "copy": lambda: dst.copy_(src),
        "read": lambda: src.sum(),
    }
    # correctness of every provider against the float64 reference (whole-batch sums);
    # for the largest sizes the float64 copies would need several GB: check against the
    # op's own result then (the op is checked against the reference by the tests).
    if r.numel() <= 64 * 2**20:
        ref = cache_metrics_reference(r, p, 1).sum(0)
    else:
        ref = fused_cache_metrics(r, p, 1).double().sum(0)
    # The composite returns the norms in the input dtype (bf16 norms are rounded to bf16
    # and, on CPU, accumulated less precisely): its error is reported, not asserted.
    errors = {}
    for pname in ("eager", "compiled", "op"):
        out = providers[pname]()
        vals = out.sum(0) if pname == "op" else torch.stack([v.double() for v in out])
        errors[pname] = ((vals.double().cpu() - ref.cpu()).abs() / ref.abs().cpu()).max().item()
    assert errors["op"] < 1e-4, errors

    for _ in range(warmup):
        for fn in providers.values():
            fn()
    times = {k: [] for k in providers}
    if device == "cuda":
        import triton.testing

        for _ in range(repeats):
            for k, fn in providers.items():
                times[k].append(triton.testing.do_bench(fn, warmup=5, rep=20) / 1e3)
    else:
        for _ in range(repeats):
            for k, fn in providers.items():
                times[k].append(_time_cpu(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    copy_gbs = 2 * src.numel() * 4 / med["copy"] / 1e9
    read_gbs = src.numel() * 4 / med["read"] / 1e9
    rows = []
    for k in ("eager", "compiled", "op"):
        gbs = nbytes / med[k] / 1e9
        rows.append(
            dict(
                size=name, desc=desc, shape=f"({B}, {F}, {N})", dtype=str(dtype).split(".")[-1],
                provider=k, ms=med[k] * 1e3, gbs=gbs, pct=100 * gbs / copy_gbs,
                speedup=med["eager"] / med[k], mb=nbytes / 1e6, copy_gbs=copy_gbs,
                read_gbs=read_gbs, pct_read=100 * gbs / read_gbs,
                spread=(min(times[k]) * 1e3, max(times[k]) * 1e3), err=errors[k],
            )
        )
    del r, p, src, dst
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,latte512,opensora480p")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--copy-mib", type=int, default=256, help="size of the bandwidth copy")
    ap.add_argument("--out", default=None, help="write a markdown report here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    all_rows = []
    for dname in args.dtypes.split(","):
        for sname in args.sizes.split(","):
            t0 = time.time()
            rows = run_size(sname, DTYPES[dname], args.device, args.repeats, args.warmup, args.copy_mib)
            all_rows += rows
            for rw in rows:
                print(
                    f"{rw['size']:>13} {rw['dtype']:>9} {rw['provider']:>9} {rw['ms']:9.2f} ms "
                    f"{rw['gbs']:7.2f} GB/s {rw['pct']:5.1f}% of copy ({rw['copy_gbs']:.1f} GB/s) "
                    f"{rw['pct_read']:5.1f}% of read ({rw['read_gbs']:.1f} GB/s) "
                    f"x{rw['speedup']:.2f} vs eager, max rel err {rw['err']:.1e}",
                    flush=True,
                )
            print(f"  ({time.time() - t0:.0f} s for this size)", flush=True)

    if args.out:
        write_report(args, all_rows)


def write_report(args, rows):
    cmd = "OMP_NUM_THREADS=1 python -m benchmarks.kernels " + " ".join(
        a if " " not in a else repr(a) for a in sys.argv[1:]
    )
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "not installed"
    lines = [
        f"# Fused cache-metrics microbenchmark ({args.device.upper()})",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- machine: {_machine()}, {os.cpu_count()} cores (shared with other jobs), "
        f"{args.threads} thread(s) used",
        f"- torch {torch.__version__}, triton {triton_v}, python {platform.python_version()}",
        f"- command: `{cmd}`",
        f"- timing: median of {args.repeats} interleaved rounds (one call of every provider per "
        "round, after a warm-up round); CPU: time.perf_counter around one call",
        "- GB/s: bytes that must move (r and p read once) / median time; % of copy: against a "
        f"{args.copy_mib} MiB `copy_` measured in the same rounds, counted as read + write "
        "(2 x size / time; the write-allocate traffic is not counted, so a pure read can "
        "exceed 100%); % of read: against `sum()` of the same buffer (a streaming read)",
        "",
        "- max rel err: largest relative error of the five whole-batch sums against the float64 "
        "reference (for the two largest sizes: against the op, to spare the float64 copies)",
        "",
        "| size | shape (B, F, N) | dtype | MB moved | provider | median ms | min-max ms | GB/s | % of copy BW | % of read BW | speedup vs eager | max rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rw in rows:
        lines.append(
            f"| {rw['desc']} | {rw['shape']} | {rw['dtype']} | {rw['mb']:.0f} | {rw['provider']} | "
            f"{rw['ms']:.2f} | {rw['spread'][0]:.1f}-{rw['spread'][1]:.1f} | {rw['gbs']:.2f} | "
            f"{rw['pct']:.0f}% ({rw['copy_gbs']:.1f} GB/s) | {rw['pct_read']:.0f}% ({rw['read_gbs']:.1f} GB/s) | "
            f"{rw['speedup']:.2f}x | {rw['err']:.1e} |"
        )
    if args.device != "cuda":
        lines += [
            "",
            "## GPU (Triton kernel)",
            "",
            "No GPU was lent to this task: the Triton kernel was only run under the Triton",
            "interpreter (correctness tests), not timed. Rows to fill on a CUDA machine with",
            "`python -m benchmarks.kernels --device cuda --sizes "
            + ",".join(SIZES) + " --dtypes bf16,fp32`:",
            "",
            "| size | dtype | provider | median ms | GB/s | % of copy BW | speedup vs eager |",
            "|---|---|---|---|---|---|---|",
        ]
        for sname in SIZES:
            for dname in ("bf16", "fp32"):
                for prov in ("eager", "compiled", "op"):
                    lines.append(f"| {SIZES[sname][4]} | {dname} | {prov} | | | | |")
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()

"""Part 0: what this machine has (GPU, driver, torch / triton / diffusers, what is missing) -> env.md.

Never fails on a missing package: it lists it. Importable without torch.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGES = [  # (module, needed for)
    ("torch", "everything"),
    ("triton", "part 1 (the kernel), part 2 (do_bench), inductor on CUDA"),
    ("adacache_fx", "everything (the library; from the repo root)"),
    ("diffusers", "parts 3, 4, 5 (WanTransformer3DModel)"),
    ("safetensors", "part 4 (the reference weights)"),
    ("transformers", "not needed here (diffusers imports it lazily)"),
    ("numpy", "torch / diffusers"),
    ("sympy", "adacache_fx"),
]

DIST = {"adacache_fx": "adacache-fx"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or "benchmarks/results/gpu")
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Part 0: environment", "", "- status: **OK**",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- python {platform.python_version()} at `{sys.executable}`, {os.cpu_count()} CPU cores",
             f"- mode: {'DRY RUN (CPU)' if args.dry_run else 'GPU'}", "", "| package | version | needed for |", "|---|---|---|"]
    missing = []
    for name, why in PACKAGES:   # found and versioned without importing (diffusers / transformers are slow)
        try:
            found = importlib.util.find_spec(name) is not None
        except Exception:  # noqa: BLE001
            found = False
        if not found:
            version = "**MISSING**"
            missing.append(name)
        else:
            try:
                version = importlib.metadata.version(DIST.get(name, name))
            except importlib.metadata.PackageNotFoundError:
                version = "present (not pip-installed: from the working tree)"
        lines.append(f"| {name} | {version} | {why} |")
    lines.append("")
    results = []
    try:
        import torch

        cuda = torch.cuda.is_available()
        results.append(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available: {cuda}")
        if cuda:
            p = torch.cuda.get_device_properties(0)
            results.append(f"GPU: {torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
                           f"sm_{p.major}{p.minor}, {torch.cuda.device_count()} device(s)")
    except Exception as exc:  # noqa: BLE001
        results.append(f"torch does not import: {exc}")
    lib_ok = True
    try:
        import adacache_fx  # noqa: F401

        results.append(f"adacache_fx imports from `{Path(adacache_fx.__file__).parent}`")
    except Exception as exc:  # noqa: BLE001
        lib_ok = False
        results.append(f"adacache_fx does not import: {type(exc).__name__}: {str(exc)[:300]}")
    if missing:
        results.append("missing: " + ", ".join(missing) + " (no internet on the GPU machine: the parts that need them "
                       "are SKIPPED or FAILED, see their files)")
    else:
        results.append("nothing missing")
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
            results.append(f"nvidia-smi: {smi}")
        except Exception as exc:  # noqa: BLE001
            results.append(f"nvidia-smi failed: {exc}")
    text = lines[:6] + ["", "## Results", ""] + [f"- {r}" for r in results] + ["", "## Details", ""] + lines[6:]
    (out / "env.md").write_text("\n".join(text) + "\n")
    print("\n".join(f"RESULT env: {r}" for r in results), flush=True)
    return 0 if lib_ok else 3   # 3: run.sh tries `pip install -e . --no-deps` and asks again


if __name__ == "__main__":
    sys.exit(main())

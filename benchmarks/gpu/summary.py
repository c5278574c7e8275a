"""summary.md: every part's status and headline results in one file (run.sh calls it last).

Reads ``<out>/runlog.tsv`` (part, exit code, seconds, time box; written by run.sh) and each
``<out>/<part>.md`` (its status line and its "## Results" bullets). Needs no torch.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from pathlib import Path

TITLES = {
    "env": "0. environment",
    "kernel_check": "1. Triton kernel correctness (compiled, CUDA)",
    "kernel_bench": "2. kernel microbenchmark (do_bench)",
    "overhead_bf16": "3. overhead, Wan 1.3B bf16",
    "demo": "4. reference-model demo",
    "cudagraphs": "5. caching under CUDA graphs",
}


def parse(md: str):
    status = re.search(r"^- status: \*\*(.+?)\*\*(.*)$", md, re.M)
    device = re.search(r"^- device: (.+)$", md, re.M)
    results = []
    m = re.search(r"^## Results\n\n(.*?)(?:\n## |\Z)", md, re.S | re.M)
    if m:
        results = [ln for ln in m.group(1).splitlines() if ln.startswith("- ")]
    return (status.group(1) + status.group(2)) if status else "NO STATUS", device.group(1) if device else None, results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--total", default="?", help="the run's total time box (s), for the header")
    args = ap.parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or "benchmarks/results/gpu")
    log = []
    if (out / "runlog.tsv").exists():
        for line in (out / "runlog.tsv").read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 4:
                log.append(parts[:4])
    device = None
    rows, sections = [], []
    for name, rc, secs, box in log:
        path = out / f"{name}.md"
        if path.exists():
            status, dev, results = parse(path.read_text())
            device = device or (dev if name != "env" else None)
        else:
            status, results = "NO OUTPUT", []
        rows.append(f"| {TITLES.get(name, name)} | **{status}** | {rc} | {secs} | {box} | [{name}.md]({name}.md) |")
        sections += [f"### {TITLES.get(name, name)}", ""] + (results or ["- (no results)"]) + [""]
    head = [
        "# adacache-fx GPU check: summary",
        "",
        f"- {'DRY RUN on the CPU (tiny shapes; checks that the script works, measures nothing about a GPU)' if args.dry_run else 'GPU run'}",
        f"- device: {device or 'unknown'}",
        f"- written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; total time box {args.total} s; "
        "command `bash benchmarks/gpu/run.sh" + (" --dry-run" if args.dry_run else "") + "`",
        "",
        "| part | status | exit code | seconds | time box (s) | file |",
        "|---|---|---|---|---|---|",
    ]
    text = "\n".join(head + rows + ["", "## Headline results", ""] + sections) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

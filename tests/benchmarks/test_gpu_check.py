"""The GPU check (benchmarks/gpu/run.sh) still runs: its --dry-run on the CPU, end to end.

The dry run uses tiny shapes, the Triton interpreter for the kernel, aot_eager instead of
inductor, and no CUDA graphs; it takes about a minute on 2 cores. It checks that every part
writes its markdown with its status OK and real numbers in its results. No timing asserts.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ["env", "kernel_check", "kernel_bench", "overhead_bf16", "demo", "cudagraphs"]
NEEDS_DIFFUSERS = {"overhead_bf16", "demo", "cudagraphs"}
NUMBER = re.compile(r"\d+\.\d+")


def results_of(md: str) -> str:
    m = re.search(r"^## Results\n\n(.*?)(?:\n## |\Z)", md, re.S | re.M)
    return m.group(1) if m else ""


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils timeout")
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out))
    env.pop("TRITON_INTERPRET", None)   # run.sh sets it for part 1 itself
    proc = subprocess.run(["bash", "benchmarks/gpu/run.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    return proc, out


def test_dry_run_exits_zero(dry_run):
    proc, _ = dry_run
    assert proc.returncode == 0, (proc.stdout[-6000:], proc.stderr[-3000:])


@pytest.mark.parametrize("part", PARTS)
def test_part_wrote_real_results(dry_run, part):
    proc, out = dry_run
    path = out / f"{part}.md"
    assert path.exists(), proc.stdout[-4000:]
    md = path.read_text()
    skipped = part in NEEDS_DIFFUSERS and importlib.util.find_spec("diffusers") is None
    expected = "SKIPPED" if skipped else "OK"
    assert re.search(rf"^- status: \*\*{expected}\*\*", md, re.M), md[:3000]
    res = results_of(md)
    assert res.strip() and "(none yet)" not in res, md[:3000]
    if part == "env" or skipped:
        return
    assert NUMBER.search(res), res
    assert not re.search(r"\bnan\b", res, re.I), res   # no empty measurement slipped through
    assert "CHECKS FAILED" not in md and "FAILED" not in md.split("## Details")[0], md[:3000]
    if part != "kernel_check" and part != "kernel_bench":
        assert "DRY RUN" in md


def test_part_specific_numbers(dry_run):
    _, out = dry_run
    res = {p: results_of((out / f"{p}.md").read_text()) for p in PARTS}
    assert re.search(r"checks passed over \d+/\d+ cases", res["kernel_check"])
    assert re.search(r"max rel err vs float64: bfloat16 \d", res["kernel_check"])
    assert re.search(r"op \d+\.\d+ ms = \d+ GB/s = \d+% of copy", res["kernel_bench"])
    if importlib.util.find_spec("diffusers") is None:
        return
    assert re.search(r"per step: plain \d+\.\d+ ms, caching off \d+\.\d+ ms", res["overhead_bf16"])
    assert re.search(r"reused step \d+\.\d+ ms", res["overhead_bf16"])   # the dry run has a reused step
    # the startup measurement at 480p: the first reused call and the cache, beside the first calls
    details = (out / "overhead_bf16.md").read_text()
    assert re.search(r"fixed: first reused call \(step \d+\) \d+\.\d+ ms; cache \d+\.\d+ MiB", details)
    assert re.search(r"compile \(first call\): plain [\d.]+ s, off [\d.]+ s, fixed [\d.]+ s, regional [\d.]+ s",
                     res["overhead_bf16"])
    assert re.search(r"speedup \*\*\d+\.\d+x\*\*", res["demo"])
    assert re.search(r"PSNR \d+\.\d+ dB", res["demo"])
    assert re.search(r"reused \d+\.\d+ ms", res["cudagraphs"])


def test_summary_lists_every_part(dry_run):
    _, out = dry_run
    summary = (out / "summary.md").read_text()
    for part in PARTS:
        assert f"[{part}.md]({part}.md)" in summary
    assert "DRY RUN" in summary
    assert "NO OUTPUT" not in summary and "NOT RUN" not in summary
    log = (out / "runlog.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in log] == PARTS
    assert all(line.split("\t")[1] == "0" for line in log), log

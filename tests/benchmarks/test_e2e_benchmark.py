"""benchmarks/e2e (``python -m benchmarks.e2e``) end to end on a smoke configuration (eager
inner, 2 prompts, 8 steps), and its pieces.

Timings are not checked (no timing asserts); what is checked is that every method family
really runs on the reference model and that the measured columns mean what they say.
"""
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

from benchmarks.e2e import cli  # noqa: E402
from benchmarks.e2e.analysis import analyse, frontier, metric_agreement, spearman, spearman_ci, summarize  # noqa: E402
from benchmarks.e2e.methods import (Runner, closest_fixed_rate, fixed_config, fixed_schedule,  # noqa: E402
                                    fixed_schedule_size)
from benchmarks.e2e.protocol import MethodResult, Record  # noqa: E402
from benchmarks.e2e.report import markdown, merge, write_outputs  # noqa: E402

from adacache_fx import adacache_backend  # noqa: E402
from helpers import sample_loop, timesteps  # noqa: E402
from models.toy_models import ToyDiT, seeded  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("e2e")
    out = cli.main(["--quick", "--threads", "1", "--check-steps", "3", "--out", str(out_dir), "--methods",
                    "adacache-fast", "adacache-cal-0.5", "fixed", "fbc-0.2", "pab-2", "taylorseer-3",
                    "magcache-0.24"])
    return out, out_dir


def rows(out):
    (run,) = out["runs"]
    return run, {r["method"]: r for r in run["methods"]}


def test_writes_every_output(quick_run):
    out, out_dir = quick_run
    for name in ("e2e.json", "e2e.md", "e2e_pareto.png", "e2e_motion.png"):
        assert (out_dir / name).stat().st_size > 0, name
    saved = json.loads((out_dir / "e2e.json").read_text())
    assert [r["method"] for r in saved["runs"][0]["methods"]] == [r["method"] for r in out["runs"][0]["methods"]]
    md = (out_dir / "e2e.md").read_text()
    for r in out["runs"][0]["methods"]:
        assert f"| {r['method']} |" in md
    # the recorded command is the module invocation with the arguments given
    assert saved["command"].startswith("python -m benchmarks.e2e --quick --threads 1"), saved["command"]
    assert f"Command: `{saved['command']}`" in md


def test_merge_combines_runs(quick_run, tmp_path):
    _, out_dir = quick_run
    path = str(out_dir / "e2e.json")
    merged = write_outputs(merge([path, path]), str(tmp_path))
    assert [run["steps"] for run in merged["runs"]] == [8, 8]
    assert merged["command"].count("python -m benchmarks.e2e") == 2
    assert len(merged["machines"]) == 2
    for name in ("e2e.json", "e2e.md", "e2e_pareto.png", "e2e_motion.png"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_every_family_runs(quick_run):
    out, _ = quick_run
    run, by = rows(out)
    families = {r["family"] for r in run["methods"]}
    assert families == {"baseline", "adacache", "fixed", "diffusers"}
    kinds = {name.split("-")[0] for name in by}
    assert {"baseline", "adacache", "fixed", "fbc", "pab", "taylorseer", "magcache"} <= kinds
    for r in run["methods"]:
        if r["method"] != "eager-baseline":
            assert r["graphs"] >= 1, r["method"]       # it went through torch.compile (or its check did)
        assert len(r["psnr"]) == len(run["prompts"])


def test_baseline_is_the_reference(quick_run):
    out, _ = quick_run
    _, by = rows(out)
    for name in ("baseline", "eager-baseline"):
        assert math.isinf(by[name]["psnr_worst"]) and by[name]["ssim_worst"] == pytest.approx(1.0)


def test_diffusers_caches_are_timed_eagerly_and_checked_under_compile(quick_run):
    """Their speedup is against the eager baseline; their graph counts come from the compile
    check (graph breaks around the hooks' Python decisions)."""
    out, _ = quick_run
    run, _ = rows(out)
    for r in run["methods"]:
        assert r["timed"] == ("eager" if r["family"] == "diffusers" or r["method"] == "eager-baseline"
                              else "torch.compile")
        if r["family"] == "diffusers":
            assert r["graphs"] >= 1
    assert any(r["graph_breaks"] > 0 for r in run["methods"] if r["family"] == "diffusers")
    assert all(r["graph_breaks"] == 0 and r["recompiles"] == 0 for r in run["methods"] if r["family"] == "adacache")


def test_skipping_changes_the_video_and_computing_all_does_not(quick_run):
    """A method that skipped steps gives a different video; an AdaCache run that computed
    every step gives the baseline's video exactly (caching off = uncached)."""
    out, _ = quick_run
    run, by = rows(out)
    for r in run["methods"]:
        if r["computed_steps"] is None:
            continue
        for i, computed in enumerate(r["computed_steps"]):
            if computed < run["steps"]:
                assert math.isfinite(r["psnr"][i]), (r["method"], i)
            elif r["family"] in ("adacache", "fixed"):
                assert math.isinf(r["psnr"][i]), (r["method"], i)


def test_taylorseer_really_caches(quick_run):
    """diffusers' default TaylorSeer patterns match no Wan module; the benchmark names them."""
    out, _ = quick_run
    _, by = rows(out)
    ts = by["taylorseer-3"]
    assert ts["computed_fraction"] < 1 and math.isfinite(ts["psnr_mean"]) and ts["cache_mib"] > 0


def test_fixed_control_follows_its_schedule(quick_run):
    out, _ = quick_run
    run, by = rows(out)
    fixed = run["fixed"]
    row = by[f"fixed-{fixed['rate']}"]
    assert fixed["fixed_computed"] == fixed_schedule_size(fixed["rate"], run["steps"])
    assert set(row["computed_steps"]) == {fixed_schedule_size(fixed["rate"], run["steps"])}
    assert fixed["rate"] == closest_fixed_rate(fixed["adacache_fast_mean_computed"], run["steps"])


def test_fixed_schedule_size():
    """The schedule contract: step 1, step 2 (the first computed step has no previous probe,
    so its rate is 1), every k-th step from there, and the last two steps."""
    assert fixed_schedule_size(1, 30) == 30
    assert fixed_schedule(3, 30) == [1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 30]
    assert fixed_schedule_size(3, 30) == len({1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 30})
    assert fixed_schedule(100, 10) == [1, 2, 9, 10]
    assert fixed_schedule_size(100, 10) == len({1, 2, 9, 10})
    assert fixed_schedule(3, 12) == [1, 2, 5, 8, 11, 12]   # the zoo matrix's contract
    assert fixed_schedule(2, 2) == [1, 2] and fixed_schedule(5, 1) == [1]


@pytest.mark.parametrize("rate,steps", [(1, 6), (2, 9), (3, 12), (4, 8), (6, 30), (50, 7)])
def test_fixed_schedule_is_what_the_backend_computes(rate, steps):
    """``fixed_schedule`` equals the steps the real backend computes under the fixed control's
    config (a toy DiT through ``torch.compile``), so the benchmark's choice of rate cannot
    drift from the scheduler."""
    backend = adacache_backend(fixed_config(rate, steps), inner="eager")
    model = torch.compile(seeded(ToyDiT()), backend=backend)
    sample_loop(model, lambda b, t: ((torch.randn(b, 7, 5, generator=torch.Generator().manual_seed(0)),
                                      torch.full((b,), t)), {}), timesteps(steps))
    assert backend.report().computed_steps == fixed_schedule(rate, steps)
    assert len(backend.report().computed_steps) == fixed_schedule_size(rate, steps)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    assert spearman([1, 2], [1, 2]) is None
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)   # ties: average ranks


def test_spearman_ci():
    lo, hi = spearman_ci(0.5, 16)
    assert lo < 0.5 < hi and -1 < lo and hi < 1
    assert spearman_ci(0.5, 3) is None and spearman_ci(None, 16) is None
    narrow = spearman_ci(0.5, 100)
    assert hi - lo > narrow[1] - narrow[0]   # more points, a narrower interval


def test_calibrated_method_is_calibrated_on_unscored_prompts(quick_run):
    out, _ = quick_run
    run, by = rows(out)
    (cal,) = run["calibrations"]
    assert cal["method"] == "adacache-cal-0.5" and not set(cal["prompts"]) & set(run["prompts"])
    assert cal["measured"]["computed_fraction"] <= 0.5 or not cal["met"]
    assert "thresholds x" in by["adacache-cal-0.5"]["setting"]


def test_frontier():
    rows_ = [{"method": "adacache-a", "family": "adacache", "speedup": 3.2, "psnr_mean": 31.0},
             {"method": "adacache-b", "family": "adacache", "speedup": 2.0, "psnr_mean": 36.0},
             {"method": "magcache-x", "family": "diffusers", "speedup": 2.5, "psnr_mean": 29.0}]
    f = frontier(rows_)
    assert f["adacache"] == {"psnr_at_3x": 31.0, "psnr_at_3x_method": "adacache-a",
                             "speedup_at_30db": 3.2, "speedup_at_30db_method": "adacache-a"}
    assert f["magcache"]["psnr_at_3x"] is None and f["magcache"]["speedup_at_30db"] is None


def test_dominance_analysis():
    rows_ = [
        {"method": "a", "family": "adacache", "speedup": 2.0, "psnr_mean": 30.0, "computed_steps": None},
        {"method": "x", "family": "diffusers", "speedup": 1.5, "psnr_mean": 25.0},
        {"method": "y", "family": "diffusers", "speedup": 2.5, "psnr_mean": 28.0},
    ]
    an = analyse(rows_, [0.1, 0.2])
    by = {d["method"]: d for d in an["dominance"]}
    assert by["x"]["dominated_by"] == ["a"]
    assert by["y"]["dominated_by"] == [] and by["y"]["more_speed_at_its_psnr"] == []
    assert by["y"]["higher_psnr_at_its_speed"] == []
    assert an["all_dominated"] is False


def test_metric_agreement():
    """PSNR up and MS-GMSD down mean the same (closer); the baseline (infinite PSNR) and a row
    without MS-GMSD (an old result) are left out."""
    rows_ = [{"method": "baseline", "psnr_mean": math.inf, "ms_gmsd_mean": 0.0},
             {"method": "a", "psnr_mean": 40.0, "ms_gmsd_mean": 0.01},
             {"method": "b", "psnr_mean": 30.0, "ms_gmsd_mean": 0.05},
             {"method": "c", "psnr_mean": 35.0, "ms_gmsd_mean": 0.06},
             {"method": "old", "psnr_mean": 25.0}]
    assert metric_agreement(rows_) == {"spearman_psnr_vs_ms_gmsd": pytest.approx(-0.5), "methods": 3, "pairs": 3,
                                       "ordered_differently": [["b", "c"]]}   # PSNR: c closer; MS-GMSD: b
    same = metric_agreement(rows_[:3] + [{"method": "c", "psnr_mean": 35.0, "ms_gmsd_mean": 0.03}])
    assert same["spearman_psnr_vs_ms_gmsd"] == pytest.approx(-1.0) and same["ordered_differently"] == []


def _fake_result(name, family, videos, seconds):
    runner = Runner(name=name, family=family, setting="s", model_fn=None, counter=None, reset=None,
                    on_step=None, end=None)
    records = [Record(i, 0, seconds, None, 0, 0) for i in videos]
    return MethodResult(runner, warmup_graphs=1, records=records, videos=videos)


def test_summary_and_report_have_ms_gmsd_columns():
    """``summarize`` scores every video with MS-GMSD beside PSNR/SSIM (0 for the baseline itself,
    larger for a noisier method), the analysis compares the two metrics' orders, and the report
    shows a column and the agreement."""
    g = torch.Generator().manual_seed(0)
    base = {i: torch.rand(1, 3, 4, 32, 32, generator=g) * 2 - 1 for i in range(3)}

    def noisy(sigma):
        return {i: (v + sigma * torch.randn(v.shape, generator=g)).clamp(-1, 1) for i, v in base.items()}
    results = [_fake_result("baseline", "baseline", base, 1.0), _fake_result("adacache-x", "adacache", noisy(0.02), 0.5),
               _fake_result("fixed-3", "fixed", noisy(0.2), 0.4)]
    out = summarize(results, 8, ["p0", "p1", "p2"], None)
    by = {r["method"]: r for r in out["methods"]}
    assert by["baseline"]["ms_gmsd"] == [0.0, 0.0, 0.0] and by["baseline"]["ms_gmsd_worst"] == 0.0
    for r in (by["adacache-x"], by["fixed-3"]):
        assert len(r["ms_gmsd"]) == 3 and r["ms_gmsd_worst"] == max(r["ms_gmsd"]) > 0
        assert r["ms_gmsd_mean"] == pytest.approx(sum(r["ms_gmsd"]) / 3)
    assert by["adacache-x"]["ms_gmsd_worst"] < min(by["fixed-3"]["ms_gmsd"])
    agreement = out["analysis"]["metric_agreement"]
    assert agreement["methods"] == 2 and agreement["ordered_differently"] == []
    out["calibrations"] = []
    md = markdown({"machine": {}, "model": "m", "guidance": 1, "inner": "eager", "check_inner": "eager",
                   "check_steps": 3, "repeats": 1, "recompile_limit": 8, "command": "c", "runs": [out]})
    header = next(line for line in md.splitlines() if line.startswith("| method |")).split(" | ")
    row = next(line for line in md.splitlines() if line.startswith("| fixed-3 |")).split(" | ")
    column = header.index("MS-GMSD mean / worst")
    assert row[column] == f"{by['fixed-3']['ms_gmsd_mean']:.4f} / {by['fixed-3']['ms_gmsd_worst']:.4f}"
    assert "PSNR vs MS-GMSD over the 2 methods" in md and "0 of 1 pairs ordered differently" in md


def test_report_of_results_without_ms_gmsd():
    """A result file written before MS-GMSD was measured still renders: '-' in its column."""
    saved = json.loads((ROOT / "benchmarks" / "results" / "e2e.json").read_text())
    for run in saved["runs"]:
        run["analysis"].pop("metric_agreement", None)
        for r in run["methods"]:
            for key in ("ms_gmsd_mean", "ms_gmsd_worst", "ms_gmsd"):
                r.pop(key, None)
        for c in run.get("calibrations", []):
            for key in ("ms_gmsd_mean", "ms_gmsd_worst", "ms_gmsd"):
                c["measured"].pop(key, None)
    lines = markdown(saved).splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| method |")))
    column = lines[start].split(" | ").index("MS-GMSD mean / worst")
    table = [line.split(" | ") for line in itertools.takewhile(lambda line: line.startswith("|"), lines[start + 2:])]
    assert len(table) == len(saved["runs"][0]["methods"])
    assert all(r[column] == "- / -" for r in table)
    assert not any("PSNR vs MS-GMSD" in line for line in lines)


def test_runs_as_a_module_from_the_repository_root():
    """``python -m benchmarks.e2e --help`` from the repository root, with no import-path set-up."""
    res = subprocess.run([sys.executable, "-m", "benchmarks.e2e", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "python -m benchmarks.e2e --quick" in res.stdout and "--merge" in res.stdout

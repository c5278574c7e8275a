"""benchmarks/e2e.py end to end on a smoke configuration (eager inner, 2 prompts, 8 steps).

Timings are not checked (no timing asserts); what is checked is that every method family
really runs on the reference model and that the measured columns mean what they say.
"""
import importlib.util
import json
import math
import os
import sys

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_e2e():
    if "e2e_bench" in sys.modules:
        return sys.modules["e2e_bench"]
    spec = importlib.util.spec_from_file_location("e2e_bench", os.path.join(ROOT, "benchmarks", "e2e.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["e2e_bench"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    e2e = load_e2e()
    out_dir = tmp_path_factory.mktemp("e2e")
    out = e2e.main(["--quick", "--threads", "1", "--check-steps", "3", "--out", str(out_dir), "--methods",
                    "adacache-fast", "fixed", "fbc-0.2", "pab-2", "taylorseer-3", "magcache-0.24"])
    return e2e, out, out_dir


def rows(out):
    (run,) = out["runs"]
    return run, {r["method"]: r for r in run["methods"]}


def test_writes_every_output(quick_run):
    _, out, out_dir = quick_run
    for name in ("e2e.json", "e2e.md", "e2e_pareto.png", "e2e_motion.png"):
        assert (out_dir / name).stat().st_size > 0, name
    saved = json.loads((out_dir / "e2e.json").read_text())
    assert [r["method"] for r in saved["runs"][0]["methods"]] == [r["method"] for r in out["runs"][0]["methods"]]
    md = (out_dir / "e2e.md").read_text()
    for r in out["runs"][0]["methods"]:
        assert f"| {r['method']} |" in md


def test_every_family_runs(quick_run):
    _, out, _ = quick_run
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
    _, out, _ = quick_run
    _, by = rows(out)
    for name in ("baseline", "eager-baseline"):
        assert math.isinf(by[name]["psnr_worst"]) and by[name]["ssim_worst"] == pytest.approx(1.0)


def test_diffusers_caches_are_timed_eagerly_and_checked_under_compile(quick_run):
    """Their speedup is against the eager baseline; their graph counts come from the compile
    check (graph breaks around the hooks' Python decisions)."""
    _, out, _ = quick_run
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
    _, out, _ = quick_run
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
    _, out, _ = quick_run
    _, by = rows(out)
    ts = by["taylorseer-3"]
    assert ts["computed_fraction"] < 1 and math.isfinite(ts["psnr_mean"]) and ts["cache_mib"] > 0


def test_fixed_control_follows_its_schedule(quick_run):
    e2e, out, _ = quick_run
    run, by = rows(out)
    fixed = run["fixed"]
    row = by[f"fixed-{fixed['rate']}"]
    assert set(row["computed_steps"]) == {e2e.fixed_schedule_size(fixed["rate"], run["steps"])}


def test_fixed_schedule_size():
    e2e = load_e2e()
    assert e2e.fixed_schedule_size(1, 30) == 30
    assert e2e.fixed_schedule_size(3, 30) == len({1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 30})
    assert e2e.fixed_schedule_size(100, 10) == len({1, 2, 9, 10})


def test_spearman():
    e2e = load_e2e()
    assert e2e.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert e2e.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert e2e.spearman([1, 2, 3], [5, 5, 5]) is None


def test_dominance_analysis():
    e2e = load_e2e()
    rows_ = [
        {"method": "a", "family": "adacache", "speedup": 2.0, "psnr_mean": 30.0, "computed_steps": None},
        {"method": "x", "family": "diffusers", "speedup": 1.5, "psnr_mean": 25.0},
        {"method": "y", "family": "diffusers", "speedup": 2.5, "psnr_mean": 28.0},
    ]
    an = e2e.analyse(rows_, [0.1, 0.2])
    by = {d["method"]: d for d in an["dominance"]}
    assert by["x"]["dominated_by"] == ["a"]
    assert by["y"]["dominated_by"] == [] and by["y"]["more_speed_at_its_psnr"] == []
    assert by["y"]["higher_psnr_at_its_speed"] == []
    assert an["all_dominated"] is False

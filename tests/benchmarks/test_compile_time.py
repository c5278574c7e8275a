"""The startup benchmark's account of a first call (benchmarks/compile_time.py): Dynamo's own timers
are read under the names torch uses (a renamed timer would read 0 and hide where the time went),
and the phase-by-phase gap to regional compilation adds up to the gap of the first calls."""
import json
import math

import pytest
import torch

from adacache_fx import AdaCacheConfig, compile_model
from benchmarks.compile_time import PHASES, dynamo_phases, first_call_gap, first_call_terms, main, markdown
from models.toy_models import ToyDiT, seeded


def test_the_timers_are_read_where_dynamo_keeps_them():
    torch._dynamo.reset()
    before = dynamo_phases()
    model = seeded(ToyDiT(depth=4), 0)
    compile_model(model, AdaCacheConfig(codebook={math.inf: 1}, num_steps=8, compile_blocks="once"), inner="eager")
    with torch.no_grad():
        model(torch.randn(2, 9, 5), torch.full((2,), 500.0))
    grown = {name: dynamo_phases()[name] - before[name] for name in PHASES}
    # every timer moved: the four blocks were marked, the first traced, the three others checked and stamped out
    assert all(seconds > 0 for seconds in grown.values()), grown
    assert grown["dynamo_s"] >= grown["tracing_s"] + grown["backend_s"]
    assert grown["tracing_s"] >= grown["region_trace_s"] + grown["region_lookup_s"] + grown["region_stamp_s"]


def _run(method, first, **phases):
    base = dict(dynamo_s=0.0, tracing_s=0.0, region_trace_s=0.0, region_lookup_s=0.0, region_stamp_s=0.0,
                backend_s=0.0, guards_s=0.0)
    return {"method": method, "blocks": 30, "parameters": 1.42e9, "first_call_s": first, "first_reused_s": None,
            "warm_computed_s": 9.0, "warm_reused_s": None, "peak_rss_gib": 6.0, "cache_bytes": 0, "round": 0,
            "phases": dict(base, **phases)}


OURS = dict(_run("adacache-off-once", 43.0, dynamo_s=34.0, tracing_s=9.0, region_trace_s=1.5, region_lookup_s=4.0,
                 region_stamp_s=2.0, backend_s=23.5, guards_s=0.8), inner_compiles=[[67, 20.5]])
REGIONAL = _run("regional", 28.5, dynamo_s=19.5, tracing_s=0.8, backend_s=18.5, guards_s=0.1)


def test_the_gap_to_regional_adds_up_phase_by_phase():
    terms = dict((name, delta) for name, delta, _detail in first_call_terms(OURS, REGIONAL))
    assert sum(terms.values()) == pytest.approx(43.0 - 28.5)
    assert terms["Dynamo's trace"] == pytest.approx(8.2)
    assert terms["the backend's passes"] == pytest.approx(3.0)       # the backend less its inner compiles
    assert terms["the inner compile"] == pytest.approx(2.0)          # against inductor under regional
    assert terms["the first run and the rest"] == pytest.approx(0.0)
    assert first_call_gap(OURS, REGIONAL).startswith("; the rounds nearest the medians differ by +14.5 s = Dynamo's trace +8.2 s")
    assert first_call_terms(OURS, dict(REGIONAL, phases=None)) == [] and first_call_gap(OURS, {}) == ""


def test_the_results_say_where_each_first_call_went():
    lines = markdown({"rows": [OURS, REGIONAL]}, {"cpu": "test"}, "cmd")
    table = [line for line in lines if line.startswith("| 30 |") and line.count("|") == 11]
    assert table == ["| 30 | adacache-off-once | 43.0 | 34.0 | 9.0 | 1.5 / 4.0 / 2.0 | 23.5 | 20.5 | 0.8 | 9.0 |",
                     "| 30 | regional | 28.5 | 19.5 | 0.8 | - | 18.5 | - | 0.1 | 9.0 |"]
    goal = next(line for line in lines if "compile_repeated_blocks'" in line)
    assert "(1.51x; goal <= 1.00x); the rounds nearest the medians differ by +14.5 s" in goal


def _output(tmp_path, name, rows):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"rows": rows, "machine": {"cpu": "test", "date": "today"}, "command": name,
                                "generations": 1, "rounds": 1}))
    return str(path)


@pytest.mark.parametrize("more_rounds", [False, True])
def test_merged_outputs_are_more_rounds_or_replace_the_earlier(tmp_path, more_rounds):
    first = _output(tmp_path, "first", [OURS, REGIONAL])
    second = _output(tmp_path, "second", [dict(OURS, first_call_s=41.0)])
    main(["--merge", first, second, "--out", str(tmp_path / "out")] + (["--more-rounds"] if more_rounds else []))
    merged = json.loads((tmp_path / "out" / "compile_time.json").read_text())
    ours = [r for r in merged["rows"] if r["method"] == "adacache-off-once"]
    assert [r["first_call_s"] for r in ours] == ([43.0, 41.0] if more_rounds else [41.0])
    assert merged["rounds"] == (2 if more_rounds else 1) and len(merged["rows"]) == len(ours) + 1
    if more_rounds:
        assert [r["round"] for r in ours] == [0, 1]
        assert "| 30 | adacache-off-once | 1.42 B | 42.0 (41.0-43.0) |" in (tmp_path / "out" / "compile_time.md").read_text()

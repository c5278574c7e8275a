"""The zoo's coverage matrix: one runner, one result.

For every zoo case, two checks:

* **capture** (:func:`zoo.check.check_case`): the eager forward is finite and deterministic,
  and ``torch.compile(fullgraph=True)`` with a capturing backend gives exactly one Dynamo graph
  (else the graph-break reason, and how many graphs the default config makes);
* **caching** (the checks of tests/zoo/test_zoo_caching.py, inner backend ``eager``): ``explain``
  finds regions, streams, a probe and a timestep (video: a MoReg frame layout); caching off
  equals plain ``torch.compile``; a fixed codebook follows the schedule contract.

Each case's result is one JSON line ``{"name", "class", "capture": {...}, "caching": {...}}`` in
``benchmarks/results/coverage.jsonl``; a later line for a case replaces the sections it carries
(so a capture-only rerun keeps the caching result). ``render`` writes
``benchmarks/results/coverage.md`` from it. The capture result is also what the zoo cases'
``one_graph`` / ``graph_break`` are read from (see ``zoo.diffusers_cases``).

From the repository root::

    PYTHONPATH=tests python -m zoo.coverage run NAME... >> benchmarks/results/coverage.jsonl
    PYTHONPATH=tests python -m zoo.coverage run --all --only capture >> benchmarks/results/coverage.jsonl
    PYTHONPATH=tests python -m zoo.coverage render      # coverage.jsonl -> coverage.md

A case takes about 10 s (both checks) unloaded, 100 s on 2 loaded cores; several ``run``
processes can share the cases.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

from .results import JSONL, MARKDOWN, SECTIONS, load_results


# ----- the checks ------------------------------------------------------------------------------
def run_capture(name: str) -> dict:
    from .check import check_case

    res = check_case(name)
    for key in ("name", "class", "core"):
        res.pop(key, None)
    if "traceback" in res:
        res["tb"] = res.pop("traceback")
    return res


def run_caching(name: str) -> dict:
    from . import test_zoo_caching as T

    res: dict = {}
    t0 = time.time()
    stage = "explain"
    try:
        if name in T.MODULE_GUARD:
            return _run_module_guard(name, res, t0)
        ex = T.check_explain(name)
        res["graphs"] = len(ex.graphs)
        res["regions"] = [len(r.blocks) for r in ex.regions]
        res["streams"] = [len(r.streams) for r in ex.regions]
        res["stream_kinds"] = [[s.kind for s in r.streams] for r in ex.regions]
        res["probe"] = ex.probe.block if ex.probe else None
        res["frame"] = ex.frame_layout.describe() if ex.frame_layout else None
        res["block_flops_cached"] = round(ex.cached_block_flops_fraction, 4)
        stage = "caching off"
        T.check_caching_off(name)
        stage = "fixed codebook"
        backend = T.check_fixed_codebook(name)
        res["runners"] = sum(len(g.runners) for g in backend.graphs)
        res["flops_cached"] = round(backend.report().cached_flops_fraction, 4)
        res["status"] = "pass"
    except BaseException as exc:  # noqa: BLE001 - recorded, not raised
        if isinstance(exc, KeyboardInterrupt):
            raise
        res["status"] = "fail"
        res["stage"] = stage
        res["error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
        res["tb"] = traceback.format_exc()[-2500:]
    res["secs"] = round(time.time() - t0, 1)
    T._models.clear()
    return res


def _run_module_guard(name: str, res: dict, t0: float) -> dict:
    """``run_caching`` for a case whose block lists are guarded at their calls (no graph holds a block)."""
    from . import test_zoo_caching as T

    stage = "caching off"
    try:
        guard = T.check_module_guard_caching_off(name)
        res["guard"] = "modules: " + T.MODULE_GUARD[name]
        res["regions"] = [len(r.paths) for r in guard.regions]
        res["streams"] = [sum(s is not None for s in r.shapes) for r in guard.regions]
        res["probe"] = guard.region_info[guard.probe[0]][2]
        res["block_flops_cached"] = 1.0   # checked: every block list of the case is a region
        stage = "fixed codebook"
        backend = T.check_fixed_codebook(name)
        res["runners"] = len(guard.runners)
        res["flops_cached"] = round(backend.report().cached_flops_fraction, 4)
        stage = "dynamo counts"
        res["dynamo"] = T.dynamo_counts(name)
        res["graphs"] = res["dynamo"]["ours"][0]
        res["status"] = "pass"
    except BaseException as exc:  # noqa: BLE001 - recorded, not raised
        if isinstance(exc, KeyboardInterrupt):
            raise
        res.update(status="fail", stage=stage, error=f"{type(exc).__name__}: {str(exc)[:600]}",
                   tb=traceback.format_exc()[-2500:])
    res["secs"] = round(time.time() - t0, 1)
    T._models.clear()
    return res


def run(name: str, only: str | None = None) -> dict:
    """One JSON record for case ``name`` (``only``: "capture" or "caching", else both)."""
    from . import get_case

    case = get_case(name)
    rec = {"name": name, "class": case.model_class.replace("diffusers.", "")}
    if only in (None, "capture"):
        rec["capture"] = run_capture(name)
    if only in (None, "caching"):
        rec["caching"] = run_caching(name)
    return rec


# ----- coverage.md -----------------------------------------------------------------------------
def _kind(case) -> str:
    kinds = [k for k, on in (("video", case.is_video), ("audio", case.is_audio)) if on]
    return "+".join(kinds) or "image"


def _md(text) -> str:
    return str(text).replace("\n", " ").replace("|", "\\|")


def _capture_cells(case, cap: dict | None) -> tuple:
    """(eager, one graph, block lists, graph break) cells."""
    lists = ", ".join(f"`{k}`" for k in case.block_lists)
    if cap is None:
        return "?", "?", lists, ""
    eager = cap.get("eager")
    if eager is False:
        return "FAIL", "-", lists, _md(cap.get("eager_error", ""))
    if cap.get("block_lists"):
        lists = ", ".join(f"`{k}` ({v})" for k, v in cap["block_lists"].items())
    one_graph = cap.get("one_graph")
    if one_graph:
        return "ok", "yes", lists, ""
    if one_graph is False:
        frag = f" ({cap['fragments']} graphs)" if cap.get("fragments") else ""
        return "ok", "no" + frag, lists, _md(cap.get("graph_break", ""))
    return "ok", "?", lists, ""


def _caching_cells(name: str, cach: dict | None, xfail: dict) -> tuple:
    """(caching status, regions / reason) cells."""
    if cach is None:
        return "not run", ""
    if cach["status"] == "pass":
        regions = " + ".join(str(b) for b in cach["regions"])
        detail = f"{len(cach['regions'])} region(s), blocks {regions}, streams {cach['streams']}, probe `{cach['probe']}`"
        if cach.get("guard"):
            plain, ours = cach["dynamo"]["plain"], cach["dynamo"]["ours"]
            detail = (f"block lists guarded at their calls (chosen on the first call: {cach['guard'][9:]}); "
                      f"{detail}; graph breaks {ours[1]} vs {plain[1]} under plain torch.compile, graphs {ours[0]} vs "
                      f"{plain[0]} (data-dependent ops captured), none compiled in a second generation")
        if cach.get("frame"):
            detail += f"; frames: {cach['frame']}"
        if cach.get("graphs", 1) > 1 and not cach.get("guard"):
            detail += f"; {cach['graphs']} Dynamo graphs"
        if cach.get("flops_cached") is not None:
            detail += f"; {cach['flops_cached']:.0%} of a forward's FLOPs cached"
        if cach.get("block_flops_cached") is not None:
            detail += f" ({cach['block_flops_cached']:.0%} of the blocks')"
        return "pass", detail
    reason = xfail.get(name) or f"{cach['stage']}: {cach['error']}"
    return f"**fail** ({cach['stage']})", _md(reason)


def render(jsonl: Path = JSONL, out: Path = MARKDOWN) -> str:
    """Write ``out`` (coverage.md) from the results in ``jsonl``; returns "passed/total"."""
    import diffusers
    import torch

    from . import test_zoo_caching as T

    from . import ZOO
    from . import diffusers_cases as dc

    results = load_results(jsonl)
    rows = []
    passed = n_one = n_break = n_eager_fail = 0
    below_goal = []
    for name in sorted(ZOO, key=lambda n: (ZOO[n].model_class.replace("diffusers.", ""), n)):
        case = ZOO[name]
        r = results.get(name, {})
        cap, cach = r.get("capture"), r.get("caching")
        eager, one_graph, lists, graph_break = _capture_cells(case, cap)
        status, detail = _caching_cells(name, cach, T.XFAIL)
        passed += status == "pass"
        if status == "pass" and (cach.get("block_flops_cached") or 0) < 0.9:
            below_goal.append(f"`{name}` ({cach.get('block_flops_cached', 0):.0%})")
        n_one += one_graph == "yes"
        n_break += one_graph.startswith("no")
        n_eager_fail += eager == "FAIL"
        rows.append(f"| `{case.model_class.replace('diffusers.', '')}` | `{name}` | {_kind(case)} | "
                    f"{'yes' if case.core else ''} | {eager} | {one_graph} | {lists} | {status} | {detail} | "
                    f"{graph_break} | {_md(case.notes)} |")
    total = len(ZOO)
    text = [
        "# Zoo coverage: capture and caching over every zoo case",
        "",
        "Generated by `PYTHONPATH=tests python -m zoo.coverage render` (from the repository root) from",
        "benchmarks/results/coverage.jsonl, the results of `PYTHONPATH=tests python -m zoo.coverage run` over",
        f"every zoo case (CPU; rendered with torch {torch.__version__}, diffusers {diffusers.__version__}). Per case:",
        "",
        "- **capture** (tests/zoo/check.py): eager = the forward is finite and deterministic; one graph =",
        "  `torch.compile(model, fullgraph=True)` with a capturing backend gives exactly one Dynamo graph for the",
        "  case's inputs (batch 2), else the graph-break reason (and the graphs the default config makes); block",
        "  lists = the `nn.ModuleList`s holding the residual blocks (`nn_module_stack` shows them in the graph);",
        "- **caching** (the checks of tests/zoo/test_zoo_caching.py, inner backend `eager`): `explain` finds >= 1",
        "  region with blocks, streams, a probe and a timestep (video: a MoReg frame layout); `{inf: 1}` over 8",
        "  steps equals `torch.compile(backend=\"eager\")` exactly; `{inf: 3}` over 12 steps computes steps",
        "  [1, 2, 5, 8, 11, 12], every region runner executes 6 times, no recompile, 5 metrics (video: with",
        "  motion). Failing cases are `xfail(strict=True)` in the test with the same reason. The model is",
        "  compiled with `compile_model` (data-dependent ops captured into the graph; the one-graph column is",
        "  the default config's capture). FLOP shares (`torch.utils.flop_counter`): of one forward, and of the",
        "  FLOPs of every block found (the goal: at least 90% of the blocks'); a tiny config's stem and head",
        "  weigh far more in the forward's share than in a full-size model's.",
        "",
        "`core` cases also run in tests/zoo/test_zoo_models.py and tests/zoo/test_zoo_caching.py by default; the others",
        "with `ADACACHE_ZOO_ALL=1` or through this runner.",
        "",
        f"**{passed} of {total} cases pass** ({len({ZOO[n].model_class for n in ZOO})} classes in the zoo; "
        f"{n_one} capture in one Dynamo graph).",
        "",
        f"Cases: {total}; caching passes: {passed}; one graph: {n_one}; graph breaks: {n_break}; "
        f"eager failures: {n_eager_fail}.",
        "",
        f"Passing cases below 90% of the blocks' FLOPs cached: {', '.join(below_goal) or 'none'}.",
        "",
        "| class | case | kind | core | eager | one graph | block lists (len) | caching | regions / reason | "
        "graph break | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "## DiT classes without a zoo case",
        "",
        "| class | reason |",
        "|---|---|",
        *[f"| `{c}` | {_md(why)} |" for c, why in sorted(dc.NOT_COVERED.items())],
        "",
        "## Not DiT denoisers (not covered on purpose)",
        "",
        "| class | reason |",
        "|---|---|",
        *[f"| `{c}` | {_md(why)} |" for c, why in sorted(dc.NOT_DIT.items())],
        "",
    ]
    out.write_text("\n".join(text))
    return f"{passed}/{total}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="PYTHONPATH=tests python -m zoo.coverage", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the checks, print one JSON line per case (append it to coverage.jsonl)")
    r.add_argument("names", nargs="*", help="zoo cases")
    r.add_argument("--all", action="store_true", help="every zoo case")
    r.add_argument("--only", choices=SECTIONS, default=None, help="only the capture or only the caching check")
    g = sub.add_parser("render", help="write coverage.md from coverage.jsonl")
    g.add_argument("--jsonl", type=Path, default=JSONL)
    g.add_argument("--out", type=Path, default=MARKDOWN)
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    if a.command == "render":
        print(render(a.jsonl, a.out))
        return
    from . import ZOO

    names = list(ZOO) if a.all else a.names
    if not names:
        ap.error("run: name zoo cases, or --all")
    for name in names:
        print(json.dumps(run(name, a.only)), flush=True)
        sys.stdout.flush()


if __name__ == "__main__":
    main()

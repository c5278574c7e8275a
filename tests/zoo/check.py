"""Check zoo cases: eager forward (deterministic, finite), and whether
``torch.compile(fullgraph=True, backend=<capture>)`` captures one Dynamo graph.

    cd tests && python -m zoo.check [names...] [--json out.json] [--coverage] [--from-json out.json]

``--coverage`` rewrites tests/zoo/COVERAGE.md and tests/zoo/graph_status.json from the results
(plus ``zoo.diffusers_cases.NOT_DIT`` / ``NOT_COVERED``). Without names every case is checked
(a few seconds each; about 10 minutes in all on 2 CPU cores)."""

from __future__ import annotations

import argparse
import json
import re
import time
import traceback
from pathlib import Path

import torch

from . import ZOO, get_output, normalize_module_path


def _short_reason(exc: BaseException) -> str:
    msg = str(exc).strip()
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        if ln.startswith(("from user code", "Set TORCHDYNAMO", "For more information", "Developer debug",
                          "File \"", "Traceback", "*****")):
            break
        keep.append(ln)
    text = " ".join(keep)
    if "Explanation:" in text:
        text = text.split("Explanation:")[0].strip()
    text = text[:240]
    # source location of the break (last diffusers frame mentioned) and its code line
    m = re.findall(r'File "([^"]*/(diffusers/[^"]+))", line (\d+), in (\w+)', msg)
    if m:
        import linecache

        full, f, line, fn = m[-1]
        code = linecache.getline(full, int(line)).strip()
        text += f" [at {f}:{line} in {fn}: `{code[:120]}`]"
    return f"{type(exc).__name__}: {text}"


def check_case(name: str, compile_check: bool = True) -> dict:
    case = ZOO[name]
    res: dict = {"name": name, "class": case.model_class, "core": case.core}
    t0 = time.time()
    try:
        model = case.build()
        res["params"] = sum(p.numel() for p in model.parameters())
        args, kwargs = case.make_inputs(2, 500.0 if case.t_max >= 10 else 0.5)
        with torch.no_grad():
            o1 = get_output(model(*args, **kwargs))
            o2 = get_output(model(*args, **kwargs))
        res["eager"] = bool(torch.isfinite(o1).all()) and bool(torch.equal(o1, o2))
        res["out_shape"] = list(o1.shape)
        res["out_std"] = float(o1.float().std())
        lists = {}
        for path in case.block_lists:
            lists[path] = len(model.get_submodule(path))
        res["block_lists"] = lists
        res["num_blocks_ok"] = sum(lists.values()) == case.num_blocks
        res["toplevel_modulelists"] = {n: len(m) for n, m in model.named_children() if isinstance(m, torch.nn.ModuleList)}
    except Exception as e:  # noqa: BLE001
        res["eager"] = False
        res["eager_error"] = _short_reason(e)
        res["traceback"] = traceback.format_exc()[-2000:]
        res["seconds"] = round(time.time() - t0, 2)
        return res
    res["eager_seconds"] = round(time.time() - t0, 2)
    if compile_check:
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        try:
            with torch.no_grad():
                oc = get_output(torch.compile(model, backend=backend, fullgraph=True)(*args, **kwargs))
            res["one_graph"] = len(graphs) == 1
            res["compiled_max_abs_err"] = float((oc - o1).abs().max())
            paths = set()
            for n in graphs[0].graph.nodes:
                for path, _ in (n.meta.get("nn_module_stack") or {}).values():
                    paths.add(normalize_module_path(path))
            res["block_lists_in_stack"] = all(
                any(re.match(re.escape(lst) + r"\.\d+(\.|$)", p) for p in paths) for lst in case.block_lists)
        except Exception as e:  # noqa: BLE001
            res["one_graph"] = False
            res["graph_break"] = _short_reason(e)
            # how many fragments without fullgraph
            graphs.clear()
            torch._dynamo.reset()
            try:
                with torch.no_grad():
                    torch.compile(model, backend=backend)(*args, **kwargs)
                res["fragments"] = len(graphs)
            except Exception as e2:  # noqa: BLE001
                res["fragments_error"] = _short_reason(e2)
        torch._dynamo.reset()
    res["seconds"] = round(time.time() - t0, 2)
    return res


def _kind(case) -> str:
    kinds = []
    if case.is_video:
        kinds.append("video")
    if case.is_audio:
        kinds.append("audio")
    return "+".join(kinds) or "image"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_coverage(results: list[dict], path: Path) -> None:
    """Write COVERAGE.md from check results (plus the NOT_DIT / NOT_COVERED lists)."""
    import diffusers

    from . import diffusers_cases as dc

    by_name = {r["name"]: r for r in results}
    lines = [
        "# Zoo coverage: diffusers transformer classes",
        "",
        f"Generated by `cd tests && python -m zoo.check --coverage` (torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}, CPU). One-graph = `torch.compile(model, fullgraph=True)` with a "
        "capturing backend gives exactly one Dynamo graph for the case's inputs (batch 2); the block lists column "
        "names the `nn.ModuleList`s holding the residual blocks (`nn_module_stack` shows them in the graph).",
        "`core` cases run in tests/test_zoo_models.py; the rest run with `python -m zoo.check` "
        "(or `ADACACHE_ZOO_ALL=1 pytest tests/test_zoo_models.py`, eager only).",
        "",
        "| class | case | kind | core | eager | one graph | block lists (len) | graph break / notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    n_yes = n_no = n_fail = 0
    for name, case in sorted(ZOO.items(), key=lambda kv: (kv[1].model_class, kv[0])):
        r = by_name.get(name, {})
        eager = r.get("eager")
        og = r.get("one_graph")
        if eager is False:
            n_fail += 1
            og_s = "-"
        elif og:
            n_yes += 1
            og_s = "yes"
        elif og is False:
            n_no += 1
            og_s = "no"
        else:
            og_s = "?"
        reason = r.get("graph_break") or r.get("eager_error") or ""
        if reason and r.get("fragments"):
            reason += f" ({r['fragments']} graphs without fullgraph)"
        lists = ", ".join(f"`{k}` ({v})" for k, v in (r.get("block_lists") or {}).items()) or \
            ", ".join(f"`{k}`" for k in case.block_lists)
        text = reason if reason else case.notes
        if reason and case.notes:
            text = reason + " -- " + case.notes
        lines.append(f"| `{case.model_class.replace('diffusers.', '')}` | `{name}` | {_kind(case)} | "
                     f"{'yes' if case.core else ''} | {'ok' if eager else ('FAIL' if eager is False else '?')} | "
                     f"{og_s} | {lists} | {_md(text)} |")
    lines += ["", f"Cases: {len(ZOO)}; one graph: {n_yes}; graph breaks: {n_no}; eager failures: {n_fail}.", ""]
    lines += ["## DiT classes without a zoo case", "", "| class | reason |", "|---|---|"]
    for cls, why in sorted(dc.NOT_COVERED.items()):
        lines.append(f"| `{cls}` | {_md(why)} |")
    lines += ["", "## Not DiT denoisers (not covered on purpose)", "", "| class | reason |", "|---|---|"]
    for cls, why in sorted(dc.NOT_DIT.items()):
        lines.append(f"| `{cls}` | {_md(why)} |")
    lines.append("")
    path.write_text("\n".join(lines))


def write_graph_status(results: list[dict], path: Path) -> None:
    status = {r["name"]: {"one_graph": r.get("one_graph"), "graph_break": r.get("graph_break", ""),
                          "eager": r.get("eager")} for r in results}
    path.write_text(json.dumps(status, indent=1, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--skip-core", action="store_true")
    ap.add_argument("--coverage", action="store_true",
                    help="write COVERAGE.md and graph_status.json next to this file (needs all cases)")
    ap.add_argument("--from-json", default=None, help="reuse results from an earlier --json run")
    args = ap.parse_args()
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        if args.coverage:
            write_coverage(results, Path(__file__).with_name("COVERAGE.md"))
            write_graph_status(results, Path(__file__).with_name("graph_status.json"))
        return
    names = args.names or [n for n, c in ZOO.items() if not (args.skip_core and c.core)]
    results = []
    for n in names:
        r = check_case(n, compile_check=not args.no_compile)
        results.append(r)
        short = {k: v for k, v in r.items() if k not in ("traceback",)}
        print(json.dumps(short), flush=True)
        if "traceback" in r and not r.get("eager"):
            print(r["traceback"], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.coverage:
        write_coverage(results, Path(__file__).with_name("COVERAGE.md"))
        write_graph_status(results, Path(__file__).with_name("graph_status.json"))


if __name__ == "__main__":
    main()

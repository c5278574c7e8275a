"""Check zoo cases: eager forward (deterministic, finite), and whether
``torch.compile(fullgraph=True, backend=<capture>)`` captures one Dynamo graph.

    cd tests && python -m zoo.check [names...] [--json out.json] [--coverage]

``--coverage`` rewrites tests/zoo/COVERAGE.md from the results (plus the non-DiT list in
``zoo.diffusers_cases.NOT_DIT``). Without names every case is checked (a few seconds each)."""

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
    text = " ".join(keep)[:300]
    # source location of the break (last user frame mentioned)
    m = re.findall(r'File "[^"]*/(diffusers/[^"]+)", line (\d+), in (\w+)', msg)
    if m:
        f, line, fn = m[-1]
        text += f" [at {f}:{line} in {fn}]"
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--skip-core", action="store_true")
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()

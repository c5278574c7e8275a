"""The capture check of a zoo case: eager forward (deterministic, finite), and whether
``torch.compile(fullgraph=True, backend=<capture>)`` captures one Dynamo graph (else the
graph-break reason, and how many graphs the default config makes).

Run over the zoo, with the caching checks, by the coverage matrix's runner
(:mod:`zoo.coverage`: ``PYTHONPATH=tests python -m zoo.coverage run NAME...`` from the
repository root), which records the results in benchmarks/results/coverage.jsonl."""

from __future__ import annotations

import re
import time
import traceback

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

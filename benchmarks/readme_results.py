"""Regenerate the results page of the docs (docs/results.md) from the committed benchmark output.

    python -m benchmarks.readme_results                      # rewrites docs/results.md between the markers
    python -m benchmarks.readme_results --out /tmp/results.md   # another copy
    python -m benchmarks.readme_results --print              # only print the section

(from the repository root). The section sits between ``<!-- results:begin -->`` and
``<!-- results:end -->``; the rest of the page (its title, the findings) is kept as written.

Every number in the section is read from a file under benchmarks/results/ (or the
reference model's card); nothing is typed by hand. The page is built by MkDocs from docs/,
which cannot link to files outside it: a link to a file under benchmarks/results/ becomes its
path in code font, and the plots the section shows are copied to docs/img/.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
#: the page the section is written to, and where the plots it shows are copied (relative to it: img/)
PAGE = os.path.join(ROOT, "docs", "results.md")
IMAGES = os.path.join(ROOT, "docs", "img")


def _load(name):
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f) if name.endswith(".json") else f.read()


def overhead_section() -> list:
    d = _load("overhead.json")
    if d is None:
        return ["Overhead: not measured yet (`python -m benchmarks.overhead`)."]
    m = d["machine"]
    med, comp = d["median_generation_s"], d["compile_s"]
    lines = [
        f"**Overhead of the rewrite** ([benchmarks/results/overhead.md](benchmarks/results/overhead.md); "
        f"{m['cpu']}, {m['torch_threads']} thread(s), torch {m['torch']}, {m['date']}; "
        f"reference STDiT, {d['steps']} steps, medians of {d['repeats']} interleaved generations):",
        "",
        "| method | generation (s) | per step (ms) | vs plain | first call incl. compile (s) |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("plain", "plain `torch.compile`"), ("off", "adacache, caching off `{inf: 1}`"),
                        ("fixed", f"adacache, fixed `{{inf: 3}}` ({len(d['fixed_computed_steps'])}/{d['steps']} steps"
                                  + (f", {d['fixed_reuse']} reuse" if d.get("fixed_reuse") else "") + ")"),
                        ("fixed_constant", "adacache, the same with constant reuse")):
        if name not in med:
            continue
        ratio = med["plain"] / med[name]
        lines.append(f"| {label} | {med[name]:.3f} | {1000 * med[name] / d['steps']:.1f} | "
                     f"{ratio:.2f}x | {comp[name]:.1f} |")
    lines += [
        "",
        f"Caching off costs **{d['off_overhead']:+.1%}** per step (goal: at most +3%: "
        f"{'met' if d['goals']['off_overhead <= 3%'] else 'missed'}); the fixed schedule reaches "
        f"**{d['fixed_speedup']:.2f}x** of an ideal {d['fixed_ideal_speedup']:.2f}x "
        f"(**{d['fixed_efficiency']:.0%}**, goal 97%: {'met' if d['goals']['fixed efficiency >= 97%'] else 'missed'})"
        + (f"; the forecast's generations take {d['forecast_cost']:+.1%} against constant reuse (medians; over "
           f"the repeats fixed spans {min(d['all_generation_s']['fixed']):.2f}-{max(d['all_generation_s']['fixed']):.2f} s "
           f"and constant {min(d['all_generation_s']['fixed_constant']):.2f}-"
           f"{max(d['all_generation_s']['fixed_constant']):.2f} s)."
           if "forecast_cost" in d else "."),
    ]
    return lines


def graph_breaks_section() -> list:
    lines = []
    for name, title in (("graph_breaks", "A model that breaks Dynamo's graph in every block"),
                        ("graph_breaks_python_loop", "A model whose blocks break the graph where no capture helps "
                                                     "(a Python loop over per-expert token counts; "
                                                     "`block_guard=\"modules\"`)")):
        d = _load(f"{name}.json")
        if d is None:
            lines += [f"{title}: not measured yet (`python -m benchmarks.graph_breaks"
                      f"{' --model python_loop' if name.endswith('loop') else ''}`).", ""]
            continue
        m, runs, per_step = d["machine"], d["runs"], d["per_step_ms"]
        lines += [
            f"**{title}** ([benchmarks/results/{name}.md]"
            f"(benchmarks/results/{name}.md); {m['cpu']}, {m['torch_threads']} thread(s), torch {m['torch']}, "
            f"{m['date']}; `examples/models/breaking_dit.py` with {', '.join(k for k, v in d['constructs'].items() if v)}; "
            f"{d['steps']} steps, inductor; each method in its own process, alternated, medians):",
            "",
            "| method | compile (s) | graphs | graph breaks | recompiles in a generation | per step (ms) |",
            "|---|---|---|---|---|---|",
        ]
        names = {"plain": "plain `torch.compile`", "off": "`compile_model`, caching off",
                 "fixed": "`compile_model`, `{inf: 3}`"}
        for key in ("plain", "off", "fixed"):
            r = runs[key][0]
            lines.append(f"| {names[key]} | {r['compile_s']:.1f} | {r['graphs']} | {r['graph_breaks']} | "
                         f"{r['recompiles_in_generation']} | {per_step[key]:.1f} |")
        lines.append("")
    return lines[:-1]


def _computed_line(d: dict, comp: list) -> str:
    """The main job's computed steps and the ideal speedup of the blocks' work: with per-sample
    schedules the blocks run on the computing prompts' rows only, so the ideal counts prompt-steps."""
    rows = d.get("sample_computed_steps")
    if rows:
        done, total = sum(len(r) for r in rows), d["steps"] * len(rows)
        return (f"- computed steps: {len(comp)}/{d['steps']} for some prompt {comp}; {done} of {total} prompt-steps "
                f"(ideal speedup of the blocks' work {total / done:.2f}x)")
    return f"- computed steps: {len(comp)}/{d['steps']} {comp} (ideal speedup {d['steps'] / len(comp):.2f}x)"


def demo_section() -> list:
    d = _load(os.path.join("demo", "report.json"))
    if d is None:
        return ["Demo: not measured yet (`python -m examples.generate --out benchmarks/results/demo`)."]
    m = d["machine"]
    comp = d["computed_steps"]
    lines = [f"**The main job** (`{d['command']}`; {m['cpu']}, torch {m['torch']}, {m['date']}; "
             f"[report](benchmarks/results/demo/report.json), "
             f"[side by side](benchmarks/results/demo/side_by_side.gif), "
             f"[schedule](benchmarks/results/demo/schedule.png)): prompts {', '.join(d['prompts'])}; "
             f"{d['steps']} steps, AdaCache-{d['mode']}, inner `{d['inner']}`.", "",
             _computed_line(d, comp),
             f"- measured speedup: **{d['speedup']:.2f}x** (median of {d['repeats']} interleaved pairs; "
             f"baseline {min(d['baseline_s']):.1f}-{max(d['baseline_s']):.1f} s, "
             f"AdaCache {min(d['adacache_s']):.1f}-{max(d['adacache_s']):.1f} s)",
             f"- against the uncached video: PSNR {d['psnr']:.2f} dB, SSIM {d['ssim']:.4f}; "
             f"cache {d['cache_bytes'] / 2**20:.2f} MiB"]
    if d.get("sample_computed_steps"):
        lines.append("- schedule per sample (`AdaCacheConfig(per_sample=True)`): " + "; ".join(
            f"{p}: {len(steps)}/{d['steps']} ({psnr:.2f} dB)"
            for p, steps, psnr in zip(d["prompts"], d["sample_computed_steps"], d["sample_psnr"])))
    return lines


def kernels_section() -> list:
    md = _load("kernels_cpu.md")
    if md is None:
        return []
    first_table = md.split("## CPU results", 1)[-1].split("\n## ", 1)[0]
    rows = [r for r in first_table.splitlines() if r.startswith("|") and "| op |" in r and r.count("|") == 13]
    lines = ["**Fused cache-metrics op** vs the eager composite of the public AdaCache code and its "
             "`torch.compile` version ([benchmarks/results/kernels_cpu.md](benchmarks/results/kernels_cpu.md), CPU; "
             "no GPU was lent, the GPU rows are empty):", "",
             "| size | dtype | op median ms | GB/s | speedup vs eager |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        # size | shape | dtype | MB | provider | median | min-max | GB/s | %copy | %read | speedup | err
        lines.append(f"| {cells[0]} | {cells[2]} | {cells[5]} | {cells[7]} | {cells[10]} |")
    return lines


def text_section(name: str, title: str, header: str = "Summary") -> list:
    md = _load(name)
    if md is None:
        return []
    summary = re.search(r"## " + header + r".*?\n(.*?)(\n## |\Z)", md, re.S)
    body = summary.group(1).strip() if summary else ""
    return [f"**{title}** ([benchmarks/results/{name}](benchmarks/results/{name})):", "", body] if body else \
        [f"**{title}**: see [benchmarks/results/{name}](benchmarks/results/{name})."]


def _num(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def e2e_section() -> list:
    d = _load("e2e.json")
    if d is None:
        return ["End-to-end comparison: not measured yet (`python -m benchmarks.e2e`)."]
    m = d["machine"]
    lines = [f"**End to end on the trained reference model: AdaCache vs diffusers' caches** "
             f"([benchmarks/results/e2e.md](benchmarks/results/e2e.md), `{d['command']}`; {m['cpu']}, "
             f"{m['torch_threads']} thread(s), torch {m['torch']}, {m['date']}; {len(d['runs'][0]['prompts'])} prompts, "
             f"guidance {d['guidance']}, inner `{d['inner']}`, every method interleaved per prompt). Speedup: median "
             "of per-prompt ratios to the uncached model run the same way (plain `torch.compile`, or the eager "
             "model for diffusers' caches, which are timed eagerly; their graph counts come from a check run "
             "under torch.compile); PSNR / SSIM against the uncached video of the same prompt and seed.", ""]
    for run in d["runs"]:
        lines += [f"*{run['steps']} steps*", "",
                  "| method | timed | speedup | computed steps | PSNR mean / worst (dB) | SSIM mean | cache MiB | "
                  "graphs / breaks / recompiles |", "|---|---|---|---|---|---|---|---|"]
        for r in run["methods"]:
            comp = "-" if r["computed_fraction"] is None else f"{r['computed_fraction']:.0%}"
            psnr = "exact" if r["psnr_mean"] == float("inf") else f"{r['psnr_mean']:.2f} / {r['psnr_worst']:.2f}"
            lines.append(f"| {r['method']} ({r['setting']}) | {r['timed']} | {r['speedup']:.2f}x | {comp} | {psnr} | "
                         f"{r['ssim_mean']:.3f} | {r['cache_mib']:.2f} | {r['graphs']} / {r['graph_breaks']} / "
                         f"{r['recompiles']} |")
        an = run["analysis"]
        beaten = [x["method"] for x in an["dominance"] if x["dominated_by"]]
        not_beaten = [x["method"] for x in an["dominance"] if not x["dominated_by"]]
        lines += ["", f"Dominance at {run['steps']} steps: AdaCache dominates {len(beaten)} of "
                  f"{len(an['dominance'])} other points" + (f"; not: {', '.join(not_beaten)}" if not_beaten else "")
                  + f" (goal: all; {'met' if not not_beaten else 'missed'})."]
        frontier = an.get("frontier", {})
        if frontier:
            def at3(f):
                return f"{f['psnr_at_3x']:.2f} dB ({f['psnr_at_3x_method']})" if f["psnr_at_3x"] is not None else "none"

            def at30(f):
                return (f"{f['speedup_at_30db']:.2f}x ({f['speedup_at_30db_method']})"
                        if f["speedup_at_30db"] is not None else "none")
            lines.append("Best mean PSNR at 3x or more / best speedup at 30 dB or more: " + "; ".join(
                f"{family} {at3(f)} / {at30(f)}" for family, f in frontier.items()) + ".")
        pairs = []
        for p in an.get("moreg", []):
            ci = an["motion"][p["with"]].get("spearman_ci95")
            ci_text = f" [95% CI {ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
            pairs.append(f"{p['with']}: rho(motion, computed steps) {_num(p['rho'][0])}{ci_text} with MoReg, "
                         f"{_num(p['rho'][1])} without; high-motion worst PSNR {_num(p['high_motion_worst_psnr'][0])} vs "
                         f"{_num(p['high_motion_worst_psnr'][1])} dB at {p['mean_computed_fraction'][0]:.0%} vs "
                         f"{p['mean_computed_fraction'][1]:.0%} computed")
        if pairs:
            lines.append("MoReg on vs off: " + "; ".join(pairs) + ".")
        lines.append("")
    lines += ["![speedup vs PSNR](benchmarks/results/e2e_pareto.png)",
              "![computed steps vs motion](benchmarks/results/e2e_motion.png)"]
    return lines


#: the columns of benchmarks/results/coverage.md shown on the results page (the graph-break reasons and
#: the case notes stay in coverage.md)
COVERAGE_COLUMNS = ("class", "case", "kind", "one graph", "caching", "regions / reason")


def _cells(row: str) -> list:
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def coverage_section() -> list:
    md = _load("coverage.md")
    if md is None:
        return []
    headline = re.search(r"\*\*(\d+ of \d+ cases pass)\*\*([^\n]*)", md)
    lines = [f"**Model coverage** over every diffusers transformer class in the test zoo "
             f"([benchmarks/results/coverage.md](benchmarks/results/coverage.md), per-case capture and caching "
             f"status and reasons): **{headline.group(1)}**{headline.group(2)}" if headline else
             "**Model coverage**: see [benchmarks/results/coverage.md](benchmarks/results/coverage.md)."]
    # the first table of coverage.md: the matrix
    table = []
    for row in md.splitlines():
        if row.startswith("|"):
            table.append(row)
        elif table:
            break
    if table:
        header = _cells(table[0])
        keep = [header.index(c) for c in COVERAGE_COLUMNS if c in header]
        body = [_cells(r) for r in table[1:] if not r.startswith("|---")]
        pick = lambda cells: "| " + " | ".join(cells[i] for i in keep) + " |"  # noqa: E731
        lines += ["", "<details markdown=\"1\"><summary>Every case: one-graph capture, caching status and, for failures, the "
                  "reason and what a fix would take</summary>", "", pick(header), "|" + "---|" * len(keep)]
        lines += [pick(cells) for cells in body if len(cells) == len(header)]
        # the other tables (classes without a zoo case, non-DiT classes) under their headings
        for title, rows in re.findall(r"\n## ([^\n]+)\n\n((?:\|[^\n]*\n?)+)", md):
            lines += ["", f"*{title}*", "", rows.rstrip("\n")]
        lines += ["", "</details>"]
    return lines


#: the methods of the few-step rows shown on the results page (every method: the linked file)
FEW_STEP_METHODS = ("baseline", "adacache-slow", "adacache-fast", "fixed-1", "taylorseer-3", "fbc-0.1",
                    "magcache-0.24", "pab-2-6")


def pipelines_section() -> list:
    """Serving soak, two experts, few steps (docs/pipelines.md)."""
    lines = []
    soak = _load("serving_soak.json")
    if soak is not None:
        v, m, rows = soak["verdict"], soak["machine"], soak["rows"]
        lines += [f"**Serving soak** ([benchmarks/results/serving_soak.md](benchmarks/results/serving_soak.md), "
                  f"`{soak['command']}`; {m['cpu']}, {m['torch_threads']} thread(s), torch {m['torch']}, {m['date']}): "
                  f"{len(rows)} requests through one diffusers `WanPipeline` with `enable_cache(pipe, "
                  f"AdaCacheConfig.fast())`, batches 1/2/4, 20/30/50 steps, two resolutions. Compiles only at a shape's "
                  f"first request: {'yes' if v['compiles_only_at_a_new_shape'] else 'no'} (the first new shape served "
                  f"without compiling: request {v['first_new_shape_without_compile']}); cache bytes flat per shape: "
                  f"{'yes' if v['cache_bytes_flat_per_shape'] else 'no'}; resident memory after the warm-up "
                  f"{v['rss_growth_after_warm_up_mb']:+.1f} MB; dropped pipelines freed: {v['dropped_pipelines_freed']}; "
                  f"schedule contract violations: {len(v['contract_violations'])}.", ""]
    experts = _load("two_experts_30.json")
    if experts is not None:
        m = experts["machine"]
        lines += [f"**Two denoising experts (the reference model's weights in both, boundary_ratio "
                  f"{experts['boundary_ratio']}: {experts['shares'][0]} + {experts['shares'][1]} of "
                  f"{experts['steps']} steps)** ([benchmarks/results/two_experts_30.md](benchmarks/results/two_experts_30.md); "
                  f"{m['cpu']}, {m['torch_threads']} thread(s), torch {m['torch']}, {m['date']}; "
                  f"{len(experts['prompts'])} prompts, inner `{experts['inner']}`):", "",
                  "| method | speedup | computed steps (mean) | PSNR mean / worst (dB) |", "|---|---|---|---|"]
        for name, r in experts["rows"].items():
            finite = [x for x in r["psnr"] if x != float("inf")]
            quality = f"{sum(finite) / len(finite):.2f} / {min(finite):.2f}" if finite else "exact"
            counts = [sum(len(c) for c in computed) for computed in r["computed"]]
            lines.append(f"| {name} | {statistics.median(r['ratios']):.2f}x | {sum(counts) / len(counts):.1f} | "
                         f"{quality} |")
        lines.append("")
    few = _load("few_step/e2e.json")
    if few is not None:
        m = few["machine"]
        lines += [f"**Few steps: every method at {' and '.join(str(r['steps']) for r in few['runs'])} steps** "
                  f"([benchmarks/results/few_step/e2e.md](benchmarks/results/few_step/e2e.md), `{few['command']}`; "
                  f"{m['cpu']}, {m['torch_threads']} thread(s), torch {m['torch']}, {m['date']}; "
                  f"{len(few['runs'][0]['prompts'])} prompts; a selection of the methods):", "",
                  "| steps | method | timed | speedup | computed | PSNR mean / worst (dB) |", "|---|---|---|---|---|---|"]
        for run in few["runs"]:
            for r in run["methods"]:
                if r["method"] not in FEW_STEP_METHODS:
                    continue
                comp = "-" if r["computed_fraction"] is None else f"{r['computed_fraction']:.0%}"
                psnr = ("exact" if r["psnr_mean"] in (float("inf"), "inf") else
                        f"{r['psnr_mean']:.2f} / {r['psnr_worst']:.2f}")
                lines.append(f"| {run['steps']} | {r['method']} | {r['timed']} | {r['speedup']:.2f}x | {comp} | {psnr} |")
    return lines


def compile_time_section() -> list:
    """Startup at real size (benchmarks/compile_time.py)."""
    d = _load("compile_time.json")
    if d is None:
        return []
    m = d["machine"]
    lines = [f"**Startup at real size: Wan 2.1 1.3B configuration, 30 and 40 blocks** "
             f"([benchmarks/results/compile_time.md](benchmarks/results/compile_time.md), `{d['command']}`; {m['cpu']}, "
             f"{m['torch_threads']} thread(s), torch {m['torch']}, {m['date']}; random weights, float32, 192 tokens; "
             f"each method in its own process, empty inductor cache; {d.get('rounds', 1)} round(s), medians, first "
             "call min-max in brackets):", "",
             "| blocks | method | first call (s) | warm computed step (s) | warm reused step (s) | peak RSS (GiB) |",
             "|---|---|---|---|---|---|"]
    from benchmarks.compile_time import by_method, goal_lines
    summary = by_method(d["rows"])   # medians over the rounds, the methods interleaved
    for r in summary:
        reused = "-" if r["warm_reused_s"] is None else f"{r['warm_reused_s']:.2f}"
        runs = r["first_call_runs"]
        spread = f" ({min(runs):.1f}-{max(runs):.1f})" if len(runs) > 1 else ""
        lines.append(f"| {r['blocks']} | {r['method']} | {r['first_call_s']:.1f}{spread} | {r['warm_computed_s']:.2f} | "
                     f"{reused} | {r['peak_rss_gib']:.1f} |")
    return lines + ["", "Against the goals (adacache caching off):", ""] + goal_lines(summary)


def branch_study_section() -> list:
    """What a reused step computes: the stack's delta vs each branch's core (benchmarks/branch_study.py)."""
    parts = [d for d in (_load("branch_study.json"), _load("branch_study_step.json")) if d is not None]
    if not parts:
        return []
    m = parts[0]["machine"]
    rows = [r for d in parts for r in d["rows"]]
    gains = [r["branch"]["psnr_mean"] - r["stack"]["psnr_mean"] for r in rows]
    lines = [f"**What a reused step computes: the stack's delta or each branch's core (emulated, reference model)** "
             f"([benchmarks/results/branch_study.md](benchmarks/results/branch_study.md), "
             f"`{'` and `'.join(d['command'].strip() for d in parts)}`; {m['cpu']}, {m['torch_threads']} thread(s), "
             f"{m['date']}; {len(parts[0]['prompts'])} prompts, 30 steps, the same computed steps for both; cores: "
             f"{', '.join(parts[0]['cores'])}). Forecasting each core with the glue run fresh changed the mean PSNR by "
             f"{min(gains):+.2f} to {max(gains):+.2f} dB against forecasting the stack's delta:", "",
             "| rate | computed | forecast | stack PSNR mean / worst | branch PSNR mean / worst | cache stack / branch (MiB) |",
             "|---|---|---|---|---|---|"]
    from benchmarks.branch_study import metric_agreement
    agree = metric_agreement(rows)
    for r in rows:
        st, br = r["stack"], r["branch"]
        lines.append(f"| {r['rate']} | {st['computed']}/30 | {st['mode']} | {st['psnr_mean']:.2f} / {st['psnr_worst']:.2f} | "
                     f"{br['psnr_mean']:.2f} / {br['psnr_worst']:.2f} | {st['cache_bytes'] / 2**20:.2f} / "
                     f"{br['cache_bytes'] / 2**20:.2f} |")
    lines += ["", f"MS-GMSD (perceptual, `adacache_fx.calibration.quality`) orders these {agree['points']} points as PSNR "
              f"does: Spearman {agree['rho_mean']:.3f} (means), {agree['rho_worst']:.3f} (worst); "
              f"{len(agree['discordant'])} pair(s) ordered differently, each within "
              f"{max([abs(d) for _a, _b, d in agree['discordant']], default=0):.2f} dB of PSNR."]
    return lines


def block() -> str:
    parts = []
    for section in (demo_section(), e2e_section(), overhead_section(), graph_breaks_section(), kernels_section(),
                    text_section("per_sample.md", "A schedule per sample vs one schedule per batch (reference model, "
                                 "batches of 4 prompts mixing low and high motion)", "Results"),
                    text_section("distributed.md", "Sequence parallel, 1/2/4 gloo processes on the 2-core CPU", "Results"),
                    text_section("distributed_cp.md", "diffusers' context parallelism (WanTransformer3DModel), 1/2 gloo "
                                 "processes on the 2-core CPU", "Results"),
                    compile_time_section(), branch_study_section(), pipelines_section(), coverage_section()):
        if section:
            parts.append("\n".join(section))
    return f"{BEGIN}\n" + for_docs("\n\n".join(parts)) + f"\n{END}"


_IMAGE = re.compile(r"!\[([^\]]*)\]\(benchmarks/results/([^)/]+)\)")
_LINK = re.compile(r"\[([^\]]+)\]\((benchmarks/results/[^)]+)\)")


def for_docs(text: str) -> str:
    """The section as a page under docs/ needs it: an image of benchmarks/results/ points to its
    copy in docs/img/ (``copy_images`` makes it), a link to a file there becomes its path in code
    font (MkDocs cannot link outside docs/)."""
    text = _IMAGE.sub(lambda m: f"![{m.group(1)}](img/{m.group(2)})", text)
    return _LINK.sub(lambda m: f"`{m.group(2)}`" if m.group(1) == m.group(2) else f"{m.group(1)} (`{m.group(2)}`)",
                     text)


def copy_images(text: str, images: str = IMAGES) -> None:
    """Copy the plots ``text`` shows (``img/NAME``) from benchmarks/results/ to ``images``."""
    names = re.findall(r"!\[[^\]]*\]\(img/([^)]+)\)", text)
    if names:
        os.makedirs(images, exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(RESULTS, name), os.path.join(images, name))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.readme_results", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", "--readme", dest="out", default=PAGE,
                    help="the page to rewrite between the markers (default: docs/results.md); the plots are "
                         "copied to img/ next to it")
    ap.add_argument("--print", dest="print_only", action="store_true", help="print the section, write nothing")
    a = ap.parse_args(argv)
    text = block()
    if a.print_only:
        print(text)
        return text
    with open(a.out) as f:
        page = f.read()
    if BEGIN in page:
        page = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: text, page, flags=re.S)
    elif "RESULTS_PLACEHOLDER" in page:
        page = page.replace("RESULTS_PLACEHOLDER", text)
    else:
        raise SystemExit(f"{a.out}: no {BEGIN} ... {END} markers and no RESULTS_PLACEHOLDER to write the section at")
    with open(a.out, "w") as f:
        f.write(page)
    copy_images(text, os.path.join(os.path.dirname(os.path.abspath(a.out)), "img"))
    print(text)
    return text


if __name__ == "__main__":
    main()

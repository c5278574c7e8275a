"""Outputs of the end-to-end benchmark: ``e2e.json``, ``e2e.md``, ``e2e_pareto.png`` and
``e2e_motion.png``, and the merge of several runs' outputs into one."""
from __future__ import annotations

import json
import math
import os

from examples.machine import machine_markdown


def fmt(v, spec=".2f"):
    if v is None:
        return "-"
    if isinstance(v, str):   # already said ("inf" from a JSON round trip)
        return v
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def markdown(out: dict) -> str:
    m = out["machine"]
    intro = (f"Model: the shipped reference WanTransformer3DModel ({out['model']}), guidance {out['guidance']}, "
             f"inner compiler `{out['inner']}`, dynamo recompile limit {out['recompile_limit']}. "
             f"{len(out['runs'][0]['prompts'])} prompts (seed = index), {out['repeats']} interleaved repeat(s). "
             "Speedup: median over prompts of baseline time / method time, measured back to back, where the "
             "baseline is the uncached model run the same way: plain torch.compile for the compiled methods, the "
             "eager model for diffusers' caches, which are timed eagerly (their hooks decide in Python between "
             "blocks; under torch.compile they break the graph around the blocks and recompile on hook state, "
             "which costs minutes per setting here). Their graph / break / recompile counts come from a separate "
             f"check run of the same method under torch.compile (inner `{out['check_inner']}`, two generations "
             f"of {out['check_steps']} steps). "
             "PSNR/SSIM/MS-GMSD: against the baseline video of the same prompt and seed; the PSNR mean is over "
             "the videos that differ from the baseline (an identical video has infinite PSNR). MS-GMSD: the "
             "perceptual multi-scale gradient similarity deviation (`adacache_fx.calibration.quality`), lower is "
             "closer, 0 when identical; its mean is over every video (an identical one counts 0), its worst the "
             "largest. Computed: the mean "
             "fraction of steps that ran the blocks ('-': not a step-skipping method). Cache MiB: the peak of "
             "the tensors a method keeps between steps. Graphs: compiled by the first generation (a graph break "
             "adds one); recompiles: graphs compiled after it.\n")
    lines = ["# End-to-end: AdaCache vs diffusers' caches on the reference model\n",
             f"Command: `{out['command']}`\n", machine_markdown(m), "", intro]
    if out.get("note"):
        lines += [f"Conditions: {out['note']}\n"]
    for run in out["runs"]:
        lines.append(f"## {run['steps']} steps\n")
        lines.append("| method | setting | timed | latency (s) | speedup (min-max) | computed | PSNR mean / worst (dB) | "
                     "SSIM mean / worst | MS-GMSD mean / worst | cache MiB | graphs / breaks / recompiles |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in run["methods"]:
            comp = "-" if r["computed_fraction"] is None else f"{r['computed_fraction']:.0%}"
            lines.append(
                f"| {r['method']} | {r['setting']} | {r['timed']} | {fmt(r['latency_s'], '.3f')} | {fmt(r['speedup'])}x "
                f"({fmt(r['speedup_min'])}-{fmt(r['speedup_max'])}) | {comp} | {fmt(r['psnr_mean'])} / "
                f"{fmt(r['psnr_worst'])} | {fmt(r['ssim_mean'], '.3f')} / {fmt(r['ssim_worst'], '.3f')} | "
                f"{fmt(r.get('ms_gmsd_mean'), '.4f')} / {fmt(r.get('ms_gmsd_worst'), '.4f')} | "
                f"{fmt(r['cache_mib'], '.2f')} | {r['graphs']} / {r['graph_breaks']} / {r['recompiles']} |")
        if run["fixed"]:
            f = run["fixed"]
            lines.append(f"\nFixed-interval control: rate {f['rate']} computes {f['fixed_computed']} steps; "
                         f"AdaCache-fast computes {f['adacache_fast_mean_computed']:.1f} on average.")
        an = run["analysis"]
        lines.append("\nDominance (an AdaCache point at least as fast with higher PSNR, and one at least as good "
                     "and faster):\n")
        for d in an["dominance"]:
            verdict = ("dominated by " + ", ".join(d["dominated_by"])) if d["dominated_by"] else (
                "not dominated: higher PSNR at its speed from " + (", ".join(d["higher_psnr_at_its_speed"]) or "none")
                + "; more speed at its PSNR from " + (", ".join(d["more_speed_at_its_psnr"]) or "none"))
            lines.append(f"- {d['method']}: {verdict}")
        lines.append(f"\nEvery other point dominated: **{'yes' if an['all_dominated'] else 'no'}**.\n")
        if an.get("metric_agreement"):
            lines.append(agreement_line(an["metric_agreement"]) + "\n")
        lines.append("Motion: Spearman correlation of the baseline video's motion level with computed steps; "
                     "worst PSNR and mean computed steps over the higher-motion half of the prompts:\n")
        for name, mr in an["motion"].items():
            ci = mr.get("spearman_ci95")
            ci_text = f" (95% CI {ci[0]:.2f} to {ci[1]:.2f})" if ci else ""
            lines.append(f"- {name}: rho {fmt(mr['spearman_motion_vs_computed'])}{ci_text}, high-motion worst PSNR "
                         f"{fmt(mr['high_motion_worst_psnr'])} dB, high-motion computed {fmt(mr['high_motion_mean_computed'], '.1f')}")
        if an.get("moreg"):
            lines.append("\nMoReg on vs off (the same setting otherwise): rho(motion, computed steps), the worst PSNR "
                         "of the higher-motion half, the mean computed fraction:\n")
            for p in an["moreg"]:
                lines.append(f"- {p['with']} vs {p['without']}: rho {fmt(p['rho'][0])} vs {fmt(p['rho'][1])}; "
                             f"high-motion worst {fmt(p['high_motion_worst_psnr'][0])} vs "
                             f"{fmt(p['high_motion_worst_psnr'][1])} dB; computed "
                             f"{fmt(p['mean_computed_fraction'][0], '.0%')} vs {fmt(p['mean_computed_fraction'][1], '.0%')}")
        if an.get("frontier"):
            lines.append("\nPer family: the best mean PSNR at 3x or more, and the best speedup at 30 dB or more:\n")
            lines.append("| family | PSNR at >= 3x (dB) | speedup at >= 30 dB |")
            lines.append("|---|---|---|")
            for family, f in an["frontier"].items():
                q = f"{fmt(f['psnr_at_3x'])} ({f['psnr_at_3x_method']})" if f["psnr_at_3x"] is not None else "none"
                v = f"{fmt(f['speedup_at_30db'])}x ({f['speedup_at_30db_method']})" if f["speedup_at_30db"] is not None else "none"
                lines.append(f"| {family} | {q} | {v} |")
        for c in run.get("calibrations", []):
            m = c["measured"]
            lines.append(f"\nCalibration of {c['method']} ({len(c['prompts'])} unscored prompts, {c['seconds']:.0f} s, "
                         f"{len(c['evaluations'])} cached evaluations): target {c['target']}, "
                         f"{'met' if c['met'] else 'NOT met'}; thresholds x{c['threshold_scale']:.3f}, rates <= {c.get('max_rate')}, MoReg normaliser "
                         f"{fmt(c['moreg_normalizer'], '.3f')}, power {fmt(c.get('moreg_power'), '.2f')}; on the calibration prompts computed "
                         f"{fmt(m['computed_fraction'], '.0%')} (predicted {fmt(c['predicted_computed_fraction'], '.0%')}), "
                         f"PSNR mean {fmt(m['psnr_mean'])} dB, MS-GMSD mean {fmt(m.get('ms_gmsd_mean'), '.4f')}.")
        lines.append("")
    return "\n".join(lines) + "\n"


def agreement_line(agreement: dict) -> str:
    """``analysis.metric_agreement`` in a sentence."""
    pairs = agreement["ordered_differently"]
    return (f"PSNR vs MS-GMSD over the {agreement['methods']} methods that differ from the baseline: Spearman rho "
            f"of mean PSNR and mean MS-GMSD {fmt(agreement['spearman_psnr_vs_ms_gmsd'])} (-1: the same order); "
            f"{len(pairs)} of {agreement['pairs']} pairs ordered differently"
            + (": " + ", ".join(f"{a} / {b}" for a, b in pairs) if pairs else "") + ".")


def plots(out: dict, prefix: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = out["runs"]
    colours = {"baseline": "black", "adacache": "tab:red", "fixed": "tab:gray"}
    markers = {"fbc": "s", "pab": "^", "taylorseer": "D", "magcache": "v"}
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.6), squeeze=False)
    for ax, run in zip(axes[0], runs):
        for r in run["methods"]:
            if r["family"] == "baseline":
                continue
            kind = r["method"].split("-")[0]
            y = min(r["psnr_mean"], 60.0)
            ax.scatter(r["speedup"], y, c=colours.get(r["family"], "tab:blue"), marker=markers.get(kind, "o"), s=40)
            ax.annotate(r["method"], (r["speedup"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("speedup over plain torch.compile (median)")
        ax.set_ylabel("PSNR vs baseline (dB, mean over prompts)")
        ax.set_title(f"{run['steps']} steps", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(prefix + "_pareto.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.2), squeeze=False)
    styles = {"adacache-fast": ("tab:red", "o"), "adacache-fast-nomoreg": ("tab:orange", "x"),
              "adacache-slow": ("tab:blue", "o"), "adacache-slow-nomoreg": ("tab:cyan", "x"),
              "adacache-cal-0.3": ("tab:green", "o"), "adacache-cal-0.3-nomoreg": ("tab:olive", "x")}
    for ax, run in zip(axes[0], runs):
        for r in run["methods"]:
            if r["method"] in styles and r["computed_steps"]:
                c, mk = styles[r["method"]]
                ax.scatter(run["motion_level"], r["computed_steps"], c=c, marker=mk, label=r["method"], s=30)
        ax.set_xlabel("motion level of the baseline video (mean |frame difference|)")
        ax.set_ylabel(f"computed steps (of {run['steps']})")
        ax.set_title(f"not all videos are equal: {run['steps']} steps", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(prefix + "_motion.png", dpi=110)
    plt.close(fig)


def merge(paths: list) -> dict:
    """One output from several (each with its own runs, e.g. one process per step count)."""
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    out = dict(parts[0])
    out["command"] = " ; ".join(p["command"] for p in parts)
    out["runs"] = sorted((run for p in parts for run in p["runs"]), key=lambda run: run["steps"])
    out["machines"] = [p["machine"] for p in parts]
    return out


def write_outputs(out: dict, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "e2e")
    with open(prefix + ".json", "w") as f:
        json.dump(out, f, indent=1, default=float)
    with open(prefix + ".md", "w") as f:
        f.write(markdown(out))
    plots(out, prefix)
    print(markdown(out))
    print(f"wrote {prefix}.json, {prefix}.md, {prefix}_pareto.png, {prefix}_motion.png")
    return out

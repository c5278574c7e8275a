"""Statistics of the end-to-end benchmark: per-method rows against the baseline, Spearman's
rank correlation, dominance of AdaCache's points, the motion questions, and whether PSNR and the
perceptual MS-GMSD order the methods alike."""
from __future__ import annotations

import itertools
import math
import statistics
from typing import Optional


def summarize(results: list, steps: int, prompts: list, fixed_info) -> dict:
    """Each method against the uncached model run the same way: compiled methods against
    ``baseline`` (plain torch.compile), eagerly timed ones against ``eager-baseline``.

    ``results``: :class:`benchmarks.e2e.protocol.MethodResult` of every method."""
    from examples.reference.quality import motion_level, ms_gmsd, psnr, ssim

    bases = {}
    for name, eager in (("baseline", False), ("eager-baseline", True)):
        base = next((r for r in results if r.runner.name == name), None)
        if base is not None:
            bases[eager] = base
    base_time = {eager: {(rec.prompt, rec.repeat): rec.seconds for rec in b.records} for eager, b in bases.items()}
    motion = {i: motion_level(v) for i, v in bases[False].videos.items()}
    rows = []
    for res in results:
        r = res.runner
        base = bases[r.eager]
        ratios = [base_time[r.eager][(rec.prompt, rec.repeat)] / rec.seconds for rec in res.records]
        ps = {i: psnr(v, base.videos[i]) for i, v in res.videos.items()}
        ss = {i: ssim(v, base.videos[i]) for i, v in res.videos.items()}
        gm = {i: ms_gmsd(v, base.videos[i]) for i, v in res.videos.items()}
        computed = [rec.computed for rec in res.records if rec.repeat == 0]
        finite = [p for p in ps.values() if math.isfinite(p)]
        rows.append({
            "method": r.name, "family": r.family, "setting": r.setting, "notes": r.notes,
            "timed": r.timed or ("eager" if r.eager else "torch.compile"),
            "latency_s": statistics.median(rec.seconds for rec in res.records),
            "speedup": statistics.median(ratios),
            "speedup_min": min(ratios), "speedup_max": max(ratios),
            "computed_fraction": (statistics.mean(computed) / steps) if None not in computed else None,
            "computed_steps": computed if None not in computed else None,
            "psnr_mean": statistics.mean(finite) if finite else float("inf"),
            "psnr_worst": min(ps.values()),
            "ssim_mean": statistics.mean(ss.values()), "ssim_worst": min(ss.values()),
            "ms_gmsd_mean": statistics.mean(gm.values()), "ms_gmsd_worst": max(gm.values()),
            "psnr": [ps[i] for i in sorted(ps)], "ssim": [ss[i] for i in sorted(ss)],
            "ms_gmsd": [gm[i] for i in sorted(gm)],
            "cache_mib": max(rec.cache_bytes for rec in res.records) / 2**20,
            "graphs": res.warmup_graphs, "graph_breaks": res.warmup_graph_breaks,
            "recompiles": (res.check_recompiles if r.eager and res.check_recompiles is not None
                           else sum(rec.graphs_after_warmup for rec in res.records)),
        })
    return {"steps": steps, "prompts": prompts, "motion_level": [motion[i] for i in sorted(motion)],
            "fixed": fixed_info, "methods": rows, "analysis": analyse(rows, [motion[i] for i in sorted(motion)])}


def spearman(x: list, y: list) -> Optional[float]:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 points or a
    constant series."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return None if den == 0 else num / den


def spearman_ci(rho: Optional[float], n: int, z: float = 1.96) -> Optional[tuple]:
    """95% confidence interval of Spearman's rho: Fisher's z-transform with Fieller, Hartley and
    Pearson's standard error ``sqrt(1.06 / (n - 3))`` (Biometrika 1957). None below 4 points."""
    if rho is None or n < 4:
        return None
    r = max(min(rho, 0.999999), -0.999999)
    centre, half = math.atanh(r), z * math.sqrt(1.06 / (n - 3))
    return (math.tanh(centre - half), math.tanh(centre + half))


def frontier(rows: list) -> dict:
    """Per family (AdaCache, each peer): the best mean PSNR among points at least 3x as fast,
    and the best speedup among points of at least 30 dB mean PSNR (the issue's headline figures)."""
    out = {}
    for family in sorted({r["method"].split("-")[0] for r in rows if r["family"] in ("adacache", "diffusers", "fixed")}):
        points = [r for r in rows if r["method"].split("-")[0] == family]
        fast = [r for r in points if r["speedup"] >= 3.0]
        good = [r for r in points if r["psnr_mean"] >= 30.0]
        best_q = max(fast, key=lambda r: r["psnr_mean"], default=None)
        best_s = max(good, key=lambda r: r["speedup"], default=None)
        out[family] = {"psnr_at_3x": best_q["psnr_mean"] if best_q else None,
                       "psnr_at_3x_method": best_q["method"] if best_q else None,
                       "speedup_at_30db": best_s["speedup"] if best_s else None,
                       "speedup_at_30db_method": best_s["method"] if best_s else None}
    return out


def moreg_pairs(rows: list, motion_rows: dict) -> list:
    """Each AdaCache setting beside the same setting with MoReg off (``X`` and ``X-nomoreg``)."""
    by = {r["method"]: r for r in rows}
    out = []
    for name, r in by.items():
        off = by.get(name + "-nomoreg")
        if off is None or name not in motion_rows or off["method"] not in motion_rows:
            continue
        on_m, off_m = motion_rows[name], motion_rows[off["method"]]
        out.append({"with": name, "without": off["method"],
                    "rho": (on_m["spearman_motion_vs_computed"], off_m["spearman_motion_vs_computed"]),
                    "high_motion_worst_psnr": (on_m["high_motion_worst_psnr"], off_m["high_motion_worst_psnr"]),
                    "mean_computed_fraction": (r["computed_fraction"], off["computed_fraction"])})
    return out


def metric_agreement(rows: list) -> dict:
    """Do PSNR and MS-GMSD order the methods alike? Over the methods whose videos differ from the
    baseline's (finite mean PSNR) and that have an MS-GMSD: Spearman's rho of mean PSNR against mean
    MS-GMSD (-1: the same order, since a higher PSNR and a lower MS-GMSD both mean closer), and
    the pairs the two order differently (one metric says the first is closer, the other the second)."""
    points = [r for r in rows if r.get("ms_gmsd_mean") is not None and math.isfinite(r["psnr_mean"])]
    rho = spearman([r["psnr_mean"] for r in points], [r["ms_gmsd_mean"] for r in points])
    discordant = [[a["method"], b["method"]] for a, b in itertools.combinations(points, 2)
                  if (a["psnr_mean"] - b["psnr_mean"]) * (a["ms_gmsd_mean"] - b["ms_gmsd_mean"]) > 0]
    return {"spearman_psnr_vs_ms_gmsd": rho, "methods": len(points),
            "pairs": len(points) * (len(points) - 1) // 2, "ordered_differently": discordant}


def analyse(rows: list, motion: list) -> dict:
    """Dominance of AdaCache's points over every other cache's, the motion questions, and the
    agreement of PSNR and MS-GMSD."""
    ada = [r for r in rows if r["family"] == "adacache"]
    others = [r for r in rows if r["family"] in ("diffusers", "fixed")]
    dominance = []
    for o in others:
        # at o's speedup, a higher PSNR: an AdaCache point at least as fast with a higher mean PSNR
        better_quality = [a["method"] for a in ada if a["speedup"] >= o["speedup"] and a["psnr_mean"] > o["psnr_mean"]]
        # at o's PSNR, more speed: an AdaCache point at least as good and faster
        more_speed = [a["method"] for a in ada if a["psnr_mean"] >= o["psnr_mean"] and a["speedup"] > o["speedup"]]
        dominance.append({"method": o["method"], "dominated_by": sorted(set(better_quality) & set(more_speed)),
                          "higher_psnr_at_its_speed": better_quality, "more_speed_at_its_psnr": more_speed})
    motion_rows = {}
    half = sorted(range(len(motion)), key=lambda i: motion[i])[len(motion) // 2:]
    for r in ada:
        if r["computed_steps"]:
            rho = spearman(motion, r["computed_steps"])
            motion_rows[r["method"]] = {
                "spearman_motion_vs_computed": rho, "spearman_ci95": spearman_ci(rho, len(motion)),
                "high_motion_worst_psnr": min(r["psnr"][i] for i in half) if half else None,
                "high_motion_mean_computed": statistics.mean(r["computed_steps"][i] for i in half) if half else None,
            }
    return {"dominance": dominance, "all_dominated": all(d["dominated_by"] for d in dominance),
            "motion": motion_rows, "moreg": moreg_pairs(rows, motion_rows), "frontier": frontier(rows),
            "metric_agreement": metric_agreement(rows)}

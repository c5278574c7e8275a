"""What a reused step should compute: the whole stack's delta forecast (``granularity="stack"``, the
backend today) against each residual branch's core forecast with the glue run fresh (issue 29's
``granularity="branch"``, what TaylorSeer does), at the same computed steps.

An emulation, not the backend, in the manner of ``schedule_study.py``: eager, in the same sampling
loop (30 steps, guidance 3 as one batch), on the reference model, on the 12 prompts and seeds of
that study (generations neither the e2e benchmark nor the calibration makes). Both modes compute the steps of
the backend's own ``{inf: rate}`` schedule (1, 2, every ``rate``, the last two):

- **stack**: the block list runs on computed steps; on the others it returns its input plus the
  stack's delta extrapolated from the last two computed steps (``schedule_study.StackWithCache``);
- **branch**: in every block, the children that hold at least ``CORE_SHARE`` of the block's
  weights are its cores (on the reference model: self-attention, cross-attention, feed-forward;
  found by size, not by name); on a reused step each core returns its output extrapolated from its
  last two computed steps, and everything else in the block (the norms, the shift / scale / gate
  modulation by the current timestep, the residual adds) runs on the current inputs.

Forecasts are constant (the last computed output), linear in the timestep (the backend's default)
or linear in the step's index (``linear-step``: TaylorSeer's first order).
PSNR and MS-GMSD against the uncached video; the cache each mode holds (bytes of the tensors kept
for the forecast); the eager time of a reused step against a computed one.

    python -m benchmarks.branch_study --threads 1     # writes benchmarks/results/branch_study.{md,json}
    python -m benchmarks.branch_study --threads 1 --rates 3 5 --modes linear linear-step \
        --schedule taylorseer --name branch_study_taylorseer   # TaylorSeer's own schedule, interval = rate
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import command_line, machine, machine_markdown, write_results
from benchmarks.schedule_study import (STEPS, StackWithCache, _Emulation, fixed, forecast, prompt_set,
                                       taylorseer_schedule)
from examples.reference import load_reference_model, sample
from examples.reference.quality import ms_gmsd, psnr

CORE_SHARE = 0.1   # a block's child holding at least this share of its weights is a core
RATES = (2, 3, 4, 5, 6)


class CoreWithCache(torch.nn.Module):
    """A block's core: run on computed steps (its output kept), forecast on the others."""

    def __init__(self, core: torch.nn.Module, emu: _Emulation):
        super().__init__()
        self.core, self.emu, self.history = core, emu, []

    def forward(self, *args, **kwargs):
        e = self.emu
        if e.schedule is not None and e.step not in e.schedule:
            return forecast(self.history, e.t, e.mode)
        out = self.core(*args, **kwargs)
        if e.schedule is not None:
            self.history = (self.history + [(e.t, out)])[-2:]
        return out


def cores_of(block: torch.nn.Module) -> list:
    """The names of ``block``'s children holding at least ``CORE_SHARE`` of its weights."""
    total = sum(p.numel() for p in block.parameters())
    return [name for name, child in block.named_children()
            if sum(p.numel() for p in child.parameters()) >= CORE_SHARE * total]


class BranchStudy:
    def __init__(self, prompts: int = 12):
        self.transformer, self.tokenizer = load_reference_model()
        self.stack, self.branch = _Emulation(), _Emulation()
        self.cores: list = []
        for block in self.transformer.blocks:
            for name in cores_of(block):
                wrapped = CoreWithCache(getattr(block, name), self.branch)
                setattr(block, name, wrapped)
                self.cores.append(wrapped)
        self.core_names = [n for n, c in self.transformer.blocks[0].named_children() if isinstance(c, CoreWithCache)]
        self.transformer.blocks = torch.nn.ModuleList([StackWithCache(self.transformer.blocks, self.stack)])
        self.null = self.tokenizer([""])
        self.prompts = prompt_set("study")[:prompts]
        self.baseline = [self.generate(p, s)[0] for p, s in self.prompts]

    def generate(self, prompt, seed, schedule=None, granularity="stack", mode="linear"):
        """The video, and the seconds of each step's model call. ``mode`` ``"linear-step"``: linear in
        the step's index instead of its timestep (TaylorSeer's finite differences count steps)."""
        active, idle = (self.stack, self.branch) if granularity == "stack" else (self.branch, self.stack)
        by_step = mode == "linear-step"
        mode = "linear" if by_step else mode
        active.schedule, active.mode, active.history = (set(schedule) if schedule else None), mode, []
        idle.schedule, idle.history = None, []
        for core in self.cores:
            core.history = []
        seconds = []

        def model_fn(**kwargs):
            for e in (self.stack, self.branch):
                e.t = float(e.step) if by_step else float(kwargs["timestep"].flatten()[0])
            start = time.perf_counter()
            out = self.transformer(**kwargs)
            seconds.append(time.perf_counter() - start)
            return out

        def callback(i, t, latents):
            self.stack.step = self.branch.step = i + 2
        self.stack.step = self.branch.step = 1
        video = sample(self.transformer, self.tokenizer([prompt]), num_steps=STEPS, seed=seed, guidance_scale=3.0,
                       negative_prompt_embeds=self.null, model_fn=model_fn, callback=callback)
        return video, seconds

    def cache_bytes(self, granularity: str) -> int:
        """Bytes kept for a linear forecast after a generation (two outputs per cached tensor)."""
        if granularity == "stack":
            return sum(d.numel() * d.element_size() for _t, d in self.stack.history[-2:])
        return sum(o.numel() * o.element_size() for core in self.cores for _t, o in core.history[-2:])

    def score(self, schedule, granularity, mode) -> dict:
        ps, gm, reused, computed = [], [], [], []
        for (prompt, seed), base in zip(self.prompts, self.baseline):
            video, seconds = self.generate(prompt, seed, schedule, granularity, mode)
            ps.append(psnr(video, base))
            gm.append(ms_gmsd(video, base))
            for step, s in enumerate(seconds, start=1):
                (computed if step in schedule else reused).append(s)
        return {"granularity": granularity, "mode": mode, "computed": len(schedule),
                "psnr_mean": statistics.mean(ps), "psnr_worst": min(ps), "psnr": ps,
                "ms_gmsd_mean": statistics.mean(gm), "ms_gmsd_worst": max(gm),
                "computed_step_s": statistics.median(computed), "reused_step_s": statistics.median(reused),
                "cache_bytes": self.cache_bytes(granularity)}


def metric_agreement(rows: list) -> dict:
    """How PSNR and MS-GMSD order the study's points (every granularity, rate and forecast):
    Spearman's rho of the means and of the worst values (-1: the same order, as lower MS-GMSD is
    closer), and the pairs of points the two means order differently."""
    from benchmarks.e2e.analysis import spearman
    points = [r[g] | {"rate": r["rate"]} for r in rows for g in ("stack", "branch")]
    return {"points": len(points),
            "rho_mean": spearman([p["psnr_mean"] for p in points], [p["ms_gmsd_mean"] for p in points]),
            "rho_worst": spearman([p["psnr_worst"] for p in points], [p["ms_gmsd_worst"] for p in points]),
            "discordant": [(f"{a['granularity']} {a['mode']} rate {a['rate']}", f"{b['granularity']} {b['mode']} rate "
                            f"{b['rate']}", round(a["psnr_mean"] - b["psnr_mean"], 2))
                           for i, a in enumerate(points) for b in points[i + 1:]
                           if (a["psnr_mean"] - b["psnr_mean"]) * (a["ms_gmsd_mean"] - b["ms_gmsd_mean"]) > 0]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.branch_study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rates", type=int, nargs="+", default=list(RATES))
    ap.add_argument("--modes", nargs="+", default=["constant", "linear"], choices=["constant", "linear", "linear-step"])
    ap.add_argument("--prompts", type=int, default=12, help="the first N of the schedule study's 12")
    ap.add_argument("--schedule", default="fixed", choices=["fixed", "taylorseer"],
                    help="the computed steps: the backend's {inf: rate}, or diffusers' TaylorSeer at interval rate")
    ap.add_argument("--name", default="branch_study", help="the results' file name (without .md / .json)")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    steps_of = fixed if a.schedule == "fixed" else taylorseer_schedule
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    study = BranchStudy(a.prompts)
    out = {"machine": machine(), "command": command_line("benchmarks.branch_study", argv),
           "prompts": study.prompts, "cores": study.core_names, "rows": []}
    lines = ["# What a reused step computes: the stack's delta or each branch's core (reference model)", "",
             f"Command: `{out['command'].strip()}`", "", machine_markdown(out["machine"]), "",
             "An emulation (see the script's docstring): 30 steps, guidance 3, the first "
             f"{len(study.prompts)} of the schedule study's 12 prompts; both modes compute the steps of "
             + ("the backend's `{inf: rate}` schedule" if a.schedule == "fixed" else
                "diffusers' TaylorSeer at interval `rate` (its 3 warm-up steps, then every `rate`-th, none forced "
                "at the end)") + ". Cores per block (children "
             f"with at least {CORE_SHARE:.0%} of its weights): {', '.join(study.core_names)}. PSNR (dB) and MS-GMSD "
             "(lower is closer) against the uncached video, mean / worst; eager step times are medians over the "
             "study's calls (one thread); cache: the bytes a linear forecast keeps.", "",
             "| rate | computed | forecast | stack PSNR | branch PSNR | gain (mean / worst) | stack MS-GMSD | "
             "branch MS-GMSD | reused step, stack / branch (ms) | computed step (ms) | cache, stack / branch (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rate in a.rates:
        schedule = steps_of(rate)
        for mode in a.modes:
            stack, branch = study.score(schedule, "stack", mode), study.score(schedule, "branch", mode)
            out["rows"].append({"rate": rate, "schedule": schedule, "stack": stack, "branch": branch})
            lines.append(
                f"| {rate} | {len(schedule)}/{STEPS} | {mode} | {stack['psnr_mean']:.2f} / {stack['psnr_worst']:.2f} | "
                f"{branch['psnr_mean']:.2f} / {branch['psnr_worst']:.2f} | "
                f"{branch['psnr_mean'] - stack['psnr_mean']:+.2f} / {branch['psnr_worst'] - stack['psnr_worst']:+.2f} | "
                f"{stack['ms_gmsd_mean']:.4f} / {stack['ms_gmsd_worst']:.4f} | "
                f"{branch['ms_gmsd_mean']:.4f} / {branch['ms_gmsd_worst']:.4f} | "
                f"{1e3 * stack['reused_step_s']:.1f} / {1e3 * branch['reused_step_s']:.1f} | "
                f"{1e3 * stack['computed_step_s']:.1f} | "
                f"{stack['cache_bytes'] / 2**20:.2f} / {branch['cache_bytes'] / 2**20:.2f} |")
            print(lines[-1], flush=True)
    out["metric_agreement"] = agree = metric_agreement(out["rows"])
    lines += ["", f"PSNR and MS-GMSD over the {agree['points']} points: Spearman {agree['rho_mean']:.3f} (means), "
              f"{agree['rho_worst']:.3f} (worst); {len(agree['discordant'])} pair(s) ordered differently by the means: "
              + ("; ".join(f"{a} / {b} ({d:+.2f} dB)" for a, b, d in agree["discordant"]) or "none")]
    write_results(a.out, a.name, lines + [""], out)
    return out


if __name__ == "__main__":
    main()

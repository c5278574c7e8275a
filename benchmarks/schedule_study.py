"""Where computed steps should go on the reference model, and which forecast of the skipped
steps holds up: the measurements behind the README's "tried and not kept" list.

An emulation, not the backend: the reference transformer's block list is replaced by one module
that runs the blocks on the steps of a given schedule and, on the others, adds the block stack's
delta (its output minus its input) extrapolated from the last computed steps, eagerly, in the
same sampling loop as everywhere else (30 steps, guidance 3 as one batch). That lets any schedule
be scored directly, not only the ones a codebook produces. PSNR is against the uncached video of
the same prompt and seed; 12 prompt-seed pairs that neither the e2e benchmark nor the calibration generates
(every 17th of the 234, seeds 500+).

1. sensitivity: reuse one window of 5 steps (all others computed): what an error costs where;
2. the distance per step (the scheduler's ``c`` with k = 1, the stack delta as the probe);
3. forecasts at fixed rates 4, 5 and 6: constant, linear (the default), second order (from the
   last three computed steps), and linear with its damping fitted at each computed step to how
   well the last forecast did (least squares, clamped to [0, 1.5]);
4. the gaps before the forced last steps evened out (each gap at most the rate);
5. per video: the distance against the PSNR at fixed rates (Spearman);
6. the steps always computed: at fixed rates 3, 4 and 5, the official first step and last two
   against warm-ups of 2 to 5 steps with 0 or 1 forced last steps (``first_computed_steps``,
   ``last_computed_steps``), and TaylorSeer's own schedule at interval 3 (diffusers' default
   warm-up of 3 steps, then every third step, none forced at the end).

    python -m benchmarks.schedule_study --threads 1     # writes benchmarks/results/schedule_study.{md,json}
    python -m benchmarks.schedule_study --threads 1 --prompt-set e2e --only-forced-steps --name schedule_study_e2e
    python -m benchmarks.schedule_study --threads 1 --prompt-set calibration --only-forced-steps \
        --name schedule_study_calibration     # section 6 on the e2e benchmark's prompts / its calibration prompts

(from the repository root).
"""
from __future__ import annotations

import argparse
import math
import statistics

import torch

from benchmarks.common import command_line, machine, machine_markdown, write_results
from benchmarks.e2e.analysis import spearman
from benchmarks.e2e.methods import fixed_schedule
from examples.reference import load_reference_model, sample
from examples.reference.data import all_specs
from examples.reference.model import make_scheduler
from examples.reference.quality import psnr

STEPS = 30


class _Emulation:
    """What the replaced block list reads: the step, the timestep, the schedule, the forecast."""

    def __init__(self):
        self.step, self.t, self.schedule, self.mode = 1, 0.0, None, "linear"
        self.history, self.record, self.damping = [], None, 1.0


class StackWithCache(torch.nn.Module):
    def __init__(self, blocks, emu: _Emulation):
        super().__init__()
        self.inner = blocks
        self.emu = emu

    def forward(self, x, *args):
        e = self.emu
        if e.schedule is not None and e.step not in e.schedule:
            return x + _forecast(e)
        h = x
        for block in self.inner:
            h = block(h, *args)
        delta = h - x
        if e.record is not None:
            e.record.append(delta.clone())
        if e.mode == "fitted" and len(e.history) >= 2:   # how well did the last forecast do?
            (t1, d1), (t0, d0) = e.history[-1], e.history[-2]
            g = (e.t - t1) / (t1 - t0) * (d1 - d0)
            e.damping = min(max(float(((delta - d1) * g).sum() / (g * g).sum().clamp_min(1e-30)), 0.0), 1.5)
        e.history = (e.history + [(e.t, delta)])[-3:]
        return h


def _forecast(e: _Emulation):
    return forecast(e.history, e.t, e.mode, e.damping)


def forecast(history: list, t: float, mode: str, damping: float = 1.0):
    """The value at ``t`` from ``history`` (``[(t, value)]`` of the last computed steps): the last
    one (constant), or extrapolated linearly (``fitted``: damped), or to second order."""
    t1, d1 = history[-1]
    if mode == "constant" or len(history) < 2:
        return d1
    t0, d0 = history[-2]
    r = (t - t1) / (t1 - t0)
    if mode == "fitted":
        return d1 + damping * r * (d1 - d0)
    if mode == "second_order" and len(history) >= 3:
        tm, dm = history[-3]
        f01, f12 = (d1 - d0) / (t1 - t0), (d0 - dm) / (t0 - tm)
        return d1 + f01 * (t - t1) + (f01 - f12) / (t1 - tm) * (t - t1) * (t - t0)
    return d1 + r * (d1 - d0)


def fixed(rate: int, n: int = STEPS, first: int = 1, last: int = 2) -> list:
    """The backend's ``{inf: rate}`` schedule (its own scheduler decides it): 1, 2, then every
    ``rate``, and the last two (``first`` / ``last``: the steps always computed at the start and end)."""
    return fixed_schedule(rate, n, first_computed_steps=first, last_computed_steps=last)


# (first_computed_steps, last_computed_steps) compared in section 6: the official split first
SPLITS = [(1, 2), (2, 0), (2, 1), (3, 0), (3, 1), (4, 0), (4, 1), (5, 0)]


def taylorseer_schedule(interval: int, n: int = STEPS, warmup: int = 3) -> list:
    """The steps diffusers' TaylorSeer computes (1-indexed): the first ``warmup``, then those whose
    0-indexed step ``i`` has ``(i - warmup - 1) % interval == 0`` (its ``_measure_should_compute``)."""
    return [i + 1 for i in range(n) if i < warmup or (i - warmup - 1) % interval == 0]


def evened(rate: int, n: int = STEPS) -> list:
    """Like :func:`fixed`, with the gaps up to the forced step ``n - 1`` evened out (none longer
    than ``rate``), instead of a short last gap."""
    steps, s = [1, 2], 2
    while s + rate < n - 1:
        remaining = n - 1 - s
        s += math.ceil(remaining / math.ceil(remaining / rate))
        steps.append(s)
    return sorted(set(steps + [n - 1, n]))


PROMPT_SETS = {
    "study": "12 prompts and seeds that neither the e2e benchmark nor the calibration generates (every 17th, "
             "seeds 500+; one prompt, blue circle shrinking, is also an e2e prompt, with another seed)",
    "e2e": "the e2e benchmark's 16 scored prompts (seed = index)",
    "calibration": "the 4 prompts the e2e benchmark calibrates AdaCache on (seeds 1000+)",
}


def prompt_set(name: str) -> list:
    """``[(prompt, seed)]`` of one of ``PROMPT_SETS``, with the seeds their users give them."""
    if name == "e2e":
        from benchmarks.e2e.protocol import PROMPTS
        return [(p, i) for i, p in enumerate(PROMPTS)]
    if name == "calibration":
        from benchmarks.e2e.protocol import ADACACHE_CALIBRATION_PROMPTS
        return [(p, 1000 + i) for i, p in enumerate(ADACACHE_CALIBRATION_PROMPTS)]
    specs = all_specs()
    return [(specs[(17 * i + 5) % len(specs)].prompt, 500 + i) for i in range(12)]


class Study:
    def __init__(self, prompts: str = "study"):
        self.transformer, self.tokenizer = load_reference_model()
        self.emu = _Emulation()
        self.transformer.blocks = torch.nn.ModuleList([StackWithCache(self.transformer.blocks, self.emu)])
        self.null = self.tokenizer([""])
        self.prompts = prompt_set(prompts)
        self.baseline = [self.generate(p, s)[0] for p, s in self.prompts]

    def generate(self, prompt, seed, schedule=None, mode="linear", record=False):
        e = self.emu
        e.schedule, e.mode, e.history, e.damping = (set(schedule) if schedule else None), mode, [], 1.0
        e.record, e.step = ([] if record else None), 1

        def model_fn(**kwargs):
            e.t = float(kwargs["timestep"].flatten()[0])
            return self.transformer(**kwargs)

        def callback(i, t, latents):
            e.step = i + 2
        video = sample(self.transformer, self.tokenizer([prompt]), num_steps=STEPS, seed=seed, guidance_scale=3.0,
                       negative_prompt_embeds=self.null, model_fn=model_fn, callback=callback)
        return video, e.record

    def score(self, schedule, mode="linear") -> dict:
        per = [psnr(self.generate(p, s, schedule, mode)[0], base)
               for (p, s), base in zip(self.prompts, self.baseline)]
        return {"schedule": schedule, "mode": mode, "psnr_mean": statistics.mean(per), "psnr_worst": min(per),
                "psnr": per}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.schedule_study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--prompt-set", default="study", choices=list(PROMPT_SETS))
    ap.add_argument("--only-forced-steps", action="store_true", help="section 6 alone")
    ap.add_argument("--name", default="schedule_study", help="the results' file name (without .md / .json)")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    study = Study(a.prompt_set)
    out = {"machine": machine(), "command": command_line("benchmarks.schedule_study", argv),
           "prompts": study.prompts}
    lines = ["# Where computed steps should go, and which forecast holds up (reference model)", "",
             f"Command: `{out['command'].strip()}`", "", machine_markdown(out["machine"]), "",
             "An emulation of caching the whole block stack (see the script's docstring): 30 steps, guidance 3, "
             f"{PROMPT_SETS[a.prompt_set]}; PSNR against the uncached video, mean / worst in dB.", ""]
    if not a.only_forced_steps:
        _sections_1_to_5(study, out, lines)
    _section_6(study, out, lines)
    write_results(a.out, a.name, lines, out)
    return out


def _sections_1_to_5(study: Study, out: dict, lines: list) -> None:
    # 1. sensitivity
    windows = [list(range(s, s + 5)) for s in range(3, 25, 3)] + [[27, 28]]
    out["sensitivity"] = []
    lines += ["## 1. What reusing 5 steps costs, by where they are (all other steps computed)", "",
              "| reused steps | constant reuse | linear forecast |", "|---|---|---|"]
    for w in windows:
        sched = [s for s in range(1, STEPS + 1) if s not in w]
        row = {m: study.score(sched, m) for m in ("constant", "linear")}
        out["sensitivity"].append({"reused": w, **{m: r["psnr_mean"] for m, r in row.items()}})
        lines.append(f"| {w[0]}-{w[-1]} | {row['constant']['psnr_mean']:.2f} | {row['linear']['psnr_mean']:.2f} |")
    # 2. distance per step
    records = [study.generate(p, s, record=True)[1] for p, s in study.prompts]
    sched = make_scheduler()
    sched.set_timesteps(STEPS)
    sigmas = [float(x) for x in sched.sigmas]
    distance = [statistics.mean(float((r[i] - r[i - 1]).abs().sum() / r[i - 1].abs().sum()) for r in records)
                for i in range(1, STEPS)]
    out["distance"] = distance
    lines += ["", "## 2. The distance per step (k = 1, the block stack's delta as the probe, mean of the 12)", "",
              "| step | " + " | ".join(str(i + 1) for i in range(1, STEPS, 3)) + " |",
              "|---|" + "---|" * len(range(1, STEPS, 3)),
              "| sigma | " + " | ".join(f"{sigmas[i]:.2f}" for i in range(1, STEPS, 3)) + " |",
              "| distance | " + " | ".join(f"{distance[i - 1]:.3f}" for i in range(1, STEPS, 3)) + " |"]
    # 3-4. forecasts and evened gaps at fixed rates
    out["forecasts"], out["evened"] = [], []
    lines += ["", "## 3. Forecasts at fixed rates", "",
              "| rate | computed | constant | linear | second order | linear, fitted damping |", "|---|---|---|---|---|---|"]
    for rate in (4, 5, 6):
        row = {m: study.score(fixed(rate), m) for m in ("constant", "linear", "second_order", "fitted")}
        out["forecasts"].append({"rate": rate, "schedule": fixed(rate),
                                 **{m: [r["psnr_mean"], r["psnr_worst"]] for m, r in row.items()}})
        lines.append(f"| {rate} | {len(fixed(rate))} | " + " | ".join(
            f"{row[m]['psnr_mean']:.2f} / {row[m]['psnr_worst']:.2f}" for m in ("constant", "linear", "second_order",
                                                                                 "fitted")) + " |")
    lines += ["", "## 4. Gaps before the forced last steps evened out (linear forecast)", "",
              "| rate | fixed schedule | PSNR | evened schedule | PSNR |", "|---|---|---|---|---|"]
    for rate in (4, 5, 6):
        f = out["forecasts"][rate - 4]["linear"]
        ev = study.score(evened(rate))
        out["evened"].append({"rate": rate, "schedule": evened(rate), "linear": [ev["psnr_mean"], ev["psnr_worst"]]})
        lines.append(f"| {rate} | {fixed(rate)} | {f[0]:.2f} / {f[1]:.2f} | {evened(rate)} | "
                     f"{ev['psnr_mean']:.2f} / {ev['psnr_worst']:.2f} |")
    # 5. per video
    per = {rate: study.score(fixed(rate))["psnr"] for rate in (4, 5, 6)}
    d12 = [float((r[1] - r[0]).abs().sum() / r[0].abs().sum()) for r in records]
    d27 = [float((r[6] - r[1]).abs().sum() / r[1].abs().sum()) / 5 for r in records]
    gain = [a - b for a, b in zip(per[4], per[6])]
    out["per_video"] = {"distance_1_2": d12, "distance_2_7": d27, "psnr": {str(k): v for k, v in per.items()},
                        "spearman_distance_2_7_vs_psnr_rate_5": spearman(d27, per[5]),
                        "spearman_distance_2_7_vs_gain_8_to_10_steps": spearman(d27, gain)}
    lines += ["", "## 5. Per video: does the distance say which videos lose the most?", "",
              "| prompt | distance 1-2 | distance 2-7 (per step) | PSNR, 10 / 9 / 8 computed steps |", "|---|---|---|---|"]
    for i, (p, _s) in enumerate(study.prompts):
        lines.append(f"| {p} | {d12[i]:.4f} | {d27[i]:.4f} | {per[4][i]:.1f} / {per[5][i]:.1f} / {per[6][i]:.1f} |")
    lines += ["", f"Spearman, distance 2-7 against the PSNR at 9 computed steps: "
              f"{out['per_video']['spearman_distance_2_7_vs_psnr_rate_5']:.2f}; against the gain from 8 to 10 "
              f"computed steps: {out['per_video']['spearman_distance_2_7_vs_gain_8_to_10_steps']:.2f} (12 prompts).", ""]


def _section_6(study: Study, out: dict, lines: list) -> None:
    out["forced_steps"] = []
    lines += ["## 6. The steps always computed: warm-up and end (linear forecast)", "",
              "At fixed rates, the backend's schedule with `first_computed_steps` / `last_computed_steps` "
              "other than the official 1 / 2; TaylorSeer's schedule (interval 3) for comparison.", "",
              "| rate | first / last | computed | schedule | PSNR mean / worst |", "|---|---|---|---|---|"]
    rows = [(rate, f"{first} / {last}", fixed(rate, first=first, last=last))
            for rate in (3, 4, 5) for first, last in SPLITS]
    rows.append((3, "TaylorSeer", taylorseer_schedule(3)))
    for rate, split, schedule in rows:
        r = study.score(schedule)
        out["forced_steps"].append({"rate": rate, "split": split, "schedule": schedule,
                                    "linear": [r["psnr_mean"], r["psnr_worst"]], "psnr": r["psnr"]})
        lines.append(f"| {rate} | {split} | {len(schedule)} | {schedule} | {r['psnr_mean']:.2f} / {r['psnr_worst']:.2f} |")
    lines.append("")


if __name__ == "__main__":
    main()

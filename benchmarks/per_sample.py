"""A schedule per sample against one schedule per batch, on the shipped reference model.

Batches of 4 prompts, two of low motion (still, growing/shrinking, slow) and two of high motion
(fast moves, bouncing), each prompt with its own seed, sampled with classifier-free guidance as
one batched call per step (8 rows). Per AdaCache config (the official slow and fast presets, and
the config ``adacache_fx.calibrate`` fitted to this model for 35 dB, committed in
``benchmarks/results/calibration_psnr.json``, whose MoReg constants come from the model's own
motion scores; all with the linear forecast and MoReg on), three ways to run the same videos:

* ``shared``: the batch in one call, one schedule for the batch (what every other cache does);
* ``per-sample``: the batch in one call, a schedule per sample, the blocks run on the computing
  samples' rows alone (``AdaCacheConfig(per_sample=True, guidance_in_batch=2)``);
* ``single``: the four prompts one after another, batch 1 (each its own schedule, no batching).

All compiled with ``adacache_fx.compile_model`` (inductor) on the same weights; the baseline is
plain ``torch.compile`` of the batch, every step computed. Per batch, every method runs once in
an order rotated per batch and repeat (interleaved). Reported per method: the median batch
latency, the median per-batch speedup against the baseline measured back to back, the computed
steps per sample (low- and high-motion means), the block rows run per generation (the compute a
sub-batch saves), PSNR of every video against the baseline video of the same prompt and seed
(mean, worst, worst of the high-motion half), and the backend's compile seconds.

    python -m benchmarks.per_sample --steps 30 --repeats 2 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from adacache_fx import AdaCacheConfig, compile_model
from benchmarks.common import command_line, machine, machine_markdown, sync, write_results
from benchmarks.e2e.methods import entry_module
from examples.reference import load_reference_model, sample
from examples.reference.quality import motion_level, psnr

# (prompt, high motion); seeds are the prompt's index in this list
PROMPTS = [
    ("red circle static", False), ("green square moving right slow", False),
    ("cyan triangle moving right fast", True), ("yellow square bouncing fast", True),
    ("blue square static", False), ("magenta circle shrinking", False),
    ("red triangle moving up fast", True), ("blue circle moving left fast", True),
    ("yellow circle growing", False), ("cyan square moving down slow", False),
    ("green triangle bouncing slow", True), ("magenta square moving down fast", True),
]
BATCH = 4


# the config adacache_fx.calibrate fitted to this model for 35 dB (python -m examples.calibrate --min-psnr 35):
# its MoReg normaliser and power come from the model's own motion scores, so its schedules follow motion
CALIBRATED = "benchmarks/results/calibration_psnr.json"


def preset_config(preset: str, steps: int, **fields) -> AdaCacheConfig:
    """``slow`` / ``fast``: the official presets; ``calibrated``: the committed calibration."""
    if preset == "calibrated":
        with open(CALIBRATED) as f:
            saved = json.load(f)["calibration"]["config"]
        if saved["num_steps"] != steps:
            raise SystemExit(f"{CALIBRATED} was calibrated for {saved['num_steps']} steps, not {steps}")
        return AdaCacheConfig.from_dict({**saved, **fields})
    return getattr(AdaCacheConfig, preset)(num_steps=steps, **fields)


class Method:
    def __init__(self, name: str, model_fn, backend=None, single: bool = False):
        self.name, self.model_fn, self.backend, self.single = name, model_fn, backend, single
        self.seconds: list = []        # per (batch, repeat)
        self.videos: dict = {}         # prompt index -> video (first repeat)
        self.steps: dict = {}          # prompt index -> computed steps of its sample
        self.rows: list = []           # block rows run per generation
        self.warmup_s = 0.0            # the first generation, compiles included


def _generate(bench, method: Method, batch: list, steps: int):
    """The videos of prompt indices ``batch``; per prompt its computed steps, and block rows run."""
    embeds = bench.tokenizer([PROMPTS[i][0] for i in batch])
    null = bench.tokenizer([""] * len(batch))
    runners = [r for g in method.backend.graphs for r in g.runners] if method.backend else []
    rows_before = sum(sum(r.batch_rows) for r in runners)
    if method.backend is not None:
        method.backend.reset()
    video = sample(bench.transformer, embeds, num_steps=steps, seed=list(batch), guidance_scale=3.0,
                   negative_prompt_embeds=null, model_fn=method.model_fn)
    computed = {}
    if method.backend is not None:
        report = method.backend.report()
        per_sample = report.sample_computed_steps or [report.computed_steps] * len(batch)
        computed = dict(zip(batch, (list(s) for s in per_sample)))
    runners = [r for g in method.backend.graphs for r in g.runners] if method.backend else []
    rows = sum(sum(r.batch_rows) for r in runners) - rows_before   # sub-batches counted by the runners
    if not rows:   # whole batches: every computed step runs every row (2 guidance rows per prompt)
        computed_steps = method.backend.report().computed_steps if method.backend is not None else range(steps)
        rows = len(computed_steps) * 2 * len(batch)
    return video, computed, rows


def run_batch(bench, method: Method, batch: list, steps: int) -> tuple:
    sync()
    start = time.perf_counter()
    videos, computed, rows = [], {}, 0
    for part in ([[i] for i in batch] if method.single else [batch]):
        video, c, r = _generate(bench, method, part, steps)
        videos.append(video)
        computed.update(c)
        rows += r
    sync()
    return torch.cat(videos), computed, rows, time.perf_counter() - start


class Bench:
    def __init__(self, a):
        self.a = a
        self.transformer, self.tokenizer = load_reference_model()

    def build(self) -> list:
        steps = self.a.steps
        base = copy.deepcopy(self.transformer)
        methods = [Method("baseline", torch.compile(entry_module(base, "baseline"), backend=self.a.inner))]
        for preset in self.a.presets:
            for kind in ("shared", "per-sample", "single"):
                config = preset_config(preset, steps, per_sample=kind == "per-sample",
                                       guidance_in_batch=2 if kind == "per-sample" else 1)
                entry = entry_module(copy.deepcopy(self.transformer), f"{kind}-{preset}")
                backend = compile_model(entry, config, inner=self.a.inner)
                methods.append(Method(f"{kind}-{preset}", entry, backend, single=kind == "single"))
        return methods

    def run(self) -> dict:
        steps = self.a.steps
        batches = [list(range(i, i + BATCH)) for i in range(0, len(PROMPTS), BATCH)][: self.a.batches]
        methods = self.build()
        print(f"== warm-up ({len(methods)} methods, compiles)", flush=True)
        for m in methods:
            t0 = time.perf_counter()
            run_batch(self, m, batches[0], steps)
            m.warmup_s = time.perf_counter() - t0
            print(f"  {m.name:20s} {m.warmup_s:6.1f} s", flush=True)
        print(f"== measuring {len(methods)} methods x {len(batches)} batches x {self.a.repeats} repeats, interleaved",
              flush=True)
        speedups = {m.name: [] for m in methods}
        for rep in range(self.a.repeats):
            for b, batch in enumerate(batches):
                shift = (b + rep) % len(methods)
                order = methods[shift:] + methods[:shift]
                times = {}
                for m in order:
                    video, computed, rows, seconds = run_batch(self, m, batch, steps)
                    m.seconds.append(seconds)
                    times[m.name] = seconds
                    if rep == 0:
                        for j, i in enumerate(batch):
                            m.videos[i] = video[j]
                        m.steps.update(computed)
                        m.rows.append(rows)
                for name, seconds in times.items():
                    speedups[name].append(times["baseline"] / seconds)
                print(f"  [{rep}] batch {b}: " + " ".join(f"{n}={s:.2f}s" for n, s in times.items()), flush=True)
        return self.summarize(methods, speedups, batches)

    def summarize(self, methods: list, speedups: dict, batches: list) -> dict:
        base = methods[0]
        scored = [i for batch in batches for i in batch]
        high = [i for i in scored if PROMPTS[i][1]]
        low = [i for i in scored if not PROMPTS[i][1]]
        motion = {i: motion_level(base.videos[i]) for i in scored}
        rows = []
        for m in methods:
            quality = {i: psnr(m.videos[i], base.videos[i]) for i in scored} if m is not base else {}
            computed = {i: len(m.steps[i]) if i in m.steps else self.a.steps for i in scored}
            rows.append({
                "method": m.name,
                "latency_s": statistics.median(m.seconds),
                "speedup": statistics.median(speedups[m.name]),
                "computed_low": statistics.mean(computed[i] for i in low),
                "computed_high": statistics.mean(computed[i] for i in high),
                "computed_mean": statistics.mean(computed.values()),
                "block_rows": statistics.mean(m.rows) if m.rows else None,
                "psnr_mean": statistics.mean(quality.values()) if quality else None,
                "psnr_worst": min(quality.values()) if quality else None,
                "psnr_worst_high": min(quality[i] for i in high) if quality else None,
                "compile_s": m.backend.compile_seconds if m.backend is not None else None,
                "warmup_s": m.warmup_s,
                "steps_per_prompt": {PROMPTS[i][0]: m.steps.get(i) for i in scored},
                "psnr_per_prompt": {PROMPTS[i][0]: quality.get(i) for i in scored},
            })
        return {"machine": machine(), "command": command_line("benchmarks.per_sample"), "steps": self.a.steps, "repeats": self.a.repeats,
                "prompts": [PROMPTS[i][0] for i in scored], "high_motion": [PROMPTS[i][0] for i in high],
                "motion_level": {PROMPTS[i][0]: motion[i] for i in scored}, "rows": rows,
                "threads": torch.get_num_threads(), "inner": self.a.inner}


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def markdown(result: dict) -> list:
    lines = ["# Per-sample schedules vs one schedule per batch (reference model)", "",
             machine_markdown(result["machine"]), "",
             f"Command: `{result['command']}`. {result['steps']} steps, batches of 4 prompts (2 low, 2 high motion), "
             f"guidance 3 as one batched call (8 rows), {result['repeats']} repeats, {result['threads']} thread(s), "
             f"inner `{result['inner']}`. PSNR of each video against the baseline video of the same prompt and seed. "
             "Backend compile: the seconds spent in the AdaCache backend (analysis and inductor compiles of the "
             "pieces); first batch: the warm-up generation, compiles included, in the order of the table (a later "
             "method reuses inductor's cache of the same graph: shared-fast's pieces are shared-slow's).",
             "", "## Results", "", "| method | batch latency (s) | speedup | computed steps, low / high motion | block rows per "
             "generation | PSNR mean (dB) | PSNR worst | worst, high motion | backend compile (s) | first batch (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['latency_s']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['computed_low']:.1f} / {r['computed_high']:.1f} | {_f(r['block_rows'], '{:.0f}')} | "
                     f"{_f(r['psnr_mean'])} | {_f(r['psnr_worst'])} | {_f(r['psnr_worst_high'])} | "
                     f"{_f(r['compile_s'], '{:.0f}')} | {r['warmup_s']:.0f} |")
    lines += ["", *verdict(result), "", *motion_lines(result), "", "## Computed steps per prompt", "", "| prompt | motion level | " +
              " | ".join(r["method"] for r in result["rows"][1:]) + " |",
              "|---|---|" + "---|" * (len(result["rows"]) - 1)]
    for p in result["prompts"]:
        cells = [str(len(r["steps_per_prompt"][p])) if r["steps_per_prompt"][p] else "-" for r in result["rows"][1:]]
        lines.append(f"| {p}{' (high)' if p in result['high_motion'] else ''} | {result['motion_level'][p]:.4f} | "
                     + " | ".join(cells) + " |")
    return lines


def motion_lines(result: dict) -> list:
    """Spearman rho (95% CI) between each prompt's motion level (of its baseline video) and its
    computed steps, per method: does the schedule give more compute to more motion?"""
    from benchmarks.e2e.analysis import spearman, spearman_ci
    prompts = result["prompts"]
    motion = [result["motion_level"][p] for p in prompts]
    parts = []
    for r in result["rows"][1:]:
        steps = [len(r["steps_per_prompt"][p]) for p in prompts]
        rho = spearman(motion, steps)
        ci = spearman_ci(rho, len(prompts)) if rho is not None else None
        parts.append(f"{r['method']} " + ("- (the same steps for every prompt)" if rho is None
                                          else f"{rho:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"))
    return [f"rho(motion level, computed steps) over the {len(prompts)} prompts, 95% CI: " + "; ".join(parts) + "."]


def verdict(result: dict) -> list:
    """Per preset: per-sample against shared, measured (speed and worst PSNR)."""
    by = {r["method"]: r for r in result["rows"]}
    out = []
    for preset in sorted({name.split("-", 1)[1].replace("sample-", "") for name in by if name != "baseline"}):
        shared, mine = by.get(f"shared-{preset}"), by.get(f"per-sample-{preset}")
        if shared is None or mine is None:
            continue
        out.append(f"- **{preset}**: per-sample {mine['speedup']:.2f}x at worst {mine['psnr_worst']:.2f} dB "
                   f"(high-motion worst {mine['psnr_worst_high']:.2f}, mean {mine['psnr_mean']:.2f}) against shared "
                   f"{shared['speedup']:.2f}x at worst {shared['psnr_worst']:.2f} dB (high-motion worst "
                   f"{shared['psnr_worst_high']:.2f}, mean {shared['psnr_mean']:.2f}); computed steps low / high "
                   f"{mine['computed_low']:.1f} / {mine['computed_high']:.1f} against "
                   f"{shared['computed_low']:.1f} / {shared['computed_high']:.1f}.")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", type=int, default=3, help="batches of 4 prompts (at most 3)")
    ap.add_argument("--presets", nargs="+", default=["slow", "fast", "calibrated"], choices=["slow", "fast", "calibrated"])
    ap.add_argument("--inner", default="inductor")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--render", metavar="JSON", help="only rewrite <out>/per_sample.md from a result JSON")
    a = ap.parse_args(argv)
    if a.render:
        with open(a.render) as f:
            result = json.load(f)
        write_results(a.out, "per_sample", markdown(result), result)
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    result = Bench(a).run()
    write_results(a.out, "per_sample", markdown(result), result)


if __name__ == "__main__":
    main()

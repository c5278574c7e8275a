"""The measurement: the workload (reference model, prompts, guidance), one generation, the
warm-up of every method and the interleaved timing of all of them, per step count."""
from __future__ import annotations

import contextlib
import io
import json
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from adacache_fx.compile import resolve_inner
from benchmarks.common import sync
from examples.reference import CONFIG_FILE, load_reference_model, sample

from .analysis import summarize
from .methods import Methods, Runner, closest_fixed_rate, fixed_schedule_size

# 16 prompts from still to fast motion, over every colour and shape (the seed is the index).
PROMPTS = [
    "red circle static", "blue square static",
    "green triangle moving right slow", "yellow circle moving left slow",
    "cyan square moving up slow", "magenta triangle moving down slow",
    "red square growing", "blue circle shrinking",
    "green circle bouncing slow", "yellow square bouncing slow",
    "cyan triangle moving right fast", "magenta circle moving left fast",
    "red triangle moving up fast", "blue square moving down fast",
    "green square bouncing fast", "yellow triangle bouncing fast",
]
CALIBRATION_PROMPT = "magenta square moving right slow"  # warm-up and MagCache calibration, not scored
# adacache_fx.calibrate's generations (seeds 1000 + index): still to fast, none of them scored.
ADACACHE_CALIBRATION_PROMPTS = ["cyan circle static", "red square moving left slow",
                                "blue triangle bouncing slow", "yellow circle moving up fast"]


@dataclass
class Record:
    prompt: int
    repeat: int
    seconds: float
    computed: Optional[int]
    cache_bytes: int
    graphs_after_warmup: int


@dataclass
class MethodResult:
    runner: Runner
    warmup_graphs: int = 0
    warmup_graph_breaks: int = 0
    check_recompiles: Optional[int] = None   # eager methods: recompiles of the compile check
    records: list = field(default_factory=list)
    videos: dict = field(default_factory=dict)  # prompt index -> video (first repeat)


def graph_break_count() -> int:
    from torch._dynamo.utils import counters
    return int(sum(counters["graph_break"].values()))


class Bench:
    """``a``: the parsed command line (prompts, guidance, inner, check_inner, check_steps,
    methods, repeats; see :mod:`benchmarks.e2e.cli`)."""

    def __init__(self, a):
        self.a = a
        self.transformer, self.tokenizer = load_reference_model()
        self.methods = Methods(self.transformer, resolve_inner(a.inner), resolve_inner(a.check_inner))
        sampling = json.loads(CONFIG_FILE.read_text()).get("sampling", {})
        self.guidance = a.guidance if a.guidance is not None else float(sampling.get("guidance_scale", 3.0))
        self.prompts = PROMPTS[: a.prompts]
        self.embeds = {p: self.tokenizer([p]) for p in self.prompts + [CALIBRATION_PROMPT]}
        self.null = self.tokenizer([""])

    # ----- generation ------------------------------------------------------------------
    def generate(self, runner: Runner, prompt: str, seed: int, steps: int):
        runner.reset()
        step_counter = [0]

        def callback(i, t, latents):
            runner.on_step(i)
            step_counter[0] += 1

        sync()
        start = time.perf_counter()
        video = sample(self.transformer, self.embeds[prompt], num_steps=steps, seed=seed,
                       guidance_scale=self.guidance, negative_prompt_embeds=self.null,
                       model_fn=runner.model_fn, callback=callback)
        sync()
        seconds = time.perf_counter() - start
        return video, seconds, runner.end()

    def calibrate_magcache(self, steps: int) -> list:
        """MagCache's own calibration (``calibrate=True``): one generation, ratios parsed from
        what the hook prints at the end."""
        runner = self.methods.magcache_calibration(steps)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.generate(runner, CALIBRATION_PROMPT, 0, steps)
        found = re.findall(r"\[([-0-9.,\s eE]+)\]", out.getvalue())
        if not found:
            raise RuntimeError(f"MagCache calibration printed no ratios: {out.getvalue()[-500:]!r}")
        ratios = [float(x) for x in found[-1].split(",")]
        if len(ratios) != steps:
            raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {steps} steps")
        return ratios

    def calibrate_adacache(self, runner: Runner, steps: int) -> dict:
        """``adacache_fx.calibrate`` on the unscored calibration prompts, with the method's own
        compiled model; the backend is left on the calibrated config."""
        from adacache_fx import calibrate

        prompts = ADACACHE_CALIBRATION_PROMPTS[: self.a.calibration_prompts]
        for p in prompts:
            self.embeds.setdefault(p, self.tokenizer([p]))

        def one(i):
            return self.generate(runner, prompts[i], 1000 + i, steps)[0]
        start = time.perf_counter()
        result = calibrate(one, runner.backend, runs=len(prompts), data_range=2.0,
                           progress=lambda msg: print(f"    {runner.name}: {msg}", flush=True),
                           **runner.calibration)
        fitted = f"thresholds x{result.threshold_scale:.3f}, rates <= {result.max_rate}"
        if result.moreg_normalizer is not None:
            fitted += f", MoReg normaliser {result.moreg_normalizer:.3f}, power {result.moreg_power:.2f}"
        runner.setting += f" ({fitted})"
        info = {"method": runner.name, "seconds": time.perf_counter() - start, "prompts": prompts,
                **{k: v for k, v in result.to_dict().items() if k != "trajectories"}}
        print(f"  calibrated {runner.name} in {info['seconds']:.1f} s: {result.summary()}", flush=True)
        return info

    # ----- protocol --------------------------------------------------------------------
    def warm_up(self, runner: Runner, steps: int) -> MethodResult:
        start = time.perf_counter()
        if runner.compile_check is not None:  # graphs, breaks, recompiles of the method under torch.compile
            check = runner.compile_check()
            breaks = graph_break_count()
            check_steps = min(steps, self.a.check_steps)
            self.generate(check, CALIBRATION_PROMPT, 0, check_steps)
            graphs, breaks = check.counter.graphs, graph_break_count() - breaks
            self.generate(check, CALIBRATION_PROMPT, 1, check_steps)
            res = MethodResult(runner, warmup_graphs=graphs, warmup_graph_breaks=breaks,
                               check_recompiles=check.counter.graphs - graphs)
            self.generate(runner, CALIBRATION_PROMPT, 0, steps)
        else:
            breaks = graph_break_count()
            self.generate(runner, CALIBRATION_PROMPT, 0, steps)
            res = MethodResult(runner, warmup_graphs=runner.counter.graphs,
                               warmup_graph_breaks=graph_break_count() - breaks)
        print(f"  warm-up {runner.name:24s} {time.perf_counter() - start:6.1f} s, "
              f"{res.warmup_graphs} graph(s), {res.warmup_graph_breaks} graph break(s)", flush=True)
        return res

    def fixed_rate(self, fast: MethodResult, steps: int) -> tuple:
        """The fixed cache rate whose schedule computes closest to AdaCache-fast's mean."""
        counts = []
        for i, p in enumerate(self.prompts):
            video, _, info = self.generate(fast.runner, p, i, steps)
            fast.videos[i] = video
            counts.append(info["computed"])
        mean = statistics.mean(counts)
        return closest_fixed_rate(mean, steps), mean

    def run_steps(self, steps: int) -> dict:
        print(f"== {steps} steps: building and warming up", flush=True)
        runners = self.methods.build(steps, self.a.methods, self.calibrate_magcache)
        calibrations = [self.calibrate_adacache(r, steps) for r in runners if r.calibration is not None]
        results = [self.warm_up(r, steps) for r in runners]
        fast = next((r for r in results if r.runner.name == "adacache-fast"), None)
        fixed_info = None
        if fast is not None and (not self.a.methods or any("fixed" in s for s in self.a.methods)):
            k, mean = self.fixed_rate(fast, steps)
            fixed_info = {"rate": k, "adacache_fast_mean_computed": mean, "fixed_computed": fixed_schedule_size(k, steps)}
            results.append(self.warm_up(self.methods.fixed(k, steps, mean), steps))
        print(f"== {steps} steps: measuring {len(results)} methods x {len(self.prompts)} prompts x "
              f"{self.a.repeats} repeat(s), interleaved", flush=True)
        for rep in range(self.a.repeats):
            for i, prompt in enumerate(self.prompts):
                shift = (i + rep) % len(results)
                order = results[shift:] + results[:shift]
                line = []
                for res in order:
                    graphs_before = res.runner.counter.graphs
                    video, seconds, info = self.generate(res.runner, prompt, i, steps)
                    res.records.append(Record(i, rep, seconds, info["computed"], info["cache_bytes"],
                                              res.runner.counter.graphs - graphs_before))
                    if rep == 0:
                        res.videos[i] = video
                    line.append(f"{res.runner.name}={seconds:.2f}s")
                print(f"  [{rep}] {prompt:34s} " + " ".join(line), flush=True)
        out = summarize(results, steps, self.prompts, fixed_info)
        out["calibrations"] = calibrations
        return out


def model_description(transformer: torch.nn.Module) -> str:
    n_params = sum(p.numel() for p in transformer.parameters())
    return f"{len(transformer.blocks)} blocks, {n_params / 1e6:.2f}M parameters"

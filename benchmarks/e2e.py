"""End-to-end speed / quality of AdaCache against the other caches, on the shipped reference model.

Every method runs on the same trained WanTransformer3DModel (examples/weights), through the
same sampling loop (diffusers' FlowMatchEulerDiscreteScheduler, classifier-free guidance as
one batched call per step), under ``torch.compile`` with the same inner compiler:

* ``baseline``: plain ``torch.compile`` (every step computed);
* ``adacache-{slow,fast}[-nomoreg]``: this library, the official codebooks, with and without
  MoReg;
* ``fixed-k``: the same backend with a fixed codebook ``{inf: k}``, k chosen so that it
  computes about as many steps as AdaCache-fast does on average (the non-adaptive control);
* diffusers' own caches on a copy of the same transformer: FirstBlockCache, PyramidAttention-
  Broadcast, TaylorSeer and MagCache (calibrated on this model first), 2-3 settings each.

Protocol, per step count: build and warm up every method (compiles, MagCache calibration),
then for each prompt run every method once, in an order rotated per prompt (interleaved, so
that load drifts hit every method alike), ``--repeats`` times. Reported per method: the median
latency of a generation, the median of the per-prompt speedups (baseline time / method time,
measured back to back), the computed-step fraction, PSNR and SSIM of each video against the
baseline video of the same prompt and seed (mean and worst), the peak cache memory, the graphs
compiled (a graph break adds one) and the compiles after the warm-up generation (recompiles).

    python benchmarks/e2e.py                          # 16 prompts, 30 and 50 steps (about 1 h on 2 CPU cores)
    python benchmarks/e2e.py --quick --out /tmp/e2e   # smoke run: 2 prompts, 8 steps, eager

Writes ``<out>/e2e.{json,md}``, ``<out>/e2e_pareto.png`` (speedup vs PSNR) and
``<out>/e2e_motion.png`` (computed steps per video against its motion level).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, machine_markdown, sync  # noqa: E402

from adacache_fx import AdaCacheConfig, adacache_backend  # noqa: E402
from adacache_fx.compile import resolve_inner  # noqa: E402
from examples.reference import CONFIG_FILE, load_reference_model, sample  # noqa: E402
from examples.reference.quality import motion_level, psnr, ssim  # noqa: E402

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
# TaylorSeer's default patterns ("^blocks.*attn" under re.fullmatch) match no module of Wan,
# whose attentions are blocks.N.attn1 / attn2: name them, with the feed-forward, explicitly.
TAYLORSEER_MODULES = [r"blocks\.\d+\.(attn1|attn2|ffn)"]
CALIBRATION_PROMPT = "magenta square moving right slow"  # warm-up and MagCache calibration, not scored


class CountingCompiler:
    """A torch.compile backend that counts the graphs dynamo hands it (one per graph, per
    graph break and per recompile) before passing them to ``backend``."""

    def __init__(self, backend: Callable):
        self.backend = backend
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.backend(gm, example_inputs)


def entry_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """``model`` behind a module whose ``forward`` is a code object of its own.

    Dynamo keeps compiled code, recompile counts and "skip this frame" marks per code object.
    Every method here compiles the same class's ``forward``, so without this a graph break in
    one method's hooks (which can mark the shared frame as skipped) would make every other
    method run uncompiled, and all of them would share one recompile limit."""
    namespace: dict = {}
    source = "def forward(self, *args, **kwargs):\n    return self.model(*args, **kwargs)\n"
    exec(compile(source, f"<e2e entry: {name}>", "exec"), namespace)
    entry = type(f"Entry_{re.sub(r'[^0-9a-zA-Z]', '_', name)}", (torch.nn.Module,), {"forward": namespace["forward"]})()
    entry.model = model
    return entry


def tensor_bytes(obj, seen: set, depth: int = 0) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` through attributes,
    dicts, lists and tuples (a cache state's memory)."""
    if depth > 6 or id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        key = ("storage", obj.untyped_storage().data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        return sum(tensor_bytes(v, seen, depth + 1) for v in vars(obj).values())
    return 0


def diffusers_hook_states(model: torch.nn.Module) -> list:
    """Every state object of every diffusers hook registered on ``model``'s modules."""
    states = []
    for m in model.modules():
        registry = getattr(m, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook in registry.hooks.values():
            manager = getattr(hook, "state_manager", None)
            if manager is not None:
                states.extend(manager._state_cache.values())
            elif getattr(hook, "state", None) is not None:
                states.append(hook.state)
    return states


@dataclass
class Runner:
    """One method, built and compiled: call ``model_fn`` like the transformer."""

    name: str
    family: str
    setting: str
    model_fn: Callable
    counter: CountingCompiler
    reset: Callable[[], None]
    on_step: Callable[[int], None]           # after each denoising step (state reading)
    end: Callable[[], dict]                  # after a generation: computed steps, cache bytes
    notes: str = ""
    eager: bool = False                      # timed without torch.compile (against the eager baseline)
    compile_check: Optional[Callable[[], "Runner"]] = None  # the same method under torch.compile


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
    def __init__(self, a):
        self.a = a
        self.transformer, self.tokenizer = load_reference_model()
        self.inner = resolve_inner(a.inner)
        self.check_inner = resolve_inner(a.check_inner)
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

    # ----- methods ---------------------------------------------------------------------
    def compiled(self, module, backend, name: str) -> tuple:
        counter = CountingCompiler(backend)
        return torch.compile(entry_module(module, name), backend=counter), counter

    def baseline(self, eager: bool = False) -> Runner:
        if eager:
            model = copy.deepcopy(self.transformer)
            return Runner("eager-baseline", "baseline", "the uncached model, not compiled", model,
                          CountingCompiler(None), lambda: None, lambda i: None,
                          lambda: {"computed": None, "cache_bytes": 0}, eager=True)
        fn, counter = self.compiled(copy.deepcopy(self.transformer), self.inner, "baseline")
        return Runner("baseline", "baseline", "plain torch.compile", fn, counter, lambda: None,
                      lambda i: None, lambda: {"computed": None, "cache_bytes": 0})

    def adacache(self, name: str, family: str, setting: str, config: AdaCacheConfig) -> Runner:
        backend = adacache_backend(config, inner=self.inner)
        fn, counter = self.compiled(copy.deepcopy(self.transformer), backend, name)

        def end():
            r = backend.report()
            return {"computed": len(r.computed_steps), "cache_bytes": int(r.cache_bytes),
                    "computed_steps": list(r.computed_steps)}

        return Runner(name, family, setting, fn, counter, backend.reset, lambda i: None, end)

    def diffusers_cache(self, name: str, setting: str, make_config: Callable, counts_steps: Optional[str],
                        compiled_with: Optional[Callable] = None) -> Runner:
        """diffusers' ``enable_cache`` on a copy of the transformer, called inside
        ``cache_context("cond")`` as diffusers' pipelines do.

        Timed eagerly (their hooks make Python decisions between blocks, under
        ``torch.compiler.disable``): under torch.compile they break the graph around every
        block and recompile on hook state, which on this CPU costs minutes per setting. Their
        speedup is taken against the eager baseline; ``compile_check`` builds the same method
        under torch.compile (``compiled_with``: the inner backend) to count graphs, graph
        breaks and recompiles.

        ``counts_steps``: how a computed step shows in the hook state after the step:
        ``"should_compute"`` (FirstBlockCache, MagCache), ``"taylorseer"``, or None (PAB skips
        attention only: every step runs the blocks)."""
        model = copy.deepcopy(self.transformer)
        clock = {"t": 1000.0}
        model.enable_cache(make_config(lambda: clock["t"]))
        if compiled_with is not None:
            compiled, counter = self.compiled(model, compiled_with, name + "-compiled")
        else:
            compiled, counter = model, CountingCompiler(None)
        track = {"computed": 0, "peak": 0}

        def model_fn(**kwargs):
            clock["t"] = float(kwargs["timestep"].flatten()[0])
            with model.cache_context("cond"):
                return compiled(**kwargs)

        def reset():
            model._reset_stateful_cache()
            track.update(computed=0, peak=0)

        def on_step(i):
            states = diffusers_hook_states(model)
            track["peak"] = max(track["peak"], sum(tensor_bytes(s, set()) for s in states))
            if counts_steps == "should_compute":
                track["computed"] += int(any(getattr(s, "should_compute", False) for s in states))
            elif counts_steps == "taylorseer":
                track["computed"] += int(any(getattr(s, "last_update_step", None) is not None
                                             and s.last_update_step == s.current_step for s in states))

        def end():
            return {"computed": track["computed"] if counts_steps else None, "cache_bytes": track["peak"]}

        notes = "" if counts_steps else "skips attention only; every step runs the blocks"
        check = None if compiled_with is not None else (
            lambda: self.diffusers_cache(name, setting, make_config, counts_steps, compiled_with=self.check_inner))
        return Runner(name, "diffusers", setting, model_fn, counter, reset, on_step, end, notes,
                      eager=compiled_with is None, compile_check=check)

    def calibrate_magcache(self, steps: int) -> list:
        """MagCache's own calibration (``calibrate=True``): one generation, ratios parsed from
        what the hook prints at the end."""
        from diffusers.hooks import MagCacheConfig

        runner = self.diffusers_cache("magcache-calibration", "calibrate",
                                      lambda clock: MagCacheConfig(calibrate=True, num_inference_steps=steps), None)
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

    def methods(self, steps: int) -> list:
        from diffusers.hooks import (FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                                     TaylorSeerCacheConfig)

        only = self.a.methods
        want = lambda name: not only or any(s in name for s in only)  # noqa: E731
        out = [self.baseline(), self.baseline(eager=True)]
        for speed in ("slow", "fast"):
            for moreg in (True, False):
                name = f"adacache-{speed}" + ("" if moreg else "-nomoreg")
                if want(name):
                    cfg = getattr(AdaCacheConfig, speed)(num_steps=steps, moreg=moreg)
                    out.append(self.adacache(name, "adacache", f"{speed}, MoReg {'on' if moreg else 'off'}", cfg))
        for thr in (0.05, 0.1, 0.2):
            if want(f"fbc-{thr}"):
                out.append(self.diffusers_cache(f"fbc-{thr}", f"threshold {thr}",
                                                lambda clock, thr=thr: FirstBlockCacheConfig(threshold=thr),
                                                "should_compute"))
        for spatial, cross in ((2, 6), (3, 9)):
            if want(f"pab-{spatial}-{cross}"):
                out.append(self.diffusers_cache(
                    f"pab-{spatial}-{cross}", f"spatial skip {spatial}, cross skip {cross}, t in (100, 800)",
                    lambda clock, s=spatial, c=cross: PyramidAttentionBroadcastConfig(
                        spatial_attention_block_skip_range=s, cross_attention_block_skip_range=c,
                        current_timestep_callback=clock), None))
        for interval in (3, 5):
            if want(f"taylorseer-{interval}"):
                out.append(self.diffusers_cache(
                    f"taylorseer-{interval}", f"interval {interval}, order 1, attn1/attn2/ffn of every block",
                    lambda clock, n=interval: TaylorSeerCacheConfig(cache_interval=n, max_order=1,
                                                                    cache_identifiers=TAYLORSEER_MODULES),
                    "taylorseer"))
        mag = [thr for thr in (0.06, 0.12, 0.24) if want(f"magcache-{thr}")]
        if mag:
            ratios = self.calibrate_magcache(steps)
            for thr in mag:
                out.append(self.diffusers_cache(
                    f"magcache-{thr}", f"threshold {thr}, K 3, retention 0.2, calibrated",
                    lambda clock, thr=thr: MagCacheConfig(threshold=thr, max_skip_steps=3, retention_ratio=0.2,
                                                          num_inference_steps=steps, mag_ratios=ratios),
                    "should_compute"))
        return out

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
        best = min(range(1, steps + 1), key=lambda k: (abs(fixed_schedule_size(k, steps) - mean), k))
        return best, mean

    def run_steps(self, steps: int) -> dict:
        print(f"== {steps} steps: building and warming up", flush=True)
        results = [self.warm_up(r, steps) for r in self.methods(steps)]
        fast = next((r for r in results if r.runner.name == "adacache-fast"), None)
        fixed_info = None
        if fast is not None and (not self.a.methods or any("fixed" in s for s in self.a.methods)):
            k, mean = self.fixed_rate(fast, steps)
            fixed_info = {"rate": k, "adacache_fast_mean_computed": mean, "fixed_computed": fixed_schedule_size(k, steps)}
            runner = self.adacache(f"fixed-{k}", "fixed", f"codebook {{inf: {k}}} (AdaCache-fast mean {mean:.1f} steps)",
                                   AdaCacheConfig(codebook={math.inf: k}, num_steps=steps, moreg=False))
            results.append(self.warm_up(runner, steps))
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
        return summarize(results, steps, self.prompts, fixed_info)


def fixed_schedule_size(rate: int, steps: int, first: int = 1, last: int = 2) -> int:
    """Computed steps of the fixed codebook ``{inf: rate}`` under the schedule contract: the
    first ``first`` steps, the step after them (the first computed step has no previous probe
    to measure a distance against, so its rate is 1), every ``rate``-th step from there, and
    the last ``last`` steps."""
    computed = set(range(1, min(first + 1, steps) + 1))
    step = min(first + 1, steps)
    while step + rate <= steps:
        step += rate
        computed.add(step)
    computed.update(range(max(1, steps - last + 1), steps + 1))
    return len(computed)


def summarize(results: list, steps: int, prompts: list, fixed_info) -> dict:
    """Each method against the uncached model run the same way: compiled methods against
    ``baseline`` (plain torch.compile), eagerly timed ones against ``eager-baseline``."""
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
        computed = [rec.computed for rec in res.records if rec.repeat == 0]
        finite = [p for p in ps.values() if math.isfinite(p)]
        rows.append({
            "method": r.name, "family": r.family, "setting": r.setting, "notes": r.notes,
            "timed": "eager" if r.eager else "torch.compile",
            "latency_s": statistics.median(rec.seconds for rec in res.records),
            "speedup": statistics.median(ratios),
            "speedup_min": min(ratios), "speedup_max": max(ratios),
            "computed_fraction": (statistics.mean(computed) / steps) if None not in computed else None,
            "computed_steps": computed if None not in computed else None,
            "psnr_mean": statistics.mean(finite) if finite else float("inf"),
            "psnr_worst": min(ps.values()),
            "ssim_mean": statistics.mean(ss.values()), "ssim_worst": min(ss.values()),
            "psnr": [ps[i] for i in sorted(ps)], "ssim": [ss[i] for i in sorted(ss)],
            "cache_mib": max(rec.cache_bytes for rec in res.records) / 2**20,
            "graphs": res.warmup_graphs, "graph_breaks": res.warmup_graph_breaks,
            "recompiles": (res.check_recompiles if r.eager and res.check_recompiles is not None
                           else sum(rec.graphs_after_warmup for rec in res.records)),
        })
    return {"steps": steps, "prompts": prompts, "motion_level": [motion[i] for i in sorted(motion)],
            "fixed": fixed_info, "methods": rows, "analysis": analyse(rows, [motion[i] for i in sorted(motion)])}


def spearman(x: list, y: list) -> Optional[float]:
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


def analyse(rows: list, motion: list) -> dict:
    """Dominance of AdaCache's points over every other cache's, and the motion questions."""
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
            motion_rows[r["method"]] = {
                "spearman_motion_vs_computed": spearman(motion, r["computed_steps"]),
                "high_motion_worst_psnr": min(r["psnr"][i] for i in half) if half else None,
                "high_motion_mean_computed": statistics.mean(r["computed_steps"][i] for i in half) if half else None,
            }
    return {"dominance": dominance, "all_dominated": all(d["dominated_by"] for d in dominance),
            "motion": motion_rows}


# ----- output -------------------------------------------------------------------------------
def fmt(v, spec=".2f"):
    if v is None:
        return "-"
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
             "PSNR/SSIM: against the baseline video of the same prompt and seed; the PSNR mean is over the "
             "videos that differ from the baseline (an identical video has infinite PSNR). Computed: the mean "
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
                     "SSIM mean / worst | cache MiB | graphs / breaks / recompiles |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in run["methods"]:
            comp = "-" if r["computed_fraction"] is None else f"{r['computed_fraction']:.0%}"
            lines.append(
                f"| {r['method']} | {r['setting']} | {r['timed']} | {fmt(r['latency_s'], '.3f')} | {fmt(r['speedup'])}x "
                f"({fmt(r['speedup_min'])}-{fmt(r['speedup_max'])}) | {comp} | {fmt(r['psnr_mean'])} / "
                f"{fmt(r['psnr_worst'])} | {fmt(r['ssim_mean'], '.3f')} / {fmt(r['ssim_worst'], '.3f')} | "
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
        lines.append("Motion: Spearman correlation of the baseline video's motion level with computed steps; "
                     "worst PSNR and mean computed steps over the higher-motion half of the prompts:\n")
        for name, mr in an["motion"].items():
            lines.append(f"- {name}: rho {fmt(mr['spearman_motion_vs_computed'])}, high-motion worst PSNR "
                         f"{fmt(mr['high_motion_worst_psnr'])} dB, high-motion computed {fmt(mr['high_motion_mean_computed'], '.1f')}")
        lines.append("")
    return "\n".join(lines) + "\n"


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
              "adacache-slow": ("tab:blue", "o"), "adacache-slow-nomoreg": ("tab:cyan", "x")}
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[30, 50])
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=None, help="default: the model card's")
    ap.add_argument("--inner", default="inductor")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--check-inner", default="eager",
                    help="inner backend of the compile check of the eagerly timed diffusers caches")
    ap.add_argument("--check-steps", type=int, default=8, help="steps of each compile-check generation")
    ap.add_argument("--methods", nargs="*", default=None, help="only methods whose name contains one of these")
    ap.add_argument("--recompile-limit", type=int, default=64,
                    help="dynamo's recompile limit: the compile checks of diffusers' caches compile the same "
                         "block forwards (their hooks break the graph around them), so the default 8 would be "
                         "shared by all of them")
    ap.add_argument("--quick", action="store_true", help="2 prompts, 8 steps, eager inner: a smoke run")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--note", default=None, help="measurement conditions to record in the outputs")
    ap.add_argument("--merge", nargs="+", default=None, metavar="E2E_JSON",
                    help="only combine the runs of earlier outputs (e.g. 30 and 50 steps run as two processes)")
    a = ap.parse_args(argv)
    if a.merge:
        out = merge(a.merge)
        if a.note:
            out["note"] = a.note
        return write_outputs(out, a.out)
    if a.quick:
        a.steps, a.prompts, a.inner = [8], min(a.prompts, 2), "eager"
    if a.threads:
        torch.set_num_threads(a.threads)
    torch._dynamo.config.recompile_limit = a.recompile_limit
    torch._dynamo.config.accumulated_recompile_limit = max(256, 8 * a.recompile_limit)
    bench = Bench(a)
    runs = [bench.run_steps(s) for s in a.steps]
    n_params = sum(p.numel() for p in bench.transformer.parameters())
    out = {"machine": machine(), "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
           "model": f"{len(bench.transformer.blocks)} blocks, {n_params / 1e6:.2f}M parameters",
           "guidance": bench.guidance, "inner": a.inner, "repeats": a.repeats,
           "check_inner": a.check_inner, "check_steps": a.check_steps, "note": a.note,
           "recompile_limit": a.recompile_limit, "runs": runs}
    return write_outputs(out, a.out)


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


if __name__ == "__main__":
    main()

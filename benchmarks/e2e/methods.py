"""The methods of the end-to-end benchmark: how each is built on a copy of the reference
transformer and compiled, what it reports after a generation, and the fixed control's schedule."""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from adacache_fx import AdaCacheConfig, adacache_backend
from adacache_fx.calibration import Trajectory, simulate

# TaylorSeer's default patterns ("^blocks.*attn" under re.fullmatch) match no module of Wan,
# whose attentions are blocks.N.attn1 / attn2: name them, with the feed-forward, explicitly.
TAYLORSEER_MODULES = [r"blocks\.\d+\.(attn1|attn2|ffn)"]
# Peers also timed under compile_repeated_blocks (one setting each, near 2x on the reference model).
REGIONAL_PEERS = ("fbc-0.1", "taylorseer-3", "magcache-0.24")


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


# ----- the fixed-interval control --------------------------------------------------------------
def fixed_config(rate: int, steps: int, **forced) -> AdaCacheConfig:
    """The fixed control: codebook ``{inf: rate}`` (every finite distance picks ``rate``), MoReg off
    (``forced``: ``first_computed_steps`` / ``last_computed_steps`` other than the official 1 / 2)."""
    return AdaCacheConfig(codebook={math.inf: rate}, num_steps=steps, moreg=False, **forced)


def fixed_schedule(rate: int, steps: int, **forced) -> list:
    """The steps the fixed control computes in a ``steps``-step generation, as the backend's
    own scheduler decides them (``adacache_fx.calibration.simulate``, which drives it as the cached
    graph does). Under ``{inf: rate}`` any finite distance picks ``rate``, so the trajectory is a
    placeholder: distance 0 at every step and gap, no motion."""
    placeholder = Trajectory(num_steps=steps, sums={(s, g): [0.0, 1.0, 0.0, 0.0, 0.0]
                                                    for s in range(1, steps + 1) for g in range(1, rate + 1)})
    return simulate(fixed_config(rate, steps, **forced), placeholder)


def fixed_schedule_size(rate: int, steps: int) -> int:
    """How many steps the fixed control computes (see :func:`fixed_schedule`)."""
    return len(fixed_schedule(rate, steps))


def closest_fixed_rate(mean_computed: float, steps: int) -> int:
    """The fixed rate whose schedule computes closest to ``mean_computed`` steps (ties: the lower rate)."""
    return min(range(1, steps + 1), key=lambda k: (abs(fixed_schedule_size(k, steps) - mean_computed), k))


# ----- AdaCache's settings --------------------------------------------------------------------
def adacache_settings(steps: int) -> list:
    """``[(name, setting, config, calibration target or None)]``: the official presets with each
    reuse (linear forecast: the default; constant: the paper's; damped), MoReg on and off, and
    configs calibrated on the model (the fast codebook's rates, thresholds and MoReg normaliser
    fitted by ``adacache_fx.calibrate`` on the unscored calibration prompts)."""
    out = []
    for speed in ("slow", "fast"):
        preset = getattr(AdaCacheConfig, speed)
        out.append((f"adacache-{speed}", f"{speed}, linear forecast, MoReg on", preset(num_steps=steps), None))
        out.append((f"adacache-{speed}-nomoreg", f"{speed}, linear forecast, MoReg off",
                    preset(num_steps=steps, moreg=False), None))
        out.append((f"adacache-{speed}-constant", f"{speed}, constant reuse (the paper's), MoReg on",
                    preset(num_steps=steps, reuse="constant"), None))
    out.append(("adacache-fast-damped", "fast, damped forecast (0.5), MoReg on",
                AdaCacheConfig.fast(num_steps=steps, reuse="damped"), None))
    for fraction in (0.3, 0.4, 0.5):   # 0.4: TaylorSeer-3's compute at 30 steps
        out.append((f"adacache-cal-{fraction}", f"calibrated to compute <= {fraction:.0%}, linear forecast, MoReg on",
                    AdaCacheConfig.fast(num_steps=steps), {"computed_fraction": fraction}))
    out.append(("adacache-cal-0.3-nomoreg", "calibrated to compute <= 30%, linear forecast, MoReg off",
                AdaCacheConfig.fast(num_steps=steps, moreg=False), {"computed_fraction": 0.3}))
    out.append(("adacache-cal-0.3-constant", "calibrated to compute <= 30%, constant reuse, MoReg on",
                AdaCacheConfig.fast(num_steps=steps, reuse="constant"), {"computed_fraction": 0.3}))
    out.append(("adacache-cal-35dB", "calibrated to 35 dB mean PSNR, linear forecast, MoReg on",
                AdaCacheConfig.fast(num_steps=steps), {"min_psnr": 35.0}))
    return out


# ----- runners ---------------------------------------------------------------------------------
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
    backend: object = None                   # AdaCache methods: their backend
    calibration: Optional[dict] = None       # calibrated AdaCache methods: the target (calibrate's keywords)
    timed: str = ""                          # how it is timed, when not "eager" / "torch.compile"


class Methods:
    """Builds every method on its own copy of ``transformer``.

    ``inner``: the inner compiler of the compiled methods; ``check_inner``: the inner
    compiler of the compile check of the eagerly timed diffusers caches."""

    def __init__(self, transformer: torch.nn.Module, inner: Callable, check_inner: Callable):
        self.transformer = transformer
        self.inner = inner
        self.check_inner = check_inner

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

    def adacache(self, name: str, family: str, setting: str, config: AdaCacheConfig,
                 calibration: Optional[dict] = None) -> Runner:
        """``calibration``: ``adacache_fx.calibrate``'s target; the protocol calibrates the method
        on the unscored calibration prompts before its warm-up (``config`` is the base)."""
        backend = adacache_backend(config, inner=self.inner)
        fn, counter = self.compiled(copy.deepcopy(self.transformer), backend, name)

        def end():
            r = backend.report()
            return {"computed": len(r.computed_steps), "cache_bytes": int(r.cache_bytes),
                    "computed_steps": list(r.computed_steps)}

        return Runner(name, family, setting, fn, counter, backend.reset, lambda i: None, end,
                      backend=backend, calibration=calibration)

    def fixed(self, rate: int, steps: int, adacache_fast_mean: float) -> Runner:
        return self.adacache(f"fixed-{rate}", "fixed",
                             f"codebook {{inf: {rate}}} (AdaCache-fast mean {adacache_fast_mean:.1f} steps)",
                             fixed_config(rate, steps))

    def regional_baseline(self) -> Runner:
        """The uncached model under diffusers' regional compilation (``compile_repeated_blocks``:
        each block compiled, the rest eager), the way diffusers' docs pair it with their caches."""
        model = copy.deepcopy(self.transformer)
        counter = CountingCompiler(self.inner)
        model.compile_repeated_blocks(backend=counter)
        return Runner("regional-baseline", "baseline", "compile_repeated_blocks, uncached", model, counter,
                      lambda: None, lambda i: None, lambda: {"computed": None, "cache_bytes": 0},
                      timed="regional compile")

    def diffusers_cache(self, name: str, setting: str, make_config: Callable, counts_steps: Optional[str],
                        compiled_with: Optional[Callable] = None, regional: bool = False) -> Runner:
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
        if regional:   # diffusers' regional compilation under the hooks: timed against plain torch.compile
            counter = CountingCompiler(self.inner)
            model.compile_repeated_blocks(backend=counter)
            compiled = model
        elif compiled_with is not None:
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
        if regional:
            return Runner(name, "diffusers", setting + ", compile_repeated_blocks", model_fn, counter, reset, on_step,
                          end, notes, timed="regional compile")
        check = None if compiled_with is not None else (
            lambda: self.diffusers_cache(name, setting, make_config, counts_steps, compiled_with=self.check_inner))
        return Runner(name, "diffusers", setting, model_fn, counter, reset, on_step, end, notes,
                      eager=compiled_with is None, compile_check=check)

    def magcache_calibration(self, steps: int) -> Runner:
        """MagCache with ``calibrate=True``: one generation prints the ratios (see
        :meth:`benchmarks.e2e.protocol.Bench.calibrate_magcache`)."""
        from diffusers.hooks import MagCacheConfig

        return self.diffusers_cache("magcache-calibration", "calibrate",
                                    lambda clock: MagCacheConfig(calibrate=True, num_inference_steps=steps), None)

    def build(self, steps: int, only: Optional[list], magcache_ratios: Callable[[int], list]) -> list:
        """Every method for ``steps``-step generations (the baselines always; the others whose
        name contains one of ``only``, or all). ``magcache_ratios(steps)`` calibrates MagCache;
        it is called only when a MagCache setting is selected. The fixed control is built later,
        from AdaCache-fast's measured schedule (:meth:`fixed`)."""
        from diffusers.hooks import (FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                                     TaylorSeerCacheConfig)

        want = lambda name: not only or any(s in name for s in only)  # noqa: E731
        out = [self.baseline(), self.baseline(eager=True)]
        for name, setting, cfg, target in adacache_settings(steps):
            if want(name):
                out.append(self.adacache(name, "adacache", setting, cfg, calibration=target))
        peers = []   # (name, setting, make_config(clock), how a computed step shows)
        for thr in (0.05, 0.1, 0.2):
            peers.append((f"fbc-{thr}", f"threshold {thr}",
                          lambda clock, thr=thr: FirstBlockCacheConfig(threshold=thr), "should_compute"))
        for spatial, cross in ((2, 6), (3, 9)):
            peers.append((f"pab-{spatial}-{cross}", f"spatial skip {spatial}, cross skip {cross}, t in (100, 800)",
                          lambda clock, s=spatial, c=cross: PyramidAttentionBroadcastConfig(
                              spatial_attention_block_skip_range=s, cross_attention_block_skip_range=c,
                              current_timestep_callback=clock), None))
        for interval in (3, 5):
            peers.append((f"taylorseer-{interval}", f"interval {interval}, order 1, attn1/attn2/ffn of every block",
                          lambda clock, n=interval: TaylorSeerCacheConfig(cache_interval=n, max_order=1,
                                                                          cache_identifiers=TAYLORSEER_MODULES),
                          "taylorseer"))
        mag = [thr for thr in (0.06, 0.12, 0.24) if want(f"magcache-{thr}")]
        ratios = magcache_ratios(steps) if mag else None
        for thr in mag:
            peers.append((f"magcache-{thr}", f"threshold {thr}, K 3, retention 0.2, calibrated",
                          lambda clock, thr=thr: MagCacheConfig(threshold=thr, max_skip_steps=3, retention_ratio=0.2,
                                                                num_inference_steps=steps, mag_ratios=ratios),
                          "should_compute"))
        for name, setting, make, counts in peers:
            if want(name):
                out.append(self.diffusers_cache(name, setting, make, counts))
        # the best settings of each peer again under diffusers' regional compilation, as their users
        # would run them for speed (against the same plain torch.compile baseline as AdaCache)
        regional = not only or any("regional" in s for s in only)   # only when asked for (or everything)
        if regional:
            out.append(self.regional_baseline())
        for name, setting, make, counts in peers:
            if regional and name in REGIONAL_PEERS and want(name):
                out.append(self.diffusers_cache(name + "-regional", setting, make, counts, regional=True))
        return out

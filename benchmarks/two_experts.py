"""Two denoising experts (Wan 2.2 A14B's layout) on the shipped reference model.

The reference transformer's weights are loaded into two experts: the first runs the timesteps at or
above ``boundary_ratio * 1000`` (0.875, Wan 2.2 T2V's), the second the rest, in the reference
sampling loop (flow-matching Euler, classifier-free guidance batched). Methods, each on its own
copies of the weights, interleaved per prompt (the baseline first):

* ``baseline``: both experts plain ``torch.compile``, every step computed;
* ``adacache-{slow,fast}-2x``: both experts compiled into one backend (``compile_model(e2,
  backend=backend)``), each told its share of the steps (``backend.set_num_steps(n, model=e)``, what
  the diffusers integration does from the pipeline's ``boundary_ratio``): each expert its own
  schedule, its own first computed step after the switch, its own forced last steps;
* ``adacache-{slow,fast}-2x-share``: each expert its own backend told only its share, so a preset's
  codebook is taken at the share's length (9 of 30 steps) instead of the generation's;
* ``adacache-{slow,fast}-1x``: the same weights as one model over every step (what the switch costs:
  the second expert starts with an empty cache and computes its first two steps).

Per method: the median latency, the speedup (median over prompts of the baseline's time over the
method's, measured back to back), the computed steps of each expert numbered by the sampler's steps,
and PSNR against the baseline video of the same prompt and seed.

    python -m benchmarks.two_experts --steps 30 --prompts 8 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from adacache_fx import AdaCacheConfig, compile_model
from benchmarks.common import command_line, machine, machine_markdown, sync, write_results
from benchmarks.e2e.methods import entry_module
from benchmarks.e2e.protocol import CALIBRATION_PROMPT, PROMPTS
from examples.reference import CONFIG_FILE, load_reference_model, sample
from examples.reference.model import make_scheduler, sampling_settings
from examples.reference.quality import psnr

BOUNDARY_RATIO = 0.875


def shares(steps: int, boundary_ratio: float = BOUNDARY_RATIO) -> tuple:
    """How many of the sampler's timesteps each expert runs."""
    scheduler = make_scheduler(config=CONFIG_FILE)
    scheduler.set_timesteps(steps)
    high = int((scheduler.timesteps >= boundary_ratio * scheduler.config.num_train_timesteps).sum())
    return high, steps - high


class Method:
    """Two experts (or one model) behind one ``model_fn`` that switches at the boundary."""

    def __init__(self, name: str, transformer, config=None, experts: int = 2, inner: str = "inductor",
                 share_backends: bool = True):
        self.name, self.config, self.experts = name, config, experts
        models = [entry_module(copy.deepcopy(transformer), f"{name}-{i}") for i in range(experts)]
        self.models, self.backend, self.backends = models, None, []
        if config is None:
            self.calls = [torch.compile(m, backend=inner) for m in models]
        elif share_backends:
            for m in models:
                self.backend = compile_model(m, config if self.backend is None else None, inner=inner,
                                             backend=self.backend)
            self.calls = models
        else:   # a backend per expert, each told only its share of the steps
            self.backends = [compile_model(m, config, inner=inner) for m in models]
            self.calls = models
        self.boundary = BOUNDARY_RATIO * 1000.0

    def model_fn(self, hidden_states, timestep, **kwargs):
        expert = 0 if self.experts == 1 or float(timestep[0]) >= self.boundary else 1
        return self.calls[expert](hidden_states=hidden_states, timestep=timestep, **kwargs)

    def generation(self, steps: int):
        """Set up one generation: every schedule reset, each expert's share of the steps."""
        for backend, count in zip(self.backends, shares(steps)):
            backend.reset()
            backend.set_num_steps(count)
        if self.backend is None:
            return
        self.backend.reset()
        self.backend.set_num_steps(steps)
        if self.experts == 2:
            for model, count in zip(self.models, shares(steps)):
                self.backend.set_num_steps(count, model=model)

    def computed(self, steps: int) -> list:
        """Per expert, its computed steps numbered by the sampler's steps."""
        if self.backend is None and not self.backends:
            return [list(range(1, steps + 1))]
        offsets = [0, shares(steps)[0]] if self.experts == 2 else [0]
        backends = self.backends or [self.backend] * len(self.models)
        return [[offset + s for s in b.report(m).computed_steps] for b, m, offset in zip(backends, self.models, offsets)]


def run(a) -> dict:
    transformer, tokenizer = load_reference_model()
    guidance = float(sampling_settings().get("guidance_scale", 3.0))
    null = tokenizer([""])
    methods = [Method("baseline", transformer, inner=a.inner)]
    for preset in ("slow", "fast"):
        config = getattr(AdaCacheConfig, preset)(a.steps)
        methods += [Method(f"adacache-{preset}-2x", transformer, config, inner=a.inner),
                    Method(f"adacache-{preset}-2x-share", transformer, config, inner=a.inner, share_backends=False),
                    Method(f"adacache-{preset}-1x", transformer, config, experts=1, inner=a.inner)]
    rows = {m.name: {"seconds": [], "ratios": [], "psnr": [], "computed": []} for m in methods}
    prompts = PROMPTS[:: max(1, len(PROMPTS) // a.prompts)][: a.prompts]   # still to fast motion
    for seed, prompt in enumerate([CALIBRATION_PROMPT] + prompts, start=-1):
        embeds = tokenizer([prompt])
        videos = {}
        for method in methods:
            method.generation(a.steps)
            sync()
            start = time.perf_counter()
            videos[method.name] = sample(transformer, embeds, num_steps=a.steps, seed=max(seed, 0),
                                         guidance_scale=guidance, negative_prompt_embeds=null,
                                         model_fn=method.model_fn)
            sync()
            seconds = time.perf_counter() - start
            if seed < 0:   # the warm-up generation compiles every method: not measured
                continue
            row = rows[method.name]
            row["seconds"].append(seconds)
            row["ratios"].append(rows["baseline"]["seconds"][-1] / seconds)
            row["psnr"].append(psnr(videos[method.name], videos["baseline"]))
            row["computed"].append(method.computed(a.steps))
        if seed >= 0:
            print(f"{prompt}: " + ", ".join(f"{n} {r['ratios'][-1]:.2f}x {r['psnr'][-1]:.1f} dB" for n, r in rows.items()),
                  flush=True)
    return {"steps": a.steps, "prompts": prompts, "boundary_ratio": BOUNDARY_RATIO, "shares": shares(a.steps),
            "guidance": guidance, "inner": a.inner, "rows": rows}


def markdown(result: dict, info: dict, command: str) -> list:
    steps, (high, low) = result["steps"], result["shares"]
    lines = ["# Two denoising experts on the reference model", "", machine_markdown(info), "", f"Command: `{command}`", "",
             f"The shipped reference transformer's weights in two experts switched at boundary_ratio "
             f"{result['boundary_ratio']} (the first runs {high} of the {steps} steps, the second {low}), flow-matching "
             f"Euler, guidance {result['guidance']} batched, inner compiler `{result['inner']}`, {len(result['prompts'])} "
             "prompts spread from still to fast motion (seed = index), methods interleaved per prompt after one warm-up generation. Speedup: median over "
             "prompts of the baseline's time over the method's, measured back to back. Computed: the mean count per "
             "generation, and each expert's steps (numbered by the sampler's steps) for the first prompt.", "",
             "| method | latency (s) | speedup (min-max) | computed | PSNR mean / worst (dB) | first prompt's computed steps |",
             "|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        finite = [p for p in r["psnr"] if p != float("inf")]
        quality = (f"{statistics.mean(finite):.2f} / {min(finite):.2f}" if finite else "inf / inf")
        counts = [sum(len(c) for c in computed) for computed in r["computed"]]
        first = " + ".join(str(c) for c in r["computed"][0]) if r["computed"] else "-"
        lines.append(f"| {name} | {statistics.median(r['seconds']):.3f} | {statistics.median(r['ratios']):.2f}x "
                     f"({min(r['ratios']):.2f}-{max(r['ratios']):.2f}) | {statistics.mean(counts):.1f}/{steps} | "
                     f"{quality} | {first} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--inner", default="inductor")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    a = parser.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    result = run(a)
    info, command = machine(), command_line("benchmarks.two_experts", argv)
    result.update(machine=info, command=command)
    write_results(a.out, f"two_experts_{a.steps}", markdown(result, info, command), result)


if __name__ == "__main__":
    main()

"""What a generation did: the computed steps, the metric at each, and the cache's size."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RegionInfo:
    graph: int
    region: int
    blocks: list            # module paths of the region's blocks
    streams: list           # shape of each stream
    probe: Optional[str]    # the probe's block, if the probe is in this region


@dataclass
class Report:
    computed_steps: list            # 1-indexed steps of the last generation that ran the blocks
    num_steps: int                  # steps seen in the last generation
    metrics: list                   # [StepMetric], one per computed step that had a previous probe
    cache_bytes: int                # bytes the cache holds now (deltas + probes, all branches)
    regions: list = field(default_factory=list)          # [RegionInfo]
    uncached_graphs: list = field(default_factory=list)  # why graphs run uncached
    block_executions: int = 0       # how often region blocks ran, over the backend's life
    compile_seconds: float = 0.0    # time spent in the backend (analysis + inner compiles)
    cached_flops: int = 0           # FLOPs of one forward inside the cached regions
    total_flops: int = 0            # FLOPs of one forward, every graph (cached or not)
    sample_computed_steps: Optional[list] = None   # per_sample: the computed steps of each sample
    sample_metrics: Optional[list] = None          # per_sample: each sample's [StepMetric]
    model: Optional[str] = None     # which model of a pipeline (``summary``: its attribute)
    first_step: int = 1             # the pipeline step of this model's step 1 (an expert's share)
    forced_steps: int = 4           # steps computed whatever the metric: the first ones, the second, the last

    @property
    def pipeline_steps(self) -> list:
        """The computed steps numbered by the pipeline's steps (an expert's step 1 is the pipeline's
        ``first_step``)."""
        return [self.first_step - 1 + s for s in self.computed_steps]

    @property
    def nothing_to_skip(self) -> bool:
        """Whether this step count leaves no step that could be skipped (steps 1, 2 and the forced
        last steps cover them all: at 4 steps, with the defaults)."""
        return 0 < self.num_steps <= self.forced_steps

    @property
    def cached_flops_fraction(self) -> float:
        """Share of one forward's FLOPs inside the cached regions: what a reused step can skip."""
        return self.cached_flops / self.total_flops if self.total_flops else 0.0

    @property
    def computed_fraction(self) -> float:
        return len(self.computed_steps) / self.num_steps if self.num_steps else 0.0

    def __str__(self) -> str:
        lines = [f"AdaCache report{' of ' + self.model if self.model else ''}: {len(self.computed_steps)}/"
                 f"{self.num_steps} steps computed ({self.computed_fraction:.0%}), cache "
                 f"{self.cache_bytes / 2**20:.2f} MiB, {self.cached_flops_fraction:.0%} of a forward's FLOPs in "
                 "cached regions"]
        lines.append(f"computed steps: {self.computed_steps}" + (
            f" (pipeline steps {self.first_step}-{self.first_step + self.num_steps - 1}: {self.pipeline_steps})"
            if self.first_step != 1 or self.model else ""))
        if self.nothing_to_skip:
            lines.append(f"nothing to skip: at {self.num_steps} steps the forced steps (the first, the second "
                         "and the last) are every step; caching costs its overhead only")
        for i, steps in enumerate(self.sample_computed_steps or []):
            lines.append(f"computed steps per sample: sample {i}: {len(steps)}/{self.num_steps} {steps}")
        for info in self.regions:
            span = info.blocks[0] if len(info.blocks) == 1 else f"{info.blocks[0]} .. {info.blocks[-1]}"
            lines.append(f"region {info.graph}.{info.region}: {len(info.blocks)} blocks ({span}), "
                         f"streams {info.streams}" + (f", probe {info.probe}" if info.probe else ""))
        if self.metrics:
            lines.append(f"{'step':>5} {'distance':>9} {'motion':>8} {'reg.dist':>9} {'rate':>5} {'next':>5}")
            for m in self.metrics:
                motion = f"{m.motion:8.4f}" if m.motion is not None else f"{'-':>8}"
                lines.append(f"{m.step:>5} {m.distance:9.4f} {motion} {m.reg_distance:9.4f} {m.rate:>5} {m.next_step:>5}")
        for reason in self.uncached_graphs:
            lines.append(f"uncached graph: {reason}")
        return "\n".join(lines)

"""AdaCacheConfig: every knob of AdaCache + MoReg, with the paper's defaults.

Reference: Kahatapitiya et al., "Adaptive Caching for Faster Video Generation with
Diffusion Transformers", arXiv 2411.02397 (https://arxiv.org/abs/2411.02397).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields
from typing import Optional, Union

from .errors import AdaCacheConfigError  # noqa: F401 - raised by the config's users; importable here

# Official codebooks ({distance threshold: cache rate}), from the public AdaCache code.
CODEBOOK_30_FAST = {0.08: 6, 0.16: 5, 0.24: 4, 0.32: 3, 0.40: 2, 1.00: 1}
CODEBOOK_30_SLOW = {0.08: 3, 0.16: 2, 0.24: 1, 0.32: 1, 0.40: 1, 1.00: 1}
CODEBOOK_100 = {0.03: 12, 0.05: 10, 0.07: 8, 0.09: 6, 0.11: 4, 1.00: 3}
# Official MoReg windows (1-indexed steps, inclusive).
MOREG_WINDOWS = {30: (4, 26), 100: (10, 90)}
# Metadata of the fields read while the graphs are analysed and rewritten: ``set_config`` cannot
# change them (``AdaCacheBackend.set_config`` derives its check from it).
SHAPES_GRAPHS = {"shapes_graphs": True}


def scale_codebook(codebook: dict, from_steps: int, to_steps: int) -> dict:
    """The documented rule for step counts without an official codebook.

    The distance is normalised per step (divided by the steps since the last
    computed one), and per-step changes shrink roughly as 1/N, so thresholds scale by
    ``from_steps / to_steps`` while cache rates (in steps) scale by
    ``to_steps / from_steps`` (rounded, at least 1).
    """
    ratio = to_steps / from_steps
    return {thr / ratio: max(1, int(round(rate * ratio))) for thr, rate in codebook.items()}


def preset_codebook(speed: str, num_steps: int) -> dict:
    """Codebook for ``speed`` in {"fast", "slow"} at ``num_steps``.

    30 steps: the official fast/slow codebooks. 100 steps, fast: the official
    100-step codebook. Any other count: the nearer reference (30 or 100 steps, on a log
    scale, split at 55 steps; slow always scales from 30) scaled by ``scale_codebook``.
    """
    if speed not in ("fast", "slow"):
        raise ValueError(f"speed must be 'fast' or 'slow', got {speed!r}")
    if speed == "fast":
        if num_steps == 30:
            return dict(CODEBOOK_30_FAST)
        if num_steps == 100:
            return dict(CODEBOOK_100)
        if num_steps >= 55:
            return scale_codebook(CODEBOOK_100, 100, num_steps)
        return scale_codebook(CODEBOOK_30_FAST, 30, num_steps)
    if num_steps == 30:
        return dict(CODEBOOK_30_SLOW)
    return scale_codebook(CODEBOOK_30_SLOW, 30, num_steps)


def default_moreg_window(num_steps: int) -> tuple[int, int]:
    """Official windows at 30 and 100 steps; otherwise the middle 80% of the steps."""
    if num_steps in MOREG_WINDOWS:
        return MOREG_WINDOWS[num_steps]
    return (max(1, round(0.1 * num_steps)), max(1, round(0.9 * num_steps)))


@dataclass(frozen=True)
class AdaCacheConfig:
    """Configuration of the AdaCache backend.

    Attributes:
        codebook: ``{distance threshold: cache rate}``, thresholds ascending. The rate
            of the first threshold with ``distance < threshold`` is taken, else the
            last rate. ``{float('inf'): 1}`` computes every step (caching off).
            Default: the official 30-step slow codebook.
        num_steps: steps per generation, if known. Enables the forced last two steps
            and the default MoReg window; required when the model has no timestep input.
        moreg: apply motion regularisation (MoReg) when a frame axis is found.
        moreg_window: 1-indexed inclusive steps where MoReg scales the distance.
            ``None``: the official window for ``num_steps`` (4..26 of 30, 10..90 of
            100, else 10%..90%); with ``num_steps`` unknown, every step.
        moreg_stride: frame stride of the motion score (official: 1).
        moreg_normalizer, moreg_power, moreg_divisor: ``m' = ((m / normalizer) ** power) / divisor``
            (official: 0.385, 8, 1).
        moreg_gradient_scale: ``mg = scale * (m' - m'_prev) / k`` (official: 10).
        probe_block: which block's residual is the probe: an index into the blocks of
            the cached region with the most blocks, in graph order (negative counts from the end), or a
            module path such as ``"transformer_blocks.13"``. ``None``: the middle block.
        probe_branch: which residual branch of that block (0: the first, usually
            self-attention).
        timestep_arg: name of the forward argument that carries the timestep, when it
            cannot be found from the graph. ``None``: found automatically.
        video_frame_dim: the frame dimension of the 5-D video input. ``None``:
            inferred from the graph (dim 2 for ``(B, C, F, H, W)``, dim 1 for
            ``(B, F, C, H, W)``).
        frames_arg: for video whose tokens reach the blocks' graph packed, ``(B, F*H*W, C)``
            frame-major, the name of the forward argument that gives the frame count ``F``: a
            Python int (LTX-Video: ``"num_frames"``), or the 5-D video itself (its frame dim,
            ``video_frame_dim`` or 2: HunyuanVideo 1.5, whose graph breaks before the blocks, with
            ``"hidden_states"``; only for a temporal patch of 1). It is read from each call's
            arguments by :func:`adacache_fx.compile_model` (and ``explain``), so MoReg gets the
            frame axis. ``None``: only 5-D video inputs give a frame layout.
        packed_frames: the frame count of packed video tokens when no argument carries it (the
            Sana-WM refiner: implicit in its precomputed rotary table), fixed for the backend.
        process_group: where the metric's partial sums are all-reduced so that every
            rank takes the same decision: ``"auto"`` (the group of the model's own
            collectives in the traced graph, i.e. its sequence-parallel group, else the
            world, when torch.distributed is initialised with several ranks), ``"world"``,
            an explicit ``ProcessGroup``, or None (no collective).
        reuse: what a reused step adds to each stream's input. ``"constant"`` (the paper's
            code): the delta of the last computed step. ``"linear"`` (default: it wins on the
            benchmark, ``benchmarks/results/e2e.md``): that delta extrapolated to the current
            step, first order in the sampler's own variable (the timestep the scheduler reads;
            the step index for a model without one), from the deltas of the last two computed
            steps: ``d1 + r (d1 - d0)`` with ``r = (t - t1) / (t1 - t0)``. ``"damped"``: the same
            with the extrapolation scaled by ``reuse_damping`` (a blend of constant and linear
            reuse). Forecasting keeps one more tensor per stream and guidance branch.
        reuse_damping: the share of the linear extrapolation that ``"damped"`` adds (0: constant,
            1: linear).
        policy: the decision rule, by its registered name (``runtime/policies/``): ``"adacache"``
            (default: the codebook on the probe's distance, raised by MoReg).
        per_sample: a schedule per sample of the batch (each sample its own distance, motion
            score, rate and next computed step), and on a step where only some samples compute,
            the blocks run on those samples' rows alone. Needs a graph traced with a dynamic
            batch size for the sub-batches (:func:`adacache_fx.compile_model` marks it; with
            ``torch.compile``: ``dynamic=True``); with a static batch every row computes when any
            sample does. Default False: one schedule for the batch, as every other cache decides.
        guidance_in_batch: how many guidance copies of the samples the batch holds, concatenated
            on dim 0 (diffusers' classifier-free guidance ``[uncond, cond]``: 2); the rows of one
            sample stay together. Guidance as separate calls: 1 (the calls are branches).
        compile_blocks: how a region's computed step is compiled. ``"once"``: cut into one
            subgraph per block, the inner compiler run once per distinct block graph and its code
            called for every block with that block's weights (``compile/compile_blocks.py``;
            diffusers' ``compile_repeated_blocks``, found from the graph): the first call's compile
            time no longer grows with the depth; what is not a block then runs as traced,
            uncompiled, and ``compile_model`` has Dynamo trace one block for all
            (``block_regions.py``). ``"whole"``: the region as one graph (the inner compiler may
            fuse across blocks; no call per block). ``"auto"`` (default): ``"once"`` when at least
            ``COMPILE_ONCE_MIN_BLOCKS`` (8) blocks share one graph, else ``"whole"`` (measured on
            a CPU at the Wan 1.3B size and on a 6 + 6 block STDiT of width 192, where once saved
            nothing and cost -1% to +7% per generation, measured before once left the rest
            uncompiled: ``benchmarks/results/compile_time.md``, ``overhead.md``).
        first_computed_steps: steps always computed at the start (official: 1).
        last_computed_steps: steps always computed at the end when ``num_steps`` is
            known (official: 2).
        preset: ``"fast"`` / ``"slow"`` when the codebook is that official preset (set by
            :meth:`fast` / :meth:`slow`): a generation of another step count (the pipeline's
            ``num_inference_steps``, ``backend.set_num_steps``) uses the preset at its own count
            (:meth:`codebook_for`). ``None`` (an explicit codebook, a calibrated one): the codebook
            as given, at every step count. A codebook that is not the preset's at ``num_steps``
            (``dataclasses.replace`` of a preset with another codebook or step count) clears it.
        fitted_steps: the step count a calibrated codebook was fitted at (set by
            :func:`adacache_fx.calibrate`): a generation of another step count warns, with both.
    """

    codebook: dict = field(default_factory=lambda: dict(CODEBOOK_30_SLOW))
    num_steps: Optional[int] = None
    moreg: bool = True
    moreg_window: Optional[tuple] = None
    moreg_stride: int = field(default=1, metadata=SHAPES_GRAPHS)
    moreg_normalizer: float = 0.385
    moreg_power: float = 8.0
    moreg_divisor: float = 1.0
    moreg_gradient_scale: float = 10.0
    probe_block: Optional[Union[int, str]] = field(default=None, metadata=SHAPES_GRAPHS)
    probe_branch: int = field(default=0, metadata=SHAPES_GRAPHS)
    timestep_arg: Optional[str] = field(default=None, metadata=SHAPES_GRAPHS)
    video_frame_dim: Optional[int] = field(default=None, metadata=SHAPES_GRAPHS)
    frames_arg: Optional[str] = field(default=None, metadata=SHAPES_GRAPHS)
    packed_frames: Optional[int] = field(default=None, metadata=SHAPES_GRAPHS)
    process_group: object = field(default="auto", metadata=SHAPES_GRAPHS)
    reuse: str = "linear"
    reuse_damping: float = 0.5
    policy: str = "adacache"
    per_sample: bool = field(default=False, metadata=SHAPES_GRAPHS)
    guidance_in_batch: int = field(default=1, metadata=SHAPES_GRAPHS)
    compile_blocks: str = field(default="auto", metadata=SHAPES_GRAPHS)
    first_computed_steps: int = 1
    last_computed_steps: int = 2
    preset: Optional[str] = None
    fitted_steps: Optional[int] = None

    def __post_init__(self):
        if self.preset not in (None, "fast", "slow"):
            raise ValueError(f"preset must be 'fast', 'slow' or None, got {self.preset!r}")
        if self.fitted_steps is not None and (not isinstance(self.fitted_steps, int) or isinstance(self.fitted_steps, bool)
                                              or self.fitted_steps < 1):
            raise ValueError(f"fitted_steps must be a positive integer or None, got {self.fitted_steps!r}")
        if not isinstance(self.codebook, dict) or not self.codebook:
            raise ValueError(f"codebook must be a non-empty dict {{threshold: rate}}, got {self.codebook!r}")
        thresholds = list(self.codebook.keys())
        for thr in thresholds:
            if not isinstance(thr, (int, float)) or isinstance(thr, bool) or math.isnan(thr) or thr <= 0:
                raise ValueError(f"codebook thresholds must be positive numbers, got {thr!r}")
        if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
            raise ValueError(f"codebook thresholds must be strictly ascending, got {thresholds}")
        for rate in self.codebook.values():
            if not isinstance(rate, int) or isinstance(rate, bool) or rate < 1:
                raise ValueError(f"codebook rates must be positive integers, got {rate!r}")
        _set(self, "codebook", {float(k): int(v) for k, v in self.codebook.items()})
        if self.num_steps is not None and (not isinstance(self.num_steps, int) or isinstance(self.num_steps, bool) or self.num_steps < 1):
            raise ValueError(f"num_steps must be a positive integer or None, got {self.num_steps!r}")
        if self.preset is not None and (self.num_steps is None
                                        or self.codebook != preset_codebook(self.preset, self.num_steps)):
            _set(self, "preset", None)   # not the preset's codebook (replaced): literal from now on
        if self.moreg_window is not None:
            w = tuple(self.moreg_window)
            if len(w) != 2 or not all(isinstance(s, int) for s in w) or w[0] < 1 or w[1] < w[0]:
                raise ValueError(f"moreg_window must be (first, last) 1-indexed steps with first <= last, got {self.moreg_window!r}")
            if self.num_steps is not None and w[1] > self.num_steps:
                raise ValueError(f"moreg_window {w} must lie inside the {self.num_steps} steps")
            _set(self, "moreg_window", w)
        if self.compile_blocks not in ("auto", "once", "whole"):
            raise ValueError(f"compile_blocks must be 'auto', 'once' or 'whole', got {self.compile_blocks!r}")
        if not isinstance(self.moreg_stride, int) or self.moreg_stride < 1:
            raise ValueError(f"moreg_stride must be a positive integer, got {self.moreg_stride!r}")
        for name in ("moreg_normalizer", "moreg_divisor"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0 or math.isinf(v):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        for name in ("moreg_power", "moreg_gradient_scale"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a non-negative finite number, got {v!r}")
        if self.probe_block is not None and not isinstance(self.probe_block, (int, str)):
            raise ValueError(f"probe_block must be a block index, a module path or None, got {self.probe_block!r}")
        if not isinstance(self.probe_branch, int) or self.probe_branch < 0:
            raise ValueError(f"probe_branch must be a non-negative integer, got {self.probe_branch!r}")
        if self.timestep_arg is not None and not isinstance(self.timestep_arg, str):
            raise ValueError(f"timestep_arg must be an argument name or None, got {self.timestep_arg!r}")
        if self.video_frame_dim is not None and self.video_frame_dim not in (1, 2, -3, -4):
            raise ValueError(f"video_frame_dim must be 1 or 2 (dim of a 5-D video input), got {self.video_frame_dim!r}")
        if self.frames_arg is not None and (not isinstance(self.frames_arg, str) or not self.frames_arg):
            raise ValueError(f"frames_arg must be an argument name or None, got {self.frames_arg!r}")
        if self.packed_frames is not None and (isinstance(self.packed_frames, bool) or not isinstance(
                self.packed_frames, int) or self.packed_frames < 2):
            raise ValueError(f"packed_frames must be an int >= 2 (a video's latent frame count) or None, got "
                             f"{self.packed_frames!r}")
        if self.packed_frames is not None and self.frames_arg is not None:
            raise ValueError("packed_frames and frames_arg both give the frame count of packed video tokens: set one")
        from .runtime.forecasters import registered_forecasters   # the registries: built-ins and the user's
        from .runtime.policies import registered_policies
        if self.reuse not in registered_forecasters():
            raise ValueError(f"reuse must be one of {registered_forecasters()} (registered forecasters), got {self.reuse!r}")
        if self.policy not in registered_policies():
            raise ValueError(f"policy must be one of {registered_policies()} (registered policies), got {self.policy!r}")
        if not isinstance(self.reuse_damping, (int, float)) or isinstance(self.reuse_damping, bool) \
                or not 0.0 <= self.reuse_damping <= 1.0:
            raise ValueError(f"reuse_damping must be a number in [0, 1], got {self.reuse_damping!r}")
        if not isinstance(self.per_sample, bool):
            raise ValueError(f"per_sample must be True or False, got {self.per_sample!r}")
        if isinstance(self.guidance_in_batch, bool) or not isinstance(self.guidance_in_batch, int) \
                or self.guidance_in_batch < 1:
            raise ValueError(f"guidance_in_batch must be a positive integer (2 for a batched [uncond, cond]), got "
                             f"{self.guidance_in_batch!r}")
        for name in ("first_computed_steps", "last_computed_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if self.first_computed_steps < 1:
            raise ValueError("first_computed_steps must be at least 1: the first step fills the cache")

    # ----- JSON ----------------------------------------------------------------
    def to_dict(self) -> dict:
        """The config as JSON-ready values (an infinite threshold becomes ``"inf"``)."""
        if not (self.process_group is None or isinstance(self.process_group, str)):
            raise ValueError("process_group: an explicit ProcessGroup cannot be saved; save 'auto' or 'world'")
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["codebook"] = [["inf" if math.isinf(thr) else thr, rate] for thr, rate in self.codebook.items()]
        out["moreg_window"] = list(self.moreg_window) if self.moreg_window is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "AdaCacheConfig":
        """The inverse of :meth:`to_dict` (validated as any config is)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AdaCacheConfig fields {unknown}")
        values = dict(data)
        if "codebook" in values:
            values["codebook"] = {math.inf if thr == "inf" else thr: rate for thr, rate in values["codebook"]}
        if values.get("moreg_window") is not None:
            values["moreg_window"] = tuple(values["moreg_window"])
        return cls(**values)

    # ----- presets -------------------------------------------------------------
    @classmethod
    def fast(cls, num_steps: int = 30, **overrides) -> "AdaCacheConfig":
        """AdaCache-fast: the official fast codebook, at ``num_steps`` and at the step count of each
        generation that says its own (see ``preset_codebook``, ``preset``)."""
        return cls._preset("fast", num_steps, overrides)

    @classmethod
    def slow(cls, num_steps: int = 30, **overrides) -> "AdaCacheConfig":
        """AdaCache-slow: the official slow codebook, at ``num_steps`` and at the step count of each
        generation that says its own (see ``preset_codebook``, ``preset``)."""
        return cls._preset("slow", num_steps, overrides)

    @classmethod
    def _preset(cls, speed: str, num_steps: int, overrides: dict) -> "AdaCacheConfig":
        # an explicit codebook in ``overrides`` is not the preset's: __post_init__ clears ``preset``
        return cls(**{"codebook": preset_codebook(speed, _check_steps(num_steps)), "num_steps": num_steps,
                      "preset": speed, **overrides})

    def codebook_for(self, num_steps: Optional[int]) -> dict:
        """The codebook in force for a generation of ``num_steps``: the preset at that count when
        the config is a preset (``fast`` / ``slow``), else the codebook as given."""
        if self.preset is None or num_steps is None or num_steps == self.num_steps:
            return self.codebook
        return _preset_codebook_cached(self.preset, num_steps)

    @classmethod
    def no_cache(cls, num_steps: Optional[int] = None, **overrides) -> "AdaCacheConfig":
        """Every step computed: the output equals the uncached model."""
        return cls(codebook={math.inf: 1}, num_steps=num_steps, **overrides)

    @classmethod
    def graph_fields(cls) -> tuple:
        """The fields read while the graphs are analysed and rewritten (``set_config`` keeps them)."""
        return tuple(f.name for f in fields(cls) if f.metadata.get("shapes_graphs"))

    def window_for(self, num_steps: Optional[int]) -> Optional[tuple]:
        """The MoReg window in force for a generation of ``num_steps`` (None: every step)."""
        if self.moreg_window is not None:
            return self.moreg_window
        if num_steps is None:
            return None
        return default_moreg_window(num_steps)


def _set(config: "AdaCacheConfig", name: str, value) -> None:
    """A field's normalised value, set while the frozen config validates itself."""
    object.__setattr__(config, name, value)


@functools.lru_cache(maxsize=64)
def _preset_codebook_cached(speed: str, num_steps: int) -> dict:
    return preset_codebook(speed, num_steps)


def _check_steps(num_steps) -> int:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    return num_steps

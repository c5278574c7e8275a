"""``calibrate``: fit AdaCache's schedule to the user's own model from a few of its generations.

The official codebooks and MoReg's normaliser (0.385) were tuned on Open-Sora. On another model
the distances sit elsewhere, so a preset computes more or fewer steps than its name promises, and
MoReg can lower the compute of every video whose motion score sits below 0.385. Calibration:

1. runs ``runs`` uncached generations (``sample(i)``), recording the metric between every step's
   probe and the probes of the ``max_gap`` steps before it (``record.TrajectoryRecorder``);
2. sets MoReg's normaliser to the model's typical motion score (``fit.typical_motion``) and its
   power so that the runs' spread of motion raises the distance at most ``MOREG_SPREAD`` times
   (``fit.moreg_power``);
3. predicts, for every scale of the base codebook's thresholds and every cap on its rates, the
   schedule the backend's own scheduler would take on those trajectories (``fit.candidates``);
4. picks the candidate that meets the target, checked by running the cached generations themselves:
   a computed-step fraction (at most that much compute), a mean PSNR against the uncached outputs
   (at least that many dB) or a mean MS-GMSD against them (at most that much; perceptual, see
   ``quality``), the last two searched by bisection over the predicted schedules;
5. optionally (``forced_steps``), tries other steps always computed at the start and the end
   (``"auto"``: warm-ups of 10-20% of the steps with 0 or 1 forced last steps,
   ``fit.forced_step_splits``): each split's candidate with at most the chosen one's predicted compute
   is run, and the best measured one is kept (within a compute target: the best quality; for a
   quality target: the least compute, the winning split then bisected further down). Off by
   default: on the reference model it won on the calibration prompts and lost on held-out ones
   (``docs/calibration.md``); with a handful of runs the best of several splits is partly noise.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..config import AdaCacheConfig
from .fit import MOREG_SPREAD, Candidate, candidates, forced_step_splits, moreg_power, simulate, typical_motion
from .measure import as_images, output_ms_gmsd
from .quality import MIN_SIDE
from .record import Trajectory, TrajectoryRecorder


@dataclass
class CalibrationResult:
    """What ``calibrate`` measured and chose. ``config`` is the calibrated config."""

    config: AdaCacheConfig
    target: dict                     # {"computed_fraction": f}, {"min_psnr": dB} or {"max_ms_gmsd": d}
    met: bool                        # the measured result meets the target
    threshold_scale: float           # the base codebook's thresholds were multiplied by this
    max_rate: int                    # and its rates capped at this
    moreg_normalizer: Optional[float]   # the calibrated normaliser (None: MoReg off or no frames)
    moreg_power: Optional[float]        # the calibrated power (None: MoReg off or no frames)
    predicted_computed_fraction: float
    measured: dict                   # of the chosen config: computed_fraction, psnr_mean, psnr_worst, psnr,
    #                                  ms_gmsd_mean, ms_gmsd_worst, ms_gmsd (None: outputs not images)
    evaluations: list = field(default_factory=list)   # every config run: scale, predicted, measured
    trajectories: list = field(default_factory=list)  # [Trajectory] of the uncached runs

    def summary(self) -> str:
        m = self.measured
        lines = [f"calibrated for {self.target}: {'met' if self.met else 'NOT met'}",
                 f"  thresholds x{self.threshold_scale:.3f}, rates capped at {self.max_rate}: {self.config.codebook}",
                 f"  always computed: the first {self.config.first_computed_steps} step(s), the last "
                 f"{self.config.last_computed_steps}",
                 "  MoReg normaliser, power: " + (f"{self.moreg_normalizer:.4f}, {self.moreg_power:.3f}"
                                                   if self.moreg_normalizer is not None else "unchanged"),
                 f"  computed fraction: predicted {self.predicted_computed_fraction:.3f}, "
                 f"measured {m['computed_fraction']:.3f}",
                 f"  PSNR vs uncached: mean {m['psnr_mean']:.2f} dB, worst {m['psnr_worst']:.2f} dB "
                 f"({len(m['psnr'])} runs)",
                 "  MS-GMSD vs uncached: " + (f"mean {m['ms_gmsd_mean']:.4f}, worst {m['ms_gmsd_worst']:.4f}"
                                              if m.get("ms_gmsd_mean") is not None else "not measured")]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "target": self.target, "met": self.met,
                "threshold_scale": self.threshold_scale, "max_rate": self.max_rate,
                "moreg_normalizer": self.moreg_normalizer,
                "moreg_power": self.moreg_power,
                "predicted_computed_fraction": self.predicted_computed_fraction,
                "measured": _json_floats(self.measured), "evaluations": _json_floats(self.evaluations),
                "trajectories": [t.to_dict() for t in self.trajectories]}

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "CalibrationResult":
        d = json.loads(Path(path).read_text())
        return cls(config=AdaCacheConfig.from_dict(d["config"]), target=d["target"], met=d["met"],
                   threshold_scale=d["threshold_scale"], max_rate=d["max_rate"], moreg_normalizer=d["moreg_normalizer"],
                   moreg_power=d["moreg_power"],
                   predicted_computed_fraction=d["predicted_computed_fraction"],
                   measured=_py_floats(d["measured"]), evaluations=_py_floats(d["evaluations"]),
                   trajectories=[Trajectory.from_dict(t) for t in d["trajectories"]])


def calibrate(sample: Callable[[int], object], backend, *, runs: int = 4,
              computed_fraction: Optional[float] = None, min_psnr: Optional[float] = None,
              max_ms_gmsd: Optional[float] = None, base: Optional[AdaCacheConfig] = None,
              data_range: Optional[float] = None, max_checks: int = 8,
              forced_steps: Union[str, Sequence, None] = None, apply: bool = True,
              progress: Union[bool, Callable[[str], None]] = True) -> CalibrationResult:
    """Calibrate ``backend`` (an ``AdaCacheBackend`` the model is compiled with) on ``runs``
    generations ``sample(0) .. sample(runs - 1)``.

    ``sample(i)`` runs the user's own generation ``i`` (its prompt and seed) with the compiled
    model and returns the output: a tensor, a tuple/list whose first item is one, or a diffusers
    output with ``.frames`` or ``.images``. Exactly one target: ``computed_fraction`` (at most that
    share of steps computed, in (0, 1]), ``min_psnr`` (mean PSNR in dB against the uncached output
    of the same run, over ``data_range``: default each reference's max - min) or ``max_ms_gmsd``
    (mean MS-GMSD against it, ``quality.ms_gmsd``: lower = closer; the outputs must read as images
    of at least 17x17, ``measure.as_images``; shifted by the reference's minimum and measured over
    ``data_range``). MS-GMSD is measured and recorded whatever the target. ``base``: the config
    whose codebook shape (rates), reuse and MoReg settings are kept (default: the backend's).
    ``max_checks``: at most that many cached evaluations (``runs`` generations each) to meet the
    target, plus one per other forced-step split and, for a quality target, up to ``max_checks``
    more in the winning split. ``forced_steps``: the ``(first_computed_steps, last_computed_steps)``
    pairs tried besides the base's: None (default: only the base's), ``"auto"``
    (``fit.forced_step_splits``) or a list of pairs; each costs one more evaluation. ``apply``:
    leave the backend on the calibrated config (else on the one it had)."""
    _check_target(computed_fraction, min_psnr, max_ms_gmsd)
    if not isinstance(runs, int) or isinstance(runs, bool) or runs < 1:
        raise ValueError(f"runs must be a positive integer, got {runs!r}")
    if not isinstance(max_checks, int) or max_checks < 1:
        raise ValueError(f"max_checks must be a positive integer, got {max_checks!r}")
    if data_range is not None and not (isinstance(data_range, (int, float)) and data_range > 0):
        raise ValueError(f"data_range must be a positive number or None, got {data_range!r}")
    _check_forced_steps(forced_steps)
    log = progress if callable(progress) else ((lambda msg: print(f"adacache calibrate: {msg}", file=sys.stderr))
                                               if progress else (lambda msg: None))
    base = base if base is not None else backend.config
    original = backend.config
    try:
        references, trajectories = _record(sample, backend, base, runs, log)
        not_images = [r for r in references if as_images(r) is None] if max_ms_gmsd is not None else []
        if not_images:   # the target cannot be measured: say so before any cached run
            raise ValueError(f"calibrate: max_ms_gmsd needs outputs that are images or videos of at least "
                             f"{MIN_SIDE}x{MIN_SIDE} pixels; sample(i) returned shape {tuple(not_images[0].shape)} "
                             "(return the decoded frames, or use min_psnr)")
        normalizer = typical_motion(base, trajectories) if base.moreg else None
        power = moreg_power(base, trajectories) if normalizer else None
        family = replace(base, moreg_normalizer=normalizer, moreg_power=power) if normalizer else base
        if normalizer is not None:
            log(f"MoReg normaliser {normalizer:.4f} (the runs' median motion score; was {base.moreg_normalizer}), "
                f"power {power:.3f} (the runs' motion spread mapped to {MOREG_SPREAD}x; was {base.moreg_power})")
        options = candidates(family, trajectories)
        evaluate = _Evaluator(sample, backend, family, references, data_range, log)
        # the step count it was fitted at (a generation of another count warns)
        fitted = max(set(t.num_steps for t in trajectories), key=[t.num_steps for t in trajectories].count)
        if computed_fraction is not None:
            goal = _Goal(lambda m: m["computed_fraction"] <= computed_fraction + 1e-9, "psnr_mean", True)
            chosen, met = _meet_fraction(options, computed_fraction, evaluate, max_checks)
            target = {"computed_fraction": computed_fraction}
        elif min_psnr is not None:
            goal = _Goal(lambda m: m["psnr_mean"] >= min_psnr, "psnr_mean", False)
            chosen, met = _meet_quality(options, goal.meets, evaluate, max_checks)
            target = {"min_psnr": min_psnr}
        else:
            goal = _Goal(lambda m: m["ms_gmsd_mean"] <= max_ms_gmsd, "ms_gmsd_mean", False, higher_is_better=False)
            chosen, met = _meet_quality(options, goal.meets, evaluate, max_checks)
            target = {"max_ms_gmsd": max_ms_gmsd}
        splits = (forced_step_splits(family, fitted) if forced_steps == "auto"
                  else [(family.first_computed_steps, family.last_computed_steps)] + list(forced_steps or []))
        if len(splits) > 1:
            chosen, met = _search_forced_steps(family, trajectories, splits, chosen, met, goal, evaluate,
                                               max_checks, log)
        config = chosen.config(family, fitted_steps=fitted)
        result = CalibrationResult(
            config=config, target=target, met=met, threshold_scale=chosen.scale, max_rate=chosen.max_rate,
            moreg_normalizer=normalizer,
            moreg_power=power,
            predicted_computed_fraction=chosen.predicted, measured=evaluate.results[chosen],
            evaluations=[{"scale": c.scale, "max_rate": c.max_rate, "first_computed_steps": c.first,
                          "last_computed_steps": c.last, **m} for c, m in evaluate.results.items()],
            trajectories=trajectories)
        log(result.summary())
        backend.set_config(config if apply else original)
        return result
    except BaseException:
        backend.runtime.recorder = None
        backend.set_config(original)
        raise


# ----- the steps -------------------------------------------------------------------------------
def _record(sample, backend, base: AdaCacheConfig, runs: int, log) -> tuple:
    recorder = TrajectoryRecorder(max(base.codebook.values()))
    backend.set_config(replace(base, codebook={math.inf: 1}))
    backend.runtime.recorder = recorder
    references = []
    try:
        for i in range(runs):
            backend.reset()
            recorder.start_run()
            references.append(_output(sample(i)).detach().clone())
            recorder.finish_run()
            log(f"uncached run {i + 1}/{runs}: {recorder.runs[-1].num_steps} steps recorded")
    finally:
        backend.runtime.recorder = None
    for i, t in enumerate(recorder.runs):
        if t.num_steps < 3 or not t.sums:
            raise RuntimeError(
                f"calibrate: run {i} recorded {t.num_steps} steps with a probe; the backend caches nothing in "
                f"this model (see backend.report().uncached_graphs) or sample(i) does not call the compiled model")
    return references, recorder.runs


class _Evaluator:
    """Runs the cached generations of one candidate, once (results kept per candidate)."""

    def __init__(self, sample, backend, family, references, data_range, log):
        self.sample, self.backend, self.family = sample, backend, family
        self.references, self.data_range, self.log = references, data_range, log
        self.results: dict = {}

    def __call__(self, c) -> dict:
        if c not in self.results:
            self.backend.set_config(c.config(self.family))
            psnrs, fractions, distances = [], [], []
            for i, ref in enumerate(self.references):
                self.backend.reset()
                out = _output(self.sample(i))
                report = self.backend.report()
                fractions.append(len(report.computed_steps) / max(report.num_steps, 1))
                psnrs.append(_psnr(out, ref, self.data_range))
                distances.append(output_ms_gmsd(out, ref, self.data_range))
            all_images = None not in distances   # else the outputs are not images (as_images)
            self.results[c] = {"predicted_computed_fraction": c.predicted,
                               "computed_fraction": statistics.mean(fractions),
                               "psnr_mean": _mean_db(psnrs), "psnr_worst": min(psnrs), "psnr": psnrs,
                               "ms_gmsd_mean": statistics.mean(distances) if all_images else None,
                               "ms_gmsd_worst": max(distances) if all_images else None, "ms_gmsd": distances}
            m = self.results[c]
            self.log(f"thresholds x{c.scale:.3f}, rates <= {c.max_rate}, first {c.first} / last {c.last} "
                     f"always computed: computed {m['computed_fraction']:.3f} "
                     f"(predicted {c.predicted:.3f}), PSNR mean {m['psnr_mean']:.2f} dB, worst {m['psnr_worst']:.2f} dB"
                     + (f", MS-GMSD mean {m['ms_gmsd_mean']:.4f}" if all_images else ""))
        return self.results[c]


def _meet_fraction(options: list, target: float, evaluate, max_checks: int) -> tuple:
    """The most compute whose measured fraction is at most ``target``: the first prediction
    within it, then less compute while the measurement exceeds it (caching perturbs the probes)."""
    within = [o for o in options if o.predicted <= target + 1e-9]
    if not within:
        last = options[-1]
        return last, evaluate(last)["computed_fraction"] <= target + 1e-9
    for option in within[:max_checks]:
        if evaluate(option)["computed_fraction"] <= target + 1e-9:
            return option, True
    return option, False


def _meet_quality(options: list, meets: Callable[[dict], bool], evaluate, max_checks: int) -> tuple:
    """The least compute whose measurement ``meets`` the target (PSNR at least, MS-GMSD at most),
    by bisection over the predicted schedules (ordered by compute, most first: quality falls as
    compute does)."""
    lo, hi, best, checks = 0, len(options) - 1, None, 0
    while lo <= hi and checks < max_checks:
        mid = (lo + hi) // 2
        checks += 1
        if meets(evaluate(options[mid])):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    if best is not None:
        return options[best], True
    # nothing tried meets it: the most compute, measured (the target may be out of reach)
    return options[0], meets(evaluate(options[0]))


@dataclass
class _Goal:
    """The target as a rule over measurements: ``meets``; ``quality``, the measurement compared
    between candidates (``higher_is_better``); ``compute_bound``: the target bounds compute (the
    best quality within it wins) rather than quality (the least compute meeting it wins)."""

    meets: Callable[[dict], bool]
    quality: str
    compute_bound: bool
    higher_is_better: bool = True

    def best(self, results: dict, incumbent: Candidate) -> Candidate:
        """The best candidate measured so far that meets the target (``incumbent`` when none does)."""
        sign = 1.0 if self.higher_is_better else -1.0
        meeting = [c for c, m in results.items() if self.meets(m)]
        if not meeting:
            return incumbent
        if self.compute_bound:
            return max(meeting, key=lambda c: (sign * results[c][self.quality], -results[c]["computed_fraction"]))
        return min(meeting, key=lambda c: (results[c]["computed_fraction"], c.predicted,
                                           -sign * results[c][self.quality]))


def _search_forced_steps(family, trajectories, splits: list, chosen: Candidate, met: bool, goal: _Goal,
                         evaluate, max_checks: int, log) -> tuple:
    """Each other ``(first, last)`` split's candidate with at most ``chosen``'s predicted compute,
    run; the best measured one kept (``_Goal.best``). For a quality target the winning split is then
    bisected over its cheaper candidates."""
    family_options = {}
    # a split whose candidate takes the very steps of one already run (near full compute the forced
    # steps are computed anyway) is not run again
    seen = {_schedules(c, family, trajectories) for c in evaluate.results}
    for first, last in splits[1:]:
        options = candidates(replace(family, first_computed_steps=first, last_computed_steps=last), trajectories)
        family_options[(first, last)] = options
        at_most = [o for o in options if o.predicted <= chosen.predicted + 1e-9]
        steps = _schedules(at_most[0], family, trajectories) if at_most else None
        if steps is not None and steps not in seen:
            seen.add(steps)
            evaluate(at_most[0])
    best = goal.best(evaluate.results, chosen)
    if not goal.compute_bound and (best.first, best.last) in family_options:
        cheaper = [o for o in family_options[(best.first, best.last)] if o.predicted < best.predicted - 1e-9]
        if cheaper:
            _meet_quality(cheaper, goal.meets, evaluate, max_checks)
            best = goal.best(evaluate.results, chosen)
    if (best.first, best.last) != (chosen.first, chosen.last):
        log(f"forced steps: first {best.first}, last {best.last} beat first {chosen.first}, last {chosen.last} "
            f"({goal.quality} {evaluate.results[best][goal.quality]:.4g} vs {evaluate.results[chosen][goal.quality]:.4g}, "
            f"computed {evaluate.results[best]['computed_fraction']:.3f} vs {evaluate.results[chosen]['computed_fraction']:.3f})")
    return best, (goal.meets(evaluate.results[best]) if best is not chosen else met)


def _schedules(c: Candidate, family, trajectories) -> tuple:
    """The steps ``c`` is predicted to compute in each recorded run."""
    return tuple(tuple(simulate(c.config(family), t)) for t in trajectories)


# ----- helpers ---------------------------------------------------------------------------------
def _check_forced_steps(forced_steps) -> None:
    if forced_steps is None or forced_steps == "auto":
        return
    if isinstance(forced_steps, str) or not all(
            isinstance(p, (tuple, list)) and len(p) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in p) and p[0] >= 1 and p[1] >= 0
            for p in forced_steps):
        raise ValueError("forced_steps must be 'auto', None or a list of (first_computed_steps >= 1, "
                         f"last_computed_steps >= 0) integer pairs, got {forced_steps!r}")


def _check_target(computed_fraction, min_psnr, max_ms_gmsd) -> None:
    if [computed_fraction, min_psnr, max_ms_gmsd].count(None) != 2:
        raise ValueError("calibrate: give exactly one target, computed_fraction=..., min_psnr=... or max_ms_gmsd=...")
    if computed_fraction is not None and not (isinstance(computed_fraction, (int, float))
                                              and not isinstance(computed_fraction, bool)
                                              and 0 < computed_fraction <= 1):
        raise ValueError(f"computed_fraction must be in (0, 1], got {computed_fraction!r}")
    if min_psnr is not None and not (isinstance(min_psnr, (int, float)) and not isinstance(min_psnr, bool)
                                     and math.isfinite(min_psnr) and min_psnr > 0):
        raise ValueError(f"min_psnr must be a positive finite number of dB, got {min_psnr!r}")
    if max_ms_gmsd is not None and not (isinstance(max_ms_gmsd, (int, float)) and not isinstance(max_ms_gmsd, bool)
                                        and math.isfinite(max_ms_gmsd) and max_ms_gmsd > 0):
        raise ValueError(f"max_ms_gmsd must be a positive finite number, got {max_ms_gmsd!r}")


def _output(value) -> torch.Tensor:
    for name in ("frames", "images"):
        if hasattr(value, name):
            value = getattr(value, name)
            break
    if isinstance(value, (tuple, list)) and value and not isinstance(value[0], (int, float)):
        value = value[0]
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except Exception as exc:
            raise ValueError(f"calibrate: sample(i) returned {type(value).__name__}, not a tensor "
                             "(return the generated images/video, or latents)") from exc
    return value


def _psnr(out: torch.Tensor, ref: torch.Tensor, data_range: Optional[float]) -> float:
    if out.shape != ref.shape:
        raise ValueError(f"calibrate: sample(i) returned shape {tuple(out.shape)} cached and "
                         f"{tuple(ref.shape)} uncached; it must be deterministic in i (seed it)")
    out, ref = out.double(), ref.double()
    peak = float(data_range) if data_range is not None else float(ref.max() - ref.min()) or 1.0
    mse = float(((out - ref) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def _mean_db(values: list) -> float:
    """The mean PSNR of runs that differ from their reference (identical runs are infinite)."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.mean(finite) if finite else math.inf


def _map_leaves(obj, leaf):
    """``obj`` (dicts and lists of values) with ``leaf`` applied to every value that is neither."""
    if isinstance(obj, dict):
        return {k: _map_leaves(v, leaf) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_leaves(v, leaf) for v in obj]
    return leaf(obj)


def _json_floats(obj):
    """Non-finite floats as strings (JSON has no inf): an identical run's PSNR is inf."""
    return _map_leaves(obj, lambda v: str(v) if isinstance(v, float) and not math.isfinite(v) else v)


def _py_floats(obj):
    """The inverse of :func:`_json_floats`."""
    return _map_leaves(obj, lambda v: float(v) if isinstance(v, str) and v in ("inf", "-inf", "nan") else v)

"""The guarded call under a schedule per sample (``AdaCacheConfig(per_sample=True)``).

``CachedGraph`` calls a ``PerSampleCalls`` of its own when the config asks for per-sample
schedules and the graph knows its batch. A branch's cache (``branch_store.SampleCache``, kept in
the graph's ``BranchStore``) holds full-batch deltas and probe, and per sample the computed
step, the sampler's variable and the forecast span they belong to. On a step:

* every sample computes: the blocks run on the whole batch (as without per-sample schedules);
* none computes: every row reuses its own sample's delta (or its forecast);
* some compute: the region pieces run on those samples' rows alone (``sub_batch``) and the
  other rows reuse; without a sub-batch plan (a static batch) every row computes.

Each computing sample with its previous computed step's probe gets its own metric: the fused op
returns per-row sums, added per sample on the device (one host read per step, in the scheduler).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..ops import fused_cache_metrics
from .branch_store import SampleCache, same_shapes
from .collectives import shard_boundary_sums
from .forecasters import apply_forecast
from .sub_batch import gather, replace_rows, scatter


def exception_summary(exc: BaseException) -> str:
    """``Type: first line of the message``, for a warning about a path given up."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class PerSampleCalls:
    """The calls of one ``CachedGraph`` under a schedule per sample."""

    def __init__(self, graph):
        self.graph = graph
        self.layout = graph.layout
        self.runtime = graph.runtime
        self.store = graph.store
        self.call = graph.call
        self.row_indices: dict = {}     # (samples, sample count, copies, device) -> their batch rows
        self.warned_copies = False      # the guidance copies did not divide a batch (warned once)

    def _grouping(self, args) -> tuple:
        """``(batch rows, samples, guidance copies)`` of this call: ``guidance_in_batch`` copies of
        the samples, or one row per sample when the batch does not split into them."""
        index, dim = self.layout.batch_source
        batch = int(args[index].shape[dim]) if dim is not None else int(args[index])
        copies = self.runtime.config.guidance_in_batch
        if batch % copies:
            if not self.warned_copies:
                self.warned_copies = True
                warnings.warn(f"adacache: per_sample: guidance_in_batch={copies} does not divide the batch of {batch} "
                              "rows; each row is a sample of its own", UserWarning, stacklevel=4)
            copies = 1
        return batch, batch // copies, copies

    def _sample_rows(self, samples: list, num_samples: int, copies: int, device) -> torch.Tensor:
        """The batch rows of ``samples`` (``h * S + i`` per guidance copy ``h``), as a cached device
        tensor: a host-to-device copy waits for the device, so each subset is copied once."""
        key = (tuple(samples), num_samples, copies, device)
        if key not in self.row_indices:
            self.row_indices[key] = torch.tensor([h * num_samples + i for h in range(copies) for i in samples],
                                                 dtype=torch.long).to(device)
        return self.row_indices[key]

    def _device(self, args) -> torch.device:
        """Where the activations are (the first tensor on an accelerator, else the CPU)."""
        devices = [a.device for a in args if isinstance(a, torch.Tensor)]
        return next((d for d in devices if d.type != "cpu"), devices[0] if devices else torch.device("cpu"))

    def __call__(self, args, scheduler, branches: dict, timestep: Optional[float]):
        grouping = batch, num_samples, copies = self._grouping(args)
        decision = scheduler.begin_call(timestep, key=self.graph, num_samples=num_samples,
                                       name=self.graph.runtime.context_name)
        time = scheduler.clock.time
        if len(decision.samples) != num_samples:   # another graph of this step sees another batch: compute
            self.call.compute, self.call.deltas = True, []
            branches.pop(decision.branch, None)
            return self.graph.top(*args)
        cache: Optional[SampleCache] = branches.get(decision.branch)
        usable = (cache is not None and cache.generation == decision.generation
                  and cache.stream_shapes == self.graph._current_shapes(args) and len(cache.steps) == num_samples)
        computing = [i for i, (scheduled, sample) in enumerate(zip(decision.samples, scheduler.samples))
                     if scheduled or not (usable and cache.steps[i] == sample.last_computed_step)]
        device = self._device(args)
        state = self.call
        plan = self.graph.sub_batch
        state.batch, state.plan = batch, plan
        if len(computing) == num_samples or (computing and plan is None):
            computing = list(range(num_samples))
            state.compute, state.deltas = True, []
        else:
            state.compute = bool(computing)
            state.deltas = self._reused_per_sample(cache, time, batch, copies)
            if computing:
                state.rows = self._sample_rows(computing, num_samples, copies, device)
                need = max(plan.min_rows - state.rows.numel(), 0)
                state.padded = torch.cat([state.rows, state.rows[:1].expand(need)]) if need else state.rows
        try:
            result = self.graph.top(*args)
        except Exception as exc:  # noqa: BLE001 - a sub-batch the compiled pieces refuse: compute every row
            if state.rows is None:
                raise
            warnings.warn(f"adacache: per_sample: a region failed on a sub-batch ({exception_summary(exc)}); "
                          "this graph computes every row when any "
                          "sample computes from now on", UserWarning, stacklevel=3)
            self.graph.sub_batch = None
            state.rows = state.padded = state.plan = None
            state.compute, state.deltas = True, []
            computing = list(range(num_samples))
            result = self.graph.top(*args)
        finally:
            state.rows = state.padded = state.plan = None
        if computing:
            branches[decision.branch] = self._store_per_sample(
                scheduler, decision, cache if usable else None, result, args, grouping, computing, device, time)
        return result

    # ----- the cache after a step with computed samples -----------------------------------
    def _store_per_sample(self, scheduler, decision, cache: Optional[SampleCache], result, args, grouping: tuple,
                          computing: list, device, time: float) -> SampleCache:
        batch, num_samples, copies = grouping
        every = len(computing) == num_samples
        rows = None if every else self._sample_rows(computing, num_samples, copies, device)
        spec = self._output_specs()
        deltas: list = [[] for _ in self.graph.runners]
        for (r, _s, index) in self.layout.deltas:
            new = result[index]
            if not every:   # the reused rows keep their own delta, not its forecast
                old = cache.deltas[r][len(deltas[r])]
                new = replace_rows(old, new, spec.get(index), rows, batch)
            deltas[r].append(new)
        probe = result[self.layout.probe_index].detach()
        probe_spec = spec.get(self.layout.probe_index, 0)
        if not every:   # the piece gave the computed rows' probe alone
            probe = scatter(cache.probe, probe, probe_spec, rows, batch)
        off_schedule = [i for i in computing if not decision.samples[i]]
        if off_schedule and cache is not None and cache.probe is not None:
            # a sample computed off its schedule (a static batch, a stale cache) keeps the probe of its
            # last scheduled computed step: its next metric compares with that step, over that gap
            kept = self._sample_rows(off_schedule, num_samples, copies, device)
            probe = replace_rows(probe, cache.probe, probe_spec, kept, batch)
        steps = list(cache.steps) if cache is not None else [0] * num_samples
        times = list(cache.times) if cache is not None else [0.0] * num_samples
        for i in computing:
            steps[i], times[i] = scheduler.samples[i].last_computed_step, time
        measured = [i for i in computing if decision.samples[i] and cache is not None and cache.probe is not None
                    and len(scheduler.samples[i].computed_steps) >= 2
                    and cache.steps[i] == scheduler.samples[i].computed_steps[-2]]
        if measured:
            self._sample_metric(scheduler, probe, cache.probe, measured, args, grouping, device)
        if every and self.runtime.recorder is not None:   # adacache_fx.calibrate records the batch, on uncached generations
            view, has_frames = self.graph._probe_view(probe, args)
            self.store.record(decision.branch, scheduler.clock.step, view, has_frames)
        terms, spans = self._sample_terms(cache, deltas, computing, time, grouping, device)
        return SampleCache(generation=decision.generation, deltas=deltas, stream_shapes=self.graph._current_shapes(args),
                           probe=probe, steps=steps, times=times, terms=terms, spans=spans)

    def _sample_metric(self, scheduler, probe, previous, measured: list, args, grouping: tuple, device) -> None:
        batch, num_samples, copies = grouping
        spec = self._output_specs().get(self.layout.probe_index, 0)
        rows = self._sample_rows(measured, num_samples, copies, device)
        current, has_frames = self.graph._probe_view(gather(probe, spec, rows, batch), args)
        before, _ = self.graph._probe_view(gather(previous, spec, rows, batch), args)
        if current.shape != before.shape:
            return
        stride = self.layout.moreg_stride
        per_row = fused_cache_metrics(current, before, stride)   # (rows * m, 5)
        per_batch_row = per_row.reshape(rows.numel(), -1, per_row.shape[-1]).sum(1)
        owner = self._sample_rows([measured[p % len(measured)] for p in range(rows.numel())], num_samples, 1,
                                  per_row.device)   # the sample of each gathered row (cached like the rows)
        sums = torch.zeros(num_samples, per_row.shape[-1], dtype=per_row.dtype, device=per_row.device)
        sums.index_add_(0, owner, per_batch_row)
        shard = self.layout.frame_axis.shard if has_frames else None
        if shard is not None:   # each sample's frame pairs across this rank's shard boundary
            if current.shape[1] < stride:
                has_frames = False
            else:
                grouped = current.reshape(rows.numel(), -1, *current.shape[1:])
                for i in measured:
                    mine = torch.cat([grouped[p] for p in range(rows.numel()) if measured[p % len(measured)] == i])
                    sums[i] += shard_boundary_sums(mine, stride, shard[:2], self.graph.process_group)
        scheduler.add_metric_sums(sums, has_motion=has_frames, samples=measured)

    # ----- forecast reuse, per sample ---------------------------------------------------------
    def _output_specs(self) -> dict:
        """Where each graph output (deltas, probe) holds the batch rows (the sub-batch plan's)."""
        plan = self.graph.sub_batch
        return plan.graph_outputs if plan is not None else {}

    def _sample_terms(self, cache: Optional[SampleCache], deltas: list, computing: list, time: float,
                      grouping: tuple, device):
        """Each computing sample's rows of the forecast terms (when its previous computed step's
        deltas are in ``cache``); the other samples keep theirs."""
        forecaster = self.store.forecaster
        if not forecaster.terms or cache is None:
            return None, None
        batch, num_samples, copies = grouping
        spec = self._output_specs()
        spans = list(cache.spans) if cache.spans is not None else [0.0] * num_samples
        fresh = [i for i in computing if time != cache.times[i]]
        for i in computing:
            spans[i] = time - cache.times[i] if i in fresh else 0.0
        if not fresh:
            return cache.terms, spans
        if not same_shapes(deltas, cache.deltas):
            return None, None
        rows = self._sample_rows(fresh, num_samples, copies, device)
        terms = []
        for r, (new, old) in enumerate(zip(deltas, cache.deltas)):
            region = []
            for j, (a, b, index) in enumerate(zip(new, old, self.layout.deltas_of_region(r))):
                stream = forecaster.stream_terms(a, b)
                if cache.terms is not None and len(fresh) < num_samples:
                    stream = [replace_rows(kept, made, spec.get(index), rows, batch)
                              for kept, made in zip(cache.terms[r][j], stream)]
                region.append(stream)
            terms.append(region)
        return terms, spans

    def _reused_per_sample(self, cache: SampleCache, time: float, batch: int, copies: int) -> list:
        """What the reused rows add: each sample's delta, or its forecast at ``time``."""
        forecaster = self.store.forecaster
        if not forecaster.terms or cache.terms is None:
            return cache.deltas
        per_sample = [forecaster.coefficients(time, t, span) for t, span in zip(cache.times, cache.spans)]
        if len(set(per_sample)) == 1:   # every sample at the same point: one set, as without per-sample schedules
            return [[apply_forecast(d, terms, per_sample[0]) for d, terms in zip(region, region_terms)]
                    for region, region_terms in zip(cache.deltas, cache.terms)]
        spec = self._output_specs()
        # per term, the coefficient of each batch row, on the device once per call
        per_row = torch.tensor([list(c) for c in per_sample] * copies).to(cache.deltas[0][0].device, non_blocking=True)
        out = []
        for r, (region, region_terms) in enumerate(zip(cache.deltas, cache.terms)):
            added = []
            for d, terms, index in zip(region, region_terms, self.layout.deltas_of_region(r)):
                dim = spec.get(index, 0)
                if not isinstance(dim, int):   # no batch dim in this delta: nothing to scale per row
                    added.append(apply_forecast(d, terms, per_sample[0]))
                    continue
                rows = [per_row[:, i].to(d.dtype).repeat_interleave(d.shape[dim] // batch)
                        .reshape([-1] + [1] * (d.dim() - dim - 1)) for i in range(len(terms))]
                added.append(apply_forecast(d, terms, rows))
            out.append(added)
        return out

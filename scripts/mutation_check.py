"""Mutation check: break each core promise of the library on purpose and see a test fail.

Every mutation is a textual patch (exact anchor text -> replacement) of one or more library
files. For each one the script copies a pristine snapshot of the repository to a temporary
directory, applies the patch there (the real checkout is never touched), runs the test files
that guard that promise with ``python -m pytest -x -q -p no:logging <files>`` (cwd = the copy,
which is first on the import path), and records which test caught it. It exits non-zero if any
mutation survives, if an anchor is not found (the library changed: update the mutation, so
that the list cannot rot silently), or if the unmutated tests fail (then "caught" would mean
nothing; ``--allow-baseline-failures`` deselects the failing tests and says so in the table).

    python scripts/mutation_check.py                      # everything; writes benchmarks/results/mutation_check.md
    python scripts/mutation_check.py --list
    python scripts/mutation_check.py --only reuse_input_only --only shape_guard_skipped --no-write
    python scripts/mutation_check.py --all-failures       # no -x: every test that catches each mutation

Not part of CI. On a 2-core CPU machine (OMP_NUM_THREADS=1, the default here) a full run takes
about 16 minutes: 6.5 for the baseline run of every test file involved, then 5-65 s per
mutation (one pytest run, stopped at its first failure; the multi-process ones are the slowest).
``--check-anchors`` (a second) only checks that every patch still applies.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "mutation_check.md")
# what the snapshot leaves out: not needed by the tests, or large, or the machine's own state
IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", "*.egg-info", ".pytest_cache",
                                "*.pyc", ".mypy_cache", ".ruff_cache")
PER_RUN_TIMEOUT_S = 1200
# short collective / launch timeouts for the distributed tests: a mutation that makes ranks
# diverge fails their launch instead of waiting for the defaults
DIST_ENV = {"ADACACHE_DIST_TEST_TIMEOUT": "240", "ADACACHE_DIST_GLOO_TIMEOUT": "60"}


@dataclasses.dataclass
class Mutation:
    name: str
    promise: str
    patches: list          # [(file relative to the repository root, anchor, replacement)]
    tests: list            # test files to run, most likely catcher first


POLICY = "adacache_fx/runtime/policies/adacache.py"
CONTRACT = "adacache_fx/runtime/policies/base.py"
STEP_CLOCK = "adacache_fx/runtime/step_clock.py"
GRAPH = "adacache_fx/runtime/cached_graph.py"
STORE = "adacache_fx/runtime/branch_store.py"
REUSE = "adacache_fx/passes/rewrite/build_reuse.py"
OPS = "adacache_fx/ops/cache_metrics.py"
DIST = "adacache_fx/runtime/collectives.py"
TIMESTEPS = "adacache_fx/runtime/timestep_source.py"
STATE = "adacache_fx/runtime/state.py"
RECORD = "adacache_fx/calibration/record.py"
CALIB = "adacache_fx/calibration/calibrate.py"

T_BACKEND = "tests/runtime/test_backend.py"
T_GUIDANCE = "tests/runtime/test_guidance.py"
T_SHAPES = "tests/runtime/test_shapes.py"
T_SCHED = "tests/runtime/test_scheduler.py"
T_DIST = "tests/distributed/test_distributed.py"
T_STATE = "tests/runtime/test_runtime_state.py"
T_DIFFUSERS = "tests/integrations/test_integrations_diffusers.py"
T_KERNELS = "tests/kernels/test_kernels.py"
T_FORECAST = "tests/runtime/test_forecast_reuse.py"
T_FUSE = "tests/passes/test_fuse_reuse.py"
T_CALIBRATE = "tests/calibration/test_calibrate.py"
T_CP = "tests/distributed/test_diffusers_context_parallel.py"
T_GENERAL = "tests/passes/test_general_blocks.py"
T_BREAKS = "tests/passes/test_graph_breaks.py"
T_PER_SAMPLE = "tests/runtime/test_per_sample.py"
T_PER_SAMPLE_DIST = "tests/distributed/test_per_sample_distributed.py"
PS_CALLS = "adacache_fx/runtime/per_sample_calls.py"
PS_SCHED = "adacache_fx/runtime/per_sample_scheduler.py"
SUB_BATCH = "adacache_fx/runtime/sub_batch.py"
MODULE_GUARD = "adacache_fx/runtime/module_guard.py"
FORECAST = "adacache_fx/runtime/forecasters/linear.py"
FORECASTERS = "adacache_fx/runtime/forecasters/registry.py"
POLICIES = "adacache_fx/runtime/policies/registry.py"
PROBE = "adacache_fx/passes/analysis/resolve_probe.py"
MODULE_BLOCKS = "adacache_fx/passes/analysis/find_module_blocks.py"
T_MODULE_GUARD = "tests/runtime/test_module_guard.py"
REGIONS = "adacache_fx/passes/analysis/find_regions.py"
ANALYSIS = "adacache_fx/passes/analysis/__init__.py"
T_EXTENSION = "tests/runtime/test_extension_points.py"
T_UPSTREAM = "tests/runtime/test_upstream_constructs.py"
RESIDUAL_PROBE = "adacache_fx/runtime/residual_probe.py"
BACKEND = "adacache_fx/backend.py"
CONFIG = "adacache_fx/config.py"
COMPILE_MODEL = "adacache_fx/compile_model.py"
T_CACHE_CONTEXT = "tests/runtime/test_cache_context.py"
T_LIFECYCLE = "tests/integrations/test_lifecycle_api.py"
T_EXPERTS = "tests/integrations/test_two_experts.py"
T_COMPILE_BLOCKS = "tests/passes/test_compile_blocks.py"
T_REGIONS = "tests/passes/test_block_regions.py"
INLINE = "adacache_fx/passes/inline_subgraphs.py"
POLICY_BASE = "adacache_fx/runtime/policies/base.py"
DIFFUSERS = "adacache_fx/integrations/diffusers.py"

MUTATIONS = [
    # ----- the schedule contract ---------------------------------------------------------------
    Mutation("contract_next_step_off_by_one", "next computed step is s + tau",
             [(POLICY, "reg, rate, s + rate)", "reg, rate, s + rate + 1)")],
             [T_SCHED, T_BACKEND]),
    Mutation("contract_last_two_not_forced", "steps N-1 and N are computed",
             [(CONTRACT, "step > num_steps - cfg.last_computed_steps)", "step > num_steps - cfg.last_computed_steps + 1)")],
             [T_SCHED, T_BACKEND]),
    Mutation("contract_rate_not_starting_at_1", "the rate starts at 1: step 2 is computed",
             [(CONTRACT, "self.next_compute_step = pending.step + 1", "self.next_compute_step = pending.step + 2")],
             [T_SCHED, T_BACKEND]),
    # ----- the reuse arithmetic ------------------------------------------------------------------
    Mutation("reuse_last_computed_output", "a reused step is skeleton(input) + cached delta, not the last output",
             [(GRAPH, "            outputs = self.compute_fn(*args)\n",
               "            outputs = self.compute_fn(*args)\n            self._mutation_last = outputs\n"),
              (GRAPH, "        outputs = self.reuse_fn(*args, *state.deltas[self.index])\n",
               "        outputs = self._mutation_last\n"),
              (GRAPH, "        result = self.top(*args)\n", "        result = self.top(*args)\n        self._mutation_last_call = result\n"),
              (GRAPH, "                return self._user_outputs(fused)\n",
               "                return self._user_outputs(self._mutation_last_call)\n")],
             [T_BACKEND, T_GUIDANCE]),
    Mutation("fused_reuse_without_delta", "a reused step run as one fused graph adds the cached delta",
             [(GRAPH, "inputs.append(delta.contiguous())", "inputs.append(torch.zeros_like(delta))")],
             [T_FUSE, T_BACKEND]),
    Mutation("reuse_input_only", "a reused step adds the cached delta",
             [(REUSE, "node = graph.call_function(torch.add, (skeleton, delta))",
               "node = graph.call_function(torch.add, (skeleton, delta), {'alpha': 0})")],
             [T_BACKEND, T_GUIDANCE, T_FUSE]),
    Mutation("reuse_input_plus_2_delta", "a reused step adds the cached delta once",
             [(REUSE, "node = graph.call_function(torch.add, (skeleton, delta))",
               "node = graph.call_function(torch.add, (skeleton, delta), {'alpha': 2})")],
             [T_BACKEND, T_GUIDANCE, T_FUSE]),
    Mutation("branches_share_one_cache", "each guidance branch keeps its own deltas",
             [(GRAPH, "cache = branches.get(decision.branch)", "cache = branches.get(0)"),
              (GRAPH, "branches[decision.branch] = self._store(", "branches[0] = self._store(")],
             [T_GUIDANCE, T_BACKEND]),
    # ----- forecast reuse (config.reuse) ---------------------------------------------------------
    Mutation("forecast_in_step_index", "the forecast extrapolates in the timestep, not the step index",
             [(STEP_CLOCK, "return float(self.timestep) if self.timestep is not None else float(self.step)",
               "return float(self.step)")],
             [T_FORECAST]),
    Mutation("forecast_damping_ignored", "damped reuse scales the extrapolation by reuse_damping",
             [(FORECAST, "return (scale * self.config.reuse_damping,)", "return (scale * 1.0,)")],
             [T_FORECAST, T_MODULE_GUARD]),
    # ----- calibration -----------------------------------------------------------------------------
    Mutation("calibration_gap_off_by_one", "the recorded trajectory pairs each step with the probe k steps before",
             [(RECORD, "gap = step - previous_step", "gap = step - previous_step + 1")],
             [T_CALIBRATE]),
    Mutation("calibration_fraction_target_exceeded", "a computed-fraction target is an upper bound",
             [(CALIB, "within = [o for o in options if o.predicted <= target + 1e-9]",
               "within = [o for o in options if o.predicted <= target + 0.25]"),
              (CALIB, "if evaluate(option)[\"computed_fraction\"] <= target + 1e-9:",
               "if evaluate(option)[\"computed_fraction\"] <= target + 0.25:")],
             [T_CALIBRATE]),
    # ----- one decision per step from the pooled sums of all branches ---------------------------
    Mutation("pooling_sums_replaced", "branch sums are summed (last branch's replaced the others)",
             [(CONTRACT, "pending.sums = sums if pending.sums is None else pending.sums + sums", "pending.sums = sums")],
             [T_GUIDANCE, T_SCHED]),
    Mutation("pooling_first_branch_only", "branch sums are summed (first branch's kept alone)",
             [(CONTRACT, "pending.sums = sums if pending.sums is None else pending.sums + sums",
               "pending.sums = sums if pending.sums is None else pending.sums")],
             [T_GUIDANCE, T_SCHED]),
    Mutation("pooling_separate_decisions", "all branches of a step follow one decision",
             [(GRAPH, "        scheduler = self.runtime.scheduler(instance)\n"
                      "        if scheduler.process_group is None:\n"
                      "            scheduler.process_group = self.process_group\n"
                      "        ts = self.layout.timestep_index\n"
                      "        timestep = self.runtime.timesteps.timestep(args[ts] if ts is not None else None)\n",
               "        ts = self.layout.timestep_index\n"
               "        timestep = self.runtime.timesteps.timestep(args[ts] if ts is not None else None)\n"
               "        _branch = self.runtime.scheduler(instance).begin_call(timestep, key=self, name=self.runtime.context_name).branch\n"
               "        scheduler = self.runtime.scheduler(64 * (1 + _branch) + instance)\n"
               "        if scheduler.process_group is None:\n"
               "            scheduler.process_group = self.process_group\n"),
              (GRAPH, "        decision = scheduler.begin_call(timestep, key=self, name=self.runtime.context_name)\n",
               "        decision = scheduler.begin_call(timestep, key=self, name=self.runtime.context_name)\n"
               "        decision.branch = _branch\n")],
             [T_GUIDANCE, T_BACKEND]),
    # ----- shapes --------------------------------------------------------------------------------
    Mutation("shape_guard_skipped", "a shape change inside a generation computes",
             [(GRAPH, "if not compute and cache.stream_shapes != self._current_shapes(args):",
               "if False and cache.stream_shapes != self._current_shapes(args):")],
             [T_BACKEND, T_SHAPES]),
    # ----- the metric ----------------------------------------------------------------------------
    Mutation("metric_ratio_inverted", "c = sum|r - p| / sum|p| (numerator and denominator swapped)",
             [(POLICY, "distance = _safe_div(diff, base) / k", "distance = _safe_div(base, diff) / k")],
             [T_SCHED, T_BACKEND]),
    Mutation("metric_not_divided_by_k", "c is divided by the steps since the previous probe",
             [(POLICY, "distance = _safe_div(diff, base) / k", "distance = _safe_div(diff, base)")],
             [T_SCHED, T_BACKEND]),
    Mutation("metric_probes_swapped", "the distance is relative to the previous probe (r and p swapped)",
             [(STORE, "fused_cache_metrics(current, previous, self.runtime.config.moreg_stride)",
               "fused_cache_metrics(previous, current, self.runtime.config.moreg_stride)")],
             [T_BACKEND]),
    Mutation("metric_motion_sums_dropped", "the MoReg motion numerator is measured",
             [(OPS, "out[:, 2] += (rf[:, s:] - rf[:, :-s]).abs_().sum(dim=(1, 2))",
               "out[:, 2] += 0.0 * (rf[:, s:] - rf[:, :-s]).abs_().sum(dim=(1, 2))")],
             [T_BACKEND, T_KERNELS]),
    Mutation("metric_nan_takes_last_rate", "a NaN or Inf metric means compute (rate 1)",
             [(POLICY, "if not math.isfinite(distance):\n        return 1", "if False:\n        return 1")],
             [T_SCHED, T_BACKEND]),
    # ----- ranks -----------------------------------------------------------------------------------
    Mutation("rank_reduction_skipped", "every rank decides from the sums of all ranks",
             [(DIST, "if group is None:\n        return sums", "if True:\n        return sums")],
             [T_DIST]),
    Mutation("sharded_motion_boundary_dropped", "under a shard of the frames the pairs across the boundary count",
             [(GRAPH, "return sums + shard_boundary_sums(current, stride, shard[:2], self.process_group), has_frames",
               "return sums + 0.0 * shard_boundary_sums(current, stride, shard[:2], self.process_group), has_frames")],
             [T_CP]),
    Mutation("shard_boundary_wrong_frames", "a boundary pair is (this shard's last frames, the next shard's first)",
             [(DIST, "out[2] = (following.to(torch.float32) - tail.to(torch.float32)).abs().sum()",
               "out[2] = (following.to(torch.float32) - head.to(torch.float32)).abs().sum()")],
             [T_CP]),
    # ----- generality ------------------------------------------------------------------------------
    Mutation("feeding_chains_not_merged", "blocks whose outputs only later blocks use join their region",
             [(REGIONS, "chains = _merge_feeding_chains(chains, order, graph_nodes, block_of)", "chains = chains")],
             [T_GENERAL]),
    Mutation("packed_frames_ignored", "packed_frames gives packed video tokens a frame axis",
             [(ANALYSIS, "        packed_frames = config.packed_frames", "        packed_frames = None")],
             [T_BREAKS]),
    # ----- runtime state (tests/runtime/test_runtime_state.py) -------------------------------------------
    Mutation("set_num_steps_lost_on_reset", "set_num_steps holds across resets",
             [(STEP_CLOCK, "self.requested_num_steps if self.requested_num_steps is not None",
               "self.default_num_steps if True")],
             [T_STATE, T_DIFFUSERS]),
    Mutation("timestep_read_on_host", "with backend.step(t) no call reads the timestep input on the host",
             [(TIMESTEPS, "if self.announced is not None:\n            return self.announced",
               "if self.announced is not None and not isinstance(value, torch.Tensor):\n"
               "            return self.announced")],
             [T_STATE]),
    Mutation("schedulers_shared_between_models", "two compiled models keep separate schedules",
             [(STATE, "return self.schedulers[instance]", "return self.schedulers[0]")],
             [T_STATE]),
    # ----- a schedule per sample -----------------------------------------------------------------------
    Mutation("per_sample_metric_pooled", "each sample's metric is its own rows' sums, not the batch's",
             [(PS_CALLS, "owner = self._sample_rows([measured[p % len(measured)] for p in range(rows.numel())]",
               "owner = self._sample_rows([measured[0] for p in range(rows.numel())]")],
             [T_PER_SAMPLE]),
    Mutation("per_sample_guidance_rows_split", "a sample's guidance copies are rows i, i + S, ...",
             [(PS_CALLS, "for h in range(copies) for i in samples]", "for i in samples for h in range(copies)]")],
             [T_PER_SAMPLE]),
    Mutation("per_sample_reused_rows_store_forecast", "reused rows keep their own delta, not its forecast",
             [(PS_CALLS, "            if not every:   # the reused rows keep their own delta, not its forecast",
               "            if False:")],
             [T_PER_SAMPLE]),
    Mutation("per_sample_scatter_wrong_rows", "the computed rows go back to their own places in the batch",
             [(SUB_BATCH, "return full.unflatten(spec, (batch, -1)).index_copy(spec, rows.to(full.device), grouped)",
               "return full.unflatten(spec, (batch, -1)).index_copy(spec, rows.flip(0).to(full.device), grouped)")],
             [T_PER_SAMPLE]),
    Mutation("per_sample_shard_boundary_skipped", "under a shard of the frames each sample's motion score adds its "
             "boundary frame pairs",
             [(PS_CALLS, "sums[i] += shard_boundary_sums(mine, stride, shard[:2], self.graph.process_group)",
               "sums[i] += 0 * shard_boundary_sums(mine, stride, shard[:2], self.graph.process_group)")],
             [T_CP]),
    Mutation("per_sample_sums_not_reduced", "under sequence parallelism the per-sample sums are reduced over the ranks",
             [(PS_SCHED, "host = all_reduce_sums(stacked, self.process_group).tolist()",
               "host = stacked.tolist()")],
             [T_PER_SAMPLE_DIST]),
    Mutation("frames_gather_ignored", "scattered video tokens are measured at the positions their input gives",
             [(GRAPH, "probe = probe.index_select(axis.dim, args[self.layout.gather_index])",
               "probe = probe.narrow(axis.dim, probe.shape[axis.dim] - args[self.layout.gather_index].numel(), "
               "args[self.layout.gather_index].numel())")],
             [T_BREAKS]),
    # ----- the block-list guard (block_guard="modules") ------------------------------------------
    Mutation("module_guard_reuse_adds_no_delta", "a reused region's last block returns the region's inputs plus the "
             "deltas",
             [(MODULE_GUARD, "else value + next(deltas) for value in call.reuse_inputs.pop(r)]",
               "else value + 0 * next(deltas) for value in call.reuse_inputs.pop(r)]")],
             [T_MODULE_GUARD]),
    Mutation("module_guard_later_blocks_run", "on a reused step no block of the region runs",
             [(MODULE_GUARD, "if call.computing[r]:   # the inputs matter",
               "if call.computing[r] or j > 0:   # the inputs matter")],
             [T_MODULE_GUARD]),
    Mutation("module_guard_branches_share_one_cache", "each guidance branch keeps its own deltas (block guard)",
             [(MODULE_GUARD, "cache = self.store.branches(self.instance).get(decision.branch)",
               "cache = self.store.branches(self.instance).get(0)"),
              (MODULE_GUARD, "self.store.branches(self.instance)[call.decision.branch] = self.store.store(",
               "self.store.branches(self.instance)[0] = self.store.store(")],
             [T_MODULE_GUARD]),
    Mutation("module_guard_calls_not_chained", "a module list whose calls do not feed each other holds no blocks",
             [(MODULE_BLOCKS, "                 if len(own) > 1 and any(c.streams is not None for c in own)",
               "                 if len(own) > 1e9 and any(c.streams is not None for c in own)")],
             [T_MODULE_GUARD]),
    Mutation("module_guard_chains_within_one_list", "consecutive calls feeding each other form one region whatever "
             "list each block belongs to (STDiT3's alternating lists)",
             [(MODULE_BLOCKS, "        continues = (run and id(call) in fed\n",
               "        continues = (run and id(call) in fed and call.container == run[-1].container\n")],
             [T_UPSTREAM]),
    Mutation("module_guard_side_state_dropped", "a reused block returns the side state it receives (a dict passed "
             "through)", [(MODULE_GUARD, "values[k] = arguments.get(key)", "values[k] = None")],
             [T_UPSTREAM]),
    Mutation("module_guard_probe_other_branch", "the module guard's probe is the probe_branch-th residual on the "
             "stream (0: the attention's)",
             [(RESIDUAL_PROBE, "if self.links[key] == self.branch:", "if self.links[key] == self.branch + 1:")],
             [T_MODULE_GUARD]),
    Mutation("auto_guard_never_switches", "a model that breaks inside its blocks is guarded at the block calls "
             "without a mode flag", [(BACKEND, "            if why is not None:   # nothing of this graph is compiled",
                                      "            if False:   # nothing of this graph is compiled")],
             [T_MODULE_GUARD, T_UPSTREAM]),
    Mutation("checkpoint_bodies_not_inlined", "blocks inside torch.utils.checkpoint are seen and cached",
             [(BACKEND, "work = inline_subgraphs(copy_graph_module(gm))", "work = copy_graph_module(gm)")],
             [T_UPSTREAM]),
    Mutation("two_classes_share_a_schedule", "two model classes on one backend keep their own schedules",
             [(BACKEND, "owner=traced_owner())", "owner=None)")],
             [T_STATE]),
    Mutation("preset_frozen_at_construction", "a preset follows the generation's step count",
             [(CONFIG, "        return _preset_codebook_cached(self.preset, num_steps)", "        return self.codebook")],
             [T_STATE]),
    Mutation("step_clock_reads_the_first_element", "a per-frame timestep with a pinned clean frame still advances the "
             "step clock", [(TIMESTEPS, "return math.fsum(values) / len(values)", "return values[0]")],
             [T_UPSTREAM]),
    Mutation("module_guard_streams_by_position", "a stream passed by keyword on one call and by position on another "
             "is the same stream", [(MODULE_BLOCKS, "bound = signature.bind(*args, **kwargs).arguments if signature is "
                                    "not None else None", "bound = None")],
             [T_MODULE_GUARD]),
    Mutation("module_guard_side_by_side_chained", "blocks that all take the same input are no chain",
             [(MODULE_BLOCKS, " or value is before.get(was):", ":")],
             [T_MODULE_GUARD]),
    Mutation("module_guard_probe_is_the_output", "the probe is the residual the block adds, not the stream after it",
             [(RESIDUAL_PROBE, "residual = other if alpha == 1 else other * alpha", "residual = out")],
             [T_MODULE_GUARD]),
    Mutation("module_guard_forecast_ignored", "a reused step under linear reuse adds the forecast (block guard)",
             [(MODULE_GUARD, "self.call.deltas = self.store.reused_deltas(cache, scheduler.clock.time)",
               "self.call.deltas = cache.deltas")],
             [T_MODULE_GUARD]),
    Mutation("cache_context_name_ignored", "a call under cache_context(name) is that name's branch whatever the order",
             [(STEP_CLOCK, "branch = count if name is None else (name, count)", "branch = count")],
             [T_CACHE_CONTEXT]),
    Mutation("diffusers_cache_context_not_forwarded", "a diffusers transformer's own cache_context names the branch",
             [(COMPILE_MODEL, "    _forward_cache_context(model, backend)\n", "")],
             [T_CACHE_CONTEXT]),
    Mutation("dropped_pipeline_kept_alive", "a pipeline dropped without disable_cache is freed",
             [(DIFFUSERS, "self._pipe = weakref.ref(pipe)", "self._pipe = (lambda p: lambda: p)(pipe)")],
             [T_LIFECYCLE]),
    Mutation("experts_share_the_pipeline_step_count", "each expert's step count is its share of the steps",
             [(DIFFUSERS, "        if len(self.modules) != 2 or boundary is None", "        if True or boundary is None")],
             [T_EXPERTS]),
    Mutation("second_expert_not_cached", "a two-expert pipeline has both experts cached",
             [(DIFFUSERS, "    found = [(n, m) for n, m in found if isinstance(m, torch.nn.Module)]\n",
               "    found = [(n, m) for n, m in found if isinstance(m, torch.nn.Module)][:1]\n")],
             [T_EXPERTS]),
    Mutation("expert_steps_not_numbered_by_the_pipeline", "summary numbers an expert's steps by the pipeline's",
             [(DIFFUSERS, "state.first_step[name] = state.clock.steps_taken + 1", "state.first_step[name] = 1")],
             [T_EXPERTS]),
    Mutation("few_steps_not_said", "a step count with nothing to skip is said in a warning",
             [(POLICY_BASE, "if step == 1 and num_steps is not None and num_steps <= forced_count:",
               "if step == 1 and num_steps is not None and num_steps < forced_count:")],
             [T_EXPERTS]),
    Mutation("expert_preset_at_its_share", "an expert's preset codebook is the generation's step count's",
             [(POLICY, "cfg.codebook_for(self.preset_steps or num_steps)", "cfg.codebook_for(num_steps)")],
             [T_EXPERTS]),
    Mutation("blocks_share_code_of_another_graph", "only subgraphs that match share a compile",
             [("adacache_fx/compile/compile_blocks.py", "            fn = compiled[body]\n",
               "            fn = next(iter(compiled.values()))\n")],
             [T_COMPILE_BLOCKS]),
    Mutation("region_copies_keep_block_0s_stack", "each inlined copy of a nested region is its own block",
             [(INLINE, "    if node.target is _REGION:\n", "    if False:\n")],
             [T_REGIONS]),
    Mutation("region_failure_not_retried", "a block that breaks Dynamo's graph is traced as before, capture on",
             [(COMPILE_MODEL, " or (regions[0] and region_failed(exc)):", ":")],
             [T_REGIONS]),
    Mutation("regions_left_after_uncompile", "uncompile_model gives the blocks their class back",
             [(COMPILE_MODEL, "        _drop_regions(self._regions)\n", "")],
             [T_REGIONS]),
    Mutation("fused_reuse_with_blocks_once", "the prologue and epilogue compile once where the blocks do",
             [("adacache_fx/compile/__init__.py", "    if rw.fused is not None and not by_block:",
               "    if rw.fused is not None:")],
             [T_REGIONS]),
    Mutation("ms_gmsd_unbiased_deviation", "MS-GMSD matches its float64 reference (piq's conventions)",
             [("adacache_fx/calibration/quality.py", "return similarity.flatten(1).std(dim=1, unbiased=False)",
               "return similarity.flatten(1).std(dim=1, unbiased=True)")],
             ["tests/calibration/test_quality.py"]),
    Mutation("ms_gmsd_target_loosened", "calibrate(max_ms_gmsd=) meets the target it names",
             [(CALIB, 'lambda m: m["ms_gmsd_mean"] <= max_ms_gmsd', 'lambda m: m["ms_gmsd_mean"] <= 2 * max_ms_gmsd')],
             [T_CALIBRATE]),
    Mutation("forced_split_worse_kept", "calibrate keeps the forced-step split that measured best within the target",
             [(CALIB, "            return max(meeting, key=lambda c: (sign * results[c][self.quality],",
               "            return min(meeting, key=lambda c: (sign * results[c][self.quality],")],
             [T_CALIBRATE]),
    Mutation("forced_split_more_compute", "each forced-step split is tried at no more compute than the base's choice",
             [(CALIB, "        at_most = [o for o in options if o.predicted <= chosen.predicted + 1e-9]",
               "        at_most = list(options)")],
             [T_CALIBRATE]),
    Mutation("forced_steps_not_applied", "the calibrated config computes the chosen split's forced steps",
             [("adacache_fx/calibration/fit.py", "first_computed_steps=self.first,\n                      last_computed_steps=self.last, ",
               "")],
             [T_CALIBRATE]),
    Mutation("branch_core_gate_inside", "a branch's core ends at its last heavy op: the gate stays outside",
             [("adacache_fx/passes/analysis/find_branch_cores.py", "    while not _is_heavy(node):\n",
               "    while not _is_heavy(node) and False:\n")],
             ["tests/passes/test_branch_cores.py"]),
    Mutation("few_steps_keep_the_bookkeeping", "a generation with nothing to skip takes no metric",
             [(STORE, '        if scheduler.nothing_to_skip and self.runtime.recorder is None:',
               '        if False:')],
             [T_EXPERTS]),
    # ----- the seams (tests/runtime/test_extension_points.py) ---------------------------------------------
    Mutation("config_policy_ignored", "AdaCacheConfig(policy=...) chooses the registered policy",
             [(POLICIES, "return POLICIES.get(config.policy)(config)", "return POLICIES.get(\"adacache\")(config)")],
             [T_EXTENSION]),
    Mutation("config_forecaster_ignored", "AdaCacheConfig(reuse=...) chooses the registered forecaster",
             [(FORECASTERS, "return forecaster_class(config.reuse)(config)",
               "return forecaster_class(\"linear\" if config.reuse not in (\"constant\", \"damped\") else config.reuse)(config)")],
             [T_EXTENSION]),
    Mutation("probe_path_suffix_match", "a probe path names a block at a dot, not the end of another list's name",
             [(PROBE, "return path == name or path.endswith(\".\" + name)", "return path.endswith(name)")],
             [T_EXTENSION]),
    Mutation("disable_leaves_block_forwards", "disable gives every guarded block its own forward back",
             [(MODULE_GUARD, "        for module, forward in reversed(self.originals):\n",
               "        for module, forward in reversed(self.originals[:0]):\n")],
             [T_EXTENSION]),
]


# ----- running ---------------------------------------------------------------------------------
def snapshot(dest: str) -> None:
    shutil.copytree(ROOT, dest, ignore=IGNORE, symlinks=True)


def apply(mutation: Mutation, tree: str) -> list:
    """Apply the patches in ``tree``; returns the problems (an anchor missing or not unique)."""
    problems = []
    for rel, anchor, replacement in mutation.patches:
        path = os.path.join(tree, rel)
        text = open(path).read()
        count = text.count(anchor)
        if count != 1:
            problems.append(f"{rel}: anchor {'not found' if count == 0 else f'found {count} times'}: {anchor!r}")
            continue
        with open(path, "w") as f:
            f.write(text.replace(anchor, replacement))
    return problems


def environment(tree: str, threads: str) -> dict:
    env = dict(os.environ)
    env.update(DIST_ENV)
    env["PYTHONPATH"] = tree + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = threads
    return env


def check_imports_from(tree: str, env: dict) -> None:
    out = subprocess.run([sys.executable, "-c", "import adacache_fx; print(adacache_fx.__file__)"],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    where = out.stdout.strip()
    if not where.startswith(os.path.realpath(tree)) and not where.startswith(tree):
        raise SystemExit(f"mutation_check: adacache_fx imports from {where!r}, not from the copy {tree}: "
                         "the mutations would not be tested")


_FAILED = re.compile(r"^(FAILED|ERROR) (\S+)", re.M)


def pytest(tree: str, files: list, env: dict, stop_first: bool, deselect: list) -> tuple:
    """Run pytest on ``files`` in ``tree``; returns (return code, failing test ids, seconds, tail)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:logging", "-p", "no:cacheprovider", "-rfE"]
    if stop_first:
        cmd.append("-x")
    for test_id in deselect:
        cmd += ["--deselect", test_id]
    cmd += files
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=PER_RUN_TIMEOUT_S)
        rc, text = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout or ""
        rc, text = "timeout", partial.decode(errors="replace") if isinstance(partial, bytes) else partial
    seconds = time.perf_counter() - start
    failed = list(dict.fromkeys(m.group(2) for m in _FAILED.finditer(text)))
    return rc, failed, seconds, text[-3000:]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout.splitlines():
            if line.startswith("Model name"):
                cpu = line.split(":", 1)[1].strip()
    except Exception:
        pass
    try:
        import torch
        torch_version = torch.__version__
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:
        torch_version, device = "?", "?"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch_version,
            "device": device}


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(rows: list, info: dict, command: str, total: float, baseline: dict, threads: str) -> str:
    caught = sum(r["status"] == "caught" for r in rows)
    lines = [
        "# Mutation check",
        "",
        "Each row breaks one core promise of the library with a textual patch of a copy of the",
        "repository and runs the test files that guard it (`pytest -x`: the first failing test is",
        "named). Every mutation must be caught; the script exits non-zero otherwise, and when a",
        "patch's anchor text is no longer in the library.",
        "",
        f"- command: `{command}`",
        *(f"- {k}: {v}" for k, v in info.items()),
        f"- OMP_NUM_THREADS: {threads or 'unset'}",
        f"- baseline (unmutated, every file below): {baseline['summary']} in {baseline['seconds']:.0f} s",
        f"- mutations caught: {caught} of {len(rows)}; total duration {total / 60:.1f} min",
        "",
        "| mutation | promise broken | patched | caught by | test files run | duration |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        by = "; ".join(f"`{t}`" for t in r["failed"][:4]) if r["failed"] else r["detail"]
        if len(r["failed"]) > 4:
            by += f" (+{len(r['failed']) - 4} more)"
        if r["status"] != "caught":
            by = f"**{r['status'].upper()}** {by}"
        files = ", ".join(os.path.basename(f) for f in r["tests"])
        lines.append(f"| `{r['name']}` | {_cell(r['promise'])} | {', '.join(sorted(r['files']))} | {_cell(by)} | "
                     f"{files} | {r['seconds']:.0f} s |")
    if baseline["deselected"]:
        lines += ["", "Deselected because they fail without any mutation (`--allow-baseline-failures`):", ""]
        lines += [f"- `{t}`" for t in baseline["deselected"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], help="run only this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--check-anchors", action="store_true",
                        help="only check that every patch applies to the checkout (seconds; exit 1 if not)")
    parser.add_argument("--all-failures", action="store_true", help="no -x: list every test that catches each")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run (not for the record)")
    parser.add_argument("--allow-baseline-failures", action="store_true",
                        help="deselect tests that fail unmutated instead of stopping")
    parser.add_argument("--threads", default=os.environ.get("OMP_NUM_THREADS", "1"),
                        help="OMP_NUM_THREADS of the test runs (default 1: steady on a loaded machine)")
    parser.add_argument("--out", default=OUT, help="markdown table to write")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s): {sorted(unknown)}")
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:36s} {m.promise}  [{', '.join(m.tests)}]")
        return 0

    if args.check_anchors:
        bad = 0
        for m in chosen:
            with tempfile.TemporaryDirectory() as tree:
                for rel in {p[0] for p in m.patches}:
                    os.makedirs(os.path.dirname(os.path.join(tree, rel)), exist_ok=True)
                    shutil.copy(os.path.join(ROOT, rel), os.path.join(tree, rel))
                problems = apply(m, tree)
            bad += bool(problems)
            print(f"{m.name:36s} {'ok' if not problems else '; '.join(problems)}")
        return 1 if bad else 0

    start_all = time.perf_counter()
    command = "python scripts/mutation_check.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    work = tempfile.mkdtemp(prefix="adacache_mutation_")
    pristine = os.path.join(work, "pristine")
    snapshot(pristine)   # the checkout may change while this runs: every mutation starts from this
    missing_files = sorted({f for m in chosen for f in m.tests if not os.path.exists(os.path.join(pristine, f))})
    if missing_files:
        print(f"mutation_check: test files missing: {missing_files}", file=sys.stderr)
        return 2
    env = environment(pristine, args.threads)
    check_imports_from(pristine, env)

    baseline = {"summary": "skipped", "seconds": 0.0, "deselected": []}
    if not args.no_baseline:
        files = list(dict.fromkeys(f for m in chosen for f in m.tests))
        print(f"baseline: {' '.join(files)}", flush=True)
        rc, failed, seconds, tail = pytest(pristine, files, env, stop_first=False, deselect=[])
        baseline.update(seconds=seconds, summary="passed" if rc == 0 else f"{len(failed)} failing")
        print(f"  rc {rc}, {seconds:.0f} s, failing: {failed}", flush=True)
        if rc != 0:
            if not args.allow_baseline_failures or not failed:
                print(tail, file=sys.stderr)
                print("mutation_check: the unmutated tests fail; fix them first (or --allow-baseline-failures)",
                      file=sys.stderr)
                return 2
            baseline["deselected"] = failed

    rows = []
    for m in chosen:
        tree = os.path.join(work, m.name)
        shutil.copytree(pristine, tree, symlinks=True)
        problems = apply(m, tree)
        row = {"name": m.name, "promise": m.promise, "files": {p[0] for p in m.patches}, "tests": m.tests,
               "failed": [], "seconds": 0.0, "detail": ""}
        if problems:
            row.update(status="anchor missing", detail="; ".join(problems))
        else:
            rc, failed, seconds, tail = pytest(tree, m.tests, environment(tree, args.threads),
                                               stop_first=not args.all_failures, deselect=baseline["deselected"])
            row.update(failed=failed, seconds=seconds)
            if rc == 0:
                row.update(status="survived", detail="every test passed")
            elif rc in (1, 2) and failed:
                row.update(status="caught")
            else:
                row.update(status="error", detail=f"pytest rc {rc}: {tail[-300:]!r}")
        shutil.rmtree(tree, ignore_errors=True)
        print(f"{m.name:36s} {row['status']:15s} {row['seconds']:6.0f} s  {row['failed'][:1] or row['detail']}",
              flush=True)
        rows.append(row)
    shutil.rmtree(work, ignore_errors=True)

    total = time.perf_counter() - start_all
    table = render(rows, machine(), command, total, baseline, args.threads)
    print(table)
    if not args.no_write:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table)
        print(f"wrote {os.path.relpath(args.out, ROOT)}")
    bad = [r["name"] for r in rows if r["status"] != "caught"]
    if bad:
        print(f"mutation_check: not caught: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

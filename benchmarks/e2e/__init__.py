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
measured back to back), the computed-step fraction, PSNR, SSIM and MS-GMSD (perceptual) of each
video against the baseline video of the same prompt and seed (mean and worst), the peak cache
memory, the graphs compiled (a graph break adds one) and the compiles after the warm-up
generation (recompiles). Across methods: whether PSNR and MS-GMSD order them alike.

From the repository root::

    python -m benchmarks.e2e                          # 16 prompts, 30 and 50 steps (about 1 h on 2 CPU cores)
    python -m benchmarks.e2e --quick --out /tmp/e2e   # smoke run: 2 prompts, 8 steps, eager

Writes ``<out>/e2e.{json,md}``, ``<out>/e2e_pareto.png`` (speedup vs PSNR) and
``<out>/e2e_motion.png`` (computed steps per video against its motion level).

Modules: :mod:`.methods` (the methods and how each is built and compiled; the fixed control's
schedule, from the real scheduler), :mod:`.protocol` (the workload and the interleaved
measurement), :mod:`.analysis` (per-method statistics, dominance, motion correlation),
:mod:`.report` (markdown, plots, merging runs), :mod:`.cli` (the command line).
"""

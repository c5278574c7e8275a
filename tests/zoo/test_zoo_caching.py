"""The caching matrix over the zoo (issue 4): for every zoo case that Dynamo captures in one
graph (and, separately, for the ones it does not),

* ``explain`` finds at least one region, its blocks and residual streams, a probe and a timestep
  (none for a model whose output ignores its timestep argument: each call is a step), and a frame
  layout for MoReg on video models (with the case's own config: ``frames_arg`` or
  ``packed_frames`` for packed video tokens);
* caching off (``{inf: 1}``) through ``compile_model`` (data-dependent ops captured) gives outputs
  identical to plain ``torch.compile(backend="eager")`` (default config) over 8 steps;
* a fixed codebook ``{inf: 3}`` over 12 steps computes steps 1, 2, 5, 8, 11, 12, the region
  blocks run on exactly those 6 steps (``report().block_executions`` sums the executions of
  every region runner of every graph: 6 per runner), and nothing recompiles
  (``error_on_recompile``).

The inner compiler is ``eager`` (CI budget). By default a representative subset runs (the core
cases, the MMDiT / Flux-style / video / audio families and the graph-break cases); set
``ADACACHE_ZOO_ALL=1`` for every case (about 72 x 10 s on 2 cores). The results of a full run are
in benchmarks/results/coverage.md (``PYTHONPATH=tests python -m zoo.coverage run|render``). Known
failures are ``xfail(strict=True)`` with the exact reason: a case that starts passing must be moved
out of ``XFAIL``.
"""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch


from adacache_fx import AdaCacheConfig, AdaCacheWarning, adacache_backend, compile_model, explain  # noqa: E402
from helpers import INF, sample_loop, timesteps  # noqa: E402
from helpers import dynamo_counts as counted  # noqa: E402
from zoo import ZOO, get_case  # noqa: E402

pytestmark = [pytest.mark.zoo, pytest.mark.slow]

ALL = os.environ.get("ADACACHE_ZOO_ALL", "") not in ("", "0")

#: case -> exact reason it does not pass the matrix (and what it would take).
XFAIL: dict[str, str] = {
}

#: case -> why no graph holds a whole block, so ``compile_model``'s default guard (``block_guard="auto"``)
#: must guard its block lists at their calls (runtime/module_guard.py) instead of inside a graph.
MODULE_GUARD: dict[str, str] = {
    "hidream_image": "the mixture-of-experts dispatch breaks Dynamo's graph inside every block even with "
                     "data-dependent ops captured (`bincount`, then a Python loop over the per-expert token counts), "
                     "so no graph holds a whole block",
}


def compile_options(name) -> dict:
    """The case's ``compile_model`` options besides its config: none (no case names its guard)."""
    return {}


#: cases whose graph breaks (see benchmarks/results/coverage.md): the block stack is in one of the graphs or not.
GRAPH_BREAK = sorted(n for n, c in ZOO.items() if c.one_graph is False)
ONE_GRAPH = sorted(n for n, c in ZOO.items() if c.one_graph)

#: the default subset: one or two cases per family (DiT/adaLN, cross-attention, MMDiT, Flux-style
#: double + single stream, Latte/STDiT interleaved lists, Wan / CogVideoX / LTX video, audio).
SUBSET = ["ref_dit", "ref_stdit", "dit", "pixart", "latte", "sd3", "flux", "hunyuan_dit", "wan", "cogvideox",
          "ltx_video", "hunyuan_video", "stable_audio", "sana", "omnigen", "helios", "mochi", "nucleus_moe_image",
          "kandinsky6_sr", "hunyuan_video15", "sana_wm_refiner", "dreamlite", "hidream_image", "minimax_h3"]

_models: dict = {}


def _model(name):
    if name not in _models:
        _models[name] = get_case(name).build()
    return _models[name]


def _params(names):
    out = []
    for name in names:
        marks = [pytest.mark.xfail(strict=True, reason=XFAIL[name])] if name in XFAIL else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def _selected(names):
    return names if ALL else [n for n in names if n in SUBSET or n in XFAIL and n in SUBSET]


def check_explain(name):
    case = get_case(name)
    model = _model(name)
    args, kwargs = case.make_inputs(2, 0.5 * case.t_max)
    torch._dynamo.reset()
    ex = explain(model, *args, config=AdaCacheConfig(**case.adacache), **kwargs)
    assert ex.regions, f"no region found:\n{ex}"
    assert ex.probe is not None, f"no probe:\n{ex}"
    assert any(ex.probe.block in r.block_paths for r in ex.regions)
    if case.uses_timestep:
        assert ex.timestep is not None, f"no timestep input found:\n{ex}"
    else:   # the output does not depend on it: each call is a step (num_steps), and explain says so
        assert ex.timestep is None and "each call is a step" in str(ex), f"a timestep input found:\n{ex}"
    for region in ex.regions:
        assert region.blocks and region.streams
    if case.is_video:
        assert ex.frame_layout is not None, f"video model without a frame layout:\n{ex}"
    return ex


def _compiled(name, config):
    """A copy of the case's model, compiled in place by ``compile_model`` (the cached original
    stays uncompiled for the other checks)."""
    model = copy.deepcopy(_model(name))
    torch._dynamo.reset()
    return model, compile_model(model, config, inner="eager", **compile_options(name))


def check_caching_off(name, steps=8):
    case = get_case(name)
    model = _model(name)
    ts = timesteps(steps, case.t_max)
    torch._dynamo.reset()
    plain = sample_loop(torch.compile(model, backend="eager"), case.make_inputs, ts, output=case.output)
    compiled, backend = _compiled(name, AdaCacheConfig(codebook={INF: 1}, num_steps=steps, **case.adacache))
    ours = sample_loop(compiled, case.make_inputs, ts, output=case.output)
    for step, (a, b) in enumerate(zip(plain, ours)):
        assert torch.equal(a, b), f"step {step + 1}: max |diff| {float((a - b).abs().max())}"
    assert any(g.runners for g in backend.graphs), f"nothing cached: {backend.uncached_graphs}"
    assert backend.report().computed_steps == list(range(1, steps + 1))
    return backend


def check_fixed_codebook(name):
    case = get_case(name)
    compiled, backend = _compiled(name, AdaCacheConfig(codebook={INF: 3}, num_steps=12, **case.adacache))
    if name in MODULE_GUARD:   # the first call runs eagerly (observed), the second compiles: as plain
        sample_loop(compiled, case.make_inputs, timesteps(12, case.t_max), output=case.output)   # torch.compile
        backend.reset()                                                        # it recompiles the first time
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = sample_loop(compiled, case.make_inputs, timesteps(12, case.t_max), output=case.output)
    report = backend.report()
    runners = sum(len(g.runners) for g in backend.graphs)
    assert runners >= 1, f"nothing cached: {report.uncached_graphs}"
    assert report.computed_steps == [1, 2, 5, 8, 11, 12]
    assert report.block_executions == 6 * runners * (2 if name in MODULE_GUARD else 1)
    assert all(torch.isfinite(o).all() for o in outs)
    assert len(report.metrics) == 5   # steps 2, 5, 8, 11, 12 each compare with the previous probe
    if case.is_video:   # MoReg saw the frame axis
        assert all(m.motion is not None for m in report.metrics)
    return backend


@pytest.mark.parametrize("name", _params(_selected(ONE_GRAPH)))
def test_one_graph_case_caches(name):
    """``torch.compile(fullgraph=True)`` captures the model in one graph. Under the default
    config a model may still take another path on its first call (Z-Image builds its rotary
    table lazily); a graph may then run uncached only for holding no block stack."""
    check_explain(name)
    check_caching_off(name)
    backend = check_fixed_codebook(name)
    assert all(reason.startswith("no block stack found") for reason in backend.uncached_graphs), \
        backend.uncached_graphs


def check_module_guard_caching_off(name):
    """``check_caching_off`` under the module-level guard, which must find every block list of the
    case as a region (so every block's FLOPs are inside the regions). Returns the guard."""
    case = get_case(name)
    backend = check_caching_off(name)
    assert [c.guard for c in backend.guard_choices] == ["modules"], backend.guard_choices
    guard = backend.graphs[0]
    assert sorted({r.container for r in guard.regions}) == sorted(case.block_lists), guard.describe()
    assert sum(len(r.paths) for r in guard.regions) == case.num_blocks, guard.describe()
    return guard


def dynamo_counts(name) -> dict:
    """``helpers.dynamo_counts`` over two 3-step generations, under plain ``torch.compile`` and
    under ``compile_model`` with the case's options: ``{"plain" | "ours": (graphs, graph breaks,
    graphs compiled in the second generation)}``."""
    case = get_case(name)
    config = AdaCacheConfig(codebook={INF: 1}, num_steps=3, **case.adacache)

    def ours(count):
        model = copy.deepcopy(_model(name))
        compile_model(model, config, inner=count, **compile_options(name))
        return model

    def generation(model):
        sample_loop(model, case.make_inputs, timesteps(3, case.t_max), output=case.output)

    return {"plain": counted(lambda count: torch.compile(copy.deepcopy(_model(name)), backend=count), generation),
            "ours": counted(ours, generation)}


@pytest.mark.parametrize("name", _params(_selected(sorted(MODULE_GUARD))))
def test_module_guard_case_caches_every_block_list(name):
    """No graph holds a whole block: the block lists are guarded at their calls. Every block list
    of the case is a region; exact with caching off; the contract; no more graph breaks than plain
    ``torch.compile`` and no graph compiled in a second generation."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdaCacheWarning)
        case = get_case(name)
        args, kwargs = case.make_inputs(2, 0.5 * case.t_max)
        torch._dynamo.reset()
        assert not explain(_model(name), *args, config=AdaCacheConfig(**case.adacache), **kwargs).regions
        check_module_guard_caching_off(name)
        check_fixed_codebook(name)
        counts = dynamo_counts(name)
        assert counts["ours"][1] <= counts["plain"][1] and counts["ours"][2] == 0, counts


@pytest.mark.parametrize("name", _params(_selected([n for n in GRAPH_BREAK if n not in MODULE_GUARD])))
def test_graph_break_case_caches_the_graph_with_the_blocks(name):
    """The model breaks Dynamo's graph itself under the default config; ``compile_model``, which
    captures data-dependent ops, makes no more graphs than plain ``torch.compile``, is exact with
    caching off, and caches the graph that holds the block stack."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdaCacheWarning)
        ex = check_explain(name)
        case = get_case(name)
        args, kwargs = case.make_inputs(2, 0.5 * case.t_max)
        torch._dynamo.reset()
        plain = explain(_model(name), *args, capture_data_dependent=False, **kwargs)
        assert 1 < len(plain.graphs) and len(ex.graphs) <= len(plain.graphs)
        check_caching_off(name)
        check_fixed_codebook(name)


def test_every_case_is_in_the_matrix():
    assert set(ONE_GRAPH) | set(GRAPH_BREAK) == set(ZOO)
    assert set(XFAIL) <= set(ZOO) and set(MODULE_GUARD) <= set(GRAPH_BREAK)
    assert set(SUBSET) <= set(ZOO)


#: a few cases under inductor (the rest of the matrix uses the eager inner backend for speed):
#: an image MMDiT with two streams and a video model with MoReg.
INDUCTOR_CASES = ["flux", "wan"]


@pytest.mark.parametrize("name", INDUCTOR_CASES)
def test_case_under_inductor(name):
    """Caching off matches plain ``torch.compile`` (inductor) to rounding (the region pieces are
    compiled separately, so inductor's fusion can differ in the last bits); a fixed codebook
    follows the contract with no recompile."""
    case = get_case(name)
    model = _model(name)
    ts = timesteps(6, case.t_max)
    plain = sample_loop(torch.compile(model), case.make_inputs, ts, output=case.output)
    torch._dynamo.reset()
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 1}, num_steps=6), inner="inductor")
    ours = sample_loop(torch.compile(model, backend=backend), case.make_inputs, ts, output=case.output)
    for a, b in zip(plain, ours):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert backend.report().computed_steps == list(range(1, 7))
    torch._dynamo.reset()
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="inductor")
    compiled = torch.compile(model, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = sample_loop(compiled, case.make_inputs, timesteps(12, case.t_max), output=case.output)
    assert backend.report().computed_steps == [1, 2, 5, 8, 11, 12]
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("name", ["ltx_video"] if not ALL else ["ltx_video", "ltx2", "sana_wm_refiner", "minimax_h3"])
def test_packed_video_case_caches_with_moreg_off(name):
    """Packed-token video models compiled without ``frames_arg`` (no 5-D input, so no frame
    layout) still cache exactly: caching off equals plain compile, a fixed codebook follows the
    contract, and the metrics have no motion score (MoReg off)."""
    check_caching_off(name)
    case = get_case(name)
    torch._dynamo.reset()
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        sample_loop(torch.compile(_model(name), backend=backend), case.make_inputs, timesteps(12, case.t_max),
                    output=case.output)
    report = backend.report()
    assert report.computed_steps == [1, 2, 5, 8, 11, 12]
    assert report.metrics and all(m.motion is None for m in report.metrics)

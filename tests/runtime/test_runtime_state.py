"""Runtime state the schedule depends on: the step count across generations, the step clock
without host reads of the timestep, and one schedule per compiled model instance.

Each test failed before its fix (set_num_steps was lost on reset; every call read the timestep
on the host; every model compiled with backend="adacache" shared one scheduler)."""
import contextlib
import dataclasses
import warnings

import pytest
import torch

import adacache_fx.backend as backend_module
from adacache_fx import AdaCacheConfig, AdaCacheWarning, adacache_backend
from helpers import INF, timesteps
from models.toy_models import ToyDiT, seeded

CONTRACT_12 = [1, 2, 5, 8, 11, 12]    # {inf: 3} over 12 steps with the last two forced
NO_FORCED_END_12 = [1, 2, 5, 8, 11]   # the same without N: step 12 is not forced


def _model(seed=0):
    return seeded(ToyDiT().eval(), seed)


def _euler(model, steps, x0, announce=None, make_t=None):
    """A flow-Euler-like loop: the input changes every step with the model's output. ``(x, outs)``."""
    loop = _euler_calls(model, steps, x0, announce, make_t)
    with torch.no_grad():
        while True:
            try:
                next(loop)
            except StopIteration as done:
                return done.value


def _solo(build, steps, seed, config):
    """``(x, outs, computed steps)`` of ``build()`` alone on a fresh backend (the reference of an
    interleaved run)."""
    torch._dynamo.reset()
    backend = adacache_backend(config, inner="eager")
    return _euler(torch.compile(build(), backend=backend), steps, _x(seed)) + (backend.report().computed_steps,)


def _interleaved(runs):
    """``_euler`` loops of several models, one call each in turn: ``runs`` is ``[(compiled model,
    steps, x0, first round)]``, a model joining at its first round. Returns each one's ``(x, outs)``."""
    loops = [iter(_euler_calls(model, steps, x0)) for model, steps, x0, _start in runs]
    results, pending, rounds = [None] * len(runs), set(range(len(runs))), 0
    with torch.no_grad():
        while pending:
            for i, (_m, _s, _x0, start) in enumerate(runs):
                if i in pending and rounds >= start:
                    try:
                        next(loops[i])
                    except StopIteration as done:
                        results[i] = done.value
                        pending.discard(i)
            rounds += 1
    return results


def _euler_calls(model, steps, x0, announce=None, make_t=None):
    """``_euler`` one call at a time (a generator; its return value is ``(x, outs)``)."""
    x, outs = x0.clone(), []
    grid = list(steps) + [0.0]
    for t, t_next in zip(grid, grid[1:]):
        if announce is not None:
            announce(t)
        v = model(x, make_t(t) if make_t else torch.full((x.shape[0],), float(t)))
        outs.append(v)
        x = x + (t_next - t) / 1000.0 * v
        yield
    return x, outs


def _assert_same_generation(run, reference):
    """Bit-identical outputs at every step and the same final latents: ``(x, outs)`` pairs."""
    (x, outs), (ref_x, ref_outs) = run, reference
    assert len(outs) == len(ref_outs)
    for a, b in zip(outs, ref_outs):
        assert torch.equal(a, b)
    assert torch.equal(x, ref_x)


def _x(seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 9, 5, generator=g)


# ----- set_num_steps survives reset -------------------------------------------------
def test_set_num_steps_survives_explicit_and_automatic_reset():
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}), inner="eager")
    model = torch.compile(_model(), backend=backend)
    backend.set_num_steps(12)
    _euler(model, timesteps(12), _x())
    assert backend.report().computed_steps == CONTRACT_12
    backend.reset()                                   # explicit reset
    _euler(model, timesteps(12), _x(2))
    assert backend.report().computed_steps == CONTRACT_12
    _euler(model, timesteps(12), _x(3))               # automatic: the timestep moved back
    assert backend.report().computed_steps == CONTRACT_12
    backend.set_num_steps(None)                       # back to config.num_steps (None)
    _euler(model, timesteps(12), _x(4))
    assert backend.report().computed_steps == NO_FORCED_END_12


def test_set_num_steps_rejects_bad_values_without_changing_state():
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}), inner="eager")
    backend.set_num_steps(12)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_steps"):
            backend.set_num_steps(bad)
    assert backend.runtime.requested_num_steps == 12


# ----- no host read of the timestep ---------------------------------------------------
@contextlib.contextmanager
def poisoned_host_reads(tensors: list):
    """Any host read (float/int/bool/item/tolist/numpy) of a tensor sharing storage with one of
    ``tensors`` raises: what a sync-free runtime must never do on a reused step."""
    storages = {t.untyped_storage().data_ptr() for t in tensors}
    names = ["__float__", "__int__", "__index__", "__bool__", "item", "tolist", "numpy"]
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def guard(name):
        original = originals[name]

        def method(self, *args, **kwargs):
            if self.untyped_storage().data_ptr() in storages:
                raise RuntimeError(f"host read of the timestep ({name})")
            return original(self, *args, **kwargs)
        return method

    for n in names:
        setattr(torch.Tensor, n, guard(n))
    try:
        yield
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)


def _poisoned_timesteps(steps, batch=2):
    return {float(t): torch.full((batch,), float(t)) for t in steps}


def test_announced_steps_read_no_timestep_on_the_host():
    steps = timesteps(12)
    reference_backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    torch._dynamo.reset()
    ref_x, ref_outs = _euler(torch.compile(_model(), backend=reference_backend), steps, _x())
    assert reference_backend.report().computed_steps == CONTRACT_12

    torch._dynamo.reset()
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    model = torch.compile(_model(), backend=backend)
    ts = _poisoned_timesteps(steps)
    with poisoned_host_reads(list(ts.values())):
        x, outs = _euler(model, steps, _x(), announce=backend.step, make_t=lambda t: ts[float(t)])
    assert backend.report().computed_steps == CONTRACT_12
    assert backend.runtime.timesteps.host_reads == 0
    _assert_same_generation((x, outs), (ref_x, ref_outs))


def test_poison_catches_the_fallback_read():
    # the guard above is real: without announcements the runtime reads the input, and it raises
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    model = torch.compile(_model(), backend=backend)
    ts = _poisoned_timesteps(timesteps(12))
    with poisoned_host_reads(list(ts.values())), pytest.raises(RuntimeError, match="host read of the timestep"):
        _euler(model, timesteps(12), _x(), make_t=lambda t: ts[float(t)])


def test_step_rejects_device_tensors_and_resets_with_the_generation():
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    backend.step(torch.tensor([500.0]))
    assert backend.runtime.timesteps.announced == 500.0
    backend.reset()
    assert backend.runtime.timesteps.announced is None
    with pytest.raises(ValueError, match="CPU tensor"):
        backend.step(torch.empty(1, device="meta"))


# ----- one schedule per compiled model --------------------------------------------
def test_registered_name_keeps_two_models_apart(monkeypatch):
    """Two models of one class compiled with backend="adacache" share Dynamo's compiled graph;
    served interleaved, each keeps its own schedule, deltas and report."""
    config = AdaCacheConfig(codebook={INF: 3}, num_steps=12)
    steps_a = timesteps(12)
    steps_b = [t - 37.0 for t in timesteps(12)]

    solo = [_solo(lambda: _model(0), steps_a, 0, config), _solo(lambda: _model(5), steps_b, 5, config)]

    torch._dynamo.reset()
    monkeypatch.setattr(backend_module, "_default", backend_module.AdaCacheBackend(config, inner="eager"))
    model_a, model_b = _model(0), _model(5)
    compiled_a = torch.compile(model_a, backend="adacache")
    compiled_b = torch.compile(model_b, backend="adacache")
    # model b starts its generation while model a is in the middle of its own
    (xa, outs_a), (xb, outs_b) = _interleaved([(compiled_a, steps_a, _x(0), 0), (compiled_b, steps_b, _x(5), 0)])
    default = backend_module.default_backend()
    assert len(default.graphs) == 1            # Dynamo did share the graph between the two
    assert default.report(model_a).computed_steps == solo[0][2] == CONTRACT_12
    assert default.report(model_b).computed_steps == solo[1][2] == CONTRACT_12
    _assert_same_generation((xa, outs_a), solo[0][:2])
    _assert_same_generation((xb, outs_b), solo[1][:2])


def test_report_of_an_unknown_model_says_so():
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    _euler(torch.compile(_model(), backend=backend), timesteps(3), _x())
    with pytest.raises(ValueError, match="has not run ToyDiT"):
        backend.report(_model(9))


# ----- the diffusers integration's clock: the pipeline scheduler's timesteps, on the host -------
def _tiny_dit_pipeline(scheduler):
    diffusers = pytest.importorskip("diffusers")
    from zoo import randomize_
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=4)
    randomize_(transformer, seed=0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                                  latent_channels=4, norm_num_groups=4, sample_size=8)
    pipe = diffusers.DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler_name", ["DDIMScheduler", "HeunDiscreteScheduler"])
def test_pipeline_clock_reads_no_timestep_and_matches_reading_it(scheduler_name):
    diffusers = pytest.importorskip("diffusers")
    from adacache_fx.integrations.diffusers import enable
    pipe = _tiny_dit_pipeline(getattr(diffusers, scheduler_name)())
    backend = enable(pipe, AdaCacheConfig(codebook={INF: 3}), inner="eager")

    def generate():
        return pipe(class_labels=[1, 2], num_inference_steps=8, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    clocked = generate()
    computed = backend.report().computed_steps
    assert backend.runtime.timesteps.host_reads == 0
    source, backend.runtime.timesteps.source = backend.runtime.timesteps.source, None   # read the input instead
    read = generate()
    assert backend.runtime.timesteps.host_reads > 0
    assert backend.report().computed_steps == computed == [1, 2, 5, 7, 8]
    assert torch.equal(clocked, read)
    backend.runtime.timesteps.source = source
    assert torch.equal(generate(), clocked)             # a second generation through the clock
    assert backend.report().computed_steps == computed


class _OtherDiT(ToyDiT):
    """Another model class with ToyDiT's forward: its own graph, owner and schedule."""


def test_two_model_classes_on_one_backend_keep_their_own_schedules():
    """Two classes compiled with one backend, called in turn, the second starting its generation
    while the first is in the middle of its own: each computes the steps it computes alone and
    returns what it returns alone (both graphs number their first model 0: the backend tells
    them apart by the class each graph was traced from)."""
    config = AdaCacheConfig(codebook={INF: 3}, num_steps=12)
    steps_a = timesteps(12)
    steps_b = [t - 37.0 for t in timesteps(12)]
    make = (lambda: _model(0), lambda: seeded(_OtherDiT().eval(), 5))

    solo = [_solo(make[0], steps_a, 0, config), _solo(make[1], steps_b, 5, config)]

    torch._dynamo.reset()
    backend = adacache_backend(config, inner="eager")
    model_a, model_b = make[0](), make[1]()
    compiled_a, compiled_b = torch.compile(model_a, backend=backend), torch.compile(model_b, backend=backend)
    (xa, outs_a), (xb, outs_b) = _interleaved([(compiled_a, steps_a, _x(0), 0),
                                               (compiled_b, steps_b, _x(5), 3)])   # b starts 3 calls later
    assert len(backend.graphs) == 2
    assert backend.report(model_a).computed_steps == solo[0][2] == CONTRACT_12
    assert backend.report(model_b).computed_steps == solo[1][2] == CONTRACT_12
    _assert_same_generation((xa, outs_a), solo[0][:2])
    _assert_same_generation((xb, outs_b), solo[1][:2])


def test_a_dropped_model_is_freed():
    import gc
    import weakref
    backend = adacache_backend(AdaCacheConfig(codebook={INF: 3}, num_steps=12), inner="eager")
    model = _model(0)
    compiled = torch.compile(model, backend=backend)
    _euler(compiled, timesteps(12), _x())
    ref = weakref.ref(model)
    weights = [weakref.ref(p) for p in model.parameters()]
    del model, compiled
    torch._dynamo.reset()   # Dynamo's own code cache holds the compiled frame's guards
    gc.collect()
    assert ref() is None and all(w() is None for w in weights)


# ----- presets follow the generation's step count ---------------------------------------------------
def _computed_steps(config, steps, set_num_steps=None):
    torch._dynamo.reset()
    backend = adacache_backend(config, inner="eager")
    model = torch.compile(_model(3), backend=backend)
    if set_num_steps is not None:
        backend.set_num_steps(set_num_steps)
    x, _outs = _euler(model, timesteps(steps), _x(3))
    return backend.report().computed_steps, x


def test_a_preset_follows_the_generations_step_count_an_explicit_codebook_stays_literal():
    from adacache_fx.config import preset_codebook
    at_50, x_50 = _computed_steps(AdaCacheConfig.fast(50), 50)
    followed, x_followed = _computed_steps(AdaCacheConfig.fast(30), 50, set_num_steps=50)
    literal, _x_literal = _computed_steps(AdaCacheConfig(codebook=preset_codebook("fast", 30), num_steps=30), 50,
                                          set_num_steps=50)
    assert followed == at_50 and torch.equal(x_followed, x_50)
    assert literal != at_50   # the 30-step codebook at 50 steps computes another schedule
    assert AdaCacheConfig.fast(30).codebook_for(50) == preset_codebook("fast", 50)
    assert AdaCacheConfig.fast(30, codebook={INF: 3}).preset is None
    assert AdaCacheConfig.from_dict(AdaCacheConfig.slow(20).to_dict()).preset == "slow"


def test_a_calibrated_codebook_used_at_another_step_count_warns_with_both_counts():
    from adacache_fx import AdaCacheWarning
    from adacache_fx.runtime.policies import base as policy_base
    policy_base._warned_counts.clear()
    config = AdaCacheConfig(codebook={0.1: 3, INF: 1}, num_steps=12, fitted_steps=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdaCacheWarning)
        _computed_steps(config, 12)   # at its own count: no warning
    with pytest.warns(AdaCacheWarning, match="calibrated at 12 steps and this generation has 20"):
        _computed_steps(config, 20, set_num_steps=20)
    # a preset replaced by another codebook is literal from then on (calibration's fits are)
    assert dataclasses.replace(AdaCacheConfig.fast(30), codebook={INF: 2}).preset is None
    assert dataclasses.replace(AdaCacheConfig.fast(30), num_steps=50).preset is None


def test_the_config_is_frozen_derive_one_with_replace():
    config = AdaCacheConfig.fast(30)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.codebook = {INF: 3}
    with pytest.raises(ValueError, match="num_steps"):
        dataclasses.replace(config, num_steps=0)   # a derived config is validated as any config
    backend = adacache_backend(config, inner="eager")
    with pytest.raises(ValueError, match="probe_block shapes the compiled graphs"):
        backend.set_config(dataclasses.replace(config, probe_block=2))

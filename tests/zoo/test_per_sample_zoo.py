"""Per-sample schedules on diffusers transformers (tiny zoo configs): the sub-batch plan must
hold on code nobody here wrote, with its text tokens, rotary tables, joint attention and
two block lists.

To make the samples' schedules differ whatever the model's distances are, sample ``k`` of the
batch gets the fixed codebook ``{inf: k + 1}`` (computes every step, every other step, every
third); each sample's reference is the same rows run alone, in a batch of one, with that codebook
and one schedule (``per_sample=False``). The inputs change every step (seeded per step, as a
sampler's do). Checked per sample and step: its computed steps, and its output to float tolerance
(sub-batches sum in another order); and that the blocks ran on sub-batches (counted).
"""
import copy
import warnings

import pytest
import torch

from adacache_fx import AdaCacheConfig, compile_model
from adacache_fx.runtime import per_sample_scheduler
from helpers import INF, timesteps
from zoo import get_case

pytestmark = [pytest.mark.zoo, pytest.mark.slow]

# two block lists on joint tokens; video; text + video tokens. CogVideoX also under inductor, which asserts
# every input's strides: its blocks get the video tokens as a strided slice of the joint sequence
CASES = [("flux", "eager"), ("wan", "eager"), ("cogvideox", "eager"), ("cogvideox", "inductor")]
STEPS = 8
SAMPLES = 3


def _batched(case, batch: int, t: float, step: int):
    return case.make_inputs(batch, t, seed=step)


def _rows(case, t: float, step: int, i: int):
    """Sample ``i``'s inputs alone: the tensors that have the batch in dim 0 sliced to row ``i``."""
    (args, kwargs), (one_args, one_kwargs) = _batched(case, SAMPLES, t, step), _batched(case, 1, t, step)

    def pick(v, one):
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == SAMPLES and one.shape[0] == 1:
            return v[i:i + 1]
        return v
    return (tuple(pick(a, o) for a, o in zip(args, one_args)),
            {k: pick(v, one_kwargs[k]) for k, v in kwargs.items()})


def _loop(case, model, make):
    outs = []
    with torch.no_grad():
        for step, t in enumerate(timesteps(STEPS, case.t_max)):
            args, kwargs = make(t, step)
            outs.append(case.output(model(*args, **kwargs)).clone())
    return outs


@pytest.mark.parametrize("name,inner", CASES)
def test_zoo_samples_compute_and_return_what_they_would_alone(name, inner, monkeypatch):
    case = get_case(name)
    base = case.build()
    singles = []
    for i in range(SAMPLES):
        model = copy.deepcopy(base)
        torch._dynamo.reset()
        backend = compile_model(model, AdaCacheConfig(codebook={INF: i + 1}, num_steps=STEPS, reuse="constant",
                                                      **case.adacache), inner=inner)
        outs = _loop(case, model, lambda t, step, i=i: _rows(case, t, step, i))
        singles.append((backend.report().computed_steps, outs))

    new_sample = per_sample_scheduler.PerSampleScheduler._new_sample

    def rate_per_sample(self):   # sample k: {inf: k + 1}
        sample = new_sample(self)
        sample.config = AdaCacheConfig(codebook={INF: len(self._made) % SAMPLES + 1}, num_steps=STEPS)
        self._made.append(sample)
        return sample
    monkeypatch.setattr(per_sample_scheduler.PerSampleScheduler, "_made", [], raising=False)
    monkeypatch.setattr(per_sample_scheduler.PerSampleScheduler, "_new_sample", rate_per_sample)

    model = copy.deepcopy(base)
    torch._dynamo.reset()
    backend = compile_model(model, AdaCacheConfig(codebook={INF: 1}, num_steps=STEPS, reuse="constant",
                                                  per_sample=True, **case.adacache), inner=inner)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*per_sample.*")   # no fallback to computing every row
        outs = _loop(case, model, lambda t, step: _batched(case, SAMPLES, t, step))
    graph = next(g for g in backend.graphs if g.runners)
    assert graph.sub_batch is not None, "no sub-batch plan"
    assert backend.report().sample_computed_steps == [steps for steps, _ in singles]
    assert any(rows < SAMPLES for rows in graph.runners[0].batch_rows)   # some steps ran part of the batch
    for i, (_steps, alone) in enumerate(singles):
        for step, (batched, single) in enumerate(zip(outs, alone), start=1):
            torch.testing.assert_close(batched[i:i + 1], single, rtol=1e-4, atol=1e-4,
                                       msg=lambda m, s=step, i=i: f"{name}, sample {i}, step {s}: {m}")

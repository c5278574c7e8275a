"""Per-sample schedules under sequence parallelism (2 gloo ranks, CPU): every rank takes the
same per-sample decisions, equal to a single process's, because the per-sample sums are reduced
(one collective for all samples) before any sample's codebook lookup. A sub-batch runs the
model's all-to-alls on the same rows on every rank, so the ranks' collectives stay matched.

The model is the Ulysses video DiT of ``examples/models/sp_dit.py``; the loop is a flow-Euler
loop whose samples are perturbed by different amounts per step (seeded per sample)."""
import pytest
import torch

from adacache_fx import AdaCacheConfig, compile_model
from examples.models.sp_dit import SPVideoDiT, make_inputs
from helpers import INF, timesteps
from helpers.distributed import launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 12
SAMPLES = 3
MOTION = (0.0, 0.05, 0.5)


def _config():
    return AdaCacheConfig(codebook={0.34: 3, 0.6: 2, INF: 1}, num_steps=STEPS, per_sample=True,
                          moreg_normalizer=0.005, reuse="constant")


def _loop(model, backend):
    (x, _ts, text), _ = make_inputs(SAMPLES, 1000.0, seed=0)
    noise = [torch.Generator().manual_seed(100 + s) for s in range(SAMPLES)]
    grid = timesteps(STEPS) + [0.0]
    outs = []
    with torch.no_grad():
        for t, t_next in zip(grid, grid[1:]):
            backend.step(t)
            out = model(x, torch.full((SAMPLES,), t), text)
            outs.append(out.clone())
            x = x + (t_next - t) / 1000.0 * out
            x = x + torch.stack([MOTION[s] * torch.randn(x.shape[1:], generator=g) for s, g in enumerate(noise)])
    return outs


def _scenario_per_sample(rank, world, ref):
    import torch.distributed as dist
    torch._dynamo.reset()
    model = SPVideoDiT(sp_group=dist.group.WORLD).eval()
    backend = compile_model(model, _config(), inner="eager")
    outs = _loop(model, backend)
    return {"steps": backend.scheduler.sample_computed_steps, "outputs": [o.numpy() for o in outs],
            "rows": list(backend.graphs[0].runners[0].batch_rows), "planned": backend.graphs[0].sub_batch is not None}


@pytest.fixture(scope="module")
def single():
    torch._dynamo.reset()
    model = SPVideoDiT().eval()
    backend = compile_model(model, _config(), inner="eager")
    outs = _loop(model, backend)
    return {"steps": backend.scheduler.sample_computed_steps, "outputs": outs}


def test_sp_ranks_take_the_single_process_per_sample_decisions(single):
    ranks = launch(2, {}, scenarios={"per_sample": _scenario_per_sample})
    results = [r["per_sample"] for r in ranks]
    assert len({tuple(map(tuple, r["steps"])) for r in results}) == 1   # every rank alike
    assert results[0]["steps"] == single["steps"]
    assert len({tuple(s) for s in single["steps"]}) > 1                   # the samples differ
    assert results[0]["planned"] and any(n < SAMPLES for n in results[0]["rows"])   # some steps ran a sub-batch
    for got, want in zip(results[0]["outputs"], single["outputs"]):
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)

"""The branch study's emulation (benchmarks/branch_study.py): the cores are found by their share of
a block's weights, and a wrapped core computes on the schedule's steps and forecasts on the others."""
import torch

from benchmarks.branch_study import CoreWithCache, cores_of, forecast
from benchmarks.schedule_study import _Emulation
from models.toy_models import Block


def test_the_cores_are_the_heavy_children():
    assert cores_of(Block(24)) == ["qkv", "proj", "mlp"]   # the norms hold 2 x 48 of ~7 k weights


def test_forecast_is_constant_or_linear_in_the_timestep():
    history = [(0.8, torch.full((2,), 1.0)), (0.6, torch.full((2,), 3.0))]
    assert torch.equal(forecast(history, 0.5, "constant"), history[-1][1])
    assert torch.allclose(forecast(history, 0.5, "linear"), torch.full((2,), 4.0))
    assert torch.equal(forecast(history[:1], 0.5, "linear"), history[0][1])


def test_a_core_computes_on_the_schedule_and_forecasts_between():
    emu = _Emulation()
    calls = []

    class Core(torch.nn.Module):
        def forward(self, x):
            calls.append(emu.step)
            return x * emu.t
    core = CoreWithCache(Core(), emu)
    emu.schedule, emu.mode = {1, 2, 5}, "linear"
    outputs = []
    for step, t in zip(range(1, 6), (1.0, 0.8, 0.6, 0.4, 0.2)):
        emu.step, emu.t = step, t
        outputs.append(core(torch.ones(3)))
    assert calls == [1, 2, 5]
    assert torch.allclose(outputs[2], torch.full((3,), 0.6)) and torch.allclose(outputs[3], torch.full((3,), 0.4))
    assert torch.allclose(outputs[4], torch.full((3,), 0.2))


def test_metric_agreement_finds_the_pairs_the_metrics_order_differently():
    from benchmarks.branch_study import metric_agreement

    def point(granularity, psnr, gmsd):
        return {"granularity": granularity, "mode": "linear", "psnr_mean": psnr, "psnr_worst": psnr - 5,
                "ms_gmsd_mean": gmsd, "ms_gmsd_worst": gmsd * 2}
    rows = [{"rate": 3, "stack": point("stack", 35.0, 0.02), "branch": point("branch", 34.0, 0.03)},
            {"rate": 5, "stack": point("stack", 30.0, 0.05), "branch": point("branch", 29.0, 0.04)}]
    agree = metric_agreement(rows)
    assert agree["points"] == 4 and agree["rho_mean"] < 0
    assert agree["discordant"] == [("stack linear rate 5", "branch linear rate 5", 1.0)]

"""The AdaCache paper's own model, as its code runs it (``tests/models/opensora_style.py``: Open-Sora 1.2's
STDiT3 with per-frame masked, gated residual updates through ``torch.where``, and ``.item()``,
``masked_select``, ``.tolist()`` outside the blocks). Checked: plain ``torch.compile`` breaks its
graph; ``compile_model`` caches the whole stack with the official probe (the temporal-attention
residual of a middle temporal block); caching off is bit-identical to plain ``torch.compile``;
and with the official 30-step fast codebook and MoReg it computes exactly the steps that the
paper's method, hand-patched into the model and scheduled by the formulas of
docs/concepts/adacache.md written out here, computes on the same sampling loop, with the same outputs."""
import pytest
import torch

from adacache_fx import AdaCacheConfig, compile_model, explain
from models.opensora_style import HandwrittenAdaCache, OpenSoraStyleSTDiT3, make_inputs
from helpers import timesteps

FAST_30 = {0.08: 6, 0.16: 5, 0.24: 4, 0.32: 3, 0.40: 2, 1.00: 1}   # the public code's 30-step fast codebook
PROBE = 1   # a middle temporal block of 2 (block 13 of 28 in the released model)


def _model():
    return OpenSoraStyleSTDiT3(input_size=8, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                               caption_channels=24, pred_sigma=False, init="random", seed=0).eval()


def _euler(model, steps, record=None):
    x, y, mask, x_mask, height, width = make_inputs()
    grid = list(steps) + [0.0]
    outs = []
    with torch.no_grad():
        for t, t_next in zip(grid, grid[1:]):
            if record is not None:
                record(t)
            v = model(x, torch.full((2,), float(t)), y, mask, x_mask, height, width)
            outs.append(v)
            x = x + (t_next - t) / 150.0 * v
    return outs


def _graphs(model, capture):
    from adacache_fx.tracing import trace_config
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with trace_config(capture):
        _euler(torch.compile(model, backend=count), timesteps(1))
    return len(graphs)


def test_plain_compile_breaks_the_graph_and_compile_model_caches_the_stack():
    model = _model()
    assert _graphs(model, capture=False) > 1
    torch._dynamo.reset()
    e = explain(model, *_call_args(), config=AdaCacheConfig(probe_block=f"temporal_blocks.{PROBE}"))
    assert [r.block_paths for r in e.regions] == [["spatial_blocks.0", "temporal_blocks.0", "spatial_blocks.1",
                                                   "temporal_blocks.1"]], str(e)
    assert e.probe.block == f"temporal_blocks.{PROBE}" and e.probe.rule == "residual branch", str(e)
    assert e.frame_layout is not None and e.cached_block_flops_fraction == 1.0, str(e)


def _call_args():
    x, y, mask, x_mask, height, width = make_inputs()
    return x, torch.full((2,), 500.0), y, mask, x_mask, height, width


def test_caching_off_is_bit_identical_to_plain_compile():
    model = _model()
    plain = _euler(torch.compile(_model(), backend="eager"), timesteps(6))
    torch._dynamo.reset()
    backend = compile_model(model, AdaCacheConfig.no_cache(num_steps=6), inner="eager")
    ours = _euler(model, timesteps(6))
    assert backend.graphs and backend.graphs[0].runners and backend.report().computed_steps == list(range(1, 7))
    for a, b in zip(ours, plain):
        assert torch.equal(a, b)


def _paper_schedule(model, steps):
    """The paper's method by hand: the model patched to skip its blocks and add the cached delta,
    the decision after each computed step from the probe (docs/concepts/adacache.md, public defaults)."""
    n = len(steps)
    state = HandwrittenAdaCache(probe_block=PROBE)
    model.handwritten = state
    model.temporal_blocks[PROBE].record = True
    computed, previous, prev_reg = [], None, None
    plan = {"next": 1, "step": 0}

    def before_call(t):
        plan["step"] += 1
        s = plan["step"]
        state.skip = not (s == 1 or s >= n - 1 or s >= plan["next"])
        if not state.skip:
            computed.append(s)

    outs = []
    x, y, mask, x_mask, height, width = make_inputs()
    grid = list(steps) + [0.0]
    with torch.no_grad():
        for t, t_next in zip(grid, grid[1:]):
            before_call(t)
            v = model(x, torch.full((2,), float(t)), y, mask, x_mask, height, width)
            outs.append(v)
            x = x + (t_next - t) / 150.0 * v
            s = plan["step"]
            if state.skip:
                continue
            r = state.probe.double()
            if previous is None:
                plan["next"] = s + 1                                   # the rate starts at 1
            else:
                k = s - computed[-2]
                distance = float((r - previous).abs().sum() / previous.abs().sum()) / k
                frames = r.reshape(2, 4, -1)                          # (B, T, S*D), frame-major tokens
                motion = float((frames[:, 1:] - frames[:, :-1]).abs().sum()
                               / (frames[:, 1:].abs().sum() + frames[:, :-1].abs().sum()))
                reg = (motion / 0.385) ** 8 / 1 if 4 <= s <= 26 else 1.0  # MoReg window 4..26 of 30
                grad = 10 * (reg - (prev_reg if prev_reg is not None else reg)) / k
                prev_reg = reg
                distance *= reg + abs(grad)
                rate = next((rate for threshold, rate in FAST_30.items() if distance < threshold), list(FAST_30.values())[-1])
                plan["next"] = s + rate
            previous = r
    model.handwritten = None
    return computed, outs


def test_the_fast_preset_computes_the_papers_steps():
    steps = timesteps(30)
    computed, expected = _paper_schedule(_model(), steps)
    assert 2 < len(computed) < 30, computed   # the schedule skips, and not everything
    model = _model()
    backend = compile_model(model, AdaCacheConfig.fast(30, reuse="constant", probe_block=f"temporal_blocks.{PROBE}"),
                            inner="eager")
    outs = _euler(model, steps)
    report = backend.report()
    assert report.computed_steps == computed
    assert all(m.motion is not None for m in report.metrics)
    assert len({m.rate for m in report.metrics}) >= 2   # more than the first codebook entry is walked
    for step, (out, exp) in enumerate(zip(outs, expected), 1):
        torch.testing.assert_close(out, exp, rtol=1e-4, atol=1e-5, msg=f"step {step}")


@pytest.mark.parametrize("preset", ["fast", "slow"])
def test_the_presets_codebooks_are_the_public_code_ones(preset):
    codebook = AdaCacheConfig.fast(30).codebook if preset == "fast" else AdaCacheConfig.slow(30).codebook
    public = FAST_30 if preset == "fast" else {0.08: 3, 0.16: 2, 0.24: 1, 0.32: 1, 0.40: 1, 1.00: 1}
    assert codebook == public

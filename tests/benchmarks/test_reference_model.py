"""Fast tests for the shipped reference model (examples/reference, examples/weights)."""
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from examples.reference import (  # noqa: E402
    DIRECTIONS, MAX_TOKENS, VOCAB, MovingShapes, ShapeSpec, all_specs, load_reference_model, render, sample,
    tokenize,
)
from examples.reference.evaluate import (  # noqa: E402
    REJECT_RESIDUAL, calibrate, check_data, control_scores, eval_specs, measure, truth,
)
from examples.reference.data import trajectory  # noqa: E402
from examples.reference.model import COORD_CHANNELS, coordinate_channels, model_input  # noqa: E402

WEIGHTS = ROOT / "examples" / "weights" / "reference_model.safetensors"


@pytest.fixture(scope="module")
def model():
    return load_reference_model()


def test_weights_ship_and_load(model):
    transformer, tokenizer = model
    from diffusers import WanTransformer3DModel

    assert isinstance(transformer, WanTransformer3DModel)
    assert WEIGHTS.stat().st_size <= 20 * 1024 * 1024
    meta = json.loads((WEIGHTS.parent / "config.json").read_text())
    assert meta["transformer"]["num_layers"] >= 6
    assert len(transformer.blocks) == meta["transformer"]["num_layers"]
    cfg = transformer.config
    # video + x, y, t coordinate channels in, velocity out; 4 x 8 x 8 = 256 tokens
    assert cfg.out_channels == 3 and cfg.in_channels == 3 + COORD_CHANNELS
    assert tuple(cfg.patch_size) == (2, 4, 4) and meta["sampling"]["shift"] == 3.0
    assert tuple(cfg.patch_size) == tuple(meta["transformer"]["patch_size"])
    assert 8 % cfg.patch_size[0] == 0 and 32 % cfg.patch_size[1] == 0
    assert all(torch.isfinite(p).all() for p in transformer.parameters())
    assert not transformer.training
    n = sum(p.numel() for p in transformer.parameters())
    assert 1_000_000 < n < 10_000_000


def test_tokenizer_is_deterministic(model):
    _, tokenizer = model
    p = "red circle moving right fast"
    ids = tokenize(p)
    assert len(ids) == MAX_TOKENS and ids == tokenize(p) and ids == tokenize("  Red circle, moving RIGHT fast ")
    assert [VOCAB[i] for i in ids[:5]] == p.split() and ids[5:] == [0] * (MAX_TOKENS - 5)
    assert tokenize("") == [0] * MAX_TOKENS  # the null prompt for guidance
    e1, e2 = tokenizer([p, "blue square static"]), tokenizer([p, "blue square static"])
    assert e1.shape == (2, MAX_TOKENS, tokenizer.text_dim)
    assert torch.equal(e1, e2) and not torch.equal(e1[0], e1[1])
    with pytest.raises(ValueError):
        tokenize("purple elephant dancing")


def test_every_prompt_tokenizes_and_round_trips():
    specs = all_specs()
    assert len(specs) == 234 and len({s.prompt for s in specs}) == 234
    for s in specs:
        tokenize(s.prompt)
        assert ShapeSpec.from_prompt(s.prompt) == s


def test_data_generator_is_seeded():
    a, pa, _ = MovingShapes(seed=3).batch(4)
    b, pb, _ = MovingShapes(seed=3).batch(4)
    c, _, _ = MovingShapes(seed=4).batch(4)
    assert torch.equal(a, b) and pa == pb and not torch.equal(a, c)
    assert a.shape == (4, 3, 8, 32, 32) and a.min() >= -1 and a.max() <= 1


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_ground_truth_motion_direction(direction):
    spec = ShapeSpec("green", "square", "moving", direction, "fast")
    video, gt = render(spec, torch.Generator().manual_seed(0))
    dx, dy = DIRECTIONS[direction]
    assert float(gt["cx"][-1] - gt["cx"][0]) == pytest.approx(dx * 14.0, abs=1e-4)
    assert float(gt["cy"][-1] - gt["cy"][0]) == pytest.approx(dy * 14.0, abs=1e-4)
    # the shape is really drawn where the ground truth says, in the right colour
    f0 = (video[:, 0] + 1) / 2
    x, y = int(gt["cx"][0]), int(gt["cy"][0])
    assert f0[:, y, x].tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-5)
    m = measure(video)
    assert (m["colour"], m["motion"], m["speed"]) == ("green", direction, "fast")


def test_start_spread_narrows_only_the_start():
    spec = ShapeSpec("red", "circle", "moving", "left", "slow")
    full = [trajectory(spec, torch.Generator().manual_seed(i))[0] for i in range(50)]
    narrow = [trajectory(spec, torch.Generator().manual_seed(i), start_spread=0.33)[0] for i in range(50)]
    assert max(float(x[0]) for x in narrow) <= 32 - 5.0 and min(float(x[0]) for x in narrow) >= 32 - 5.5 - 1.5 - 0.33 * 15.4 - 0.01
    assert min(float(x[0]) for x in full) < min(float(x[0]) for x in narrow)
    assert all(float(x[-1] - x[0]) == pytest.approx(-5.6, abs=1e-4) for x in narrow)


def test_measurement_recovers_every_label():
    r = check_data(n=117)  # 9 of each of the 13 motions
    assert r["adherence"] == 1.0 and r["speed_acc_given_direction"] == 1.0 and r["bounce_speed_acc"] == 1.0
    assert r["persistence"] == 1.0 and r["direction_acc"] == 1.0
    assert all(r["confusion"][c][c] == n for c, n in [("static", 9), ("left", 18), ("growing", 9)])
    assert truth(ShapeSpec.from_prompt("blue circle bouncing fast"))["motion"] == "bouncing"


def test_evaluator_controls():
    """Perturbed ground truth scores ~100%, ground truth without temporal coherence does not."""
    c = control_scores(eval_specs(26))  # 2 prompts of each of the 13 motions
    for k in ("gt", "gt_noise", "gt_jitter"):
        assert c[k]["adherence"] == 1.0, k
    assert c["gt_blur"]["adherence"] >= 0.95
    assert c["shuffled"]["adherence"] < 0.2 and c["independent"]["adherence"] < 0.1
    # a reversed clip is right only when the motion is symmetric in time (static, bouncing)
    assert c["reversed"]["adherence"] == pytest.approx(3 / 13, abs=0.01)
    assert c["reversed"]["direction_acc"] == 0.0 and c["shuffled"]["colour_acc"] == 1.0


def test_rejection_threshold_is_calibrated():
    cal = calibrate(n=26)
    assert cal["max"] < REJECT_RESIDUAL <= 1.05 * cal["threshold"] + 0.1


def test_persistence_and_motion_are_separate():
    spec = ShapeSpec("red", "circle", "moving", "right", "fast")
    video, _ = render(spec, torch.Generator().manual_seed(1))
    faint = video.clone()
    faint[:, 3] = -1.0  # one empty frame: persistence fails, the motion is still measured
    m = measure(faint)
    assert not m["persistent"] and m["motion"] == "right" and m["colour"] == "red"
    jumpy = video.clone()
    jumpy[:, 4] = torch.roll(video[:, 4], shifts=9, dims=1)  # a jump down in one frame
    assert measure(jumpy)["motion"] == "incoherent"
    assert measure(torch.full_like(video, -1.0))["motion"] == "empty"


def test_coordinate_channels():
    c = coordinate_channels(8, 32, 32)
    assert c.shape == (3, 8, 32, 32) and c.min() == -1 and c.max() == 1
    assert torch.equal(c[0, 0, 0], torch.linspace(-1, 1, 32)) and torch.equal(c[1, 0, :, 0], torch.linspace(-1, 1, 32))
    assert torch.equal(c[2, :, 0, 0], torch.linspace(-1, 1, 8))

    class T:  # only .config matters
        class config:
            in_channels, out_channels = 6, 3

    x = torch.randn(2, 3, 8, 32, 32)
    y = model_input(T, x)
    assert y.shape == (2, 6, 8, 32, 32) and torch.equal(y[:, :3], x) and torch.equal(y[1, 3:], c)
    T.config.in_channels = 3
    assert model_input(T, x) is x


def test_one_sampling_step_runs(model):
    transformer, tokenizer = model
    emb = tokenizer(["red circle moving right fast", "blue triangle growing"])
    out = sample(transformer, emb, num_steps=1, seed=[0, 1], guidance_scale=3.0,
                 negative_prompt_embeds=tokenizer(["", ""]))
    assert out.shape == (2, 3, 8, 32, 32) and torch.isfinite(out).all()
    calls = []

    def model_fn(**kw):
        calls.append((kw["timestep"].shape, kw["hidden_states"].shape[1]))
        assert torch.equal(kw["hidden_states"][0, 3:], coordinate_channels())  # sample() adds them
        return transformer(**kw)

    out1 = sample(transformer, emb[:1], num_steps=2, seed=0, model_fn=model_fn)
    assert calls == [((1,), 6), ((1,), 6)] and out1.shape == (1, 3, 8, 32, 32)
    # the default scheduler shift is the one of the weights' config.json
    from examples.reference import make_scheduler

    meta = json.loads((WEIGHTS.parent / "config.json").read_text())
    assert make_scheduler().config.shift == meta["sampling"]["shift"]


def test_motion_weights_choose_what_the_data_draws():
    _, prompts, specs = MovingShapes(seed=5, motion_weights={"bouncing": 1.0}).batch(6)
    assert {s.motion for s in specs} == {"bouncing"} and all("bouncing" in p for p in prompts)
    for bad in ({"jumping": 1.0}, {"static": 0.0}, {"static": -1.0, "moving": 2.0}):
        with pytest.raises(ValueError, match="motion_weights"):
            MovingShapes(motion_weights=bad)

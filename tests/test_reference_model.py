"""Fast tests for the shipped reference model (examples/reference, examples/weights)."""
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from examples.reference import (  # noqa: E402
    DIRECTIONS, MAX_TOKENS, VOCAB, MovingShapes, ShapeSpec, all_specs, load_reference_model, render, sample,
    tokenize,
)
from examples.reference.evaluate import check_data, measure, truth  # noqa: E402

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
    assert transformer.config.in_channels == 3 and tuple(transformer.config.patch_size) == (1, 4, 4)
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


def test_measurement_recovers_every_label():
    r = check_data(n=117)  # 9 of each of the 13 motions
    assert r["adherence"] == 1.0 and r["speed_acc_given_direction"] == 1.0
    assert truth(ShapeSpec.from_prompt("blue circle bouncing fast"))["motion"] == "bouncing"


def test_one_sampling_step_runs(model):
    transformer, tokenizer = model
    emb = tokenizer(["red circle moving right fast", "blue triangle growing"])
    out = sample(transformer, emb, num_steps=1, seed=[0, 1], guidance_scale=3.0,
                 negative_prompt_embeds=tokenizer(["", ""]))
    assert out.shape == (2, 3, 8, 32, 32) and torch.isfinite(out).all()
    calls = []

    def model_fn(**kw):
        calls.append(kw["timestep"].shape)
        return transformer(**kw)

    out1 = sample(transformer, emb[:1], num_steps=2, seed=0, model_fn=model_fn)
    assert calls == [(1,), (1,)] and out1.shape == (1, 3, 8, 32, 32)

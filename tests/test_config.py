import math

import pytest

from adacache_fx import AdaCacheConfig, adacache_backend
from adacache_fx.config import CODEBOOK_100, CODEBOOK_30_FAST, CODEBOOK_30_SLOW, preset_codebook


def test_presets_use_official_codebooks():
    assert AdaCacheConfig.fast(30).codebook == CODEBOOK_30_FAST
    assert AdaCacheConfig.slow(30).codebook == CODEBOOK_30_SLOW
    assert AdaCacheConfig.fast(100).codebook == CODEBOOK_100
    assert AdaCacheConfig.fast(30).num_steps == 30
    assert AdaCacheConfig.no_cache().codebook == {math.inf: 1}


@pytest.mark.parametrize("steps", [1, 4, 10, 50, 60, 150, 1000])
@pytest.mark.parametrize("speed", ["fast", "slow"])
def test_preset_rule_for_other_step_counts(speed, steps):
    cb = preset_codebook(speed, steps)
    AdaCacheConfig(codebook=cb, num_steps=steps)  # valid
    assert all(r >= 1 for r in cb.values())
    # more steps -> smaller per-step thresholds and longer skips
    if steps > 30:
        base = preset_codebook(speed, 30)
        assert max(cb.values()) >= max(base.values())


def test_moreg_window_defaults():
    assert AdaCacheConfig(num_steps=100).window_for(100) == (10, 90)
    assert AdaCacheConfig().window_for(None) is None
    assert AdaCacheConfig(moreg_window=(2, 5)).window_for(30) == (2, 5)


@pytest.mark.parametrize("kwargs, field", [
    (dict(codebook={}), "codebook"),
    (dict(codebook={0.2: 1, 0.1: 2}), "ascending"),
    (dict(codebook={0.1: 0}), "rates"),
    (dict(codebook={0.1: 1.5}), "rates"),
    (dict(codebook={-1.0: 2}), "thresholds"),
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=10, moreg_window=(4, 26)), "moreg_window"),
    (dict(moreg_window=(5, 2)), "moreg_window"),
    (dict(moreg_stride=0), "moreg_stride"),
    (dict(moreg_normalizer=0.0), "moreg_normalizer"),
    (dict(moreg_power=-1.0), "moreg_power"),
    (dict(probe_branch=-1), "probe_branch"),
    (dict(probe_block=1.5), "probe_block"),
    (dict(video_frame_dim=3), "video_frame_dim"),
    (dict(first_computed_steps=0), "first_computed_steps"),
])
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdaCacheConfig(**kwargs)


def test_preset_rejects_bad_steps():
    with pytest.raises(ValueError, match="num_steps"):
        AdaCacheConfig.fast(0)


def test_backend_rejects_bad_arguments():
    with pytest.raises(ValueError, match="config"):
        adacache_backend({0.1: 2})
    with pytest.raises(ValueError, match="twice"):
        adacache_backend(inner="adacache")
    with pytest.raises(ValueError, match="inductor"):
        adacache_backend(inner="eager", mode="max-autotune")

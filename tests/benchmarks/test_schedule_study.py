"""The schedule study's emulated schedules are the backend's own (benchmarks/schedule_study.py)."""
import pytest

from benchmarks.e2e.methods import fixed_schedule
from benchmarks.schedule_study import evened, fixed


@pytest.mark.parametrize("rate", [1, 2, 3, 4, 5, 6, 7, 10])
@pytest.mark.parametrize("steps", [12, 30, 50])
def test_fixed_is_the_backend_schedule_and_evened_only_moves_steps(rate, steps):
    assert fixed(rate, steps) == fixed_schedule(rate, steps)
    ev = evened(rate, steps)
    assert len(ev) == len(fixed(rate, steps))   # the same compute
    assert ev[:2] == [1, 2] and ev[-2:] == [steps - 1, steps]
    gaps = [b - a for a, b in zip(ev[1:-1], ev[2:-1])]
    assert all(1 <= g <= rate for g in gaps) and max(gaps, default=0) - min(gaps, default=0) <= 1


@pytest.mark.parametrize("first,last", [(1, 2), (2, 0), (3, 1), (4, 0), (5, 0)])
@pytest.mark.parametrize("rate", [3, 4, 5])
def test_forced_steps_are_computed_in_the_fixed_schedule(rate, first, last):
    schedule = fixed(rate, 30, first=first, last=last)
    assert schedule[:max(first, 2)] == list(range(1, max(first, 2) + 1))
    assert all(s in schedule for s in range(31 - last, 31))
    gaps = [b - a for a, b in zip(schedule, schedule[1:])]
    assert max(gaps) <= rate


def test_taylorseer_schedule_is_diffusers_own():
    """diffusers' hook counts ``current_step`` from 0 and computes below ``disable_cache_before_step``
    (3) or where ``(current_step - 3 - 1) % cache_interval == 0``."""
    from benchmarks.schedule_study import taylorseer_schedule

    assert taylorseer_schedule(3, 30) == [1, 2, 3, 5, 8, 11, 14, 17, 20, 23, 26, 29]
    assert len(taylorseer_schedule(3, 30)) == 12
    assert taylorseer_schedule(5, 12) == [1, 2, 3, 5, 10]


def test_prompt_sets_are_the_ones_their_users_run():
    """Section 6 on other prompt sets must score the very generations the e2e benchmark and its
    calibration make: the same prompts with the same seeds."""
    from benchmarks.e2e.protocol import ADACACHE_CALIBRATION_PROMPTS, PROMPTS
    from benchmarks.schedule_study import prompt_set

    assert prompt_set("e2e") == [(p, i) for i, p in enumerate(PROMPTS)]
    assert prompt_set("calibration") == [(p, 1000 + i) for i, p in enumerate(ADACACHE_CALIBRATION_PROMPTS)]
    study = prompt_set("study")   # generations neither of them makes (one prompt is shared, with another seed)
    assert len(study) == 12 and not set(study) & (set(prompt_set("e2e")) | set(prompt_set("calibration")))
    assert {p for p, _ in study} & set(PROMPTS) == {"blue circle shrinking"}

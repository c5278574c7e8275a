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

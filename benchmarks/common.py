"""Shared benchmark helpers: interleaved timing, plus the machine description of
:mod:`examples.machine` (re-exported here)."""
from __future__ import annotations

import statistics
import time

import torch

from examples.machine import command_line, machine, machine_markdown

__all__ = ["command_line", "interleaved", "machine", "machine_markdown", "median", "sync"]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int) -> dict:
    """Run each callable ``repeats`` times, round-robin, and return the per-name times (s)."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def median(xs):
    return statistics.median(xs)

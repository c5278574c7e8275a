"""Shared benchmark helpers: interleaved timing, plus the machine description of
:mod:`examples.machine` (re-exported here)."""
from __future__ import annotations

import json
import os
import statistics
import time

import torch

from examples.machine import command_line, machine, machine_markdown

__all__ = ["command_line", "interleaved", "machine", "machine_markdown", "median", "sync", "write_results"]


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


def write_results(out_dir: str, stem: str, lines: list, result: dict) -> None:
    """Write ``<stem>.md`` (the lines) and ``<stem>.json`` (the result) under ``out_dir``, and
    print the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    print("\n".join(lines))

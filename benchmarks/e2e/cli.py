"""Command line of the end-to-end benchmark (``python -m benchmarks.e2e``)."""
from __future__ import annotations

import argparse
import os

import torch

import benchmarks.e2e as package
from benchmarks.common import command_line, machine

from .protocol import PROMPTS, Bench, model_description
from .report import merge, write_outputs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=package.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[30, 50])
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--calibration-prompts", type=int, default=4,
                    help="generations adacache_fx.calibrate runs per calibrated method (unscored prompts)")
    ap.add_argument("--guidance", type=float, default=None, help="default: the model card's")
    ap.add_argument("--inner", default="inductor")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--check-inner", default="eager",
                    help="inner backend of the compile check of the eagerly timed diffusers caches")
    ap.add_argument("--check-steps", type=int, default=8, help="steps of each compile-check generation")
    ap.add_argument("--methods", nargs="*", default=None, help="only methods whose name contains one of these")
    ap.add_argument("--recompile-limit", type=int, default=64,
                    help="dynamo's recompile limit: the compile checks of diffusers' caches compile the same "
                         "block forwards (their hooks break the graph around them), so the default 8 would be "
                         "shared by all of them")
    ap.add_argument("--quick", action="store_true", help="2 prompts, 8 steps, eager inner: a smoke run")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--note", default=None, help="measurement conditions to record in the outputs")
    ap.add_argument("--merge", nargs="+", default=None, metavar="E2E_JSON",
                    help="only combine the runs of earlier outputs (e.g. 30 and 50 steps run as two processes)")
    return ap


def main(argv=None) -> dict:
    a = parser().parse_args(argv)
    if a.merge:
        out = merge(a.merge)
        if a.note:
            out["note"] = a.note
        return write_outputs(out, a.out)
    if a.quick:
        a.steps, a.prompts, a.inner = [8], min(a.prompts, 2), "eager"
        a.calibration_prompts = min(a.calibration_prompts, 2)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch._dynamo.config.recompile_limit = a.recompile_limit
    torch._dynamo.config.accumulated_recompile_limit = max(256, 8 * a.recompile_limit)
    bench = Bench(a)
    runs = [bench.run_steps(s) for s in a.steps]
    out = {"machine": machine(), "command": command_line("benchmarks.e2e", argv),
           "model": model_description(bench.transformer),
           "guidance": bench.guidance, "inner": a.inner, "repeats": a.repeats,
           "check_inner": a.check_inner, "check_steps": a.check_steps, "note": a.note,
           "recompile_limit": a.recompile_limit, "runs": runs}
    return write_outputs(out, a.out)

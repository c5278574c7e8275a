"""Calibrate AdaCache to the shipped reference model, then check the result on other prompts.

    python -m examples.calibrate                       # target: compute at most 30% of the steps
    python -m examples.calibrate --min-psnr 35         # target: 35 dB mean PSNR vs uncached
    python -m examples.calibrate --max-ms-gmsd 0.03    # target: perceptual (MS-GMSD, lower = closer)
    python -m examples.calibrate --out calibration.json   # what it measured (JSON)

(from the repository root). ``adacache_fx.calibrate`` runs a few uncached generations of the
calibration prompts, records the metric's trajectory, picks the codebook thresholds and MoReg
normaliser that meet the target, and checks them by running the cached generations. This script
then generates a few held-out prompts with the calibrated config and prints what they computed and
their PSNR against the uncached videos. Inner compiler: ``eager`` by default (calibration itself
does not need inductor; pass --inner inductor for timings).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from adacache_fx import AdaCacheConfig, adacache_backend, calibrate
from examples.machine import command_line, machine
from examples.reference import CONFIG_FILE, load_reference_model, sample
from examples.reference.quality import ms_gmsd, psnr
from examples.reference.model import sampling_settings

CALIBRATION_PROMPTS = ["cyan circle static", "red square moving left slow", "blue triangle bouncing slow",
                       "yellow circle moving up fast"]
HELD_OUT_PROMPTS = ["red circle static", "green square moving right slow", "blue triangle moving down fast"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m examples.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    target = ap.add_mutually_exclusive_group()
    target.add_argument("--computed-fraction", type=float, default=None, help="default 0.3 when no target is given")
    target.add_argument("--min-psnr", type=float, default=None, help="mean PSNR (dB) against the uncached video")
    target.add_argument("--max-ms-gmsd", type=float, default=None,
                        help="mean MS-GMSD against the uncached video (perceptual; lower is closer)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--inner", default="eager")
    ap.add_argument("--out", default=None, help="write the calibration and the held-out check (JSON) here")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.computed_fraction is None and a.min_psnr is None and a.max_ms_gmsd is None:
        a.computed_fraction = 0.3
    guidance = float(sampling_settings(CONFIG_FILE).get("guidance_scale", 3.0))
    transformer, tokenizer = load_reference_model()
    null = tokenizer([""])
    backend = adacache_backend(AdaCacheConfig.fast(num_steps=a.steps), inner=a.inner)
    model = torch.compile(transformer, backend=backend)

    def generate(prompt: str, seed: int, model_fn=None):
        return sample(transformer, tokenizer([prompt]), num_steps=a.steps, seed=seed, guidance_scale=guidance,
                      negative_prompt_embeds=null, model_fn=model_fn)

    start = time.perf_counter()
    result = calibrate(lambda i: generate(CALIBRATION_PROMPTS[i], 1000 + i, model), backend,
                       runs=len(CALIBRATION_PROMPTS), computed_fraction=a.computed_fraction, min_psnr=a.min_psnr,
                       max_ms_gmsd=a.max_ms_gmsd, data_range=2.0)
    seconds = time.perf_counter() - start
    print(f"calibrated in {seconds:.0f} s")
    print(f"held-out prompts, calibrated config ({a.steps} steps):")
    rows = []
    for i, prompt in enumerate(HELD_OUT_PROMPTS):
        reference = generate(prompt, i)
        backend.reset()
        video = generate(prompt, i, model)
        computed = backend.report().computed_steps
        rows.append({"prompt": prompt, "computed": len(computed), "psnr": psnr(video, reference),
                     "ms_gmsd": ms_gmsd(video, reference)})
        print(f"  {prompt:34s} computed {len(computed):2d}/{a.steps}, PSNR {rows[-1]['psnr']:.2f} dB, "
              f"MS-GMSD {rows[-1]['ms_gmsd']:.4f}")
    print(f"  mean: computed {statistics.mean(r['computed'] for r in rows) / a.steps:.0%}, "
          f"PSNR {statistics.mean(r['psnr'] for r in rows):.2f} dB, MS-GMSD {statistics.mean(r['ms_gmsd'] for r in rows):.4f}")
    if a.out:   # the calibration (CalibrationResult.load reads its "calibration" part) and the check
        out = {"command": command_line("examples.calibrate", argv), "machine": machine(), "inner": a.inner,
               "steps": a.steps, "calibration_seconds": seconds, "calibration_prompts": CALIBRATION_PROMPTS,
               "held_out": rows, "calibration": result.to_dict()}
        Path(a.out).write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {a.out}")
    return {"result": result, "held_out": rows}


if __name__ == "__main__":
    main()

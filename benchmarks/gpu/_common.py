"""Shared pieces of the GPU check parts (this package only; no other benchmark module is imported).

Every part writes one markdown file ``<out>/<part>.md``, rewritten after every addition, so
that a part killed by its time box still leaves what it measured. Its header says the status
(RUNNING while in flight; OK, CHECKS FAILED, FAILED, TIMED OUT or SKIPPED at the end), the
device, the torch / triton / diffusers versions and the date.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

DEFAULT_OUT = Path("benchmarks") / "results" / "gpu"
INF = float("inf")

# Wan 2.1 T2V 1.3B, the transformer config of the released checkpoint
# (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json), as WanTransformer3DModel kwargs.
WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
# 480p (480x832), 81 frames: VAE 4x temporal (1 + 80/4 = 21), 8x spatial (60x104), 16 channels;
# UMT5 text embeddings: 512 tokens x 4096.
WAN_LATENT_480P_81F = (16, 21, 60, 104)
WAN_TEXT = (512, 4096)
# The same architecture, tiny, for --dry-run on a CPU.
WAN_TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=16, ffn_dim=64,
                num_layers=3, rope_max_seq_len=64)
WAN_TINY_LATENT = (16, 3, 8, 8)
WAN_TINY_TEXT = (8, 32)


class TimeBoxExceeded(BaseException):
    """SIGTERM from run.sh's ``timeout``: write what was measured and stop."""


class SkipPart(Exception):
    """The part cannot run here (e.g. diffusers is not installed): SKIPPED, not FAILED."""


def base_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes on the CPU (what CI runs): checks the wiring, not the GPU")
    ap.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results/gpu)")
    ap.add_argument("--budget", type=float, default=None,
                    help="soft time budget in seconds: the part trims its work to finish inside it")
    return ap


def out_dir(arg: Optional[str]) -> Path:
    path = Path(arg or os.environ.get("OUT") or DEFAULT_OUT)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pick_device(dry_run: bool) -> torch.device:
    if dry_run:
        # one thread: the CI machine is small and shared (OpenMP threads spinning against another
        # job's make a tiny model hundreds of times slower)
        torch.set_num_threads(1)
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"no CUDA device (torch {torch.__version__}, torch.version.cuda={torch.version.cuda}); "
                           "run with --dry-run on a CPU")
    return torch.device("cuda")


def _version(name: str) -> str:
    try:
        module = __import__(name)
        return getattr(module, "__version__", "?")
    except Exception as exc:  # noqa: BLE001 - report, never fail here
        return f"not importable ({type(exc).__name__})"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: Optional[torch.device] = None) -> str:
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return (f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, "
                f"{props.multi_processor_count} SMs, sm_{props.major}{props.minor})")
    return f"CPU: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (no GPU)"


def env_line(device: Optional[torch.device] = None) -> str:
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
    return (f"{device_name(device)} | torch {torch.__version__}{cuda} | triton {_version('triton')} | "
            f"diffusers {_version('diffusers')} | python {platform.python_version()} | "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def md_table(headers: Sequence[str], rows: Iterable[Sequence]) -> list:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return lines


def tail(text: str, n: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


class _SectionRef:
    def __init__(self, key: str):
        self.key = key


class PartReport:
    """The markdown of one part, flushed to disk after every change.

    ``with PartReport(...) as rep:`` turns an exception into FAILED (with the traceback
    tail), SIGTERM into TIMED OUT, :class:`SkipPart` into SKIPPED; ``rep.check(ok, what)``
    records a check (any failed check makes the status CHECKS FAILED).
    """

    def __init__(self, name: str, title: str, args, device: Optional[torch.device] = None):
        self.name, self.title, self.args = name, title, args
        self.path = out_dir(args.out) / f"{name}.md"
        self.device = device
        self.dry_run = bool(getattr(args, "dry_run", False))
        self.budget = args.budget
        self.t0 = time.monotonic()
        self.status = "RUNNING"
        self.results: list = []   # headline bullets (also copied into summary.md)
        self.body: list = []
        self.sections: dict = {}
        self.failed_checks: list = []
        self.num_checks = 0
        self.command = "python -m benchmarks.gpu." + name + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
        self._old_handler = None
        self.terminated = False
        self.flush()

    # ----- time ------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return float("inf") if self.budget is None else self.budget - self.elapsed()

    # ----- content ---------------------------------------------------------------
    def result(self, line: str) -> None:
        self.results.append(line)
        print("RESULT", self.name + ":", line, flush=True)
        self.flush()

    def add(self, *lines: str) -> None:
        self.body.extend(lines)
        self.flush()

    def section(self, key: str, lines: Sequence[str]) -> None:
        """A block of the details that is replaced (not appended) on every call."""
        if key not in self.sections:
            self.body.append(_SectionRef(key))
        self.sections[key] = list(lines)
        self.flush()

    def table(self, headers: Sequence[str], rows: Iterable[Sequence]) -> None:
        self.body.extend(md_table(headers, rows) + [""])
        self.flush()

    def check(self, ok: bool, what: str) -> bool:
        self.num_checks += 1
        if not ok:
            self.failed_checks.append(what)
            print("CHECK FAILED", self.name + ":", what, flush=True)
        return ok

    def render(self) -> str:
        status = self.status
        if status == "OK" and self.failed_checks:
            status = "CHECKS FAILED"
        checks = ""
        if self.num_checks:
            checks = f" ({self.num_checks - len(self.failed_checks)} of {self.num_checks} checks passed)"
        lines = [
            f"# {self.title}",
            "",
            f"- status: **{status}**{checks}",
            f"- device: {env_line(self.device)}",
            f"- mode: {'DRY RUN (CPU, tiny shapes: checks the wiring, measures nothing about a GPU)' if self.dry_run else 'GPU'}",
            f"- command: `{self.command}`",
            f"- wall time: {self.elapsed():.1f} s" + (f" (soft budget {self.budget:.0f} s)" if self.budget else ""),
            "",
            "## Results",
            "",
        ]
        lines += [f"- {r}" for r in self.results] or ["- (none yet)"]
        if self.failed_checks:
            lines += ["", "## Failed checks", ""] + [f"- {w}" for w in self.failed_checks[:50]]
            if len(self.failed_checks) > 50:
                lines.append(f"- ... and {len(self.failed_checks) - 50} more")
        lines += ["", "## Details", ""]
        for item in self.body:
            lines += self.sections[item.key] if isinstance(item, _SectionRef) else [item]
        return "\n".join(lines) + "\n"

    def flush(self) -> None:
        tmp = self.path.with_suffix(".md.tmp")
        tmp.write_text(self.render())
        os.replace(tmp, self.path)

    # ----- lifetime --------------------------------------------------------------
    def __enter__(self):
        def on_term(signum, frame):
            self.terminated = True
            raise TimeBoxExceeded()

        self._old_handler = signal.signal(signal.SIGTERM, on_term)
        print(f"== {self.title} ({'dry run' if self.dry_run else 'GPU'}), writing {self.path}", flush=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        signal.signal(signal.SIGTERM, self._old_handler or signal.SIG_DFL)
        if exc_type is None and not self.terminated:
            self.status = "OK"
        elif self.terminated or issubclass(exc_type, TimeBoxExceeded):
            # (SIGTERM may surface as another exception, e.g. from a killed compile worker)
            self.status = "TIMED OUT"
            self.body += ["", f"**Stopped by the time box after {self.elapsed():.0f} s**: the results above are "
                          "what was measured before that."]
        elif issubclass(exc_type, SkipPart):
            self.status = "SKIPPED"
            self.results.insert(0, f"skipped: {exc}")
        else:
            self.status = "FAILED"
            text = "".join(traceback.format_exception(exc_type, exc, tb))
            self.results.append(f"failed: `{exc_type.__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}`")
            self.body += ["", "### Traceback (tail)", "", "```", tail(text, 40), "```"]
            print(text, file=sys.stderr, flush=True)
        self.flush()
        print(f"== {self.name}: {self.render().splitlines()[2][2:]} in {self.elapsed():.1f} s", flush=True)
        return True  # handled: the exit code says the rest

    def run(self, body: Callable[["PartReport", object, torch.device], object]) -> "PartReport":
        """Run ``body(report, args, device)`` inside this report (time box, status, writing the
        part's markdown), on the device the part's ``--dry-run`` picks; returns the report."""
        with self:
            self.device = pick_device(self.args.dry_run)
            body(self, self.args, self.device)
        return self

    def exit_code(self) -> int:
        if self.status in ("OK", "SKIPPED") and not self.failed_checks:
            return 0
        return 124 if self.status == "TIMED OUT" else 1


def run_part(main: Callable[[list], "PartReport"], argv=None) -> None:
    rep = main(sys.argv[1:] if argv is None else argv)
    sys.exit(rep.exit_code())


# ----- models shared by the model parts --------------------------------------------
def require_diffusers():
    try:
        from diffusers import WanTransformer3DModel  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        raise SkipPart(f"diffusers is not importable here ({type(exc).__name__}: {exc}); "
                       "install it (`pip install diffusers safetensors transformers`) to run this part")
    return WanTransformer3DModel


def build_wan(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """WanTransformer3DModel with random weights (torch's default init), eval, no grad, on
    ``device`` (initialised there directly), all parameters and buffers in ``dtype``."""
    wan_cls = require_diffusers()
    torch.manual_seed(seed)
    with torch.device(device):
        model = wan_cls(**config)
    return model.to(dtype=dtype).eval().requires_grad_(False)


def flow_sigmas(steps: int, shift: float = 3.0) -> list:
    """Flow-matching sigmas 1 -> 0 (steps + 1 values) with the usual time shift
    ``shift * s / (1 + (shift - 1) * s)`` (diffusers' FlowMatchEulerDiscreteScheduler)."""
    out = []
    for i in range(steps + 1):
        s = 1.0 - i / steps
        out.append(shift * s / (1 + (shift - 1) * s))
    return out


def raise_dynamo_limits() -> None:
    """Several backends compile the same forward in one process: keep Dynamo from giving up."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(64, getattr(cfg, name)))
    if hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(512, cfg.accumulated_cache_size_limit)


# A small Wan-architecture model for quick GPU checks (compiles in seconds): 6 layers x 256.
WAN_SMALL = dict(WAN_1_3B, num_attention_heads=4, attention_head_dim=64, text_dim=256, ffn_dim=1024, num_layers=6)
WAN_SMALL_LATENT = (16, 9, 32, 32)   # 9 x 16 x 16 = 2304 tokens
WAN_SMALL_TEXT = (64, 256)


def wan_setup(dry_run: bool, device: torch.device, dtype: torch.dtype, batch: int = 1, layers: Optional[int] = None,
              seed: int = 0, size: Optional[str] = None):
    """(model, x0, text, description): the Wan 1.3B transformer with random weights and 480p 81-frame
    latents (``size="small"``: WAN_SMALL; dry run: the tiny config), initial noise ``x0``
    (B, 16, F, H, W), text (B, L, D)."""
    size = "tiny" if dry_run else (size or "1.3b")
    cfg = dict({"tiny": WAN_TINY, "small": WAN_SMALL, "1.3b": WAN_1_3B}[size])
    if layers:
        cfg["num_layers"] = layers
    latent, text = {"tiny": (WAN_TINY_LATENT, WAN_TINY_TEXT), "small": (WAN_SMALL_LATENT, WAN_SMALL_TEXT),
                    "1.3b": (WAN_LATENT_480P_81F, WAN_TEXT)}[size]
    model = build_wan(cfg, device, dtype, seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    x0 = torch.randn(batch, *latent, generator=g, device=device).to(dtype)
    ctx = torch.randn(batch, *text, generator=g, device=device).to(dtype)
    heads, hd = cfg["num_attention_heads"], cfg["attention_head_dim"]
    pt, ph, pw = cfg["patch_size"]
    tokens = (latent[1] // pt) * (latent[2] // ph) * (latent[3] // pw)
    params = sum(p.numel() for p in model.parameters())
    label = {"tiny": " (TINY dry-run config)", "small": " (small Wan-architecture config)",
             "1.3b": " (Wan 2.1 1.3B config)"}[size]
    desc = (f"WanTransformer3DModel{label}, random weights, "
            f"{cfg['num_layers']} layers, {heads} heads x {hd} = {heads * hd}, ffn {cfg['ffn_dim']}, text_dim "
            f"{cfg['text_dim']}, {params / 1e9:.3f} B params, {str(dtype).split('.')[-1]}; latents "
            f"{tuple(x0.shape)} = {tokens} tokens/sample, text {tuple(ctx.shape)}")
    return model, x0, ctx, desc


def flow_generation(model_fn, x0: torch.Tensor, ctx: torch.Tensor, sigmas: list, device: torch.device,
                    backend=None, feed: Optional[list] = None, keep: bool = False, before_step=None) -> dict:
    """One flow-matching Euler generation ``x <- x + (sigma_next - sigma) * v`` (the input changes
    every step). ``backend``: an adacache backend (reset first; the host timestep is announced
    with ``backend.step`` so no device timestep is read). ``feed``: inputs to use at each step
    instead of the running latent (teacher forcing: the same inputs for every method).
    ``keep``: return each step's input and (cloned) output. Each step is timed between syncs."""
    if backend is not None:
        backend.reset()
    x = x0.clone()
    steps = len(sigmas) - 1
    step_s, inputs, outputs = [], [], []
    with torch.no_grad():
        for i in range(steps):
            x_in = feed[i] if feed is not None else x
            t = sigmas[i] * 1000.0
            ts = torch.full((x_in.shape[0],), t, device=device)
            if backend is not None:
                backend.step(t)
            if before_step is not None:
                before_step()
            sync(device)
            t0 = time.perf_counter()
            v = model_fn(hidden_states=x_in, timestep=ts, encoder_hidden_states=ctx, return_dict=False)[0]
            x = x_in + (sigmas[i + 1] - sigmas[i]) * v
            sync(device)
            step_s.append(time.perf_counter() - t0)
            if keep:
                inputs.append(x_in.clone())
                outputs.append(v.clone())
    return dict(final=x, step_s=step_s, total_s=sum(step_s), inputs=inputs, outputs=outputs)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32 (nan when either holds a NaN)."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def latent_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of ``a`` against ``b`` over ``b``'s peak-to-peak range (latents have no fixed range)."""
    a, b = a.float(), b.float()
    mse = float(((a - b) ** 2).mean())
    rng = float(b.max() - b.min())
    return float("inf") if mse == 0 else 10 * math.log10(rng * rng / mse)

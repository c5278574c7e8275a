"""What a recorded measurement ran on, and how it was started (shared by the examples and
the benchmarks, which import it from here: examples never import benchmarks)."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys

import torch


def machine() -> dict:
    """CPU, cores, torch threads and versions, the accelerator, and the UTC date."""
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                cpu = line.split(":", 1)[1].strip()
    except Exception:
        pass
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def machine_markdown(info: dict) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in info.items())


def command_line(module: str, argv: list | None = None) -> str:
    """The command that started this run, as ``python -m <module> <args>`` (``argv``:
    the arguments; default ``sys.argv[1:]``)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", module] + [shlex.quote(str(a)) for a in args])

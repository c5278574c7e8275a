"""Shared helpers for backend tests: run a sampling loop with a compiled model."""
import contextlib

import torch

from adacache_fx import AdaCacheConfig, adacache_backend

INF = float("inf")


def timesteps(n, t_max=1000.0):
    return torch.linspace(t_max, t_max / n, n).tolist()


def sample_loop(model, make_inputs, steps, batch=2, output=lambda o: o):
    """Call ``model`` once per timestep with inputs that depend only on the step (seeded)."""
    outs = []
    with torch.no_grad():
        for t in steps:
            args, kwargs = make_inputs(batch, float(t))
            outs.append(output(model(*args, **kwargs)))
    return outs


def cached(model, codebook=None, num_steps=None, inner="eager", config=None):
    torch._dynamo.reset()
    config = config or AdaCacheConfig(codebook=codebook or {INF: 1}, num_steps=num_steps)
    backend = adacache_backend(config, inner=inner)
    return torch.compile(model, backend=backend), backend


def count_ops(fn, name="aten::scaled_dot_product_attention"):
    """How many times ``fn`` runs the op ``name`` (an independent count of block work)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == name)


@contextlib.contextmanager
def no_recompiles():
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield

"""Shared helpers for backend tests: sampling loops with a compiled model, and independent
references for what a reused step must return.

``euler_loop`` is the loop every value test uses: a flow-Euler sampler whose latent changes
every step with the model's own output (``x <- x + (t_next - t) / t_max * v``), one call per
guidance branch per step. A loop that fed the same latent at every step could not tell
``input + cached delta`` from "the last computed output".

``BlockStackReference`` computes, on the plain eager model and with nothing from the backend,
what a reused step must return: ``skeleton(input) + delta`` with ``delta`` taken at the branch's
last computed step (block-stack output minus the skeleton there). The skeleton is the model with
every block replaced by the identity (the glue between blocks, position embeddings and the
prologue / epilogue still run).
"""
import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from adacache_fx import AdaCacheConfig, adacache_backend

INF = float("inf")


def timesteps(n, t_max=1000.0):
    return torch.linspace(t_max, t_max / n, n).tolist()


def sample_loop(model, make_inputs, steps, batch=2, output=lambda o: o):
    """Call ``model`` once per timestep with inputs that depend only on the step (seeded).
    Kept for schedule-only checks; value checks use :func:`euler_loop`."""
    outs = []
    with torch.no_grad():
        for t in steps:
            args, kwargs = make_inputs(batch, float(t))
            outs.append(output(model(*args, **kwargs)))
    return outs


def cached(model, codebook=None, num_steps=None, inner="eager", config=None, **compile_kwargs):
    """``model`` compiled with a fresh backend. Constant reuse (the paper's): the independent
    references here (``BlockStackReference``, ``x + cached delta``) compute that; forecast reuse
    has its own tests (test_forecast_reuse.py)."""
    torch._dynamo.reset()
    config = config or AdaCacheConfig(codebook=codebook or {INF: 1}, num_steps=num_steps, reuse="constant")
    backend = adacache_backend(config, inner=inner)
    return torch.compile(model, backend=backend, **compile_kwargs), backend


def count_ops(fn, name="aten::scaled_dot_product_attention"):
    """How many times ``fn`` runs the op ``name`` (an independent count of block work)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == name)


def dynamo_counts(make: Callable, generation: Callable) -> tuple:
    """``(graphs, graph breaks, graphs compiled in a second generation)``: Dynamo's counts for
    ``make(backend)`` (a model compiled with the counting ``backend``) over two runs of
    ``generation(model)``, after ``torch._dynamo.reset()``. Graph breaks: Dynamo's ``graph_break``
    counter, as benchmarks/graph_breaks.py counts them."""
    from torch._dynamo.utils import counters
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    model = make(count)
    generation(model)
    first = len(graphs)
    generation(model)
    return first, sum(counters["graph_break"].values()), len(graphs) - first


@contextlib.contextmanager
def no_recompiles():
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


# ----- sampler-style loops ----------------------------------------------------------------------
@dataclass
class Call:
    """One model call of a loop: its inputs (replayable) and its output sample tensor."""

    args: tuple
    kwargs: dict
    output: torch.Tensor


@dataclass
class SamplerRun:
    calls: list = field(default_factory=list)     # [step][branch] -> Call
    latents: list = field(default_factory=list)   # the latent fed at each step
    final: Optional[torch.Tensor] = None          # the latent after the last update

    def outputs(self, branch=0):
        return [row[branch].output for row in self.calls]


def _velocity(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The model output as a velocity for ``x``: learn-sigma models return more channels."""
    if out.shape != x.shape:
        out = out[:, :x.shape[1]]
    assert out.shape == x.shape, (tuple(out.shape), tuple(x.shape))
    return out


def euler_loop(model, make_inputs, steps, *, batch=2, output=lambda o: o, t_max=None,
               branches=(None,), guidance_scale=4.0, x0=None, before_step=None) -> SamplerRun:
    """Flow-Euler sampling with ``model``: ``make_inputs(batch, t)`` gives the step's conditioning
    and timestep; its first positional argument is replaced by the running latent (from the
    first step's inputs, or ``x0``). ``branches``: per guidance branch, ``None`` or a function
    ``(args, kwargs) -> (args, kwargs)`` (e.g. another class label); every branch is called with
    the step's timestep, the velocity is ``u + s * (c - u)`` for two branches (c first), else
    their mean. ``before_step(t)`` runs before the step's calls (e.g. ``backend.step``)."""
    run = SamplerRun()
    t_max = float(t_max if t_max is not None else max(abs(float(s)) for s in steps))
    grid = [float(s) for s in steps] + [0.0]
    x = None if x0 is None else x0.clone()
    with torch.no_grad():
        for t, t_next in zip(grid, grid[1:]):
            if before_step is not None:
                before_step(t)
            args, kwargs = make_inputs(batch, t)
            if x is None:
                x = args[0].clone()
            args = (x,) + tuple(args[1:])
            row = []
            for branch in branches:
                a, kw = branch(args, dict(kwargs)) if branch is not None else (args, dict(kwargs))
                row.append(Call(a, kw, output(model(*a, **kw))))
            run.calls.append(row)
            run.latents.append(x)
            preds = [_velocity(c.output, x) for c in row]
            if len(preds) == 2:
                v = preds[1] + guidance_scale * (preds[0] - preds[1])
            else:
                v = sum(preds) / len(preds)
            x = x + (t_next - t) / t_max * v
    run.final = x
    return run


def label_branch(y):
    """A guidance branch for ``euler_loop`` on a class-conditioned toy (``model(x, t, labels)``):
    the same call with every label set to ``y``."""
    def branch(args, kwargs):
        x, t, labels = args
        return (x, t, torch.full_like(labels, y)), kwargs
    return branch


def replay(model, calls, output=lambda o: o) -> list:
    """Call ``model`` with recorded calls, in order; returns the outputs."""
    with torch.no_grad():
        return [output(model(*c.args, **c.kwargs)) for c in calls]


def relative_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().sum() / b.abs().sum())


# ----- an independent reference for reused steps -----------------------------------------------
class BlockStackReference:
    """What a cached run must return, computed on a private copy of the eager model.

    ``block_paths``: the block modules of the model's one cached region, in execution order (each
    maps its first positional input, the stream, to a tensor of the same shape, or to a tuple whose
    first element it is and whose other elements it passes through; models with several regions
    need another reference). Computed step: the plain model. Reused step of
    branch ``b``: the model with every block replaced by the identity, the last block returning
    ``its input + delta_b``, where ``delta_b`` is the last block's output minus its
    identity-model input at ``b``'s last computed step. That is ``skeleton(input) + delta``
    whatever glue (rearranges, position embeddings) sits between the blocks."""

    def __init__(self, model: torch.nn.Module, block_paths: list, output: Callable = lambda o: o):
        self.model = copy.deepcopy(model).eval()
        self.blocks = [self.model.get_submodule(p) for p in block_paths]
        self.output = output
        self.mode = "full"
        self.delta = None
        self.last = None
        for i, block in enumerate(self.blocks):
            block.register_forward_hook(self._hook(i == len(self.blocks) - 1), with_kwargs=True)

    def _hook(self, is_last: bool):
        def hook(module, args, kwargs, out):
            stream = args[0] if args else kwargs["hidden_states"]
            rest = tuple(out[1:]) if isinstance(out, tuple) else None
            value = out[0] if rest is not None else out
            if self.mode == "skeleton":
                value = stream if not is_last or self.delta is None else stream + self.delta
            if is_last:
                self.last = value
            return value if rest is None else (value, *rest)
        return hook

    def _run(self, call: Call, mode: str, delta=None):
        self.mode, self.delta = mode, delta
        with torch.no_grad():
            out = self.output(self.model(*call.args, **call.kwargs))
        return out, self.last

    def plain(self, call: Call) -> torch.Tensor:
        return self._run(call, "full")[0]

    def computed(self, call: Call) -> tuple:
        """(the plain model's output, the delta it leaves: block-stack output minus the skeleton's)."""
        out, full = self._run(call, "full")
        skeleton = self._run(call, "skeleton")[1]
        return out, full - skeleton

    def reused(self, call: Call, delta: torch.Tensor) -> torch.Tensor:
        return self._run(call, "skeleton", delta)[0]

    def expected(self, run: SamplerRun, computed_steps: list) -> list:
        """``[step][branch]``: the plain model's output on computed steps (and for a branch with
        no delta yet), ``skeleton(input) + delta`` of the branch's last computed step otherwise."""
        deltas, rows = {}, []
        for step, row in enumerate(run.calls, start=1):
            out_row = []
            for b, call in enumerate(row):
                if step in computed_steps or b not in deltas:
                    out, deltas[b] = self.computed(call)
                    out_row.append(out)
                else:
                    out_row.append(self.reused(call, deltas[b]))
            rows.append(out_row)
        return rows


def assert_matches_reference(run: SamplerRun, expected: list, rtol=1e-5, atol=1e-5):
    for step, (row, want_row) in enumerate(zip(run.calls, expected), start=1):
        for b, (call, want) in enumerate(zip(row, want_row)):
            torch.testing.assert_close(call.output, want, rtol=rtol, atol=atol,
                                       msg=lambda m, s=step, b=b: f"step {s}, branch {b}: {m}")


def zoo_block_paths(case, model) -> list:
    """A zoo case's block module paths in execution order: its block lists interleaved by index
    (``sb0, tb0, sb1, tb1`` for spatial / temporal lists, as the core video cases run them)."""
    lists = [(name, len(model.get_submodule(name))) for name in case.block_lists]
    return [f"{name}.{i}" for i in range(max(n for _, n in lists)) for name, n in lists if i < n]


# ----- an independent metric ------------------------------------------------------------------
class ProbeRecorder:
    """Records a module's outputs (the probe residual branch) on a private copy of the model."""

    def __init__(self, model: torch.nn.Module, module_path: str):
        self.model = copy.deepcopy(model).eval()
        self.records = []
        self.model.get_submodule(module_path).register_forward_hook(lambda m, a, o: self.records.append(o.detach()))

    def __call__(self, call: Call) -> torch.Tensor:
        self.records.clear()
        with torch.no_grad():
            self.model(*call.args, **call.kwargs)
        (probe,) = self.records
        return probe


def distance_and_motion(r: torch.Tensor, p: torch.Tensor, k: int, frames: Optional[Callable] = None):
    """The paper's formulas, written out: ``c = (sum|r - p| / sum|p|) / k`` and, with
    ``frames(r) -> (B, F, N)``, ``m = sum|r[f+1] - r[f]| / (sum|r[1:]| + sum|r[:-1]|)``."""
    r64, p64 = r.double(), p.double()
    c = float((r64 - p64).abs().sum() / p64.abs().sum()) / k
    if frames is None:
        return c, None
    v = frames(r64)
    m = float((v[:, 1:] - v[:, :-1]).abs().sum() / (v[:, 1:].abs().sum() + v[:, :-1].abs().sum()))
    return c, m


def moreg(distance, motion, prev_reg, k, in_window, cfg):
    """MoReg on one measured distance; returns (regularised distance, m')."""
    reg = ((motion / cfg.moreg_normalizer) ** cfg.moreg_power) / cfg.moreg_divisor if in_window else 1.0
    prev = reg if prev_reg is None else prev_reg
    grad = cfg.moreg_gradient_scale * (reg - prev) / k
    return distance * (reg + abs(grad)), reg


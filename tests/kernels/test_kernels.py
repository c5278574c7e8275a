"""Tests of the fused cache-metrics op (adacache_fx/ops), CPU only, against a float64 torch reference.

The Triton kernel itself is run on CPU tensors by the Triton interpreter. The
interpreter is chosen when a kernel is *decorated*, so TRITON_INTERPRET=1 is set here,
at the top of the module, before anything of this module imports triton. That is not
enough when the whole suite runs (``python -m pytest tests``): another test module may
import triton / adacache_fx first. The launcher therefore also takes
``interpret=True`` explicitly and re-wraps the kernel's Python function in an
``InterpretedFunction`` when the imported kernel is a compiled ``JITFunction`` (the
kernel uses only Triton builtins, so this works in either import order). The tests
below always pass ``interpret=True``.

Run:  python -m pytest tests/kernels/test_kernels.py -q
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (see above)

import itertools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from adacache_fx._compat import triton_installed  # noqa: E402
from adacache_fx.ops import cache_metrics_reference, cache_metrics_torch, fused_cache_metrics  # noqa: E402

HAS_TRITON = triton_installed()
if HAS_TRITON:
    from adacache_fx.triton_kernels import cache_metrics as cm  # noqa: E402
    from adacache_fx.triton_kernels.cache_metrics import cache_metrics_triton  # noqa: E402

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The reference sees the same (already rounded) inputs in float64, so what remains is
# the float32 accumulation error of the kernel; the half types add the error of the
# exact-in-fp32 subtraction of two rounded values, i.e. nothing, plus larger sums.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-5, atol=1e-5),
}
SIZES_N = [1, 7, 1023, 4097]
SIZES_F = [1, 2, 3, 17]
SIZES_B = [1, 2, 3]
STRIDES = [1, 2]
LAYOUTS = ["contiguous", "sliced", "transposed"]


def make(B, F, N, dtype, layout, seed):
    """A (B, F, N) tensor in the given memory layout (values from one generator)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        x = torch.randn(B, F, N, generator=g)
        return x.to(dtype)
    if layout == "sliced":  # non-contiguous batch/frame strides, unit element stride
        x = torch.randn(B + 1, F + 2, N + 5, generator=g).to(dtype)
        return x[1:, 1:-1, 3 : 3 + N]
    if layout == "transposed":  # storage (B, N, F): element stride F, frame stride 1
        x = torch.randn(B, N, F, generator=g).to(dtype)
        return x.transpose(1, 2)
    raise ValueError(layout)


def check(out, ref, dtype):
    assert out.dtype == torch.float32
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, equal_nan=True, **TOL[dtype])


def cases(N, F):
    """All B x frame_stride combinations, with the layouts of r and p rotating."""
    for k, (B, s) in enumerate(itertools.product(SIZES_B, STRIDES)):
        yield B, s, LAYOUTS[k % 3], LAYOUTS[(k + 1) % 3]


# ----------------------------------------------------------------------------------
# Triton kernel (interpreter) against the float64 reference
# ----------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("F", SIZES_F)
@pytest.mark.parametrize("N", SIZES_N)
def test_triton_kernel_matches_reference(N, F, dtype):
    for B, s, lay_r, lay_p in cases(N, F):
        seed = N * 1000 + F * 10 + B
        r = make(B, F, N, dtype, lay_r, seed)
        p = make(B, F, N, dtype, lay_p, seed + 1)
        out = cache_metrics_triton(r, p, s, interpret=True)
        check(out, cache_metrics_reference(r, p, s), dtype)
        if F < s + 1:
            assert torch.equal(out[:, 2:], torch.zeros(B, 3))


@needs_triton
def test_triton_kernel_small_blocks_many_programs():
    # several element blocks per sample, masked tail, both phases of stride 2
    r = make(2, 5, 1000, torch.float32, "sliced", 1)
    p = make(2, 5, 1000, torch.float32, "transposed", 2)
    for s in (1, 2, 3):
        out = cache_metrics_triton(r, p, s, block_n=64, num_warps=1, interpret=True)
        check(out, cache_metrics_reference(r, p, s), torch.float32)


# ----------------------------------------------------------------------------------
# CPU path (the op as it runs on CPU tensors) against the same reference
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("F", SIZES_F)
@pytest.mark.parametrize("N", SIZES_N)
def test_cpu_op_matches_reference(N, F, dtype):
    for B, s, lay_r, lay_p in cases(N, F):
        seed = N * 1000 + F * 10 + B
        r = make(B, F, N, dtype, lay_r, seed)
        p = make(B, F, N, dtype, lay_p, seed + 1)
        ref = cache_metrics_reference(r, p, s)
        check(fused_cache_metrics(r, p, s), ref, dtype)
        check(cache_metrics_torch(r, p, s), ref, dtype)
        if F < s + 1:
            assert torch.equal(fused_cache_metrics(r, p, s)[:, 2:], torch.zeros(B, 3))


# ----------------------------------------------------------------------------------
# DiT probe layouts: read in place, no copy
# ----------------------------------------------------------------------------------
def _dit_layouts(dtype=torch.float32):
    B, F, S, C = 2, 4, 6, 10
    g = torch.Generator().manual_seed(7)
    out = {}
    x = torch.randn(B * F, S, C, generator=g).to(dtype)  # Latte spatial (B*F, S, C)
    out["latte_spatial"] = x.view(B, F, S, C)
    x = torch.randn(B * S, F, C, generator=g).to(dtype)  # Latte temporal (B*S, F, C)
    out["latte_temporal"] = x.view(B, S, F, C).permute(0, 2, 1, 3)
    x = torch.randn(B, F * S, C, generator=g).to(dtype)  # STDiT (B, F*S, C)
    out["stdit"] = x.view(B, F, S, C)
    out["stdit_flat"] = x.view(B, F, S * C)
    return out


@pytest.mark.parametrize("name", ["latte_spatial", "latte_temporal", "stdit", "stdit_flat"])
def test_dit_layouts_no_copy(name):
    r = _dit_layouts()[name]
    p = torch.empty_strided(r.shape, r.stride()).copy_(torch.randn(r.shape))
    ref = cache_metrics_reference(r, p, 1)
    if HAS_TRITON:
        r2, p2, *_ = cm._kernel_layout(r, p)
        assert r2 is r and p2 is p  # the kernel reads the views in place
    check(fused_cache_metrics(r, p, 1), ref, torch.float32)
    if HAS_TRITON:
        check(cache_metrics_triton(r, p, 1, interpret=True), ref, torch.float32)


def test_more_than_two_element_axes_still_correct():
    # (B, F, A, S, C) with a permuted middle: not mergeable into 2 axes -> one copy
    x = torch.randn(2, 3, 5, 4, 6).permute(0, 1, 3, 2, 4)
    y = torch.randn(2, 3, 4, 5, 6)
    ref = cache_metrics_reference(x, y, 1)
    check(fused_cache_metrics(x, y, 1), ref, torch.float32)
    if HAS_TRITON:
        check(cache_metrics_triton(x, y, 1, interpret=True), ref, torch.float32)


# ----------------------------------------------------------------------------------
# NaN / Inf, determinism, edge cases
# ----------------------------------------------------------------------------------
def _impls():
    impls = [("cpu_op", lambda r, p, s: fused_cache_metrics(r, p, s))]
    if HAS_TRITON:
        impls.append(("triton_interp", lambda r, p, s: cache_metrics_triton(r, p, s, interpret=True)))
    return impls


@pytest.mark.parametrize("impl", [n for n, _ in _impls()])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_nan_inf_propagate(impl, dtype):
    fn = dict(_impls())[impl]
    B, F, N = 2, 3, 37
    r = torch.randn(B, F, N).to(dtype)
    p = torch.randn(B, F, N).to(dtype)
    r[0, 0, 5] = float("nan")  # frame 0: in sums 0, 2, 4 - not in sum|r[:, 1:]|
    p[1, 2, 3] = float("inf")  # sums 0 and 1 of sample 1
    out = fn(r, p, 1)
    ref = cache_metrics_reference(r, p, 1)
    check(out, ref, dtype)
    assert torch.isnan(out[0, [0, 2, 4]]).all()
    assert torch.isfinite(out[0, [1, 3]]).all()  # an excluded frame does not leak NaN
    assert torch.isinf(out[1, 0]) and torch.isinf(out[1, 1])
    assert torch.isfinite(out[1, 2:]).all()
    # inf - inf = nan
    r2, p2 = r.clone(), p.clone()
    r2[1, 2, 3] = float("inf")
    out2 = fn(r2, p2, 1)
    check(out2, cache_metrics_reference(r2, p2, 1), dtype)
    assert torch.isnan(out2[1, 0])


@pytest.mark.parametrize("impl", [n for n, _ in _impls()])
def test_bitwise_deterministic(impl):
    fn = dict(_impls())[impl]
    r = make(3, 17, 4097, torch.float32, "sliced", 3)
    p = make(3, 17, 4097, torch.float32, "contiguous", 4)
    first = fn(r, p, 2)
    for _ in range(3):
        assert torch.equal(fn(r, p, 2), first)


def test_images_and_short_clips_have_zero_motion():
    for F, s in [(1, 1), (2, 2), (3, 3), (1, 2)]:
        r, p = torch.randn(2, F, 11), torch.randn(2, F, 11)
        for _, fn in _impls():
            out = fn(r, p, s)
            assert torch.equal(out[:, 2:], torch.zeros(2, 3))
            check(out, cache_metrics_reference(r, p, s), torch.float32)


def test_empty_inputs():
    for shape in [(0, 3, 5), (2, 3, 0), (2, 0, 5)]:
        r, p = torch.randn(shape), torch.randn(shape)
        out = fused_cache_metrics(r, p, 1)
        assert out.shape == (shape[0], 5) and out.dtype == torch.float32
        assert torch.equal(out, torch.zeros(shape[0], 5))


# ----------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------
def test_validation_errors():
    r = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="dtype"):
        fused_cache_metrics(r.double(), r.double())
    with pytest.raises(TypeError, match="same dtype"):
        fused_cache_metrics(r, r.half())
    with pytest.raises(TypeError, match="dtype"):
        fused_cache_metrics(r.to(torch.int32), r.to(torch.int32))
    with pytest.raises(ValueError, match="same shape"):
        fused_cache_metrics(r, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"\(B, F, N\)"):
        fused_cache_metrics(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="frame_stride"):
        fused_cache_metrics(r, r, 0)
    with pytest.raises(TypeError, match="frame_stride"):
        fused_cache_metrics(r, r, 1.0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fused_cache_metrics(r.numpy(), r)
    with pytest.raises(ValueError, match="same device"):
        fused_cache_metrics(r, r.to("meta"))
    if HAS_TRITON:
        with pytest.raises(ValueError, match="power of two"):
            cache_metrics_triton(r, r, 1, block_n=100, interpret=True)


@needs_triton
def test_launch_config_rule():
    assert cm.triton_launch_config(2, 15, 1620 * 1152, 1) == (2048, 8)
    assert cm.triton_launch_config(1, 1, 7, 1) == (64, 1)
    block, warps = cm.triton_launch_config(1, 17, 4097, 1)  # few programs -> smaller
    assert block == 256 and warps == 1
    assert cm.triton_launch_config(1, 17, 4097, 1, interpret=True)[0] == 2048


# ----------------------------------------------------------------------------------
# torch.compile: the op sits in the graph, no graph break
# ----------------------------------------------------------------------------------
def _metric_fn(r, p):
    sums = fused_cache_metrics(r, p, 1).sum(0)
    c = sums[0] / sums[1]
    m = sums[2] / (sums[3] + sums[4])
    return c, m


def test_op_in_compiled_graph_no_graph_break():
    import torch._dynamo
    from torch._dynamo.utils import counters

    counters.clear()
    r, p = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    seen = []

    def backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    compiled = torch.compile(_metric_fn, backend=backend, fullgraph=True)
    c, m = compiled(r, p)
    ref = cache_metrics_reference(r, p, 1).sum(0)
    torch.testing.assert_close(c.double(), ref[0] / ref[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(m.double(), ref[2] / (ref[3] + ref[4]), rtol=1e-5, atol=0)
    assert len(seen) == 1
    assert sum(counters["graph_break"].values()) == 0
    targets = [str(n.target) for n in seen[0].graph.nodes if n.op == "call_function"]
    assert any("adacache_fx.cache_metrics" in t for t in targets), targets


def test_op_under_inductor_fullgraph():
    r, p = torch.randn(2, 5, 64).bfloat16(), torch.randn(2, 5, 64).bfloat16()
    compiled = torch.compile(lambda r, p: fused_cache_metrics(r, p, 1) * 1.0, fullgraph=True)
    out = compiled(r, p)
    # inside the compiled graph the op stays opaque and runs the same composite: bit-identical to eager
    assert torch.equal(out, fused_cache_metrics(r, p, 1))
    check(out, cache_metrics_reference(r, p, 1), torch.bfloat16)


def test_fake_tensor_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        r = torch.empty(3, 4, 5, dtype=torch.bfloat16)
        out = torch.ops.adacache_fx.cache_metrics(r, r, 1)
        assert out.shape == (3, 5) and out.dtype == torch.float32


# ----------------------------------------------------------------------------------
# triton is optional
# ----------------------------------------------------------------------------------
def test_works_without_triton():
    import subprocess
    import sys

    code = "\n".join(
        [
            "import sys",
            "sys.modules['triton'] = None  # makes 'import triton' raise ImportError",
            "import torch",
            "from adacache_fx.ops import fused_cache_metrics, cache_metrics_torch",
            "from adacache_fx.ops.cache_metrics import _cache_metrics_cuda",
            "from adacache_fx._compat import triton_installed",
            "assert not triton_installed()",
            "r, p = torch.randn(2, 3, 50), torch.randn(2, 3, 50)",
            "out = fused_cache_metrics(r, p, 1)",
            "assert torch.equal(out, cache_metrics_torch(r, p, 1))",
            "assert torch.equal(_cache_metrics_cuda(r, p, 1), out)  # CUDA without triton: the composite",
            "c = torch.compile(lambda r, p: fused_cache_metrics(r, p, 1), fullgraph=True, backend='eager')",
            "assert torch.equal(c(r, p), out)",
            "print('ok')",
        ]
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------------
# no GPU here: at least compile the real kernel for a CUDA target (sm_90) down to cubin
# ----------------------------------------------------------------------------------
_COMPILE_SCRIPT = """
import sys
import triton
from triton.backends import backends
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
if "nvidia" not in backends:
    print("SKIP no nvidia backend"); sys.exit(0)
from adacache_fx.triton_kernels import cache_metrics as cm
ints = ["F", "N", "N2", "sr_b", "sr_f", "sr_1", "sr_2", "sp_b", "sp_f", "sp_1", "sp_2", "n_blocks", "FRAME_STRIDE"]
for dtype, inner_2d in (("bf16", False), ("bf16", True), ("fp32", False)):
    sig = {"r_ptr": "*" + dtype, "p_ptr": "*" + dtype, "part_ptr": "*fp32", **{n: "i32" for n in ints}}
    sig.update(BLOCK_N="constexpr", INNER_2D="constexpr")
    if True:
        src = ASTSource(fn=cm._cache_metrics_kernel, signature=sig,
                        constexprs={"BLOCK_N": 2048, "INNER_2D": inner_2d})
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        assert "cubin" in c.asm and "atom." not in c.asm["ptx"], dtype  # no atomics
print("ok")
"""


@needs_triton
def test_triton_kernel_compiles_for_cuda_target():
    # Real compiler, not the interpreter: a fresh process without TRITON_INTERPRET.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_broken_triton_install_says_so(tmp_path):
    # a triton that is installed but fails to import: the CUDA path raises, naming the problem
    import subprocess
    import sys

    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('libcuda mismatch (simulated)')\n")
    code = "\n".join([
        "import torch",
        "from adacache_fx.ops.cache_metrics import _cache_metrics_cuda",
        "r = torch.randn(2, 3, 5)",
        "try:",
        "    _cache_metrics_cuda(r, r, 1)",
        "except ImportError as e:",
        "    print('raised:', e)",
    ])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{root}")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert "raised: adacache_fx: triton is installed but does not import" in proc.stdout, proc.stderr[-3000:]
    assert "simulated" in proc.stdout


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_composite_over_several_chunks_matches_reference_and_leaves_inputs(dtype):
    # N large enough that the composite sums several chunks of the element axis (odd tail included)
    r = make(2, 17, 40_011, dtype, "sliced", 11)
    p = make(2, 17, 40_011, dtype, "transposed", 12)
    r0, p0 = r.clone(), p.clone()
    for s in (1, 2):
        check(fused_cache_metrics(r, p, s), cache_metrics_reference(r, p, s), dtype)
    assert torch.equal(r, r0) and torch.equal(p, p0)   # float32 inputs are aliased, never written

"""Weight-only quantized projections (kernels/quant.py): the decode GEMV quant_linear with its fusions, the Triton
dequantize kernel and the prefill path against the reference (fused_linear_ref on the exact dequantized weight)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_utils import DEVICE, assert_bf16_close, assert_close, assert_tight, poisoned
from qwen2rt.kernels import QuantizedWeight, dequantize, dequantize_weight, fused_linear_ref, quant_linear
from qwen2rt.kernels import quant_linear_gemm
from qwen2rt.kernels.gemv import MAX_ROWS
from qwen2rt.kernels.quant import pack_rows, quant_config
from qwen2rt.models.backend import TorchBackend, TritonBackend

# weight forms: (kind, group size (None: per channel), act-order perm, symmetric zeros)
FORMS = {
    "int4-g32": ("int4", 32, False, True),
    "int4-g64-actorder": ("int4", 64, True, False),
    "int4-g128": ("int4", 128, False, False),
    "int4-channel": ("int4", None, False, False),
    "int8-g128-actorder": ("int8", 128, True, True),
    "int8-channel": ("int8", None, False, False),
    "fp8": ("fp8", None, False, False),
}
FUSIONS = {
    "plain": dict(),
    "norm+bias": dict(norm=True, bias=True),  # qkv
    "norm+swiglu": dict(norm=True, swiglu=True),  # gate_up
    "residual": dict(residual=True),  # o, down
    "norm+logits": dict(norm=True, out_dtype=torch.float32),  # final norm + lm_head
    "all": dict(norm=True, bias=True, swiglu=True, residual=True),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def quantized(n: int, k: int, form: str, scale_dtype=torch.float16, device=DEVICE) -> QuantizedWeight:
    """Fresh random integers / fp8 values, positive scales of about 1 / (range * sqrt(k)), random zeros (symmetric:
    the middle of the range, as GPTQ's sym=True stores them)."""
    kind, group, act_order, symmetric = FORMS[form]
    group = group or k
    if kind == "fp8":
        q = (torch.randn(n, k, device=device) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        scales = (torch.rand(n, 1, device=device) + 0.5) / (64 * k ** 0.5)
        return QuantizedWeight("fp8", q, scales.to(scale_dtype), None, k)
    bits = 4 if kind == "int4" else 8
    top = 2 ** bits
    q = torch.randint(0, top, (n, k), device=device)
    groups = k // group
    scales = (torch.rand(n, groups, device=device) + 0.5) / (top / 2 * k ** 0.5)
    zeros = (torch.full((n, groups), top // 2, device=device) if symmetric
             else torch.randint(0, top, (n, groups), device=device))
    perm = torch.randperm(k, device=device).to(torch.int32) if act_order else None
    return QuantizedWeight(kind, pack_rows(q, bits), scales.to(scale_dtype), zeros.to(scale_dtype), group, perm)


def _operands(m, n, k, dtype, bias=False, norm=False, residual=False, swiglu=False, out_dtype=None):
    x = torch.randn(m, k, device=DEVICE, dtype=dtype) * 2
    kw = dict(swiglu=swiglu, out_dtype=out_dtype, eps=1e-6)
    if bias:
        kw["bias"] = (0.5 * torch.randn(n, device=DEVICE)).to(dtype)
    if norm:
        kw["norm_weight"] = (1 + 0.3 * torch.randn(k, device=DEVICE)).to(dtype)
    width = n // 2 if swiglu else n
    if residual:
        kw["residual"] = torch.randn(m, width, device=DEVICE, dtype=dtype)
    return x, kw, width


# K a multiple of every group size used with it and of 8 (a word of int4); odd N (even with SwiGLU: [gate | up])
SHAPES = {"int4-g32": (38, 96), "int4-g64-actorder": (70, 192), "int4-g128": (22, 256), "int4-channel": (54, 104),
          "int8-g128-actorder": (30, 128), "int8-channel": (46, 100), "fp8": (26, 99)}
# every form with every fusion, rows and dtypes spread over the table (32 rows, the slowest in the interpreter, in
# one case out of 7). The interpreter truncates fp32 -> bf16 instead of rounding to nearest, and SwiGLU's cascaded
# roundings then put single elements 5-8 bf16 ulps from the reference (in ~6% of random draws, for the GEMVs of
# tests/test_gemv.py too): there the bf16 cases run in fp16; on the GPU they run in bf16 (and the bf16 GPU test below
# checks every fusion at real shapes with a tolerance proven tight).
CASE_DTYPES = DTYPES if DEVICE.type == "cuda" else [torch.float32, torch.float16, torch.float16]
CASES = [(form, fusion, 32 if (i + j) % 7 == 3 else (1, 3, 5)[(i + j) % 3], CASE_DTYPES[(i + 2 * j) % 3])
         for i, form in enumerate(FORMS) for j, fusion in enumerate(FUSIONS)]


@pytest.mark.parametrize("form, fusion, m, dtype", CASES)
def test_quant_linear(form, fusion, m, dtype):
    n, k = SHAPES[form]
    fusion = dict(FUSIONS[fusion])
    if fusion.get("swiglu"):
        n += n % 2
    w = quantized(n, k, form)
    x, kw, width = _operands(m, n, k, dtype, **fusion)
    out_dtype = kw["out_dtype"] or dtype
    before = {name: t.clone() for name, t in kw.items() if isinstance(t, torch.Tensor)}
    out = poisoned(m, width, dtype=out_dtype)
    y = quant_linear(x, w, out=out, **kw)
    assert y.data_ptr() == out.data_ptr() and y.dtype == out_dtype
    assert_close(y, fused_linear_ref(x, w, **kw), dtype)
    assert all(torch.equal(kw[name], t) for name, t in before.items())  # inputs untouched


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_scales_of_another_dtype_and_residual_in_place(scale_dtype):
    """Scales (and zeros) in a float dtype other than x's; the residual stream updated in place; strided x rows."""
    w = quantized(40, 128, "int4-g32", scale_dtype=scale_dtype)
    base = torch.randn(5, 300, device=DEVICE, dtype=torch.float16)
    x = base[:, :128]  # rows with stride 300
    res = torch.randn(5, 40, device=DEVICE, dtype=torch.float16)
    expected = fused_linear_ref(x, w, residual=res)
    y = quant_linear(x, w, residual=res, out=res)
    assert y.data_ptr() == res.data_ptr()
    assert_close(res, expected, torch.float16)


def test_block_sizes_do_not_matter_beyond_rounding():
    """Every configuration computes the same function (edge masks on N and on the words in every combination)."""
    for form in ("int4-g64-actorder", "int8-channel", "fp8"):
        w = quantized(46, 192, form)
        x, kw, _ = _operands(5, 46, 192, torch.float32, norm=True, bias=True, swiglu=True, residual=True)
        expected = fused_linear_ref(x, w, **kw)
        for bn, bkw in ((8, 32), (32, 128)):
            y = quant_linear(x, w, config=dict(BLOCK_N=bn, BLOCK_KW=bkw, num_warps=4), **kw)
            assert_close(y, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance(dtype):
    """A row's result is bitwise the same alone, among 7 others at another position, and in a batch of 32."""
    w = quantized(60, 128, "int4-g64-actorder")
    x, kw, _ = _operands(32, 60, 128, dtype, norm=True, bias=True)
    alone = quant_linear(x[5:6], w, **kw)
    among8 = quant_linear(x[:8], w, **kw)
    among32 = quant_linear(x, w, **kw)
    assert torch.equal(alone[0], among8[5]) and torch.equal(among8, among32[:8])


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_kernel_is_the_reference_bit_for_bit(form, dtype):
    n, k = SHAPES[form]
    w = quantized(n, k, form)
    out = poisoned(n, k, dtype=dtype)
    assert dequantize_weight(w, dtype, out=out).data_ptr() == out.data_ptr()
    if dtype == torch.bfloat16 and DEVICE.type == "cpu":  # the interpreter truncates to bf16: within an ulp
        assert_close(out, dequantize(w, dtype), dtype)
    else:
        assert torch.equal(out, dequantize(w, dtype))


@pytest.mark.parametrize("form", ["int4-g64-actorder", "int8-channel", "fp8"])
def test_prefill_path(form):
    """More rows than a decode bucket: the dequantize kernel + F.linear, and the triton backend's three projections
    on both sides of MAX_ROWS against the torch backend (the reference)."""
    m = MAX_ROWS + 9
    w = quantized(46, 192, form)
    x, kw, _ = _operands(m, 46, 192, torch.float32, bias=True)
    assert_close(quant_linear_gemm(x, w, kw["bias"]), fused_linear_ref(x, w, kw["bias"]), torch.float32)
    g, r = kw["bias"].new_ones(192) + 0.3 * torch.randn(192, device=DEVICE), torch.randn(m, 46, device=DEVICE)
    triton_backend, torch_backend = TritonBackend(), TorchBackend()
    for rows in (3, m):
        xs = x[:rows]
        assert_close(triton_backend.norm_linear(xs, g, 1e-6, w, kw["bias"]),
                     torch_backend.norm_linear(xs, g, 1e-6, w, kw["bias"]), torch.float32)
        assert_close(triton_backend.norm_swiglu(xs, g, 1e-6, w), torch_backend.norm_swiglu(xs, g, 1e-6, w),
                     torch.float32)
        assert_close(triton_backend.linear_residual(xs, w, r[:rows]), torch_backend.linear_residual(xs, w, r[:rows]),
                     torch.float32)


GEMM_DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("dtype", GEMM_DTYPES)  # bf16 tl.dot is wrong in the interpreter: bf16 on the GPU only
def test_fused_dequantize_gemm(form, dtype):
    """The prefill GEMM that dequantizes in its K loop, at the odd shapes of SHAPES (K tails, several M and N tiles,
    1-4 K steps per group) with a bias, into a NaN-poisoned output, against F.linear on the reference's weight
    rounded to x's dtype (the numerics both prefill paths promise); the dequantize + cuBLAS path beside it."""
    n, k = SHAPES[form]
    m = MAX_ROWS + 13
    w = quantized(n, k, form)
    x, kw, _ = _operands(m, n, k, dtype, bias=True)
    expected = F.linear(x.float(), dequantize(w, dtype).float(), kw["bias"].float())
    out = poisoned(m, n, dtype=dtype)
    assert quant_linear_gemm(x, w, kw["bias"], path="fused", out=out).data_ptr() == out.data_ptr()
    assert_close(out, expected, dtype)
    assert_close(quant_linear_gemm(x, w, kw["bias"], path="dequant"), expected, dtype)


def test_prefill_path_choice(monkeypatch):
    """path None: the fused GEMM up to FUSED_GEMM_MAX_ROWS rows, dequantize + cuBLAS above it and for group sizes the
    fused kernel's BLOCK_K cannot divide (asked for explicitly, that is a clear error)."""
    import qwen2rt.kernels.quant as quant

    calls = []
    real = quant._quant_gemm_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]
    monkeypatch.setattr(quant, "_quant_gemm_kernel", Spy())
    monkeypatch.setattr(quant, "FUSED_GEMM_MAX_ROWS", 40)
    w = quantized(38, 96, "int4-g32")
    for m, fused in ((33, True), (40, True), (41, False)):
        calls.clear()
        x = torch.randn(m, 96, device=DEVICE)
        assert_close(quant_linear_gemm(x, w), fused_linear_ref(x, w), torch.float32)
        assert bool(calls) == fused, m
    odd = QuantizedWeight("int4", w.qweight, w.scales.repeat_interleave(4, 1), w.zeros.repeat_interleave(4, 1), 8)
    calls.clear()
    x = torch.randn(33, 96, device=DEVICE)
    assert_close(quant_linear_gemm(x, odd), fused_linear_ref(x, odd), torch.float32)
    assert not calls
    with pytest.raises(ValueError, match="group size divisible by 16.*got 8"):
        quant_linear_gemm(x, odd, path="fused")
    with pytest.raises(ValueError, match="path must be"):
        quant_linear_gemm(x, w, path="cublas")
    with pytest.raises(ValueError, match=r"out must be a torch.float32 tensor \[33, 38\]"):
        quant_linear_gemm(x, w, out=torch.empty(33, 37, device=DEVICE))


# bf16 on the GPU: relative error against the fp32 function of the same bf16 inputs. The kernel rounds twice (the
# normalised row, the output: ~2e-3 each), so 1e-2, which each plausible bug below exceeds at the GPU test shapes.
GPU_TOL = 1e-2
GPU_SHAPES = [(1, 4608, 3584, "norm+bias"), (8, 3584, 18944, "residual"), (32, 2 * 2048, 3584, "norm+swiglu"),
              (3, 4000, 8192, "plain")]


def test_tolerance_is_tight():
    """A plausible bug moves the output farther than GPU_TOL at the largest K of the GPU tests (where a dropped word
    matters least): zeros off by one, the neighbouring group's scales, one word of each row dropped, the act-order
    permutation ignored, scales applied per input instead of per group."""
    torch.manual_seed(1)
    k = 18944
    w = quantized(64, k, "int4-g64-actorder", device="cpu")
    x = torch.randn(4, k)
    ref = fused_linear_ref(x, w)
    dense = dequantize(w, torch.float32)

    def with_weight(stored_edit):
        bad = QuantizedWeight(w.kind, w.qweight, w.scales, w.zeros, w.group_size, w.perm)
        stored_edit(bad)
        return fused_linear_ref(x, bad)

    dropped = dense.clone()
    dropped[:, w.perm[40:48].long()] = 0  # stored word 5: stored columns 40..47
    mutants = {
        "zeros off by one": with_weight(lambda b: setattr(b, "zeros", w.zeros + 1)),
        "neighbouring group's scales": with_weight(lambda b: setattr(b, "scales", w.scales.roll(1, dims=1))),
        "a word dropped": F.linear(x, dropped),
        "act-order ignored": with_weight(lambda b: setattr(b, "perm", None)),
    }
    assert_tight(ref, mutants, GPU_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["int4-g128", "int4-g64-actorder", "int8-channel", "fp8"])
@pytest.mark.parametrize("m, n, k, fusion", GPU_SHAPES)
def test_quant_linear_bf16_gpu(m, n, k, fusion, form):
    """bf16 on the GPU, at the compiled configs of real shapes, against the fp32 function of the same inputs."""
    w = quantized(n, k, form)
    x, kw, width = _operands(m, n, k, torch.bfloat16, **FUSIONS[fusion])
    fp32 = {name: (t.float() if isinstance(t, torch.Tensor) else t) for name, t in kw.items()}
    fp32["out_dtype"] = None
    y = quant_linear(x, w, out=poisoned(m, width, dtype=kw["out_dtype"] or torch.bfloat16), **kw)
    assert_bf16_close(y, fused_linear_ref(x.float(), w, **fp32), GPU_TOL)
    y1 = quant_linear(x, w, config=dict(quant_config(width, k, w.kind, w.group_size, kw["swiglu"]), NUM_STAGES=1),
                      **kw)
    assert_bf16_close(y1, fused_linear_ref(x.float(), w, **fp32), GPU_TOL)  # the unpipelined loop too


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["int4-g128", "int8-channel"])
def test_batch_invariance_and_prefill_bf16_gpu(form):
    """On the GPU, where M = 1 compiles to its own kernel, a row is bitwise the same alone and in a batch of 32; the
    prefill path matches F.linear on the dequantized weight."""
    w = quantized(4608, 3584, form)
    x, kw, _ = _operands(32, 4608, 3584, torch.bfloat16, norm=True, bias=True)
    alone = quant_linear(x[5:6], w, **kw)
    among32 = quant_linear(x, w, **kw)
    assert torch.equal(alone[0], among32[5])
    xs = torch.randn(300, 3584, device=DEVICE, dtype=torch.bfloat16)
    for path in ("fused", "dequant"):
        torch.testing.assert_close(quant_linear_gemm(xs, w, path=path), F.linear(xs, dequantize(w, torch.bfloat16)))


@pytest.mark.gpu
def test_register_cap_changes_no_bit_fp16_gpu():
    """The int4 GEMV in fp16 with the residual at M = 2 and 32 (the variant Triton 3.6's ptxas caps at 168 registers,
    spilling outside the weight loop): capped at 255 registers through `maxnreg` (bench_quant times both) the output
    is bitwise the same, and matches the fp32 function."""
    w = quantized(3584, 3584, "int4-g128")
    for m in (2, 32):
        x, kw, width = _operands(m, 3584, 3584, torch.float16, residual=True)
        cfg = quant_config(width, 3584, w.kind, w.group_size, False)
        y = quant_linear(x, w, out=poisoned(m, width, dtype=torch.float16), **kw)
        capped = quant_linear(x, w, out=poisoned(m, width, dtype=torch.float16), config=dict(cfg, maxnreg=255), **kw)
        assert torch.equal(y, capped)
        fp32 = dict(kw, residual=kw["residual"].float())
        assert_bf16_close(y, fused_linear_ref(x.float(), w, **fp32), GPU_TOL)


def test_config_depends_on_the_weight_only():
    for n, k, kind, group, swiglu in ((4608, 3584, "int4", 128, False), (18944, 3584, "int8", 3584, True),
                                      (3584, 18944, "fp8", 18944, False), (8192, 29568, "int4", 128, False)):
        cfg = quant_config(n, k, kind, group, swiglu)
        assert cfg == quant_config(n, k, kind, group, swiglu)
        accumulators = 2 if swiglu else 1
        assert 4 * cfg["BLOCK_N"] * cfg["BLOCK_KW"] * accumulators <= 8192  # ~64 fp32 registers per thread


def test_bad_inputs():
    x = torch.randn(3, 64, device=DEVICE)
    w = quantized(16, 64, "int4-g32")
    with pytest.raises(ValueError, match="expected a QuantizedWeight"):
        quant_linear(x, torch.randn(16, 64, device=DEVICE))
    with pytest.raises(ValueError, match="must be int32"):
        quant_linear(x, QuantizedWeight("int4", w.qweight.to(torch.int64), w.scales, w.zeros, 32))
    with pytest.raises(ValueError, match="does not divide"):
        quant_linear(x, QuantizedWeight("int4", w.qweight, w.scales, w.zeros, 48))
    with pytest.raises(ValueError, match="straddle"):
        w4 = quantized(16, 64, "int4-channel")
        quant_linear(x, QuantizedWeight("int4", w4.qweight, w4.scales.repeat(1, 16), w4.zeros.repeat(1, 16), 4))
    with pytest.raises(ValueError, match="scales must be"):
        quant_linear(x, QuantizedWeight("int4", w.qweight, w.scales[:, :1], w.zeros, 32))
    with pytest.raises(ValueError, match="zeros must be"):
        quant_linear(x, QuantizedWeight("int4", w.qweight, w.scales, w.zeros.float(), 32))
    with pytest.raises(ValueError, match="perm must be"):
        quant_linear(x, QuantizedWeight("int4", w.qweight, w.scales, w.zeros, 32, torch.arange(64, device=DEVICE)))
    with pytest.raises(ValueError, match="x has 63 inputs"):
        quant_linear(torch.randn(3, 63, device=DEVICE), w)
    with pytest.raises(ValueError, match="x must be float32"):
        quant_linear(x.to(torch.int32), w)
    with pytest.raises(ValueError, match="bias must be"):
        quant_linear(x, w, torch.randn(15, device=DEVICE))
    with pytest.raises(ValueError, match="residual must be"):
        quant_linear(x, w, swiglu=True, residual=torch.randn(3, 16, device=DEVICE))
    with pytest.raises(ValueError, match="out_dtype"):
        quant_linear(x, w, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        quant_linear(x, QuantizedWeight("int4", w.qweight, w.scales.t().contiguous().t(), w.zeros, 32))
    assert quant_linear(x[:0], w).shape == (0, 16)
    # out overlapping an operand (but for the residual itself), or rows of out on one another: a race on the GPU
    buf = torch.randn(4, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with pytest.raises(ValueError, match="out must not overlap residual"):
        quant_linear(x, w, residual=buf[:3], out=buf[1:])
    with pytest.raises(ValueError, match="out's rows overlap one another"):
        quant_linear(x, w, out=torch.zeros(1, 16, device=DEVICE).expand(3, 16))
    square = quantized(64, 64, "int4-g32")
    with pytest.raises(ValueError, match="out must not overlap x"):  # the fused GEMM's programs read all of x
        quant_linear_gemm(x, square, path="fused", out=x)
    with pytest.raises(ValueError, match="out's rows overlap one another"):
        quant_linear_gemm(x, square, out=torch.zeros(1, 64, device=DEVICE).expand(3, 64))
    with pytest.raises(ValueError, match=r"x has no columns \(K = 0\)"):
        empty = torch.empty(16, 0, device=DEVICE)
        quant_linear(x[:, :0], QuantizedWeight("int4", empty.to(torch.int32), empty.half(), empty.half(), 32))

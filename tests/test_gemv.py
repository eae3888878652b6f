"""Decode GEMVs with their fused prologue / epilogues against the unfused PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from kernel_utils import DEVICE, assert_bf16_close, assert_close, assert_tight, poisoned
from qwen2rt.kernels import fused_linear, fused_linear_ref
from qwen2rt.kernels.gemv import gemv_config

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (fusion name, keyword arguments of fused_linear)
FUSIONS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "norm+bias": dict(norm=True, bias=True),  # qkv
    "norm+swiglu": dict(norm=True, swiglu=True),  # gate_up
    "residual": dict(residual=True),  # o, down
    "norm+logits": dict(norm=True, out_dtype=torch.float32),  # final norm + lm_head
}


def _inputs(m, n, k, dtype, bias=False, norm=False, residual=False, swiglu=False, out_dtype=None):
    x = torch.randn(m, k, device=DEVICE, dtype=dtype) * 2
    w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
    kw = dict(swiglu=swiglu, out_dtype=out_dtype, eps=1e-6)
    if bias:
        kw["bias"] = (0.5 * torch.randn(n, device=DEVICE)).to(dtype)
    if norm:
        kw["norm_weight"] = (1 + 0.3 * torch.randn(k, device=DEVICE)).to(dtype)
    width = n // 2 if swiglu else n
    if residual:
        kw["residual"] = torch.randn(m, width, device=DEVICE, dtype=dtype)
    return x, w, kw, width


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("m,n,k", [(1, 64, 96), (3, 70, 100), (7, 38, 1000), (32, 10, 33)])
def test_fused_linear(m, n, k, fusion, dtype):
    x, w, kw, width = _inputs(m, n, k, dtype, **FUSIONS[fusion])
    out_dtype = kw["out_dtype"] or dtype
    before = {name: t.clone() for name, t in kw.items() if isinstance(t, torch.Tensor)}
    out = poisoned(m, width, dtype=out_dtype)
    y = fused_linear(x, w, out=out, **kw)
    assert y.data_ptr() == out.data_ptr() and y.dtype == out_dtype
    assert_close(y, fused_linear_ref(x, w, **kw), dtype)
    assert all(torch.equal(kw[name], t) for name, t in before.items())  # inputs untouched


def test_residual_in_place_and_strided_rows():
    base = torch.randn(5, 300, device=DEVICE)
    x = base[:, :100]  # rows with stride 300
    w = torch.randn(50, 100, device=DEVICE) * 0.1
    res = torch.randn(5, 50, device=DEVICE)
    expected = fused_linear_ref(x, w, residual=res)
    y = fused_linear(x, w, residual=res, out=res)  # the residual stream updated in place
    assert y.data_ptr() == res.data_ptr()
    assert_close(res, expected, torch.float32)


def test_block_sizes_do_not_matter_beyond_rounding():
    """Every configuration computes the same function (edge masks on N and K in every combination)."""
    x, w, kw, width = _inputs(6, 46, 130, torch.float32, norm=True, bias=True, swiglu=True, residual=True)
    expected = fused_linear_ref(x, w, **kw)
    for bn, bk in ((4, 16), (8, 64), (16, 256)):
        y = fused_linear(x, w, config=dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=4), **kw)
        assert_close(y, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance(dtype):
    """A row's result is bitwise the same alone, among 7 others at another position, and in a batch of 32."""
    x, w, kw, _ = _inputs(32, 60, 200, dtype, norm=True, bias=True)
    alone = fused_linear(x[5:6], w, **kw)
    among8 = fused_linear(x[:8], w, **kw)
    among32 = fused_linear(x, w, **kw)
    assert torch.equal(alone[0], among8[5]) and torch.equal(among8, among32[:8])
    assert torch.equal(fused_linear(x[16:32], w, **kw), among32[16:])


@pytest.mark.gpu
@pytest.mark.parametrize("n, k, fusion", [(1152, 896, "norm+bias"), (896, 4864, "residual"),
                                          (9728, 896, "norm+swiglu"), (151936, 896, "norm+logits")])
def test_batch_invariance_bf16_gpu(n, k, fusion):
    """On the GPU, where M = 1 compiles to its own kernel (the JIT specialises it), a row is bitwise the same alone,
    among 8 and in a batch of 32."""
    x, w, kw, _ = _inputs(32, n, k, torch.bfloat16, **FUSIONS[fusion])
    sliced = lambda a, b: {name: (t[a:b] if name == "residual" else t) for name, t in kw.items()}  # noqa: E731
    alone = fused_linear(x[5:6], w, **sliced(5, 6))
    among8 = fused_linear(x[:8], w, **sliced(0, 8))
    among32 = fused_linear(x, w, **kw)
    assert torch.equal(alone[0], among8[5]) and torch.equal(among8, among32[:8])


def test_tolerance_is_tight():
    """A plausible bug in each fusion moves the output farther than the bf16 GPU tolerance: the norm left out, the
    norm weight ignored, the bias added twice, the residual dropped, silu applied to up instead of gate."""
    x, w, kw, _ = _inputs(4, 64, 256, torch.float32, norm=True, bias=True, swiglu=True, residual=True)
    ref = fused_linear_ref(x, w, **kw)
    g, b, r = kw["norm_weight"], kw["bias"], kw["residual"]
    rest = dict(eps=1e-6, swiglu=True)
    mutants = {
        "norm weight ignored": fused_linear_ref(x, w, b, norm_weight=torch.ones_like(g), residual=r, **rest),
        "no norm": fused_linear_ref(x, w, b, residual=r, **rest),
        "bias twice": fused_linear_ref(x, w, 2 * b, norm_weight=g, residual=r, **rest),
        "residual dropped": fused_linear_ref(x, w, b, norm_weight=g, eps=1e-6, swiglu=True),
        "silu on up": fused_linear_ref(x, torch.cat(w.chunk(2)[::-1]), torch.cat(b.chunk(2)[::-1]),
                                       norm_weight=g, residual=r, **rest),
    }
    assert_tight(ref, mutants, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("m,n,k", [(1, 1152, 896), (8, 9728, 896), (32, 3584, 18944), (3, 4096, 4000)])
def test_fused_linear_bf16_gpu(m, n, k, fusion):
    """bf16 on the GPU against the fp32 function of the same bf16 inputs (tolerance shown tight above)."""
    x, w, kw, width = _inputs(m, n, k, torch.bfloat16, **FUSIONS[fusion])
    fp32 = {name: (t.float() if isinstance(t, torch.Tensor) else t) for name, t in kw.items()}
    fp32["out_dtype"] = None
    y = fused_linear(x, w, out=poisoned(m, width, dtype=kw["out_dtype"] or torch.bfloat16), **kw)
    assert_bf16_close(y, fused_linear_ref(x.float(), w.float(), **fp32), 2e-2)


def test_config_depends_on_weight_shape_only():
    assert gemv_config(896, 4864, False) == gemv_config(896, 4864, False)
    for n, k, swiglu in ((1152, 896, False), (4864, 896, True), (151936, 896, False), (3584, 18944, False)):
        cfg = gemv_config(n, k, swiglu)
        accumulators = 2 if swiglu else 1
        assert 4 * cfg["BLOCK_N"] * cfg["BLOCK_K"] * accumulators <= 8192  # ~64 fp32 registers per thread each


def test_bad_inputs():
    x = torch.randn(3, 64, device=DEVICE)
    w = torch.randn(16, 64, device=DEVICE)
    with pytest.raises(ValueError, match="x must be"):
        fused_linear(x, torch.randn(16, 63, device=DEVICE))
    with pytest.raises(ValueError, match="weight must be a torch.float32"):
        fused_linear(x, w.half())
    with pytest.raises(ValueError, match="bias must be"):
        fused_linear(x, w, torch.randn(15, device=DEVICE))
    with pytest.raises(ValueError, match="norm_weight must be"):
        fused_linear(x, w, norm_weight=torch.randn(65, device=DEVICE))
    with pytest.raises(ValueError, match="residual must be"):
        fused_linear(x, w, swiglu=True, residual=torch.randn(3, 16, device=DEVICE))
    with pytest.raises(ValueError, match="even number"):
        fused_linear(x, w[:15], swiglu=True)
    with pytest.raises(ValueError, match="out_dtype"):
        fused_linear(x, w, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="out must be"):
        fused_linear(x, w, out=torch.empty(3, 15, device=DEVICE))
    square = torch.randn(64, 64, generator=torch.Generator().manual_seed(7)).to(DEVICE) * 0.125  # K ** -0.5
    with pytest.raises(ValueError, match="out must not overlap x"):  # a race on the GPU: programs read all of x
        fused_linear(x, square, out=x)
    rows = torch.randn(3, 128, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    with pytest.raises(ValueError, match="out must not overlap x"):  # columns 64-95 of each row are both
        fused_linear(rows[:, 64:], square, residual=rows[:, 32:96], out=rows[:, 32:96])
    with pytest.raises(ValueError, match="out must not overlap x"):  # x's first row is out's last
        fused_linear(rows.view(6, 64)[2:5], square, out=rows.view(6, 64)[:3])
    # column blocks of one buffer that share nothing are fine, either way round
    for r in (slice(0, 3), slice(1, 2)):  # three rows, and one (whose pitch is out's)
        for x_cols, out_cols in ((slice(0, 64), slice(64, 128)), (slice(64, 128), slice(0, 64))):
            expected = fused_linear_ref(rows[r, x_cols], square)
            assert_close(fused_linear(rows[r, x_cols], square, out=rows[:, out_cols][r]), expected, torch.float32)
    assert fused_linear(x[:0], w).shape == (0, 16)


def test_out_overlapping_any_operand_is_an_error():
    """out may be the residual itself, element for element; any other overlap with an operand, or rows of out that
    overlap one another, is a race on the GPU (programs read whole operands while others write out) and gave wrong
    numbers in the interpreter: a ValueError naming the operand."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 13, generator=g).to(DEVICE)
    w = (torch.randn(7, 13, generator=g) * 0.3).to(DEVICE)
    buf = torch.randn(6, 7, generator=g).to(DEVICE)
    with pytest.raises(ValueError, match=r"out must not overlap residual \(it may be residual itself\)"):
        fused_linear(x, w, residual=buf[:5], out=buf[1:])  # the residual one row ahead of out
    norm = torch.randn(13, generator=g).to(DEVICE)
    with pytest.raises(ValueError, match="out must not overlap norm_weight"):
        fused_linear(x[:1], w, norm_weight=norm, out=norm[:7].view(1, 7))
    bias = torch.randn(7, generator=g).to(DEVICE)
    with pytest.raises(ValueError, match="out must not overlap bias"):
        fused_linear(x[:1], w, bias, out=bias.view(1, 7))
    wide = torch.randn(7, 13, generator=g).to(DEVICE)
    with pytest.raises(ValueError, match="out must not overlap weight"):
        fused_linear(x[:1], wide, out=wide[0, :7].view(1, 7))
    square = torch.randn(13, 13, generator=g).to(DEVICE) * 0.3
    with pytest.raises(ValueError, match="out must not overlap x"):  # x is the residual too: out may be the residual
        fused_linear(x, square, residual=x, out=x)  # itself, but not x, which every program reads whole
    with pytest.raises(ValueError, match=r"out's rows overlap one another \(row stride 0, 7 columns\)"):
        fused_linear(x, w, out=torch.zeros(1, 7, device=DEVICE).expand(5, 7))
    # the exact alias still works, and x expanded over one row (stride 0) with a separate out too
    res = buf[:5].clone()
    expected = fused_linear_ref(x, w, residual=res)
    assert_close(fused_linear(x, w, residual=res, out=res), expected, torch.float32)
    assert_close(fused_linear(x[:1].expand(4, 13), w), fused_linear_ref(x[:1].expand(4, 13), w), torch.float32)


def test_empty_weight_and_no_columns():
    x = torch.randn(3, 13, device=DEVICE)
    assert fused_linear(x, torch.empty(0, 13, device=DEVICE)).shape == (3, 0)
    with pytest.raises(ValueError, match=r"x has no columns \(K = 0\)"):
        fused_linear(x[:, :0], torch.empty(7, 0, device=DEVICE))

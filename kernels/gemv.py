"""Decode projections (1-32 rows) as Triton GEMVs, with their neighbours fused in.

    fused_linear(x, w, bias, norm_weight=g, residual=r, swiglu=...)
        h = rms_norm(x, g)        (prologue, when norm_weight is given)
        y = h @ w.T + bias        (bias when given)
        y = silu(y_gate) * y_up   (epilogue, when swiglu: w packs [gate | up] rows, y is half as wide)
        y = y + r                 (epilogue, when residual is given)

At decode a projection reads its whole weight matrix to produce a handful of rows: it is bound by the weight bytes,
and at 0.5B sizes by launches. One program owns BLOCK_N output columns for every row: it streams its [BLOCK_N, K]
slice of the weight once from memory and loops over the rows BLOCK_M at a time (the slice stays in L1/L2 for the
later row blocks). Each program recomputes the norm of its rows (x is 1.8-16 KB, tiny next to the weight slice),
so the norm costs no launch and no round trip through memory; the residual is read and written element by element
by the program that owns the column, so `out` may alias `residual`.

Batch invariance: the block sizes depend on (N, K) only and a row's reduction runs in the same order whichever
rows share its block, so a row's result is bitwise the same alone or in any batch of any size.

Numerics follow the unfused model op for op: the normalised row is rounded to the input dtype and scaled by the
norm weight (Hugging Face's Qwen2RMSNorm), the projection accumulates in fp32 and is rounded to the input dtype
(plus the bias in fp32 first, as cuBLAS's epilogue does), SwiGLU rounds gate and up first then computes in fp32
(the silu_and_mul kernel), the residual add rounds once. `out_dtype=torch.float32` stores the rounded values as
float32 (the logits)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .quant import QuantizedWeight, dequantize
from .rmsnorm import rms_norm_ref, rms_normed
from .swiglu import silu_and_mul_ref

# Rows per block of the row loop. Fixed, whatever the batch: it sets the reduction's layout, so changing it with
# the batch would break batch invariance. Four rows cost 4 FMAs per weight element loaded, far below the FMA rate
# at the bandwidth of a GEMV, and read each weight slice from L1/L2 at most 8 times at batch 32.
BLOCK_M = 4
MAX_ROWS = 32  # the decode buckets; more rows are a GEMM (the backend sends them to cuBLAS)


# ---- reference --------------------------------------------------------------------------------------------------

def fused_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                     residual: torch.Tensor | None = None, swiglu: bool = False,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    h = x if norm_weight is None else rms_norm_ref(x, norm_weight, eps)
    if isinstance(weight, QuantizedWeight):  # fp32 products of the exact dequantized weight, rounded once
        y = F.linear(h.float(), dequantize(weight, torch.float32), None if bias is None else bias.float()).to(x.dtype)
    else:
        y = F.linear(h, weight, bias)
    if swiglu:
        y = silu_and_mul_ref(y)
    if residual is not None:
        y = y + residual
    return y if out_dtype is None else y.to(out_dtype)


# ---- kernel -----------------------------------------------------------------------------------------------------

@triton.jit
def _fused_linear_kernel(
    # pointers
    p_x, p_w, p_bias, p_norm, p_res, p_out,
    # sizes: M rows, N output columns (gate rows when SWIGLU), K inputs
    M, N, K, eps,
    # strides (rows; columns are contiguous)
    s_x, s_w, s_res, s_out,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SWIGLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    dt = p_x.dtype.element_ty
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    p_wg = p_w + o_n[:, None] * s_w  # [BN, 1] gate rows (all rows without SwiGLU)
    p_wu = p_w + (N + o_n)[:, None] * s_w  # [BN, 1] up rows
    if HAS_BIAS:
        b_bias = tl.load(p_bias + o_n, mask=m_n, other=0.0).to(tl.float32)
        if SWIGLU:
            b_bias_up = tl.load(p_bias + N + o_n, mask=m_n, other=0.0).to(tl.float32)
    for m0 in range(0, M, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < M
        p_xm = p_x + o_m.to(tl.int64)[:, None] * s_x  # [BM, 1]
        if HAS_NORM:
            b_ss = tl.zeros([BLOCK_M], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                o_k = k0 + tl.arange(0, BLOCK_K)
                b_x = tl.load(p_xm + o_k[None, :], mask=m_m[:, None] & (o_k < K)[None, :], other=0.0)
                b_xf = b_x.to(tl.float32)
                b_ss += tl.sum(b_xf * b_xf, axis=1)
            b_rstd = tl.rsqrt(b_ss / K + eps)  # [BM]
        # [BM, BN, BK] products accumulated across K, reduced once at the end: no cross-thread work in the loop
        b_acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
        if SWIGLU:
            b_acc_up = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < K
            b_x = tl.load(p_xm + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0).to(tl.float32)
            if HAS_NORM:
                b_g = tl.load(p_norm + o_k, mask=m_k, other=0.0).to(tl.float32)
                b_x = rms_normed(b_x, b_rstd[:, None], b_g[None, :], dt)
            m_w = m_n[:, None] & m_k[None, :]
            b_w = tl.load(p_wg + o_k[None, :], mask=m_w, other=0.0).to(tl.float32)  # [BN, BK]
            b_acc += b_x[:, None, :] * b_w[None, :, :]  # [BM, 1, BK] * [1, BN, BK]
            if SWIGLU:
                b_wu = tl.load(p_wu + o_k[None, :], mask=m_w, other=0.0).to(tl.float32)
                b_acc_up += b_x[:, None, :] * b_wu[None, :, :]
        b_y = tl.sum(b_acc, axis=2)  # [BM, BN]
        if HAS_BIAS:
            b_y += b_bias[None, :]
        b_y = b_y.to(dt).to(tl.float32)
        if SWIGLU:
            b_up = tl.sum(b_acc_up, axis=2)
            if HAS_BIAS:
                b_up += b_bias_up[None, :]
            b_y = b_y * tl.sigmoid(b_y) * b_up.to(dt).to(tl.float32)
            b_y = b_y.to(dt).to(tl.float32)
        m_out = m_m[:, None] & m_n[None, :]
        if HAS_RESIDUAL:
            p_r = p_res + o_m.to(tl.int64)[:, None] * s_res + o_n[None, :]
            b_y = (b_y + tl.load(p_r, mask=m_out, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
        p_o = p_out + o_m.to(tl.int64)[:, None] * s_out + o_n[None, :]
        tl.store(p_o, b_y.to(p_out.dtype.element_ty), mask=m_out)


# ---- launcher ---------------------------------------------------------------------------------------------------

def gemv_config(n: int, k: int, swiglu: bool, interpreter: bool = False) -> dict:
    """Block sizes from the weight's shape alone (never the row count: batch invariance). About 64 fp32 partial
    products per thread per accumulator at 4 warps; 4 output columns per program where 8 would leave fewer
    programs than a GPU has SMs (the measured best on Qwen2-0.5B / 7B qkv, o and down shapes). The interpreter
    runs programs one after another at ~10 ms each: there, few large ones."""
    if interpreter:
        return dict(BLOCK_N=min(64, triton.next_power_of_2(n)), BLOCK_K=min(128, triton.next_power_of_2(k)),
                    num_warps=4)
    block_n = 4 if swiglu or n < 4096 else 8
    block_k = min(2048 // (block_n * (2 if swiglu else 1)), triton.next_power_of_2(k))
    return dict(BLOCK_N=block_n, BLOCK_K=max(16, block_k), num_warps=4)


def check_operand(name: str, t: torch.Tensor | None, shape: tuple, dtype: torch.dtype, device) -> None:
    """An optional operand: absent, or `shape`, `dtype`, on `device`, with a contiguous last dimension."""
    if t is None:
        return
    if tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
        raise ValueError(f"{name} must be a {dtype} tensor {list(shape)} on {device}, got {t.dtype} "
                         f"{list(t.shape)} on {t.device}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension")


def gemv_operands(x: torch.Tensor, n: int, bias, norm_weight, residual, swiglu: bool, out_dtype, out):
    """The checks every decode GEMV (fused_linear, quant.quant_linear) makes of x [M, K] and the optional operands
    of a weight with n rows, and its output -> (output width N', out [M, N'], allocated when not given)."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    m, k = x.shape
    if k == 0:
        raise ValueError("x has no columns (K = 0)")
    if swiglu and n % 2:
        raise ValueError(f"swiglu needs an even number of weight rows [gate | up], got {n}")
    width = n // 2 if swiglu else n
    if x.stride(1) != 1:
        raise ValueError("x must have a contiguous last dimension")
    check_operand("bias", bias, (n,), x.dtype, x.device)
    check_operand("norm_weight", norm_weight, (k,), x.dtype, x.device)
    check_operand("residual", residual, (m, width), x.dtype, x.device)
    if out_dtype not in (None, x.dtype, torch.float32):
        raise ValueError(f"out_dtype must be None, x's dtype or float32, got {out_dtype}")
    out_dtype = out_dtype or x.dtype
    if out is None:
        out = torch.empty((m, width), device=x.device, dtype=out_dtype)
    else:
        check_operand("out", out, (m, width), out_dtype, x.device)
        # every program reads all of x's rows (and the bias and norm weight) while the others write their columns
        # of out; a residual element is read by the program that then writes it: out may be residual itself
        check_out(out, {"x": x, "bias": bias, "norm_weight": norm_weight, "residual": residual},
                  may_be=("residual",))
    return width, out


def check_out(out: torch.Tensor, inputs: dict, may_be: tuple[str, ...] = (), name: str = "out") -> None:
    """out [M, N] with a contiguous last dimension: a ValueError if its rows overlap one another or it shares memory
    with any of `inputs` (name -> tensor or None: a 2-D one with a contiguous last dimension row by row, any other
    by its whole memory extent), except that it may be exactly one of the inputs named in `may_be` (the same
    elements in the same places: a kernel whose programs read each element before writing the same one). By name:
    the same tensor passed as two inputs (x and residual) is still checked as the other one."""
    if out.shape[0] > 1 and out.shape[1] and out.stride(0) < out.shape[1]:
        raise ValueError(f"{name}'s rows overlap one another (row stride {out.stride(0)}, {out.shape[1]} columns)")
    for other, t in inputs.items():
        if t is None or (other in may_be and (t.data_ptr(), t.shape, t.stride()) == (out.data_ptr(), out.shape,
                                                                                     out.stride())):
            continue
        if _overlap(out, t if t.ndim == 2 and t.stride(-1) == 1 else _extent(t)):
            raise ValueError(f"{name} must not overlap {other}" + (f" (it may be {' or '.join(may_be)} itself)"
                                                                   if may_be else ""))


def _extent(t: torch.Tensor) -> torch.Tensor:
    """A view of t's whole memory extent as one row (any layout: a paged cache, a strided or 0-d tensor; a reshape
    would copy a non-contiguous one, and the copy overlaps nothing)."""
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
    return t.as_strided((1, extent), (max(extent, 1), 1))


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two 2-D tensors with contiguous rows may share an element: their byte ranges intersect and, for rows
    of one pitch (column blocks of one buffer), their columns do too; other layouts, whenever the ranges do."""
    def span(t):
        start = t.data_ptr()
        return start, start + ((t.shape[0] - 1) * t.stride(0) + t.shape[1]) * t.element_size()

    if a.device.type == "meta" or b.device.type == "meta":  # no memory (tests/aot_sm90.py's launches)
        return False
    (a0, a1), (b0, b1) = span(a), span(b)
    if a.numel() == 0 or b.numel() == 0 or a1 <= b0 or b1 <= a0:
        return False
    if a.shape[0] == 1 and b.shape[0] == 1:  # the ranges are the elements
        return True
    pitches = {t.stride(0) * t.element_size() for t in (a, b) if t.shape[0] > 1}  # a single row fits any pitch
    if len(pitches) == 1 and 0 not in pitches:
        # each row's bytes as an arc of a circle of the pitch: b's start d bytes after a's
        pitch = pitches.pop()
        d = (b0 - a0) % pitch
        return d < a.shape[1] * a.element_size() or pitch - d < b.shape[1] * b.element_size()
    return True


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 norm_weight: torch.Tensor | None = None, eps: float = 1e-6, residual: torch.Tensor | None = None,
                 swiglu: bool = False, out_dtype: torch.dtype | None = None,
                 out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [M, K] (M up to a few dozen rows; any M works), weight [N, K] in nn.Linear layout, optional bias [N],
    norm weight [K] (RMSNorm of x first, epsilon eps), residual [M, N'] added last; swiglu: weight packs [gate | up]
    rows and the output is silu(gate) * up, N' = N / 2 wide, else N' = N. All in x's dtype. -> [M, N'] in x's
    dtype, or `out_dtype` (float32 only: the rounded values, widened), into `out` when given (it may be
    `residual` itself). `config` overrides gemv_config (BLOCK_N, BLOCK_K, num_warps). No host synchronisation."""
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [M, K] and weight [N, K], got {list(x.shape)} and {list(weight.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    given = out is not None
    width, out = gemv_operands(x, n, bias, norm_weight, residual, swiglu, out_dtype, out)
    check_operand("weight", weight, (n, k), x.dtype, x.device)
    if given:
        check_out(out, {"weight": weight})
    if m == 0 or width == 0:
        return out
    cfg = config or gemv_config(width, k, swiglu, interpreter=x.device.type == "cpu")
    grid = (triton.cdiv(width, cfg["BLOCK_N"]),)
    _fused_linear_kernel[grid](
        x, weight, bias if bias is not None else weight, norm_weight if norm_weight is not None else weight,
        residual if residual is not None else out, out,
        m, width, k, eps,
        x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        HAS_BIAS=bias is not None, HAS_NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None,
        SWIGLU=swiglu, BLOCK_M=BLOCK_M, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"])
    return out

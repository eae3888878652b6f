"""RMSNorm and the fused residual-add + RMSNorm, one program per row, one pass over memory.

    rms_norm(x, w, eps)              y = w * (x * rsqrt(mean(x^2) + eps))
    add_rms_norm(x, residual, w, eps) r = x + residual;  y = rms_norm(r)  -> (y, r)

Numerics follow Hugging Face's Qwen2RMSNorm: the sum of squares in fp32, the normalised row rounded to the input
dtype, then multiplied by the weight. In the fused form the residual sum is rounded to the input dtype before it
is normalised, exactly as the unfused model computes it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# ---- reference --------------------------------------------------------------------------------------------------

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    residual = x + residual
    return rms_norm_ref(residual, weight, eps), residual


# ---- kernel -----------------------------------------------------------------------------------------------------

@triton.jit
def rms_normed(b_x, rstd, b_w, dt: tl.constexpr):
    """The normalised values as the unfused model has them, in fp32: x * rstd rounded to dt, times the weight,
    rounded again (torch's low-precision multiply rounds the same way; the Triton interpreter cannot multiply bf16
    values directly). b_x, rstd and b_w are fp32 and broadcast. Shared by every kernel with an RMSNorm prologue."""
    return ((b_x * rstd).to(dt).to(tl.float32) * b_w).to(dt).to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    # pointers
    p_x, p_res, p_w, p_y, p_res_out,
    # sizes
    n_cols, eps,
    # strides (rows; columns are contiguous)
    s_x, s_res, s_y, s_res_out,
    # meta-parameters
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    o_col = tl.arange(0, BLOCK)
    m_col = o_col < n_cols
    b_x = tl.load(p_x + i_row * s_x + o_col, mask=m_col, other=0.0)
    if HAS_RESIDUAL:
        b_res = tl.load(p_res + i_row * s_res + o_col, mask=m_col, other=0.0)
        b_x = (b_x.to(tl.float32) + b_res.to(tl.float32)).to(p_x.dtype.element_ty)
        tl.store(p_res_out + i_row * s_res_out + o_col, b_x, mask=m_col)
    b_xf = b_x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(b_xf * b_xf, axis=0) / n_cols + eps)
    b_w = tl.load(p_w + o_col, mask=m_col, other=0.0).to(tl.float32)
    b_y = rms_normed(b_xf, rstd, b_w, p_x.dtype.element_ty)
    tl.store(p_y + i_row * s_y + o_col, b_y.to(p_y.dtype.element_ty), mask=m_col)


def _launch_config(n_cols: int) -> tuple[int, int]:
    """Whole row in one block; about 8 elements per thread, 1 to 16 warps."""
    block = triton.next_power_of_2(n_cols)
    return block, min(16, max(1, block // 256))


def _check(x: torch.Tensor, weight: torch.Tensor, name: str = "x"):
    if x.ndim == 0:
        raise ValueError(f"{name} must be [..., H] with at least one dimension, got a 0-d tensor")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} must have a hidden size H >= 1, got shape {list(x.shape)}")
    if weight.ndim != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [{x.shape[-1]}], got {list(weight.shape)}")
    # the kernel reads weight[i] at p_w + i and multiplies in the input dtype (the model's norm weights are in its
    # dtype; a weight of another dtype would make the output's dtype and rounding ambiguous)
    if weight.dtype != x.dtype:
        raise ValueError(f"weight must have {name}'s dtype {x.dtype}, got {weight.dtype}")
    if not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous (stride 1), got stride {weight.stride(0)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, {name} on {x.device}")
    if x.shape[-1] > 65536:
        raise ValueError(f"hidden size {x.shape[-1]} exceeds the one-block-per-row limit of 65536")


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _output(out: torch.Tensor | None, like: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    """A fresh [rows, H] buffer, or the caller's `out` (x's shape and dtype, contiguous) viewed as one. Only x's
    shape: one of another with as many elements (x's transpose, say) would be written as if it were x's."""
    if out is None:
        return torch.empty(like.shape, device=like.device, dtype=like.dtype)
    if out.dtype != like.dtype or out.device != like.device or out.shape != shape or not out.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {like.dtype} tensor {list(shape)} on {like.device} (x's), got "
                         f"{out.dtype} {list(out.shape)} on {out.device}")
    return out.view(like.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., H] (fp32 / fp16 / bf16), weight [H] contiguous, of x's dtype -> y [..., H] in x's dtype (into `out`
    if given: it may be x itself, in place, but must not otherwise overlap x or the weight)."""
    _check(x, weight)
    x2 = _rows(x)
    y = _output(out, x2, x.shape, "out")
    if out is not None:  # each program reads its whole row before writing it: out may be x itself
        from .gemv import check_out  # gemv imports this module

        check_out(y, {"x": x2, "weight": weight}, may_be=("x",))
    if x2.shape[0]:
        block, warps = _launch_config(x2.shape[1])
        _rms_norm_kernel[(x2.shape[0],)](x2, x2, weight, y, y, x2.shape[1], eps,
                                         x2.stride(0), x2.stride(0), y.stride(0), y.stride(0),
                                         HAS_RESIDUAL=False, BLOCK=block, num_warps=warps)
    return y.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """x, residual [..., H] of one dtype, weight [H] contiguous, of x's dtype -> (rms_norm(x + residual),
    x + residual), written into `out` / `residual_out` when given. Each of them may be exactly x or exactly residual
    (in place: the same data pointer, shape and strides), but must not otherwise overlap x, residual or the weight;
    out and residual_out must not overlap each other at all."""
    _check(x, weight)
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"residual must match x ({list(x.shape)}, {x.dtype}, {x.device}), got "
                         f"({list(residual.shape)}, {residual.dtype}, {residual.device})")
    x2, r2 = _rows(x), _rows(residual)
    y = _output(out, x2, x.shape, "out")
    r_out = _output(residual_out, x2, x.shape, "residual_out")
    from .gemv import check_out  # gemv imports this module

    rows_read = {"x": x2, "residual": r2, "weight": weight}
    if out is not None:
        check_out(y, dict(rows_read, residual_out=r_out), may_be=("x", "residual"))
    if residual_out is not None:
        check_out(r_out, dict(rows_read, out=y), may_be=("x", "residual"), name="residual_out")
    if x2.shape[0]:
        block, warps = _launch_config(x2.shape[1])
        _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, y, r_out, x2.shape[1], eps,
                                         x2.stride(0), r2.stride(0), y.stride(0), r_out.stride(0),
                                         HAS_RESIDUAL=True, BLOCK=block, num_warps=warps)
    return y.view(x.shape), r_out.view(x.shape)

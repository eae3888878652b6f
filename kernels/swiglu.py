"""SwiGLU activation of the packed gate_up projection: [..., 2I] = [gate | up] -> silu(gate) * up, [..., I].

Computed in fp32 and rounded once (the unfused torch form rounds silu(gate) before the product: the two differ by
at most one rounding in low precision)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(
    # pointers
    p_in, p_out,
    # sizes
    n_cols,
    # strides (rows; columns are contiguous)
    s_in, s_out,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    i_col = tl.program_id(1)
    o_col = i_col * BLOCK + tl.arange(0, BLOCK)
    m_col = o_col < n_cols
    b_gate = tl.load(p_in + i_row * s_in + o_col, mask=m_col, other=0.0).to(tl.float32)
    b_up = tl.load(p_in + i_row * s_in + n_cols + o_col, mask=m_col, other=0.0).to(tl.float32)
    b_out = b_gate * tl.sigmoid(b_gate) * b_up
    tl.store(p_out + i_row * s_out + o_col, b_out.to(p_out.dtype.element_ty), mask=m_col)


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [..., 2I] (fp32 / fp16 / bf16) -> [..., I] in the same dtype (into `out` if given: contiguous, and
    sharing no memory with gate_up, whose rows other programs may still be reading)."""
    if gate_up.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"gate_up must be float32, float16 or bfloat16, got {gate_up.dtype}")
    if gate_up.ndim == 0 or gate_up.shape[-1] == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dimension must be even and positive ([gate | up]), got shape "
                         f"{list(gate_up.shape)}")
    inter = gate_up.shape[-1] // 2
    x = gate_up.reshape(-1, gate_up.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty((x.shape[0], inter), device=x.device, dtype=x.dtype)
    elif out.dtype != x.dtype or out.device != x.device or out.numel() != x.shape[0] * inter or \
            not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of {x.shape[0] * inter} elements")
    out = out.view(x.shape[0], inter)
    from .gemv import check_out  # gemv imports this module

    check_out(out, {"gate_up": x})
    if x.shape[0] and inter:
        block = min(1024, triton.next_power_of_2(inter))
        grid = (x.shape[0], triton.cdiv(inter, block))
        _silu_and_mul_kernel[grid](x, out, inter, x.stride(0), out.stride(0), BLOCK=block,
                                   num_warps=4 if block >= 512 else 1)
    return out.view(*gate_up.shape[:-1], inter)

"""Weight-only quantized linear weights: the one layout every quantized path shares, and its PyTorch reference.

A `QuantizedWeight` stands in for an nn.Linear weight [N, K] (N outputs, K inputs). Whatever the checkpoint format
(GPTQ, AWQ) or the at-load quantization (int8, int4, fp8), weights are re-packed at load into this layout, chosen
for the decode GEMV, which streams each output row's K inputs contiguously:

    kind "int4" / "int8" (bits 4 / 8):
        qweight [N, K // per_word] int32, per_word = 32 // bits: input k of row n is the unsigned integer q in
                word k // per_word, bits (k % per_word) * bits .. + bits (GPTQ's packing along K, transposed)
        scales  [N, G] float (float16, bfloat16 or float32), G = K // group_size
        zeros   [N, G] same dtype as scales: the zero point of each group, an integer value held as a float
        w[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g],  g = k // group_size
    kind "fp8":
        qweight [N, K] float8_e4m3fn, scales [N, 1] float, zeros None, group_size K
        w[n, k] = float(qweight[n, k]) * scales[n, 0]

    perm [K] int32 or None (act-order checkpoints, GPTQ desc_act): the stored columns are the inputs in the order
        perm, i.e. stored column i multiplies input x[:, perm[i]]; groups are contiguous in stored order.

The dequantized weight of the reference (`dequantize`) is in input order, so F.linear(x, dequantize(w)) is the
projection whatever the layout.

The kernels below (the layout's consumers):
    quant_linear(x, w, ...)       decode, 1-32 rows: fused_linear's contract and fusions with a quantized weight, one
                                  Triton GEMV that unpacks the words in registers
    dequantize_weight(w, dtype)   the weight [N, K] in input order, in `dtype`, by a Triton kernel
    quant_linear_gemm(x, w, bias) prefill, more rows: a Triton GEMM that dequantizes the weight in its K loop (up to
                                  FUSED_GEMM_MAX_ROWS rows), or dequantize_weight into a scratch buffer + cuBLAS
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .rmsnorm import rms_normed

KINDS = {"int4": 4, "int8": 8, "fp8": 8}


@dataclass
class QuantizedWeight:
    kind: str  # "int4", "int8" or "fp8"
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    perm: torch.Tensor | None = None

    @property
    def bits(self) -> int:
        return KINDS[self.kind]

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K), the shape of the nn.Linear weight this stands for."""
        n, words = self.qweight.shape
        return n, words if self.kind == "fp8" else words * (32 // self.bits)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the scales (and of a dequantized weight)."""
        return self.scales.dtype

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros, self.perm)
                   if t is not None)

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Output rows [start, stop) as views (to fill a fused projection's part while loading)."""
        return QuantizedWeight(self.kind, self.qweight[start:stop], self.scales[start:stop],
                               None if self.zeros is None else self.zeros[start:stop], self.group_size, self.perm)

    def validate(self) -> None:
        """Shapes, dtypes and devices agree with the layout above: a ValueError naming what does not."""
        if self.kind not in KINDS:
            raise ValueError(f"unknown quantized weight kind {self.kind!r}; expected one of {sorted(KINDS)}")
        n, k = self.shape
        if self.kind == "fp8":
            if self.qweight.dtype != torch.float8_e4m3fn or self.zeros is not None or self.group_size != k:
                raise ValueError("an fp8 weight is a float8_e4m3fn qweight [N, K] with per-row scales and no zeros")
        elif self.qweight.dtype != torch.int32:
            raise ValueError(f"{self.kind} qweight must be int32, got {self.qweight.dtype}")
        if self.group_size <= 0 or k % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide the input size {k}")
        groups = k // self.group_size
        if tuple(self.scales.shape) != (n, groups) or not self.scales.is_floating_point():
            raise ValueError(f"scales must be a float tensor [{n}, {groups}], got {self.scales.dtype} "
                             f"{list(self.scales.shape)}")
        if self.kind != "fp8" and (self.zeros is None or self.zeros.shape != self.scales.shape
                                   or self.zeros.dtype != self.scales.dtype):
            raise ValueError(f"zeros must be a {self.scales.dtype} tensor [{n}, {groups}]")
        if self.perm is not None and (tuple(self.perm.shape) != (k,) or self.perm.dtype != torch.int32):
            raise ValueError(f"perm must be an int32 tensor [{k}], got {self.perm.dtype} {list(self.perm.shape)}")
        for t in (self.scales, self.zeros, self.perm):
            if t is not None and t.device != self.qweight.device:
                raise ValueError("every part of a quantized weight must be on one device")


# ---- packing along the input dimension (this layout and GPTQ's) --------------------------------------------------

def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers q [N, K] (values in [0, 2**bits)) -> int32 [N, K * bits // 32], packed along K: input k in
    word k // per_word at bit (k % per_word) * bits."""
    per_word = 32 // bits
    n, k = q.shape
    if k % per_word:
        raise ValueError(f"cannot pack {k} inputs {per_word} to a word")
    shifts = torch.arange(per_word, device=q.device, dtype=torch.int64) * bits
    words = (q.to(torch.int64).view(n, k // per_word, per_word) << shifts).sum(dim=2)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement: the top bit set is a negative int32


def unpack_rows(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of pack_rows: int32 [N, W] -> int64 [N, W * 32 // bits] in [0, 2**bits)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=qweight.device, dtype=torch.int64) * bits
    values = (qweight.to(torch.int64)[:, :, None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(qweight.shape[0], -1)


# ---- reference --------------------------------------------------------------------------------------------------

def dequantize(w: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight [N, K] in input order, computed in fp32 and returned in `dtype` (default: the scales' dtype)."""
    n, k = w.shape
    scales = w.scales.float().repeat_interleave(w.group_size, dim=1)  # [N, K], stored order
    if w.kind == "fp8":
        stored = w.qweight.float() * scales
    else:
        zeros = w.zeros.float().repeat_interleave(w.group_size, dim=1)
        stored = (unpack_rows(w.qweight, w.bits).float() - zeros) * scales
    if w.perm is not None:
        out = torch.empty_like(stored)
        out[:, w.perm.long()] = stored
        stored = out
    return stored.to(dtype or w.dtype)


# ---- decode GEMV: the weight unpacked in registers ---------------------------------------------------------------
#
# Words, not weights, are the unit of a tile: a program loads [BLOCK_N, BLOCK_KW] int32 words (or fp8 bytes) and
# visits the PER_WORD positions of each word in an unrolled loop, position j holding stored column word * PER_WORD + j.
# Each position is a [BLOCK_N, BLOCK_KW] tile of weights with the same layout as the words, so unpacking is a shift
# and a mask per weight, with no reshape (no shuffle through shared memory), and x is loaded at the matching columns
# (strided by PER_WORD: x is a few KB read from L1, the weight streams from HBM once). Each row's fp32 accumulator has
# one entry per word, so int4 keeps 8x fewer partial sums per weight than a bf16 GEMV of the same tile.
#
# Integer to float: (q | 0x4B000000) read as a float is exactly 2^23 + q, so w = (that - (2^23 + zero)) * scale costs a
# logic op and two float ops, and no I2F conversion (a quarter-rate instruction on sm_90, too slow to keep up with
# 4-bit weights at HBM speed). The subtraction is exact for integer zeros below 2^22, so w is the reference's
# (q - zero) * scale in fp32 bit for bit. Per-channel weights (one group, fp8 always) apply the scale once to the
# row's sum instead of to every weight: the same value up to fp32 rounding of the sum.

MAGIC = tl.constexpr(0x4B000000)  # the bits of 2^23 as a float32
MAGIC_VALUE = tl.constexpr(8388608.0)


@triton.jit
def _weights(b_q, b_zb, b_s, J: tl.constexpr, BITS: tl.constexpr, IS_FP8: tl.constexpr, SCALED: tl.constexpr):
    """Position J of each word of b_q as fp32 weights: (q - zero) (b_zb = 2^23 + zero), times b_s when SCALED."""
    if IS_FP8:
        b_w = b_q.to(tl.float32)
    else:
        b_bits = ((b_q >> (J * BITS)) & ((1 << BITS) - 1)) | MAGIC
        b_w = b_bits.to(tl.float32, bitcast=True) - b_zb
    if SCALED:
        b_w = b_w * b_s
    return b_w


@triton.jit
def _row_product(p_x, o_k, m_k, b_g, rstd, b_w, HAS_NORM: tl.constexpr, dt: tl.constexpr):
    """x[o_k] of one row (normalised when HAS_NORM) times the weights: [1, BKW] * [BN, BKW]."""
    b_x = tl.load(p_x + o_k, mask=m_k, other=0.0).to(tl.float32)  # [BKW]
    if HAS_NORM:
        b_x = rms_normed(b_x, rstd, b_g, dt)
    return b_x[None, :] * b_w


@triton.jit
def _pick(b_v, i: tl.constexpr):
    """Element i of a [4] vector, as a scalar (exact: a sum of zeros and one value)."""
    return tl.sum(tl.where(tl.arange(0, 4) == i, b_v, 0.0), axis=0)


@triton.jit
def _row_epilogue(b_acc, b_acc_up, b_s, b_su, b_bias, b_bias_up, p_res, p_out, o_n, m_n, rows_left, s_res, s_out,
                  R: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                  SWIGLU: tl.constexpr, dt: tl.constexpr):
    """Row R of the block (written if R < rows_left) from its [BN, BKW] accumulators: the row scale, bias,
    rounding, SwiGLU, residual, store."""
    b_y = tl.sum(b_acc, axis=1)  # [BN]
    if PER_CHANNEL:
        b_y = b_y * b_s
    if HAS_BIAS:
        b_y += b_bias
    b_y = b_y.to(dt).to(tl.float32)
    if SWIGLU:
        b_up = tl.sum(b_acc_up, axis=1)
        if PER_CHANNEL:
            b_up = b_up * b_su
        if HAS_BIAS:
            b_up += b_bias_up
        b_y = b_y * tl.sigmoid(b_y) * b_up.to(dt).to(tl.float32)
        b_y = b_y.to(dt).to(tl.float32)
    m_out = m_n & (tl.full([o_n.shape[0]], R, tl.int32) < rows_left)
    p_res += R * s_res
    p_out += R * s_out
    if HAS_RESIDUAL:
        b_y = (b_y + tl.load(p_res + o_n, mask=m_out, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
    tl.store(p_out + o_n, b_y.to(p_out.dtype.element_ty), mask=m_out)


@triton.jit
def _quant_linear_kernel(
    # pointers
    p_x, p_qw, p_scales, p_zeros, p_perm, p_bias, p_norm, p_res, p_out,
    # sizes: M rows, N output columns (gate rows when SWIGLU), K inputs, KW words per weight row
    M, N, K, KW, eps,
    # strides (rows; columns are contiguous)
    s_x, s_qw, s_scales, s_zeros, s_res, s_out,
    # meta-parameters
    BITS: tl.constexpr, IS_FP8: tl.constexpr, GROUP_WORDS: tl.constexpr, PER_CHANNEL: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, NORM_BLOCK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # Rows 4 at a time, each with its own [BN, BKW] accumulator (not one [4, BN, BKW] block as in fused_linear): a
    # row's sums have the same layout and order whatever M is (batch invariance), and rows past M skip their
    # products (a uniform branch), so M = 1 does 1 FMA per weight, not 4. At 4 bits the unpacking (~4 operations
    # per weight) plus 4 FMAs would exceed an H100's FP32 issue rate at copy bandwidth (~25 weights per cycle per
    # SM); plus 1 it fits.
    PER_WORD: tl.constexpr = 1 if IS_FP8 else 32 // BITS
    i_n = tl.program_id(0).to(tl.int64)
    dt = p_x.dtype.element_ty
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    p_qg = p_qw + o_n[:, None] * s_qw  # [BN, 1] gate rows (all rows without SwiGLU)
    p_qu = p_qw + (N + o_n)[:, None] * s_qw  # [BN, 1] up rows
    b_sg = tl.zeros([BLOCK_N], tl.float32)
    b_su = tl.zeros([BLOCK_N], tl.float32)
    b_zg = MAGIC_VALUE
    b_zu = MAGIC_VALUE
    if PER_CHANNEL:  # one scale (and zero) per row, applied to the row's sum
        b_sg = tl.load(p_scales + o_n * s_scales, mask=m_n, other=0.0).to(tl.float32)  # [BN]
        if not IS_FP8:
            b_zg = tl.load(p_zeros + o_n * s_zeros, mask=m_n, other=0.0).to(tl.float32)[:, None] + MAGIC_VALUE
        if SWIGLU:
            b_su = tl.load(p_scales + (N + o_n) * s_scales, mask=m_n, other=0.0).to(tl.float32)
            if not IS_FP8:
                b_zu = tl.load(p_zeros + (N + o_n) * s_zeros, mask=m_n, other=0.0).to(tl.float32)[:, None] \
                    + MAGIC_VALUE
    b_bias = tl.zeros([BLOCK_N], tl.float32)
    b_bias_up = tl.zeros([BLOCK_N], tl.float32)
    if HAS_BIAS:
        b_bias = tl.load(p_bias + o_n, mask=m_n, other=0.0).to(tl.float32)
        if SWIGLU:
            b_bias_up = tl.load(p_bias + N + o_n, mask=m_n, other=0.0).to(tl.float32)
    for m0 in range(0, M, 4):
        o_m = m0 + tl.arange(0, 4)
        m_m = o_m < M
        has1, has2, has3 = m0 + 1 < M, m0 + 2 < M, m0 + 3 < M
        p_x0 = p_x + tl.cast(m0, tl.int64) * s_x
        p_x1, p_x2, p_x3 = p_x0 + s_x, p_x0 + 2 * s_x, p_x0 + 3 * s_x
        b_rstd = tl.zeros([4], tl.float32)
        if HAS_NORM:  # row statistics in input order: they do not depend on the order of the columns
            b_ss = tl.zeros([4], tl.float32)
            for k0 in range(0, K, NORM_BLOCK):
                o_k = k0 + tl.arange(0, NORM_BLOCK)
                b_x = tl.load(p_x0 + tl.arange(0, 4).to(tl.int64)[:, None] * s_x + o_k[None, :],
                              mask=m_m[:, None] & (o_k < K)[None, :], other=0.0)
                b_xf = b_x.to(tl.float32)
                b_ss += tl.sum(b_xf * b_xf, axis=1)
            b_rstd = tl.rsqrt(b_ss / K + eps)  # [4]
        rstd0, rstd1, rstd2, rstd3 = _pick(b_rstd, 0), _pick(b_rstd, 1), _pick(b_rstd, 2), _pick(b_rstd, 3)
        # per row, [BN, BKW] products accumulated across K (one entry per word), reduced once at the end
        b_acc0 = tl.zeros([BLOCK_N, BLOCK_KW], tl.float32)
        b_acc1 = tl.zeros([BLOCK_N, BLOCK_KW], tl.float32)
        b_acc2 = tl.zeros([BLOCK_N, BLOCK_KW], tl.float32)
        b_acc3 = tl.zeros([BLOCK_N, BLOCK_KW], tl.float32)
        b_up0 = tl.zeros([BLOCK_N, BLOCK_KW], tl.float32)
        b_up1 = tl.zeros([BLOCK_N, BLOCK_KW], tl.float32)
        b_up2 = tl.zeros([BLOCK_N, BLOCK_KW], tl.float32)
        b_up3 = tl.zeros([BLOCK_N, BLOCK_KW], tl.float32)
        for w0 in tl.range(0, KW, BLOCK_KW, num_stages=NUM_STAGES):  # the words' loads pipelined
            o_w = w0 + tl.arange(0, BLOCK_KW)
            m_w = o_w < KW
            m_nw = m_n[:, None] & m_w[None, :]
            b_q = tl.load(p_qg + o_w[None, :], mask=m_nw, other=0.0)  # [BN, BKW] words
            if SWIGLU:
                b_qu = tl.load(p_qu + o_w[None, :], mask=m_nw, other=0.0)
            b_tsg, b_tzg, b_tsu, b_tzu = b_sg, b_zg, b_su, b_zu  # per channel: the rows' (scales unused here)
            if not PER_CHANNEL:  # words never straddle groups: one scale and zero per word
                o_sg = o_n[:, None] * s_scales + (o_w // GROUP_WORDS)[None, :]
                o_zg = o_n[:, None] * s_zeros + (o_w // GROUP_WORDS)[None, :]
                b_tsg = tl.load(p_scales + o_sg, mask=m_nw, other=0.0).to(tl.float32)
                b_tzg = tl.load(p_zeros + o_zg, mask=m_nw, other=0.0).to(tl.float32) + MAGIC_VALUE
                if SWIGLU:
                    b_tsu = tl.load(p_scales + N * s_scales + o_sg, mask=m_nw, other=0.0).to(tl.float32)
                    b_tzu = tl.load(p_zeros + N * s_zeros + o_zg, mask=m_nw, other=0.0).to(tl.float32) + MAGIC_VALUE
            for j in tl.static_range(PER_WORD):
                o_k = o_w * PER_WORD + j  # [BKW] stored columns
                if HAS_PERM:  # act-order: stored column i multiplies input perm[i]
                    o_k = tl.load(p_perm + o_k, mask=m_w, other=0)
                b_g = tl.zeros([BLOCK_KW], tl.float32)
                if HAS_NORM:
                    b_g = tl.load(p_norm + o_k, mask=m_w, other=0.0).to(tl.float32)
                b_w = _weights(b_q, b_tzg, b_tsg, j, BITS, IS_FP8, not PER_CHANNEL)  # [BN, BKW]
                b_acc0 += _row_product(p_x0, o_k, m_w, b_g, rstd0, b_w, HAS_NORM, dt)
                if has1:
                    b_acc1 += _row_product(p_x1, o_k, m_w, b_g, rstd1, b_w, HAS_NORM, dt)
                if has2:
                    b_acc2 += _row_product(p_x2, o_k, m_w, b_g, rstd2, b_w, HAS_NORM, dt)
                if has3:
                    b_acc3 += _row_product(p_x3, o_k, m_w, b_g, rstd3, b_w, HAS_NORM, dt)
                if SWIGLU:
                    b_wu = _weights(b_qu, b_tzu, b_tsu, j, BITS, IS_FP8, not PER_CHANNEL)
                    b_up0 += _row_product(p_x0, o_k, m_w, b_g, rstd0, b_wu, HAS_NORM, dt)
                    if has1:
                        b_up1 += _row_product(p_x1, o_k, m_w, b_g, rstd1, b_wu, HAS_NORM, dt)
                    if has2:
                        b_up2 += _row_product(p_x2, o_k, m_w, b_g, rstd2, b_wu, HAS_NORM, dt)
                    if has3:
                        b_up3 += _row_product(p_x3, o_k, m_w, b_g, rstd3, b_wu, HAS_NORM, dt)
        p_r = p_res + tl.cast(m0, tl.int64) * s_res
        p_o = p_out + tl.cast(m0, tl.int64) * s_out
        rows_left = M - m0
        _row_epilogue(b_acc0, b_up0, b_sg, b_su, b_bias, b_bias_up, p_r, p_o, o_n, m_n, rows_left, s_res, s_out, 0,
                      PER_CHANNEL, HAS_BIAS, HAS_RESIDUAL, SWIGLU, dt)
        _row_epilogue(b_acc1, b_up1, b_sg, b_su, b_bias, b_bias_up, p_r, p_o, o_n, m_n, rows_left, s_res, s_out, 1,
                      PER_CHANNEL, HAS_BIAS, HAS_RESIDUAL, SWIGLU, dt)
        _row_epilogue(b_acc2, b_up2, b_sg, b_su, b_bias, b_bias_up, p_r, p_o, o_n, m_n, rows_left, s_res, s_out, 2,
                      PER_CHANNEL, HAS_BIAS, HAS_RESIDUAL, SWIGLU, dt)
        _row_epilogue(b_acc3, b_up3, b_sg, b_su, b_bias, b_bias_up, p_r, p_o, o_n, m_n, rows_left, s_res, s_out, 3,
                      PER_CHANNEL, HAS_BIAS, HAS_RESIDUAL, SWIGLU, dt)


# ---- prefill: dequantize once, then cuBLAS ------------------------------------------------------------------------

@triton.jit
def _dequantize_kernel(
    # pointers
    p_qw, p_scales, p_zeros, p_perm, p_out,
    # sizes: N rows, KW words per row
    N, KW,
    # strides (rows; columns are contiguous)
    s_qw, s_scales, s_zeros, s_out,
    # meta-parameters
    BITS: tl.constexpr, IS_FP8: tl.constexpr, GROUP_WORDS: tl.constexpr, PER_CHANNEL: tl.constexpr,
    HAS_PERM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    PER_WORD: tl.constexpr = 1 if IS_FP8 else 32 // BITS
    i_n, i_w = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_w = i_w * BLOCK_KW + tl.arange(0, BLOCK_KW)
    m_w = o_w < KW
    m_nw = (o_n < N)[:, None] & m_w[None, :]
    b_q = tl.load(p_qw + o_n[:, None] * s_qw + o_w[None, :], mask=m_nw, other=0.0)  # [BN, BKW]
    o_g = (o_w * 0 if PER_CHANNEL else o_w // GROUP_WORDS)[None, :]
    b_s = tl.load(p_scales + o_n[:, None] * s_scales + o_g, mask=m_nw, other=0.0).to(tl.float32)
    b_zb = MAGIC_VALUE
    if not IS_FP8:
        b_zb = tl.load(p_zeros + o_n[:, None] * s_zeros + o_g, mask=m_nw, other=0.0).to(tl.float32) + MAGIC_VALUE
    for j in tl.static_range(PER_WORD):
        o_k = o_w * PER_WORD + j  # [BKW] stored columns
        if HAS_PERM:
            o_k = tl.load(p_perm + o_k, mask=m_w, other=0)
        b_w = _weights(b_q, b_zb, b_s, j, BITS, IS_FP8, True)
        tl.store(p_out + o_n[:, None] * s_out + o_k[None, :], b_w.to(p_out.dtype.element_ty), mask=m_nw)


# ---- prefill: the weight dequantized inside the GEMM's K loop --------------------------------------------------------
#
# A [BLOCK_M, BLOCK_N] output tile walks K in steps of BLOCK_K stored columns. Each step loads the step's words
# transposed, [BLOCK_K / PER_WORD, BLOCK_N], spreads each word's PER_WORD fields along a new axis and reshapes to the
# [BLOCK_K, BLOCK_N] weight tile (stored column word * PER_WORD + j is row (word - first) * PER_WORD + j: a row-major
# reshape), dequantizes it with the step's scales and zeros ((q - zero) * scale in fp32, the 2^23 trick, rounded to
# x's dtype as the dequantize-then-GEMM path rounds it) and feeds tl.dot with the x tile of the same columns (gathered
# through the act-order perm when there is one). BLOCK_K divides the group size, so a step has one group: its scales
# and zeros are one [BLOCK_N] vector each. The weight is read from memory once per BLOCK_M rows instead of being
# unpacked to a bf16 copy (4x / 2x the bytes of int4 / int8) and read back.

@triton.jit
def dequant_tile(p_qw, p_s, p_z, o_r, m_r, i_k, K, s_qw, s_s, s_z, dt: tl.constexpr, BITS: tl.constexpr,
                 IS_FP8: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP_STEPS: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """[BLOCK_K, BLOCK_N]: stored columns [i_k BLOCK_K, (i_k + 1) BLOCK_K) of the rows o_r (masked by m_r) of a
    quantized weight, dequantized and rounded to dt (rows masked off are 0; columns past K are finite garbage that the
    caller's zero x columns cancel). BLOCK_K divides the group size (GROUP_STEPS steps per group) unless PER_CHANNEL.
    Shared by the fused dequantize-GEMM and kernels.moe's grouped expert GEMMs."""
    PER_WORD: tl.constexpr = 1 if IS_FP8 else 32 // BITS
    BLOCK_KW: tl.constexpr = BLOCK_K // PER_WORD
    o_g = i_k * 0 if PER_CHANNEL else i_k // GROUP_STEPS
    b_s = tl.load(p_s + o_r * s_s + o_g, mask=m_r, other=0.0).to(tl.float32)[None, :]
    if IS_FP8:
        o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
        b_w = tl.load(p_qw + o_r[None, :] * s_qw + o_k[:, None], mask=(o_k < K)[:, None] & m_r[None, :],
                      other=0.0).to(tl.float32)
    else:
        o_w = i_k * BLOCK_KW + tl.arange(0, BLOCK_KW)
        b_q = tl.load(p_qw + o_r[None, :] * s_qw + o_w[:, None], mask=(o_w * PER_WORD < K)[:, None] & m_r[None, :],
                      other=0)  # [BKW, BN] words
        o_j = tl.arange(0, PER_WORD)
        b_v = (b_q[:, None, :] >> (o_j * BITS)[None, :, None]) & ((1 << BITS) - 1)  # [BKW, PER_WORD, BN]
        b_v = tl.reshape(b_v | MAGIC, (BLOCK_K, BLOCK_N)).to(tl.float32, bitcast=True)  # 2^23 + q
        b_zb = tl.load(p_z + o_r * s_z + o_g, mask=m_r, other=0.0).to(tl.float32)[None, :] + MAGIC_VALUE
        b_w = b_v - b_zb
    return (b_w * b_s).to(dt)


@triton.jit
def _quant_gemm_kernel(
    # pointers
    p_x, p_qw, p_scales, p_zeros, p_perm, p_bias, p_out,
    # sizes: M rows, N outputs, K inputs
    M, N, K,
    # strides (rows; columns are contiguous)
    s_x, s_qw, s_scales, s_zeros, s_out,
    # meta-parameters
    BITS: tl.constexpr, IS_FP8: tl.constexpr, GROUP_STEPS: tl.constexpr, PER_CHANNEL: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    dt = p_x.dtype.element_ty
    # the M blocks of one N block are neighbours in launch order: they run together and share the weight tile in L2
    i_m, i_n = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m, m_n = o_m < M, o_n < N
    p_xm = p_x + o_m[:, None] * s_x  # [BM, 1]
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for i_k in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=NUM_STAGES):
        o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)  # stored columns
        m_k = o_k < K
        o_kx = tl.load(p_perm + o_k, mask=m_k, other=0) if HAS_PERM else o_k
        b_x = tl.load(p_xm + o_kx[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        b_w = dequant_tile(p_qw, p_scales, p_zeros, o_n, m_n, i_k, K, s_qw, s_scales, s_zeros, dt, BITS, IS_FP8,
                           PER_CHANNEL, GROUP_STEPS, BLOCK_K, BLOCK_N)
        b_acc = tl.dot(b_x, b_w, b_acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b_acc += tl.load(p_bias + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    tl.store(p_out + o_m[:, None] * s_out + o_n[None, :], b_acc.to(p_out.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


def dequant_block_k(block_k: int, kind: str, group_size: int, k: int) -> int | None:
    """The largest BLOCK_K <= block_k (halving) that dequant_tile can use on this weight: dividing the group size
    (any, per channel) and at least 16 (tl.dot) and the weights per word; None if there is none."""
    pw = 1 if kind == "fp8" else 32 // KINDS[kind]
    if kind != "fp8" and group_size < k:
        while block_k >= 16 and group_size % block_k:
            block_k //= 2
    return block_k if block_k >= max(16, pw) else None


# ---- launchers ----------------------------------------------------------------------------------------------------

def per_word(w: QuantizedWeight) -> int:
    """Weights per stored element of qweight: 8 (int4), 4 (int8), 1 (fp8 bytes)."""
    return 1 if w.kind == "fp8" else 32 // w.bits


def quant_config(n: int, k: int, kind: str, group_size: int, swiglu: bool, interpreter: bool = False) -> dict:
    """Block sizes of quant_linear from the weight alone (shape, kind, group size; never the row count: batch
    invariance). Nothing here is measured on a GPU yet; the reasoning, from gemv_config's measured bf16 choices:
    - BLOCK_N as in gemv_config (4 rows per program with SwiGLU or N < 4096, else 8): at M = 1 it gives 448-3700
      programs on the Qwen2-7B / 72B projections, 3-28 per SM of an H100's 132.
    - BLOCK_KW: 1024 words (4 KB) of weight per program per iteration, halved with SwiGLU (two weight tiles): 8
      words (two 16-byte loads) per thread at 4 warps, and 4 row accumulators [BN, BKW] of 8 fp32 registers per
      thread each (fp8 counts bytes: 2048 per iteration, an accumulator entry per weight, 16 registers each).
    - NUM_STAGES 3: the word loop is software-pipelined (tl.range num_stages: the next tiles' words go through
      shared memory by cp.async while this one is unpacked; 5-26 KB of shared memory per program), so a program
      keeps two tiles in flight, not one: at M = 1 (52-110 registers, 4+ programs per SM) that is 32+ KB in flight
      per SM, above the ~16 KB that 3 TB/s at ~700 ns of latency needs. NUM_STAGES 1 is the plain loop
      (fused_linear's); the benchmark times both.
    - The group size only sets GROUP_WORDS (a shift for power-of-two groups); it is part of the key so that a
      measured rule can use it.
    sm_90 compile (tests/aot_sm90.py): 52-110 registers per thread at M = 1 (the JIT's own specialisation, rows 1-3
    compiled out), 113-236 for M > 1 (int4 with act-order the most), no spills with Triton 3.9. Triton 3.6's ptxas
    caps the fp16 int4 variants without act-order at BLOCK_KW 256 and M > 1 at 168 registers (3 blocks per SM) and
    keeps 4-8 values in local memory, stored before the weight loop and loaded after it (none in the loop); capped
    at 255 (maxnreg) it takes 203 registers (2 blocks per SM) and spills nothing. Halving BLOCK_KW moved the spill to
    the bf16 act-order variant (capped at 128). Left to ptxas's trade until a GPU times both.
    The interpreter runs programs one after another: there, few large ones."""
    pw = 1 if kind == "fp8" else 32 // KINDS[kind]
    words = k // pw
    if interpreter:
        return dict(BLOCK_N=min(64, triton.next_power_of_2(n)), BLOCK_KW=min(128, triton.next_power_of_2(words)),
                    NUM_STAGES=1, num_warps=4)
    block_n = 4 if swiglu or n < 4096 else 8
    tile = (2048 if kind == "fp8" else 1024) // (2 if swiglu else 1)
    return dict(BLOCK_N=block_n, BLOCK_KW=max(16, min(tile // block_n, triton.next_power_of_2(words))), NUM_STAGES=3,
                num_warps=4)


def _check_weight(w, device) -> None:
    if not isinstance(w, QuantizedWeight):
        raise ValueError(f"expected a QuantizedWeight, got {type(w).__name__}")
    w.validate()
    if w.device != device:
        raise ValueError(f"the quantized weight is on {w.device}, x on {device}")
    if w.kind != "fp8" and w.group_size % per_word(w):
        raise ValueError(f"group_size {w.group_size} is not a multiple of the {per_word(w)} {w.kind} weights of a "
                         f"word: a word would straddle two groups")
    for name, t in (("qweight", w.qweight), ("scales", w.scales), ("zeros", w.zeros), ("perm", w.perm)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"the quantized weight's {name} must have a contiguous last dimension")


def _launch_meta(w: QuantizedWeight) -> tuple[dict, int]:
    """(the kernels' weight meta-parameters, groups per row)"""
    groups = w.scales.shape[1]
    return dict(BITS=w.bits, IS_FP8=w.kind == "fp8", GROUP_WORDS=1 if groups == 1 else w.group_size // per_word(w),
                PER_CHANNEL=groups == 1, HAS_PERM=w.perm is not None), groups


def quant_linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None, *,
                 norm_weight: torch.Tensor | None = None, eps: float = 1e-6, residual: torch.Tensor | None = None,
                 swiglu: bool = False, out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                 config: dict | None = None) -> torch.Tensor:
    """fused_linear with a quantized weight: x [M, K] (float32 / float16 / bfloat16; M up to
    kernels.gemv.MAX_ROWS at decode, any M works), w a QuantizedWeight standing for [N, K] (int4 / int8 with group
    scales and zeros, fp8 with row scales; any float dtype of scales, read as fp32; act-order perm gathered inside
    the kernel), optional bias [N], norm weight [K] (RMSNorm of x first), residual [M, N'] added last; swiglu: w packs
    [gate | up] rows and the output is silu(gate) * up, N' = N / 2, else N' = N. Operands in x's dtype. -> [M, N']
    in x's dtype or `out_dtype` (float32 only), into `out` when given (it may be `residual`). Numerics:
    fused_linear_ref's: fp32 products of the exact dequantized weight, rounded once, then the same epilogues (zeros
    must hold integers, as the layout says: the kernel's exact integer-to-float trick relies on it).
    `config` overrides quant_config (BLOCK_N, BLOCK_KW, NUM_STAGES, num_warps; maxnreg, a register cap for ptxas, on
    a GPU only). One launch, no host synchronisation."""
    from .gemv import gemv_operands

    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got {list(x.shape)}")
    _check_weight(w, x.device)
    m, k = x.shape
    n, wk = w.shape
    if wk != k:
        raise ValueError(f"x has {k} inputs, the quantized weight {wk}")
    width, out = gemv_operands(x, n, bias, norm_weight, residual, swiglu, out_dtype, out)
    if m == 0 or width == 0:
        return out
    cfg = config or quant_config(width, k, w.kind, w.group_size, swiglu, interpreter=x.device.type == "cpu")
    meta, groups = _launch_meta(w)
    zeros = w.zeros if w.zeros is not None else w.scales
    _quant_linear_kernel[(triton.cdiv(width, cfg["BLOCK_N"]),)](
        x, w.qweight, w.scales, zeros, w.perm if w.perm is not None else w.qweight,
        bias if bias is not None else x, norm_weight if norm_weight is not None else x,
        residual if residual is not None else out, out,
        m, width, k, w.qweight.shape[1], eps,
        x.stride(0), w.qweight.stride(0), w.scales.stride(0), zeros.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0),
        HAS_BIAS=bias is not None, HAS_NORM=norm_weight is not None,
        HAS_RESIDUAL=residual is not None, SWIGLU=swiglu, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_KW=cfg["BLOCK_KW"], NORM_BLOCK=min(1024, triton.next_power_of_2(k)),
        NUM_STAGES=cfg.get("NUM_STAGES", 1), num_warps=cfg["num_warps"],
        **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}), **meta)
    return out


def dequantize_weight(w: QuantizedWeight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton counterpart of `dequantize`: the weight [N, K] in input order, (q - zero) * scale computed in fp32
    and rounded once to `dtype` (bitwise equal to dequantize(w, dtype)), into `out` ([N, K], contiguous rows) when
    given. One launch over [16, 64-word] tiles (not tuned: prefill reads the weight once and the GEMM dominates)."""
    _check_weight(w, w.device)
    n, k = w.shape
    if out is None:
        out = torch.empty((n, k), device=w.device, dtype=dtype)
    elif tuple(out.shape) != (n, k) or out.dtype != dtype or out.device != w.device or out.stride(1) != 1:
        raise ValueError(f"out must be a {dtype} tensor [{n}, {k}] on {w.device} with contiguous rows")
    if n == 0 or k == 0:
        return out
    interpreter = w.device.type == "cpu"
    words = w.qweight.shape[1]
    block_n = min(64, triton.next_power_of_2(n)) if interpreter else 16
    block_kw = min(128 if interpreter else 64, triton.next_power_of_2(words))
    meta, _ = _launch_meta(w)
    zeros = w.zeros if w.zeros is not None else w.scales
    _dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(words, block_kw))](
        w.qweight, w.scales, zeros, w.perm if w.perm is not None else w.qweight, out,
        n, words, w.qweight.stride(0), w.scales.stride(0), zeros.stride(0), out.stride(0),
        BLOCK_N=block_n, BLOCK_KW=block_kw, num_warps=4, **meta)
    return out


# Rows up to which the prefill path is the fused dequantize-GEMM; above it, dequantize_weight + cuBLAS. Not measured
# yet (bench_quant times both at 128, 512 and 2048 rows): from the H100 ceilings, the scratch path costs the weight's
# dequantized bytes written and read back (4.5 bytes per int4 weight, ~10 ms for all of Qwen2-7B) while a Triton GEMM
# without warp specialisation reaches perhaps 60-75% of cuBLAS's rate; the two meet near 1-2K rows.
FUSED_GEMM_MAX_ROWS = 1024


def quant_gemm_config(m: int, n: int, k: int, kind: str, group_size: int, interpreter: bool = False) -> dict | None:
    """Tile sizes of the fused dequantize-GEMM, or None where it does not apply (a group size that no BLOCK_K of at
    least 16 divides: dequantize_weight + cuBLAS then). BLOCK_K: up to 64 stored columns, dividing the group size
    (one group per step) and a multiple of the weights per word. Not tuned on a GPU yet: 64 x 128 tiles with 4 warps
    up to 64 rows, 128 x 128 with 8 warps above, 3 stages (sm_90 compile: 33-82 KB of shared memory, 114-255
    registers, no spills); the interpreter gets small tiles (it runs programs one after another, and tl.dot there
    is a numpy matmul)."""
    block_k = dequant_block_k(32 if interpreter else 64, kind, group_size, k)
    if block_k is None:
        return None
    if interpreter:
        return dict(BLOCK_M=min(32, max(16, triton.next_power_of_2(m))), BLOCK_N=32, BLOCK_K=block_k, NUM_STAGES=1,
                    num_warps=4)
    big = m > 64
    return dict(BLOCK_M=128 if big else 64, BLOCK_N=128, BLOCK_K=block_k, NUM_STAGES=3, num_warps=8 if big else 4)


def quant_linear_gemm(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None, *,
                      path: str | None = None, config: dict | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """The prefill projection (more than kernels.gemv.MAX_ROWS rows). x [M, K] -> [M, N] in x's dtype, plus bias [N].
    Two paths, with the same numerics (the dequantized weight rounded to x's dtype, as every dequantize-then-GEMM
    path rounds it (exact in float32), products accumulated in fp32):
        "fused":   one Triton GEMM that unpacks and dequantizes the weight tile by tile in its K loop
                   (_quant_gemm_kernel): the packed weight is read once per BLOCK_M rows;
        "dequant": dequantize_weight into a scratch [N, K] buffer in x's dtype (torch's caching allocator keeps one
                   block per shape), then cuBLAS F.linear.
    path None picks "fused" up to FUSED_GEMM_MAX_ROWS rows (where the scratch copy's bytes weigh most), "dequant"
    above it or where the fused kernel does not apply (quant_gemm_config). `config` overrides quant_gemm_config.
    `out` [M, N] (x's dtype, contiguous rows): written in place of a new tensor."""
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x must be [M, {w.shape[1]}], got {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if path not in (None, "fused", "dequant"):
        raise ValueError(f"path must be None, 'fused' or 'dequant', got {path!r}")
    _check_weight(w, x.device)
    from .gemv import check_operand, check_out

    m, k = x.shape
    n = w.shape[0]
    if k == 0:
        raise ValueError("x has no columns (K = 0)")
    check_operand("bias", bias, (n,), x.dtype, x.device)
    check_operand("out", out, (m, n), x.dtype, x.device)
    if out is not None:  # the fused GEMM reads x's rows while other programs write out's
        check_out(out, {"x": x if x.stride(1) == 1 else None, "bias": bias})
    cfg = config or quant_gemm_config(m, n, k, w.kind, w.group_size, interpreter=x.device.type == "cpu")
    if path is None:
        path = "fused" if cfg is not None and m <= FUSED_GEMM_MAX_ROWS else "dequant"
    if path == "dequant":
        y = F.linear(x, dequantize_weight(w, x.dtype), bias)
        return y if out is None else out.copy_(y)
    if cfg is None:
        raise ValueError(f"the fused dequantize-GEMM needs a group size divisible by 16 and by the weights per word, "
                         f"got {w.group_size} ({w.kind}): use path='dequant'")
    if dequant_block_k(cfg["BLOCK_K"], w.kind, w.group_size, k) != cfg["BLOCK_K"]:
        raise ValueError(f"BLOCK_K {cfg['BLOCK_K']} must be at least 16 and the weights per word, and divide the group "
                         f"size {w.group_size}")
    x = x if x.stride(1) == 1 else x.contiguous()
    if out is None:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    meta, _ = _launch_meta(w)
    meta.pop("GROUP_WORDS")
    zeros = w.zeros if w.zeros is not None else w.scales
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _quant_gemm_kernel[grid](
        x, w.qweight, w.scales, zeros, w.perm if w.perm is not None else w.qweight, bias if bias is not None else x,
        out, m, n, k, x.stride(0), w.qweight.stride(0), w.scales.stride(0), zeros.stride(0), out.stride(0),
        GROUP_STEPS=1 if meta["PER_CHANNEL"] else w.group_size // cfg["BLOCK_K"], HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], NUM_STAGES=cfg["NUM_STAGES"], num_warps=cfg["num_warps"],
        **meta)
    return out

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

"""Quantized models: reading `quantization_config`, re-packing GPTQ and AWQ checkpoint tensors into the one layout of
`qwen2rt.kernels.quant.QuantizedWeight`, quantizing floating-point weights at load (round to nearest), and random
quantized weights for the built-in shapes.

Supported (every decoder linear q, k, v, o, gate, up, down quantized, in MoE layers every expert's and the shared
expert's; embeddings, norms, lm_head, the MoE router and shared expert gate stay floating point, biases stay float
and are cast to the model dtype):
- GPTQ checkpoints (AutoGPTQ v1 format, `checkpoint_format: "gptq"`): bits 4 or 8, group_size 128 (any size that
  divides K) or -1, sym true or false, desc_act true or false (MoE models: desc_act false only: the expert kernels
  take no act-order permutation);
- AWQ GEMM checkpoints (`version: "gemm"`): 4 bits, zero_point true, any group size that divides K;
- at load, `LLM(..., quantization=)`: "int8" (per output channel, symmetric), "int4" (groups of 128 inputs,
  asymmetric: min/max with 0 kept exact) and "fp8" (e4m3, per output channel).
Dense and MoE models alike: a MoE layer's experts fill their rows of the layer's flattened expert weights.
Scales keep the checkpoint's dtype (fp16 for every published GPTQ / AWQ checkpoint: bf16 would round them, and the
fp32 reference dequantizes them exactly); at-load quantization stores scales and zeros in the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen2rt.kernels.quant import QuantizedWeight, pack_rows, unpack_rows

CHECKPOINT_METHODS = ("gptq", "awq")
AT_LOAD = ("int8", "int4", "fp8")
INT4_GROUP = 128
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ GEMM: nibble j of a word holds column AWQ_ORDER[j] of its eight
_CHUNK_ELEMENTS = 1 << 24  # unpacked int64 elements per conversion step (128 MiB): bounds the transient memory


class QuantizationError(ValueError):
    """A quantization setting or a quantized tensor qwen2rt cannot load; the message names the field or tensor."""


@dataclass(frozen=True)
class QuantConfig:
    """How the decoder linears are quantized. method: "gptq" or "awq" (a quantized checkpoint, read from
    config.json's quantization_config) or "int8", "int4", "fp8" (floating-point weights quantized at load)."""

    method: str
    bits: int
    group_size: int  # inputs per scale; -1: one group per row (per output channel)
    sym: bool = True
    desc_act: bool = False

    @property
    def kind(self) -> str:
        """The QuantizedWeight kind."""
        return "fp8" if self.method == "fp8" else f"int{self.bits}"

    @property
    def from_checkpoint(self) -> bool:
        return self.method in CHECKPOINT_METHODS

    def group_for(self, k: int) -> int:
        """The group size of a linear with k inputs. At-load int4 falls back to one group per row when 128 does
        not divide k (every Qwen2 shape is a multiple of 128; the tiny test shapes are not)."""
        if self.method == "int4" and k % INT4_GROUP == 0:
            return INT4_GROUP
        return k if self.group_size <= 0 or self.method in AT_LOAD else self.group_size

    def describe(self) -> str:
        if self.method == "fp8":
            return "fp8 (e4m3, per output channel)"
        group = "per output channel" if self.group_size <= 0 else f"group {self.group_size}"
        extra = (", desc_act" if self.desc_act else "") if self.method == "gptq" else ""
        name = self.method if self.method in AT_LOAD else f"{self.method} {self.bits}-bit"
        return f"{name} ({group}, {'symmetric' if self.sym else 'asymmetric'}{extra})"


def _fail(field: str, value, why: str):
    raise QuantizationError(f"config field 'quantization_config.{field}' = {value!r}: {why}")


def parse_quantization_config(d) -> QuantConfig:
    """config.json's `quantization_config` -> QuantConfig; an unsupported setting is a QuantizationError naming
    the field. Both spellings transformers writes are read: `checkpoint_format` or `format` (GPTQ), `version` or
    `format` (AWQ)."""
    if not isinstance(d, dict):
        raise QuantizationError(f"config field 'quantization_config' = {d!r}: must be an object")
    method = str(d.get("quant_method", "")).lower()
    if method not in CHECKPOINT_METHODS:
        _fail("quant_method", d.get("quant_method"), f"unsupported; qwen2rt loads {list(CHECKPOINT_METHODS)} "
              "checkpoints (or quantizes floating-point ones at load: int8, int4, fp8)")
    bits = d.get("bits")
    if not isinstance(bits, int) or isinstance(bits, bool):  # 4.0 equals 4, and would reach the packing as a float
        _fail("bits", bits, "must be an integer")
    group_size = d.get("group_size", 128)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not (group_size == -1 or group_size > 0):
        _fail("group_size", group_size, "must be a positive integer or -1")
    if method == "gptq":
        if bits not in (4, 8):
            _fail("bits", bits, "qwen2rt loads 4- and 8-bit GPTQ checkpoints")
        fmt = str(d.get("checkpoint_format") or d.get("format") or "gptq").lower()
        if fmt != "gptq":
            field = "checkpoint_format" if d.get("checkpoint_format") else "format"
            _fail(field, fmt, "only the AutoGPTQ v1 format 'gptq' is supported (not gptq_v2 or marlin)")
        if d.get("lm_head"):
            _fail("lm_head", d["lm_head"], "a quantized lm_head is not supported")
        if d.get("dynamic"):
            _fail("dynamic", d["dynamic"], "per-module quantization overrides are not supported")
        sym, desc_act = d.get("sym", True), d.get("desc_act", False)
        for field, value in (("sym", sym), ("desc_act", desc_act)):
            if not isinstance(value, bool):
                _fail(field, value, "must be true or false")
        return QuantConfig("gptq", bits, group_size, sym=sym, desc_act=desc_act)
    if bits != 4:
        _fail("bits", bits, "AWQ checkpoints are 4-bit")
    version = str(d.get("version") or d.get("format") or "gemm").lower()
    if version != "gemm":
        _fail("version" if d.get("version") else "format", version, "only AWQ 'gemm' checkpoints are supported")
    if d.get("zero_point", True) is not True:
        _fail("zero_point", d.get("zero_point"), "only AWQ with zero points (zero_point true) is supported")
    if d.get("modules_to_not_convert"):
        _fail("modules_to_not_convert", d["modules_to_not_convert"], "every decoder linear must be quantized")
    return QuantConfig("awq", 4, group_size, sym=False)


def at_load_config(name) -> QuantConfig:
    """LLM(..., quantization=name) -> QuantConfig for quantizing a floating-point model at load."""
    configs = {"int8": QuantConfig("int8", 8, -1, sym=True),
               "int4": QuantConfig("int4", 4, INT4_GROUP, sym=False),
               "fp8": QuantConfig("fp8", 8, -1, sym=True)}
    if not isinstance(name, str) or name not in configs:
        raise QuantizationError(f"quantization = {name!r}: must be None or one of {list(configs)}")
    return configs[name]


def check_fp8_device(device: torch.device) -> None:
    """fp8 weights need float8 conversions in hardware on CUDA: compute capability 8.9 (Ada, Hopper) or newer."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise QuantizationError(f"quantization = 'fp8' needs a GPU with compute capability 8.9 or newer (sm_89+); "
                                    f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}: use 'int8' or 'int4'")


# ---- sizes -----------------------------------------------------------------------------------------------------

def linear_shapes(config, layer: int = 0) -> list[tuple[int, int, int, int]]:
    """(N, K, how many the layer holds, how many one decoded token reads) of the decoder linears of one layer: qkv,
    o, then gate_up and down (dense), or in a MoE layer each expert's gate_up and down (E held, top-k read) and the
    shared expert's (the router and shared gate stay floating point)."""
    c = config
    h = c.hidden_size
    shapes = [(c.qkv_size, h, 1, 1), (h, c.num_attention_heads * c.head_dim, 1, 1)]
    if not c.is_moe_layer(layer):
        return shapes + [(2 * c.intermediate_size, h, 1, 1), (h, c.intermediate_size, 1, 1)]
    e, k, inter, shared = c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, \
        c.shared_expert_intermediate_size
    shapes += [(2 * inter, h, e, k), (h, inter, e, k)]
    if shared:
        shapes += [(2 * shared, h, 1, 1), (h, shared, 1, 1)]
    return shapes


def linear_bytes(q: QuantConfig, n: int, k: int, scale_bytes: int) -> int:
    """Bytes of one quantized [N, K] linear in the internal layout."""
    if q.kind == "fp8":
        return n * k + n * scale_bytes
    groups = k // q.group_for(k)
    return n * k * q.bits // 8 + 2 * n * groups * scale_bytes + (4 * k if q.desc_act else 0)


def weight_bytes(config, dtype_bytes: int, q: QuantConfig | None) -> tuple[int, int]:
    """-> (bytes of all weights, bytes one decode step at batch 1 reads) with the decoder linears quantized by `q`
    (None: all in the model dtype; MoE layers: every expert held, top-k experts and the shared expert read per
    token). Scales: fp16 for a quantized checkpoint, the model dtype at load."""
    total, per_token = config.parameter_count() * dtype_bytes, config.bytes_per_token(dtype_bytes)
    if q is None:
        return total, per_token
    scale_bytes = 2 if q.from_checkpoint else dtype_bytes
    for layer in range(config.num_hidden_layers):
        for n, k, held, read in linear_shapes(config, layer):
            delta = linear_bytes(q, n, k, scale_bytes) - n * k * dtype_bytes
            total += held * delta
            per_token += read * delta
    return total, per_token


# ---- allocation and random weights -----------------------------------------------------------------------------

def allocate(q: QuantConfig, n: int, k: int, device, scale_dtype: torch.dtype) -> QuantizedWeight:
    """An uninitialised QuantizedWeight standing for an [N, K] linear (perm None: act-order checkpoints set it)."""
    group = q.group_for(k)
    if q.kind == "fp8":
        return QuantizedWeight("fp8", torch.empty(n, k, dtype=torch.float8_e4m3fn, device=device),
                               torch.empty(n, 1, dtype=scale_dtype, device=device), None, k)
    per_word = 32 // q.bits
    if k % per_word or k % group:
        raise QuantizationError(f"cannot quantize a linear with {k} inputs to {q.describe()}: {k} must be a multiple "
                                f"of {per_word} and of the group size {group}")
    return QuantizedWeight(q.kind, torch.empty(n, k // per_word, dtype=torch.int32, device=device),
                           torch.empty(n, k // group, dtype=scale_dtype, device=device),
                           torch.empty(n, k // group, dtype=scale_dtype, device=device), group)


def fill_random(w: QuantizedWeight, gen: torch.Generator, std: float) -> None:
    """Random quantized values whose dequantized weights have about N(0, std)'s spread, made in place on the
    weight's device (no floating-point copy of the matrix, except fp8: one chunk of rows at a time)."""
    n, k = w.shape
    if w.kind == "fp8":
        rows = max(1, _CHUNK_ELEMENTS // (4 * k))
        for start in range(0, n, rows):
            part = w.qweight[start:start + rows]
            part.copy_(torch.randn(part.shape, generator=gen, device=w.device).clamp_(-FP8_MAX, FP8_MAX))
        w.scales.normal_(std, 0.1 * std, generator=gen)
        return
    w.qweight.view(torch.uint8).random_(0, 256, generator=gen)  # every packed field uniform in [0, 2**bits)
    zero = float(1 << (w.bits - 1))
    w.zeros.fill_(zero)
    rms = (((1 << 2 * w.bits) - 1) / 12 + 0.25) ** 0.5  # of (q - zero) for q uniform in [0, 2**bits)
    w.scales.normal_(std / rms, 0.1 * std / rms, generator=gen)


def copy_into(dst: QuantizedWeight, src: QuantizedWeight, name: str) -> None:
    """Fill dst (views into a fused projection) from a converted or quantized part of the same layout."""
    if (dst.kind, dst.shape, dst.group_size) != (src.kind, src.shape, src.group_size):
        raise QuantizationError(f"{name}: a {src.kind} {list(src.shape)} weight with group {src.group_size} does not "
                                f"fit its {dst.kind} {list(dst.shape)} slot with group {dst.group_size}")
    dst.qweight.copy_(src.qweight)
    dst.scales.copy_(src.scales)
    if dst.zeros is not None:
        dst.zeros.copy_(src.zeros)


# ---- checkpoint formats ----------------------------------------------------------------------------------------

def checkpoint_shapes(q: QuantConfig, prefix: str, n: int, k: int) -> dict[str, tuple[int, ...]]:
    """The tensors a GPTQ / AWQ checkpoint holds for one [N, K] linear `prefix` (in place of prefix.weight), with
    their shapes; a size the packing or the group size cannot divide is a QuantizationError naming the tensor."""
    per_word = 32 // q.bits
    group = q.group_for(k)
    if k % group:
        raise QuantizationError(f"tensor {prefix + '.scales'!r}: group_size {group} does not divide the input size {k}")
    if q.method == "gptq":
        if k % per_word:
            raise QuantizationError(f"tensor {prefix + '.qweight'!r}: the input size {k} is not a multiple of "
                                    f"{per_word} ({q.bits}-bit values packed along the inputs)")
        if n % per_word:
            raise QuantizationError(f"tensor {prefix + '.qzeros'!r}: the output size {n} is not a multiple of "
                                    f"{per_word} ({q.bits}-bit zeros packed along the outputs)")
        return {prefix + ".qweight": (k // per_word, n), prefix + ".qzeros": (k // group, n // per_word),
                prefix + ".scales": (k // group, n), prefix + ".g_idx": (k,)}
    if n % per_word:
        raise QuantizationError(f"tensor {prefix + '.qweight'!r}: the output size {n} is not a multiple of {per_word} "
                                "(AWQ packs along the outputs)")
    return {prefix + ".qweight": (k, n // per_word), prefix + ".qzeros": (k // group, n // per_word),
            prefix + ".scales": (k // group, n)}


def _row_chunks(n: int, k: int):
    rows = max(1, _CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def gptq_to_layout(q: QuantConfig, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor, name: str) -> QuantizedWeight:
    """One GPTQ (AutoGPTQ v1) linear -> QuantizedWeight, on the tensors' device.

    qweight int32 [K / per_word, N] (input k of output n at bits (k % per_word) * bits of word k // per_word),
    qzeros int32 [G, N / per_word] packed the same way along N, scales float [G, N], g_idx int32 [K] (the group
    of each input). Zeros are stored as zero - 1 (the v1 format) and read back as gptqmodel, which transformers
    uses, reads them: 0x11111111 (4-bit; 0x01010101 8-bit) added to the whole packed word, modulo 2**32
    (gptqmodel/utils/model.py, convert_gptq_v1_to_v2_format_module), the inverse of its save, which subtracts it
    from the word: a zero point of 0 borrows from the next field there, and only the word-wide sum undoes that.
    For zero points of 1 or more (every field a plain zero - 1) this equals AutoGPTQ's field-wise `field + 1`
    (auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py); AutoGPTQ's own packer ORs a zero of 0's -1 into the fields
    above it, so such a file is corrupt for every reader.

    Act-order (desc_act): the stored columns are the inputs sorted stably by g_idx, so that each group is
    contiguous; each group must have exactly group_size members."""
    bits, per_word = q.bits, 32 // q.bits
    k = g_idx.shape[0]
    n = scales.shape[1]
    group = q.group_for(k)
    groups = k // group
    g = g_idx.to(torch.int64)
    if g.numel() and (g.min() < 0 or g.max() >= groups):
        raise QuantizationError(f"tensor {name + '.g_idx'!r}: group indices must lie in [0, {groups})")
    perm = torch.argsort(g, stable=True)
    expected = torch.arange(k, device=g.device) // group
    if not torch.equal(g[perm], expected):
        raise QuantizationError(f"tensor {name + '.g_idx'!r}: every group must hold exactly group_size = {group} "
                                "inputs")
    if torch.equal(perm, torch.arange(k, device=perm.device)):
        packed = qweight.t().contiguous()  # same packing along K: a transpose of the words is the whole conversion
        perm_out = None
    else:
        packed = torch.empty(n, k // per_word, dtype=torch.int32, device=qweight.device)
        for start, stop in _row_chunks(n, k):
            values = unpack_rows(qweight[:, start:stop].t(), bits)  # [rows, K] in input order
            packed[start:stop] = pack_rows(values[:, perm], bits)
        perm_out = perm.to(torch.int32)
    ones = sum(1 << (j * bits) for j in range(per_word))  # 1 in every field
    words = (qzeros.to(torch.int64) + ones) & 0xFFFFFFFF  # v1 -> the zero points, word-wide
    zeros = unpack_rows(words, bits)[:, :n].t().to(scales.dtype)  # [N, G]
    return QuantizedWeight(q.kind, packed, scales.t().contiguous(), zeros.contiguous(), group, perm_out)


def _awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] packed along C in AWQ's nibble order -> int64 [R, C] in column order."""
    values = unpack_rows(packed, 4).view(packed.shape[0], -1, 8)  # [R, C / 8, nibble]
    inverse = torch.empty(8, dtype=torch.int64)
    inverse[list(AWQ_ORDER)] = torch.arange(8)  # column c of a group of eight is nibble inverse[c]
    return values[:, :, inverse.to(packed.device)].reshape(packed.shape[0], -1)


def awq_to_layout(q: QuantConfig, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  name: str) -> QuantizedWeight:
    """One AWQ GEMM linear -> QuantizedWeight: qweight int32 [K, N / 8] packed along N, nibble j of each word holding
    column AWQ_ORDER[j] of its eight (AutoAWQ's pack order [0, 2, 4, 6, 1, 3, 5, 7]; its unpack reverses it with
    [0, 4, 1, 5, 2, 6, 3, 7], awq/utils/packing_utils.py), qzeros int32 [G, N / 8] the same way with no offset,
    scales float [G, N]; w = (q - z) * s."""
    k, n = qweight.shape[0], scales.shape[1]
    group = q.group_for(k)
    packed = torch.empty(n, k // 8, dtype=torch.int32, device=qweight.device)
    cols = max(8, (_CHUNK_ELEMENTS // max(k, 1)) // 8 * 8)
    for start in range(0, n, cols):
        stop = min(n, start + cols)
        values = _awq_unpack(qweight[:, start // 8:stop // 8])  # [K, cols]
        packed[start:stop] = pack_rows(values.t(), 4)
    zeros = _awq_unpack(qzeros).t().to(scales.dtype)
    return QuantizedWeight("int4", packed, scales.t().contiguous(), zeros.contiguous(), group)


# ---- quantization at load (round to nearest) -------------------------------------------------------------------

def quantize(w: torch.Tensor, q: QuantConfig, scale_dtype: torch.dtype, name: str = "weight") -> QuantizedWeight:
    """A floating-point weight [N, K] -> QuantizedWeight (computed in fp32, chunks of rows, on w's device); a NaN
    or infinity in it is a QuantizationError naming `name` (it would poison or silently zero its row or group).

    int8: per output row, symmetric: s = max|w| / 127, q = round(w / s) + 128 in [1, 255], zero 128.
    int4: per group of 128 inputs (or the whole row), asymmetric over [min(w, 0), max(w, 0)]: s = range / 15,
        zero = round(-min / s) in [0, 15], q = clamp(round(w / s) + zero, 0, 15).
    fp8: per output row: s = max|w| / 448, q = float8_e4m3fn(w / s).
    Scales are rounded to scale_dtype before the values are computed, so that dequantization uses the scale the
    values were rounded with, and rounded up (never below the exact scale: a smaller one would stretch the range
    past the top integer, and its values would be clamped more than half a step away), at least the dtype's
    smallest normal number (fp16 would round a tiny scale to 0); an all-zero row or group gets scale 1. Every value
    is then within half a step of its weight."""
    n, k = w.shape
    out = allocate(q, n, k, w.device, scale_dtype)
    group = out.group_size
    for start, stop in _row_chunks(n, k):
        x = w[start:stop].float()
        if not torch.isfinite(x).all():
            row = start + int((~torch.isfinite(x)).any(dim=1).nonzero()[0])
            raise QuantizationError(f"{name}: holds a NaN or infinity (row {row}); it cannot be quantized")
        if q.kind == "fp8":
            s = _rounded_scale(x.abs().amax(dim=1, keepdim=True) / FP8_MAX, scale_dtype)
            out.qweight[start:stop] = (x / s).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            out.scales[start:stop] = s.to(scale_dtype)
            continue
        xg = x.view(stop - start, k // group, group)
        if q.kind == "int8":
            s = _rounded_scale(xg.abs().amax(dim=2, keepdim=True) / 127, scale_dtype)
            zero = torch.full_like(s, 128.0)
            values = (torch.round(xg / s) + zero).clamp_(1, 255)
        else:
            lo, hi = xg.amin(dim=2, keepdim=True).clamp(max=0), xg.amax(dim=2, keepdim=True).clamp(min=0)
            s = _rounded_scale((hi - lo) / 15, scale_dtype)
            zero = torch.round(-lo / s).clamp_(0, 15)
            values = (torch.round(xg / s) + zero).clamp_(0, 15)
        out.qweight[start:stop] = pack_rows(values.view(stop - start, k).to(torch.int64), q.bits)
        out.scales[start:stop] = s.squeeze(2).to(scale_dtype)
        out.zeros[start:stop] = zero.squeeze(2).to(scale_dtype)
    return out


def _rounded_scale(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 scales (>= 0) -> the nearest value of `dtype` at or above each (as fp32): 1 for 0, at least the
    smallest normal number of `dtype`."""
    s = torch.where(s > 0, s, torch.ones_like(s)).clamp(min=torch.finfo(dtype).tiny)
    r = s.to(dtype)
    r = torch.where(r.float() < s, torch.nextafter(r, torch.full_like(r, float("inf"))), r)
    return r.float()

"""qwen2rt.kernels: Triton kernels, one op per file, each with its launcher and its PyTorch reference.

Without CUDA the kernels run through the Triton interpreter (slow; for tests at small shapes). The choice is made
when a kernel is defined, so it is set here, before any kernel module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .gemv import fused_linear, fused_linear_ref  # noqa: E402
from .moe import fused_moe, fused_moe_ref, moe_align, route, route_ref  # noqa: E402
from .rmsnorm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref  # noqa: E402
from .quant import QuantizedWeight, dequantize, dequantize_weight, quant_linear, quant_linear_gemm  # noqa: E402
from .rope_attention import decode_attention, paged_attention_ref, prefill_attention  # noqa: E402
from .swiglu import silu_and_mul, silu_and_mul_ref  # noqa: E402

__all__ = ["rms_norm", "rms_norm_ref", "add_rms_norm", "add_rms_norm_ref", "silu_and_mul", "silu_and_mul_ref",
           "prefill_attention", "decode_attention", "paged_attention_ref", "fused_moe", "fused_moe_ref", "moe_align",
           "route", "route_ref", "fused_linear", "fused_linear_ref", "QuantizedWeight", "dequantize",
           "dequantize_weight", "quant_linear", "quant_linear_gemm"]

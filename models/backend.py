"""The small interface every op of the model goes through, and its two implementations.

The model never calls a kernel directly: it calls a `Backend`, so the same model code runs on the PyTorch
references (`torch`, CPU or GPU) and on the Triton kernels (`triton`), and tests compare the two. A backend is
registered by name with `register_backend`.

KV cache layout (paged): per layer, k and v are `[num_blocks, block_size, num_kv_heads, head_dim]`; a sequence
owns the blocks listed in its row of `block_tables`; the token at position p of sequence b lives in block
`block_tables[b, p // block_size]`, row `p % block_size`. `slot_mapping[t] = block * block_size + row` is where
new token t is written, -1 for a padding row that writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from qwen2rt import kernels

from .rope import RotaryTables


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit, for all layers. T new tokens from B sequences.

    positions:     [T] int64  rotary position of each new token
    slot_mapping:  [T] int64  cache slot each new token's k/v is written to; -1 writes nothing
    block_tables:  [B, max_blocks] int32  cache blocks of each sequence, in order
    seq_lens:      [B] int32 or int64  context length of each sequence after this step (cached prefix + new
                              tokens); 0 marks a padding row
    query_start:   [B + 1] int32  prefill only: new tokens of sequence b are rows query_start[b]:query_start[b+1]
    is_prefill:    prefill (any number of new tokens per sequence) or decode (exactly one per sequence, row b)
    query_lens_host: prefill only, host copy of the new-token counts (sizes the prefill grid; an upper bound will do)
    padded:        prefill only: rows past query_start[B] are padding (a prefill graph's bucket), whose attention
                   output is 0, as for a padding row of decode, so that no uninitialised value reaches the layers
                   after it (a MoE router's top-k, for one)
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    is_prefill: bool
    query_start: torch.Tensor | None = None
    query_lens_host: list[int] | None = None
    padded: bool = False


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float


@dataclass
class MoEWeights:
    """One sparse MoE block. E experts of width I, shared expert of width Is (absent when Is == 0).

    Quantized (kernels.QuantizedWeight, one kind for the four expert weights; router and shared gate stay in the
    model dtype): the experts are flattened into rows, gate_up one QuantizedWeight [E 2I, H] (expert e's rows
    [e 2I, (e+1) 2I), gate rows then up rows), down one [E H, I] (expert e's rows [e H, (e+1) H)); shared_gate_up
    [2Is, H] and shared_down [H, Is] keep their float shapes. `QuantizedWeight.rows` gives one expert's slice."""

    router: torch.Tensor  # [E, H]
    gate_up: torch.Tensor | kernels.QuantizedWeight  # [E, 2I, H]  rows [gate | up]; quantized: [E 2I, H]
    down: torch.Tensor | kernels.QuantizedWeight  # [E, H, I]; quantized: [E H, I]
    shared_gate_up: torch.Tensor | kernels.QuantizedWeight | None  # [2Is, H]
    shared_down: torch.Tensor | kernels.QuantizedWeight | None  # [H, Is]
    shared_gate: torch.Tensor | None  # [1, H]  sigmoid gate of the shared expert
    top_k: int
    norm_topk_prob: bool


Weight = torch.Tensor | kernels.QuantizedWeight  # a projection's weight: dense [out, in], or weight-only quantized


class Backend:
    """The ops the model needs. Shapes: x is [T, H]; weights are in `nn.Linear` layout [out, in], dense tensors or
    `kernels.QuantizedWeight`s standing for one (int4 / int8 / fp8, kernels/quant.py). The residual stream x is
    carried between ops un-normalised; each norm is fused into the op that consumes it and each residual add into the
    op that produces it."""

    name = "abstract"
    graph_safe = False  # True when the decode step never synchronises with the host (CUDA-graph capturable)

    def norm_linear(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: Weight,
                    bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """linear(rms_norm(x, norm_weight), weight, bias) -> [T, N] in x's dtype, or out_dtype (float32: logits)."""
        raise NotImplementedError

    def norm_swiglu(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate_up: Weight) -> torch.Tensor:
        """silu(gate) * up of linear(rms_norm(x, norm_weight), gate_up), gate_up packing rows [gate | up] -> [T, I]"""
        raise NotImplementedError

    def linear_residual(self, x: torch.Tensor, weight: Weight, residual: torch.Tensor) -> torch.Tensor:
        """linear(x, weight) + residual"""
        raise NotImplementedError

    def attention(self, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rope: RotaryTables,
                  meta: AttentionMetadata, shape: AttentionShape) -> torch.Tensor:
        """Rotary-embed q and k of the packed projection qkv [T, (Hq + 2 Hkv) D], write rotated k and v to the
        cache at meta.slot_mapping, attend causally over each sequence's cached context; -> [T, Hq D]. Every new
        token's k/v is written before any query attends: a sequence's block table may list blocks that another
        sequence of the same prefill step writes (prefix caching shares them, runtime/scheduler.py)."""
        raise NotImplementedError

    def moe_residual(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, w: MoEWeights,
                     token_slots: torch.Tensor | None = None) -> torch.Tensor:
        """x + moe(rms_norm(x, norm_weight)). The sparse MoE block has Hugging Face semantics: softmax router in
        fp32, top-k, optional renormalisation, experts weighted and summed, plus the shared expert scaled by
        sigmoid(shared_gate x). token_slots (AttentionMetadata.slot_mapping): rows whose slot is negative are
        padding, whose output nothing reads: a backend may skip their experts (kernels.fused_moe's token_slots)."""
        raise NotImplementedError

    def warmup(self, layers: list) -> None:
        """Called once with the model's layer weights before the first step (kernel tuning, caches)."""


# ---- implementations ---------------------------------------------------------------------------------------------

class TorchBackend(Backend):
    """Pure PyTorch, CPU or GPU: the kernels' references (qwen2rt.kernels.*_ref), fp32 accumulation where it
    matters (a quantized weight: fused_linear_ref dequantizes it to fp32 on every call). Reads host copies of
    lengths, so it is never captured in a CUDA graph."""

    name = "torch"
    # prefill attends in query chunks so that the fp32 score matrix stays ~256 MB whatever the prompt length
    max_score_elements = 1 << 26

    def norm_linear(self, x, norm_weight, eps, weight, bias=None, out_dtype=None):
        return kernels.fused_linear_ref(x, weight, bias, norm_weight=norm_weight, eps=eps, out_dtype=out_dtype)

    def norm_swiglu(self, x, norm_weight, eps, gate_up):
        return kernels.fused_linear_ref(x, gate_up, norm_weight=norm_weight, eps=eps, swiglu=True)

    def linear_residual(self, x, weight, residual):
        return kernels.fused_linear_ref(x, weight, residual=residual)

    def attention(self, qkv, k_cache, v_cache, rope, meta, shape):
        query_start = meta.query_start
        if query_start is None:  # decode: row b is sequence b
            query_start = torch.arange(qkv.shape[0] + 1, device=qkv.device)
        return kernels.paged_attention_ref(
            qkv, k_cache, v_cache, rope.cos, rope.sin, meta.positions, meta.slot_mapping, meta.block_tables,
            meta.seq_lens, query_start, shape.num_heads, shape.num_kv_heads, shape.scale, self.max_score_elements)

    def moe_residual(self, x, norm_weight, eps, w, token_slots=None):  # padding rows computed like the others
        return kernels.fused_moe_ref(x, w.router, w.gate_up, w.down, w.top_k, w.norm_topk_prob, w.shared_gate_up,
                                     w.shared_down, w.shared_gate, norm_weight=norm_weight, eps=eps, residual=x)


class TritonBackend(Backend):
    """The Triton kernels, every op listed here (nothing inherited from the references). Up to
    kernels.gemv.MAX_ROWS rows (every decode bucket, short prefill chunks) a projection is one fused GEMV with its
    norm, bias, SwiGLU or residual add inside. Longer inputs are GEMMs: the projection is cuBLAS (`F.linear`, the
    one torch op by choice: it runs near the GEMM rate at prefill sizes), the norm and SwiGLU the Triton kernels,
    the residual add an in-place torch add. A quantized weight (kernels.QuantizedWeight) takes the same two roads:
    up to MAX_ROWS rows kernels.quant_linear, the fused GEMV that unpacks the weight in registers; longer inputs
    kernels.quant_linear_gemm, a Triton GEMM that dequantizes the weight tile by tile in its K loop (up to
    kernels.quant.FUSED_GEMM_MAX_ROWS rows) or, for longer inputs, a scratch copy of the weight in x's dtype for
    cuBLAS, with the same norm / SwiGLU kernels and residual add around it. On CPU the kernels run through the
    Triton interpreter."""

    name = "triton"
    graph_safe = True

    @staticmethod
    def _gemv(x, weight, *args, **kwargs):
        """The fused decode GEMV for the weight's kind."""
        fn = kernels.quant_linear if isinstance(weight, kernels.QuantizedWeight) else kernels.fused_linear
        return fn(x, weight, *args, **kwargs)

    @staticmethod
    def _gemm(x, weight, bias=None):
        """The prefill projection: cuBLAS, or kernels.quant_linear_gemm for a quantized weight."""
        if isinstance(weight, kernels.QuantizedWeight):
            return kernels.quant_linear_gemm(x, weight, bias)
        return F.linear(x, weight, bias)

    def norm_linear(self, x, norm_weight, eps, weight, bias=None, out_dtype=None):
        if x.shape[0] <= kernels.gemv.MAX_ROWS:
            return self._gemv(x, weight, bias, norm_weight=norm_weight, eps=eps, out_dtype=out_dtype)
        y = self._gemm(kernels.rms_norm(x, norm_weight, eps), weight, bias)
        return y if out_dtype is None else y.to(out_dtype)

    def norm_swiglu(self, x, norm_weight, eps, gate_up):
        if x.shape[0] <= kernels.gemv.MAX_ROWS:
            return self._gemv(x, gate_up, norm_weight=norm_weight, eps=eps, swiglu=True)
        return kernels.silu_and_mul(self._gemm(kernels.rms_norm(x, norm_weight, eps), gate_up))

    def linear_residual(self, x, weight, residual):
        if x.shape[0] <= kernels.gemv.MAX_ROWS:
            return self._gemv(x, weight, residual=residual)
        return self._gemm(x, weight).add_(residual)

    def attention(self, qkv, k_cache, v_cache, rope, meta, shape):
        args = (qkv, k_cache, v_cache, rope.cos, rope.sin, meta.positions, meta.slot_mapping, meta.block_tables,
                meta.seq_lens)
        if meta.is_prefill:
            out = qkv.new_zeros(qkv.shape[0], shape.num_heads * shape.head_dim) if meta.padded else None
            return kernels.prefill_attention(*args, meta.query_start, max(meta.query_lens_host), shape.num_heads,
                                             shape.num_kv_heads, shape.scale, out=out)
        return kernels.decode_attention(*args, shape.num_heads, shape.num_kv_heads, shape.scale)

    def moe_residual(self, x, norm_weight, eps, w, token_slots=None):
        return kernels.fused_moe(x, w.router, w.gate_up, w.down, w.top_k, w.norm_topk_prob, w.shared_gate_up,
                                 w.shared_down, w.shared_gate, norm_weight=norm_weight, eps=eps, residual=x,
                                 token_slots=token_slots)

    def warmup(self, layers):
        moe = next((layer.mlp for layer in layers if isinstance(layer.mlp, MoEWeights)), None)
        if moe is not None:  # every MoE layer of a model has the same shape
            kernels.moe.warmup(moe.router, moe.gate_up, moe.down, moe.top_k, moe.norm_topk_prob,
                               moe.shared_gate_up, moe.shared_down, moe.shared_gate)


BACKENDS: dict[str, Callable[[], Backend]] = {"torch": TorchBackend, "triton": TritonBackend}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    BACKENDS[name] = factory


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {sorted(BACKENDS)}")
    return BACKENDS[name]()


def default_backend_name(device: torch.device) -> str:
    """`triton` on CUDA, `torch` on CPU (where Triton only runs through its slow interpreter)."""
    return "triton" if device.type == "cuda" else "torch"

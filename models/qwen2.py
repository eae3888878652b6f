"""One Qwen2 model for dense and MoE checkpoints; every op goes through a `Backend`.

Weights are held fused the way the kernels want them: q/k/v as one `qkv` projection, gate/up as one `gate_up`,
experts stacked into [E, 2I, H] and [E, H, I]. The layer order follows Hugging Face's Qwen2DecoderLayer; each RMSNorm
is fused into the projection that consumes it and each residual add into the projection that produces it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwen2rt.kernels.quant import QuantizedWeight

from .backend import AttentionMetadata, AttentionShape, Backend, MoEWeights
from .config import Qwen2Config
from .quant import QuantConfig
from .quant import allocate as allocate_quantized
from .quant import fill_random as fill_random_quantized
from .rope import RotaryTables

Linear = torch.Tensor | QuantizedWeight  # a decoder linear's weight [N, K]: floating point, or quantized

@dataclass
class DenseMLPWeights:
    gate_up: Linear  # [2I, H]  rows [gate | up]
    down: Linear  # [H, I]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    qkv: Linear  # [(Hq + 2 Hkv) D, H]
    qkv_bias: torch.Tensor | None  # [(Hq + 2 Hkv) D]
    o: Linear  # [H, Hq D]
    post_attention_norm: torch.Tensor  # [H]
    mlp: DenseMLPWeights | MoEWeights


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]; the same tensor as embed when tied

    def nbytes(self) -> int:
        """Bytes of every weight held (a tied lm_head counted once)."""
        seen, total = set(), 0

        def add(t):
            nonlocal total
            if isinstance(t, QuantizedWeight):
                for part in (t.qweight, t.scales, t.zeros, t.perm):
                    add(part)
            elif isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()

        for t in (self.embed, self.final_norm, self.lm_head):
            add(t)
        for layer in self.layers:
            for t in (layer.input_norm, layer.qkv, layer.qkv_bias, layer.o, layer.post_attention_norm):
                add(t)
            for t in vars(layer.mlp).values():
                add(t)
        return total


def weight_shapes(config: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face checkpoint of this config (hub naming), with its shape."""
    c = config
    h, d = c.hidden_size, c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for name, heads in (("q", c.num_attention_heads), ("k", c.num_key_value_heads), ("v", c.num_key_value_heads)):
            shapes[p + f"self_attn.{name}_proj.weight"] = (heads * d, h)
            if c.qkv_bias:
                shapes[p + f"self_attn.{name}_proj.bias"] = (heads * d,)
        shapes[p + "self_attn.o_proj.weight"] = (h, c.num_attention_heads * d)
        if c.is_moe_layer(i):
            shapes[p + "mlp.gate.weight"] = (c.num_experts, h)
            for e in range(c.num_experts):
                _mlp_shapes(shapes, p + f"mlp.experts.{e}.", h, c.moe_intermediate_size)
            if c.shared_expert_intermediate_size:
                _mlp_shapes(shapes, p + "mlp.shared_expert.", h, c.shared_expert_intermediate_size)
                shapes[p + "mlp.shared_expert_gate.weight"] = (1, h)
        else:
            _mlp_shapes(shapes, p + "mlp.", h, c.intermediate_size)
    return shapes


def _mlp_shapes(shapes, prefix, h, inter):
    shapes[prefix + "gate_proj.weight"] = (inter, h)
    shapes[prefix + "up_proj.weight"] = (inter, h)
    shapes[prefix + "down_proj.weight"] = (h, inter)


def allocate_weights(config: Qwen2Config, device, dtype, fill=None, quantization: QuantConfig | None = None,
                     scale_dtype: torch.dtype | None = None) -> ModelWeights:
    """Uninitialised weights in the fused layout (the loader and `random_weights` fill every element).
    `fill(tensor, kind)` is called on each new tensor, kind in {"norm", "bias", "weight", "quantized"} ("quantized":
    a QuantizedWeight). With `quantization`, the decoder linears (qkv, o, gate_up, down; in MoE layers the experts,
    flattened into the rows of one QuantizedWeight each, and the shared expert) are QuantizedWeights with scales in
    `scale_dtype` (default: the model dtype); embeddings, norms, biases, lm_head, the router and the shared expert's
    gate stay in `dtype`."""
    c = config
    h, d = c.hidden_size, c.head_dim

    def new(kind, *shape):
        t = torch.empty(shape, device=device, dtype=dtype)
        if fill is not None:
            fill(t, kind)
        return t

    def linear(n, k) -> Linear:
        if quantization is None:
            return new("weight", n, k)
        w = allocate_quantized(quantization, n, k, device, scale_dtype or dtype)
        if fill is not None:
            fill(w, "quantized")
        return w

    def dense_mlp(inter):
        return DenseMLPWeights(gate_up=linear(2 * inter, h), down=linear(h, inter))

    layers = []
    for i in range(c.num_hidden_layers):
        if c.is_moe_layer(i):
            e, inter, shared = c.num_experts, c.moe_intermediate_size, c.shared_expert_intermediate_size
            # the router's rows then the shared expert's gate row, in one tensor: the decode path computes all the
            # gate logits with one GEMV (kernels.moe.router_with_shared_gate)
            gates = new("weight", e + (1 if shared else 0), h)
            if quantization is None:
                gate_up, down = new("weight", e, 2 * inter, h), new("weight", e, h, inter)
            else:  # the experts flattened into the rows of one quantized weight each (MoEWeights)
                gate_up, down = linear(e * 2 * inter, h), linear(e * h, inter)
            mlp = MoEWeights(
                router=gates[:e],
                gate_up=gate_up,
                down=down,
                shared_gate_up=linear(2 * shared, h) if shared else None,
                shared_down=linear(h, shared) if shared else None,
                shared_gate=gates[e:] if shared else None,
                top_k=c.num_experts_per_tok,
                norm_topk_prob=c.norm_topk_prob,
            )
        else:
            mlp = dense_mlp(c.intermediate_size)
        layers.append(LayerWeights(
            input_norm=new("norm", h),
            qkv=linear(c.qkv_size, h),
            qkv_bias=new("bias", c.qkv_size) if c.qkv_bias else None,
            o=linear(h, c.num_attention_heads * d),
            post_attention_norm=new("norm", h),
            mlp=mlp,
        ))
    embed = new("weight", c.vocab_size, h)
    lm_head = embed if c.tie_word_embeddings else new("weight", c.vocab_size, h)
    return ModelWeights(embed=embed, layers=layers, final_norm=new("norm", h), lm_head=lm_head)


def random_weights(config: Qwen2Config, device, dtype, seed: int = 0, std: float = 0.02,
                   quantization: QuantConfig | None = None) -> ModelWeights:
    """Deterministic random weights made straight on `device` (no host copy): N(0, std) matrices, norms near
    1 and biases near 0 (perturbed so that they matter). With `quantization`, the decoder linears are random
    quantized values made in place, layer by layer: no floating-point copy of them exists at any time."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def fill(t, kind):
        if kind == "quantized":
            fill_random_quantized(t, gen, std)
        elif kind == "weight":
            t.normal_(0.0, std, generator=gen)
        elif kind == "norm":
            t.normal_(1.0, 0.1, generator=gen)
        else:
            t.normal_(0.0, 0.1, generator=gen)

    return allocate_weights(config, device, dtype, fill, quantization)


class Qwen2Model:
    """The forward pass. `forward` maps this step's tokens to the final residual stream [T, H]; `compute_logits`
    maps chosen rows of it to logits."""

    def __init__(self, config: Qwen2Config, weights: ModelWeights, backend: Backend, rope: RotaryTables):
        self.config = config
        self.weights = weights
        self.backend = backend
        self.rope = rope
        self.attention_shape = AttentionShape(
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            scale=config.head_dim ** -0.5,
        )
        self.profile_ranges = False  # `qwen2rt profile`: named ranges per step and layer (record_function + NVTX)

    @property
    def device(self) -> torch.device:
        return self.weights.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    def forward(self, token_ids: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """token_ids [T] int64 -> the residual stream after the last layer [T, H] (compute_logits applies the final
        norm, so that only the rows whose logits are wanted are normalised)."""
        x = F.embedding(token_ids, self.weights.embed)
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.weights.layers, kv_caches)):
            with self.named_range(f"qwen2rt.layer.{i}"):
                x = self._layer(layer, x, k_cache, v_cache, meta)
        return x

    def _layer(self, layer: LayerWeights, x, k_cache, v_cache, meta):
        """One decoder layer on the residual stream x [T, H] -> [T, H]: Hugging Face's Qwen2DecoderLayer with each
        norm fused into the projection after it and each residual add into the projection before it."""
        be, eps = self.backend, self.config.rms_norm_eps
        qkv = be.norm_linear(x, layer.input_norm, eps, layer.qkv, layer.qkv_bias)
        attn = be.attention(qkv, k_cache, v_cache, self.rope, meta, self.attention_shape)
        x = be.linear_residual(attn, layer.o, x)
        if isinstance(layer.mlp, MoEWeights):
            return be.moe_residual(x, layer.post_attention_norm, eps, layer.mlp, meta.slot_mapping)
        h = be.norm_swiglu(x, layer.post_attention_norm, eps, layer.mlp.gate_up)
        return be.linear_residual(h, layer.mlp.down, x)

    def named_range(self, name: str):
        """A profiler range (and NVTX range on CUDA) while profile_ranges is on; otherwise nothing."""
        if not self.profile_ranges:
            return contextlib.nullcontext()
        return named_range(name, self.device.type == "cuda")

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Rows of the residual stream [N, H] -> float32 logits [N, V] (final norm, then lm_head)."""
        w = self.weights
        return self.backend.norm_linear(hidden, w.final_norm, self.config.rms_norm_eps, w.lm_head,
                                        out_dtype=torch.float32)


@contextlib.contextmanager
def named_range(name: str, cuda: bool):
    with torch.profiler.record_function(name):
        if cuda:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if cuda:
                torch.cuda.nvtx.range_pop()

"""Validated Qwen2 / Qwen2-MoE configuration, read from a Hugging Face `config.json` or a built-in shape.

Both spellings real checkpoints use are accepted:
- the 2024 hub format: `rope_theta`, `rope_scaling` ({"type" | "rope_type": ..., ...}), `torch_dtype`;
- the transformers-5 format: `rope_parameters` ({"rope_type", "rope_theta", ...}), `dtype`.
Keys we do not model (initializer_range, use_cache, bos_token_id, ...) are ignored, as Hugging Face does; a key
we model with a value we do not support is a `ConfigError` that names it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .quant import QuantConfig

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen2MoeForCausalLM": "qwen2_moe"}
ROPE_TYPES = ("default", "linear", "yarn")
DTYPE_NAMES = ("float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """A config.json value qwen2rt cannot run; the message names the field."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as Hugging Face computes it (`modeling_rope_utils`)."""

    rope_type: str = "default"
    factor: float = 1.0
    # YaRN only
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class Qwen2Config:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    dtype: str | None = None  # the checkpoint's dtype, informational: the runtime picks its own
    eos_token_id: tuple[int, ...] = ()
    # sliding window (not supported yet: use_sliding_window must be false)
    use_sliding_window: bool = False
    sliding_window: int | None = None
    # mixture of experts (Qwen2MoeForCausalLM)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # a quantized checkpoint (config.json's quantization_config: GPTQ or AWQ); None for floating-point weights
    quantization: QuantConfig | None = None

    def __post_init__(self):
        _validate(self)

    # ---- derived ----------------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.architecture == "Qwen2MoeForCausalLM"

    def is_moe_layer(self, layer: int) -> bool:
        """Hugging Face's rule: sparse unless listed in mlp_only_layers or off the decoder_sparse_step grid."""
        return (
            self.is_moe
            and self.num_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def max_context(self) -> int:
        """The longest sequence the model takes: max_position_embeddings, or the length its rope scaling extends to
        when longer (vLLM's rule: YaRN original_max_position_embeddings x factor, linear max_position_embeddings x
        factor). Qwen2.5's model cards add YaRN factor 4 over 32768 positions for 131072-token contexts."""
        rs = self.rope_scaling
        if rs.rope_type == "yarn":
            scaled = rs.original_max_position_embeddings * rs.factor
        elif rs.rope_type == "linear":
            scaled = self.max_position_embeddings * rs.factor
        else:
            scaled = 0
        return max(self.max_position_embeddings, int(scaled))

    @property
    def qkv_size(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    def parameter_count(self) -> int:
        """All parameters, embeddings counted once when tied."""
        return sum(n for n, _ in _parameter_groups(self))

    def bytes_per_token(self, dtype_bytes: int) -> int:
        """Weight bytes one decode step at batch 1 must read: everything except the embedding table (one row is
        read) and, in MoE layers, the experts that are not selected (only top-k of them are read)."""
        return sum(active for _, active in _parameter_groups(self)) * dtype_bytes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parameter_groups(c: Qwen2Config) -> list[tuple[int, int]]:
    """(parameters, parameters read per decoded token) for each group of weights."""
    h = c.hidden_size
    groups = [(c.vocab_size * h, h)]  # embedding: one row per token
    if not c.tie_word_embeddings:
        groups.append((c.vocab_size * h, c.vocab_size * h))
    else:
        groups.append((0, c.vocab_size * h))  # tied lm_head reads the whole table once more
    groups.append((h, h))  # final norm
    attn = h * c.qkv_size + c.qkv_size * c.qkv_bias + c.num_attention_heads * c.head_dim * h + 2 * h
    for layer in range(c.num_hidden_layers):
        groups.append((attn, attn))
        if c.is_moe_layer(layer):
            per_expert = 3 * h * c.moe_intermediate_size
            shared = 3 * h * c.shared_expert_intermediate_size + (h if c.shared_expert_intermediate_size else 0)
            router = c.num_experts * h
            groups.append(
                (c.num_experts * per_expert + shared + router, c.num_experts_per_tok * per_expert + shared + router)
            )
        else:
            groups.append((3 * h * c.intermediate_size, 3 * h * c.intermediate_size))
    return groups


def _fail(name: str, value, why: str):
    raise ConfigError(f"config field {name!r} = {value!r}: {why}")


def _validate(c: Qwen2Config) -> None:
    if c.architecture not in ARCHITECTURES:
        _fail("architectures", c.architecture, f"unsupported architecture; qwen2rt runs {sorted(ARCHITECTURES)}")
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "max_position_embeddings"):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            _fail(name, value, "must be a positive integer")
    if not isinstance(c.intermediate_size, int) or c.intermediate_size < 0:
        _fail("intermediate_size", c.intermediate_size, "must be a non-negative integer")
    if c.num_attention_heads % c.num_key_value_heads:
        _fail("num_key_value_heads", c.num_key_value_heads,
              f"must divide num_attention_heads ({c.num_attention_heads})")
    if c.head_dim % 2:
        _fail("head_dim", c.head_dim, "must be even for rotary embeddings")
    if not (isinstance(c.rms_norm_eps, (int, float)) and c.rms_norm_eps > 0):
        _fail("rms_norm_eps", c.rms_norm_eps, "must be a positive number")
    if not (isinstance(c.rope_theta, (int, float)) and c.rope_theta > 0):
        _fail("rope_theta", c.rope_theta, "must be a positive number")
    if c.dtype is not None and c.dtype not in DTYPE_NAMES:
        _fail("dtype", c.dtype, f"unsupported dtype; expected one of {DTYPE_NAMES}")
    if c.use_sliding_window:
        _fail("use_sliding_window", True, "sliding-window attention is not supported yet")
    rs = c.rope_scaling
    if rs.rope_type not in ROPE_TYPES:
        _fail("rope_scaling.rope_type", rs.rope_type, f"unsupported rope type; supported: {ROPE_TYPES}")
    if rs.rope_type != "default" and not (isinstance(rs.factor, (int, float)) and rs.factor >= 1.0):
        _fail("rope_scaling.factor", rs.factor, "must be a number >= 1")
    if rs.rope_type == "yarn" and not (isinstance(rs.original_max_position_embeddings, int)
                                       and rs.original_max_position_embeddings > 0):
        _fail("rope_scaling.original_max_position_embeddings", rs.original_max_position_embeddings,
              "YaRN needs a positive integer")
    if c.is_moe:
        if c.num_experts <= 0:
            _fail("num_experts", c.num_experts, "must be a positive integer for Qwen2MoeForCausalLM")
        if not 1 <= c.num_experts_per_tok <= c.num_experts:
            _fail("num_experts_per_tok", c.num_experts_per_tok, f"must be in [1, num_experts={c.num_experts}]")
        if c.moe_intermediate_size <= 0:
            _fail("moe_intermediate_size", c.moe_intermediate_size, "must be a positive integer")
        if c.shared_expert_intermediate_size < 0:
            _fail("shared_expert_intermediate_size", c.shared_expert_intermediate_size,
                  "must be >= 0 (0 means no shared expert)")
        if c.decoder_sparse_step < 1:
            _fail("decoder_sparse_step", c.decoder_sparse_step, "must be >= 1")
        bad = [i for i in c.mlp_only_layers if not (isinstance(i, int) and 0 <= i < c.num_hidden_layers)]
        if bad:
            _fail("mlp_only_layers", list(c.mlp_only_layers), f"layer indices {bad} are out of range")
    if c.quantization is not None and c.is_moe and c.quantization.desc_act:
        _fail("quantization_config.desc_act", True, "act-order (desc_act) GPTQ checkpoints of MoE models are not "
              "supported: the expert kernels read each expert's inputs in order (they take no act-order permutation)")
    has_dense = any(not c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    if has_dense and c.intermediate_size <= 0:
        _fail("intermediate_size", c.intermediate_size, "must be positive: the model has dense MLP layers")


# ---- parsing config.json ---------------------------------------------------------------------------------------

def _parse_rope(d: dict) -> tuple[float, RopeScaling]:
    """rope theta and scaling from either spelling. As in transformers 5 (`rope_scaling or rope_parameters`), a
    non-empty rope_scaling wins over rope_parameters: Qwen2.5's model cards tell users to add a YaRN rope_scaling to
    config.json, which transformers 5 saves with a rope_parameters of its own."""
    for source in ("rope_scaling", "rope_parameters"):
        if d.get(source) is not None and not isinstance(d[source], dict):
            _fail(source, d[source], "must be an object")
    source = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    params = dict(d.get(source) or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        _fail(source, params, "per-layer-type rope parameters are not supported")
    theta = params.pop("rope_theta", d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        _fail(f"{source}.rope_type", rope_type, f"unsupported rope type; supported: {ROPE_TYPES}")
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        _fail(f"{source}.partial_rotary_factor", d[source].get("partial_rotary_factor"), "must be 1.0")
    allowed = {
        "default": set(),
        "linear": {"factor"},
        "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                 "mscale", "mscale_all_dim", "truncate"},
    }[rope_type]
    unknown = sorted(set(params) - allowed)
    if unknown:
        _fail(f"{source}.{unknown[0]}", params[unknown[0]], f"not a parameter of rope type {rope_type!r}")
    if rope_type == "default":
        return float(theta), RopeScaling()
    if "factor" not in params:
        _fail(f"{source}.factor", None, f"rope type {rope_type!r} needs a factor")
    kwargs = dict(rope_type=rope_type, factor=params["factor"])
    if rope_type == "yarn":
        kwargs["original_max_position_embeddings"] = params.get(
            "original_max_position_embeddings", d.get("max_position_embeddings"))
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if params.get(key) is not None:
                kwargs[key] = float(params[key])
        # Hugging Face: `beta_fast or 32`, `beta_slow or 1`
        kwargs["beta_fast"] = float(params.get("beta_fast") or 32)
        kwargs["beta_slow"] = float(params.get("beta_slow") or 1)
        kwargs["truncate"] = bool(params.get("truncate", True))
    return float(theta), RopeScaling(**kwargs)


def _sliding_layers(d: dict, moe: bool) -> tuple[list[int], str]:
    """(the layers transformers runs with sliding-window attention, the config field that decides): config.json's
    layer_types when it has them, else transformers' rules from use_sliding_window and max_window_layers (dense:
    the layers from max_window_layers on, when sliding_window is set; MoE: the even layers below it). Qwen2-7B's
    use_sliding_window true with max_window_layers 28 of 28 layers slides none."""
    layer_types = d.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list):
            _fail("layer_types", layer_types, "must be a list of attention types, one per layer")
        return [i for i, t in enumerate(layer_types) if t != "full_attention"], "layer_types"
    if not d.get("use_sliding_window", False):
        return [], "use_sliding_window"
    first = d.get("max_window_layers", 28)
    layers = range(d.get("num_hidden_layers", 0))
    if moe:
        return [i for i in layers if i % 2 == 0 and i < first], "use_sliding_window"
    window = d.get("sliding_window", 4096)  # transformers' default when the key is absent (null: no window)
    return [i for i in layers if window is not None and i >= first], "use_sliding_window"


def config_from_dict(d: dict) -> Qwen2Config:
    """Build a validated config from the contents of a Hugging Face `config.json`."""
    archs = d.get("architectures")
    if not archs:
        model_type = d.get("model_type")
        by_type = {v: k for k, v in ARCHITECTURES.items()}
        if model_type not in by_type:
            _fail("architectures", archs, f"missing, and model_type {model_type!r} is not qwen2 or qwen2_moe")
        archs = [by_type[model_type]]
    if not isinstance(archs, list) or len(archs) != 1:
        _fail("architectures", archs, "must list exactly one architecture")
    arch = archs[0]
    if arch not in ARCHITECTURES:
        _fail("architectures", arch, f"unsupported architecture; qwen2rt runs {sorted(ARCHITECTURES)}")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if key not in d:
            _fail(key, None, "missing from config.json")
    hidden_act = d.get("hidden_act", "silu")
    if hidden_act != "silu":
        _fail("hidden_act", hidden_act, "only silu is supported")
    moe = arch == "Qwen2MoeForCausalLM"
    sliding, field = _sliding_layers(d, moe)
    if sliding:
        _fail(field, d.get(field), f"layers {sliding[:8]}{' ...' if len(sliding) > 8 else ''} would use sliding-window "
              "attention, which is not supported yet")
    heads = d["num_attention_heads"]
    theta, scaling = _parse_rope(d)
    quantization = None
    if d.get("quantization_config") is not None:
        from .quant import QuantizationError, parse_quantization_config  # torch: only for quantized checkpoints

        try:
            quantization = parse_quantization_config(d["quantization_config"])
        except QuantizationError as e:
            raise ConfigError(str(e)) from None
    eos = d.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    mlp_only = d.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list):
        _fail("mlp_only_layers", mlp_only, "must be a list of layer indices")
    return Qwen2Config(
        architecture=arch,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d.get("intermediate_size", 0),
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=d.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=bool(d.get("qkv_bias", True)) if moe else True,  # dense Qwen2 always has them (transformers)
        dtype=d.get("dtype") or d.get("torch_dtype"),
        eos_token_id=eos,
        use_sliding_window=False,  # no layer slides (checked above), whatever the flag says
        sliding_window=None,  # no layer slides: a window of none
        num_experts=d.get("num_experts", 60) if moe else 0,
        num_experts_per_tok=d.get("num_experts_per_tok", 4) if moe else 0,
        moe_intermediate_size=d.get("moe_intermediate_size", 1408) if moe else 0,
        shared_expert_intermediate_size=d.get("shared_expert_intermediate_size", 5632) if moe else 0,
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        decoder_sparse_step=d.get("decoder_sparse_step", 1) if moe else 1,
        mlp_only_layers=tuple(mlp_only),
        quantization=quantization,
    )


def read_json(path: str | os.PathLike):
    """A checkpoint folder's JSON file (config.json, tokenizer_config.json, generation_config.json) -> its value; a
    ConfigError naming the file when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def load_config(model_dir: str | os.PathLike) -> Qwen2Config:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{model_dir}: no config.json (is this a Hugging Face checkpoint folder?)")
    return config_from_dict(read_json(path))


# ---- built-in shapes (the published config values; random weights) -------------------------------------------

def _dense(**kw) -> Qwen2Config:
    kw.setdefault("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
    return Qwen2Config(architecture="Qwen2ForCausalLM", **kw)


def _moe(**kw) -> Qwen2Config:
    kw.setdefault("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
    return Qwen2Config(architecture="Qwen2MoeForCausalLM", **kw)


BUILTIN_CONFIGS: dict[str, Qwen2Config] = {
    "qwen2-0.5b": _dense(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6,
                         max_position_embeddings=131072, tie_word_embeddings=True, dtype="bfloat16",
                         eos_token_id=(151643,)),
    "qwen2-1.5b": _dense(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6,
                         max_position_embeddings=131072, tie_word_embeddings=True, dtype="bfloat16",
                         eos_token_id=(151643,)),
    "qwen2-7b": _dense(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
                       max_position_embeddings=131072, dtype="bfloat16", eos_token_id=(151643,)),
    "qwen2-72b": _dense(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6,
                        max_position_embeddings=131072, dtype="bfloat16", eos_token_id=(151643,)),
    "qwen2-57b-a14b": _moe(vocab_size=151936, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                           num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
                           max_position_embeddings=131072, dtype="bfloat16", eos_token_id=(151643,),
                           num_experts=64, num_experts_per_tok=8, moe_intermediate_size=2560,
                           shared_expert_intermediate_size=20480),
    "qwen1.5-moe-a2.7b": _moe(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                              num_attention_heads=16, num_key_value_heads=16, rope_theta=1e6,
                              max_position_embeddings=8192, dtype="bfloat16", eos_token_id=(151643,),
                              num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                              shared_expert_intermediate_size=5632),
    # Small shapes for tests and the default CPU run. Vocabulary 512 covers the built-in byte tokenizer.
    "tiny": _dense(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=2048,
                   tie_word_embeddings=True, dtype="float32"),
    "tiny-moe": _moe(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=2048,
                     dtype="float32", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96,
                     shared_expert_intermediate_size=192, mlp_only_layers=(0,)),
}


# Benchmark slice: the first 4 layers of Qwen2-57B-A14B (the whole model does not fit one 80 GB GPU in bf16).
BUILTIN_CONFIGS["qwen2-57b-a14b-4l"] = dataclasses.replace(BUILTIN_CONFIGS["qwen2-57b-a14b"], num_hidden_layers=4)


def builtin_config(name: str) -> Qwen2Config:
    try:
        return BUILTIN_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown built-in model {name!r}; built-ins: {sorted(BUILTIN_CONFIGS)}") from None


"""Config parsing in both spellings, RoPE tables against Hugging Face's, and errors that name the field."""

from __future__ import annotations

import json

import pytest
import torch

from qwen2rt.models.config import BUILTIN_CONFIGS, ConfigError, config_from_dict, load_config
from qwen2rt.models.rope import inverse_frequencies

# Qwen2-7B-Instruct's config.json as published in 2024 (hub format), with a YaRN block as its model card suggests.
HUB_2024 = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
    "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"},
}
# The same model in the transformers-5 spelling.
TF5 = {k: v for k, v in HUB_2024.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
TF5.update(dtype="bfloat16", rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                              "original_max_position_embeddings": 32768},
           layer_types=["full_attention"] * 28)

MOE_2024 = {  # Qwen1.5-MoE-A2.7B
    "architectures": ["Qwen2MoeForCausalLM"], "bos_token_id": 151643, "decoder_sparse_step": 1,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 5632,
    "max_position_embeddings": 8192, "max_window_layers": 21, "model_type": "qwen2_moe",
    "moe_intermediate_size": 1408, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 60,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 16, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "shared_expert_intermediate_size": 5632, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}


def test_both_spellings_give_the_same_config():
    a, b = config_from_dict(HUB_2024), config_from_dict(TF5)
    assert a == b
    assert a.rope_scaling.rope_type == "yarn" and a.rope_scaling.factor == 4.0
    assert a.rope_theta == 1e6 and a.dtype == "bfloat16" and a.head_dim == 128 and a.eos_token_id == (151645,)
    assert a.max_context == 131072 and a.max_position_embeddings == 32768  # YaRN factor 4 over 32768 positions
    assert config_from_dict(dict(HUB_2024, rope_scaling=None)).max_context == 32768
    # "type" spelled as "rope_type" inside rope_scaling works too
    c = dict(HUB_2024, rope_scaling={"factor": 4.0, "original_max_position_embeddings": 32768, "rope_type": "yarn"})
    assert config_from_dict(c) == a
    # a transformers-5 folder to which the model card's YaRN rope_scaling was added: rope_scaling wins, as in
    # transformers 5; theta stays the model's (rope_parameters'), where transformers 5.25 falls back to 10000
    tf5_default = dict(TF5, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    assert config_from_dict(tf5_default).rope_scaling.rope_type == "default"
    assert config_from_dict(dict(tf5_default, rope_scaling=HUB_2024["rope_scaling"])) == a
    assert config_from_dict(dict(tf5_default, rope_scaling=None)) == config_from_dict(tf5_default)


def test_sliding_window_flags_that_slide_no_layer_are_accepted():
    """transformers' rules: Qwen2-7B's use_sliding_window true with max_window_layers 28 of 28 layers (or no
    sliding_window) slides no layer, so the model is the full-attention one; Qwen2-MoE slides its even layers
    below max_window_layers (none when it is 0); explicit layer_types decide alone. Dense Qwen2 always has qkv
    biases, whatever a qkv_bias key says (transformers reads it for MoE only)."""
    base = config_from_dict(HUB_2024)
    for change in ({"use_sliding_window": True}, {"use_sliding_window": True, "max_window_layers": 0,
                                                  "sliding_window": None},
                   {"use_sliding_window": True, "max_window_layers": 0, "layer_types": ["full_attention"] * 28},
                   {"qkv_bias": False}):
        assert config_from_dict(dict(HUB_2024, **change)) == base, change
    moe = config_from_dict(MOE_2024)
    assert config_from_dict(dict(MOE_2024, use_sliding_window=True, max_window_layers=0)) == moe
    with pytest.raises(ConfigError, match=r"'use_sliding_window'.*layers \[0, 2\]"):
        config_from_dict(dict(MOE_2024, use_sliding_window=True, max_window_layers=3))
    assert not config_from_dict(dict(MOE_2024, qkv_bias=False)).qkv_bias


def test_moe_config_and_builtin_matches_published():
    c = config_from_dict(MOE_2024)
    assert c.is_moe and all(c.is_moe_layer(i) for i in range(24))
    builtin = BUILTIN_CONFIGS["qwen1.5-moe-a2.7b"]
    for field in ("hidden_size", "intermediate_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "shared_expert_intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                  "max_position_embeddings", "rope_theta", "norm_topk_prob"):
        assert getattr(builtin, field) == getattr(c, field), field
    mixed = config_from_dict(dict(MOE_2024, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert [mixed.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]


def test_parameter_counts_of_builtins():
    # published totals (embeddings counted once when tied)
    assert round(BUILTIN_CONFIGS["qwen2-7b"].parameter_count() / 1e9, 2) == 7.62
    assert round(BUILTIN_CONFIGS["qwen2-0.5b"].parameter_count() / 1e9, 2) == 0.49
    assert round(BUILTIN_CONFIGS["qwen1.5-moe-a2.7b"].parameter_count() / 1e9, 1) == 14.3
    # bytes per decoded token in bf16 (DESIGN.md): 0.99, 3.09, 14.1, 4.76 GB
    for name, gb in (("qwen2-0.5b", 0.99), ("qwen2-1.5b", 3.09), ("qwen2-7b", 14.14), ("qwen1.5-moe-a2.7b", 4.76)):
        assert abs(BUILTIN_CONFIGS[name].bytes_per_token(2) / 1e9 - gb) < 0.01, name


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 1e6},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0},
    {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 4096,
     "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
])
def test_rope_frequencies_match_hf(rope):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = transformers.Qwen2Config(hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=131072, rope_parameters=dict(rope))
    if rope["rope_type"] == "default":
        hf_inv, hf_factor = transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding \
            .compute_default_rope_parameters(hf_cfg)
    else:
        hf_inv, hf_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")
    ours = config_from_dict(dict(HUB_2024, hidden_size=256, num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=131072, rope_scaling=None, rope_theta=None,
                                 rope_parameters=dict(rope)))
    inv, factor = inverse_frequencies(ours)
    torch.testing.assert_close(inv, hf_inv.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(hf_factor)


@pytest.mark.parametrize("change, field", [
    ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ({"use_sliding_window": True, "max_window_layers": 20}, "use_sliding_window"),  # layers 20-27 would slide
    ({"layer_types": ["full_attention"] * 27 + ["sliding_attention"]}, "layer_types"),
    # no sliding_window key: transformers' default window of 4096 applies, so layers 20-27 slide
    ({"use_sliding_window": True, "max_window_layers": 20, "sliding_window": "absent"}, "use_sliding_window"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"rope_scaling": {"type": "linear"}}, "rope_scaling.factor"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "low_freq_factor": 1}}, "rope_scaling.low_freq_factor"),
    ({"rope_scaling": [4.0, "yarn"]}, "rope_scaling"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 5}, "num_key_value_heads"),
    ({"torch_dtype": "int8"}, "dtype"),
    ({"hidden_size": -1}, "hidden_size"),
    ({"vocab_size": None}, "vocab_size"),
])
def test_bad_dense_values_name_the_field(change, field):
    d = {k: v for k, v in dict(HUB_2024, **change).items() if v != "absent"}
    with pytest.raises(ConfigError, match=repr(field).replace(".", r"\.").replace("[", r"\[")):
        config_from_dict(d)


@pytest.mark.parametrize("change, field", [
    ({"num_experts_per_tok": 61}, "num_experts_per_tok"),
    ({"num_experts": 0}, "num_experts"),
    ({"mlp_only_layers": [24]}, "mlp_only_layers"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
])
def test_bad_moe_values_name_the_field(change, field):
    with pytest.raises(ConfigError, match=repr(field)):
        config_from_dict(dict(MOE_2024, **change))


def test_missing_field_and_files(tmp_path):
    with pytest.raises(ConfigError, match="'num_hidden_layers'"):
        config_from_dict({k: v for k, v in HUB_2024.items() if k != "num_hidden_layers"})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TF5))
    assert load_config(tmp_path) == config_from_dict(HUB_2024)

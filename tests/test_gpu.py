"""The torch backend on a CUDA GPU against Hugging Face on the same GPU (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from qwen2rt import LLM, SamplingParams
from test_parity import hf_logits, random_prompt, rel_err

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["dense_gqa", "moe_renorm"])
def test_fp32_logits_on_gpu_match_hf(name, hf_checkpoints):
    path, hf = hf_checkpoints[name]
    llm = LLM(path, device="cuda", dtype="float32", backend="torch", max_seq_len=256)
    ids = random_prompt(45, hf.config.vocab_size, 1)
    assert rel_err(llm.logits(ids).cpu(), hf_logits(hf, ids)) < 1e-4


@pytest.mark.parametrize("name", ["dense_gqa", "moe_sparse_step_sharded"])
def test_bf16_on_gpu_close_to_fp32_hf(name, hf_checkpoints):
    path, hf = hf_checkpoints[name]
    llm = LLM(path, device="cuda", backend="torch", max_seq_len=256)
    assert llm.dtype == torch.bfloat16
    ids = random_prompt(45, hf.config.vocab_size, 2)
    # bf16 weights and activations against fp32 HF: 1.6e-2 at this seed, up to 2.6e-2 at others (bf16 on CPU)
    assert rel_err(llm.logits(ids).cpu(), hf_logits(hf, ids)) < 5e-2
    out = llm.generate([ids, ids[:7]], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [16, 16]


def test_builtin_shape_on_gpu_is_deterministic():
    a = LLM("qwen2-0.5b", device="cuda", seed=1, max_seq_len=512, max_batch_size=2)
    b = LLM("qwen2-0.5b", device="cuda", seed=1, max_seq_len=512, max_batch_size=2)
    ids = list(range(100, 140))
    torch.testing.assert_close(a.logits(ids), b.logits(ids), rtol=0, atol=0)


@pytest.mark.parametrize("model", ["tiny", "tiny-moe", "qwen2-0.5b"])
@pytest.mark.parametrize("batch", [1, 5])  # 5 runs padded in the 8 bucket
def test_cuda_graph_decode_equals_eager(model, batch):
    kw = dict(device="cuda", seed=0, max_seq_len=256, max_batch_size=8)
    graphs = LLM(model, **kw)
    assert graphs.use_graphs and graphs.backend.name == "triton" and graphs.engine.decoder.graphs
    eager = LLM(model, enforce_eager=True, **kw)
    prompts = [[(7 * i + j) % 500 + 1 for j in range(5 + 3 * i)] for i in range(batch)]
    greedy = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in graphs.generate(prompts, greedy)] == \
        [o.token_ids for o in eager.generate(prompts, greedy)]
    # sampling inside the graph: the same draws as eager (counter-based RNG, per-request seeds), with the top-k
    # sampler (top_k <= 256) and with the full one (top-p over the whole vocabulary)
    for top_k in (50, 0):
        sampled = SamplingParams(max_tokens=32, temperature=0.8, top_k=top_k, top_p=0.9, min_p=0.01,
                                 repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.1, seed=11,
                                 ignore_eos=True)
        assert [o.token_ids for o in graphs.generate(prompts, sampled)] == \
            [o.token_ids for o in eager.generate(prompts, sampled)]


def test_lazily_captured_graphs_equal_eager():
    kw = dict(device="cuda", seed=0, max_seq_len=256, max_batch_size=8)
    lazy = LLM("tiny-moe", capture_graphs="lazy", **kw)
    assert lazy.use_graphs and not lazy.engine.decoder.graphs  # nothing captured before the first decode step
    eager = LLM("tiny-moe", enforce_eager=True, **kw)
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for batch in (3, 1, 3):  # first use of bucket 4, of bucket 1, then bucket 4 again from its graph
        prompts = [[(11 * i + j) % 500 + 1 for j in range(6 + 2 * i)] for i in range(batch)]
        assert [o.token_ids for o in lazy.generate(prompts, greedy)] == \
            [o.token_ids for o in eager.generate(prompts, greedy)]
    assert {(4, "greedy"), (1, "greedy")} <= set(lazy.engine.decoder.graphs)

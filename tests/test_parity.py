"""The whole model against Hugging Face transformers on tiny random checkpoints written with save_pretrained."""

from __future__ import annotations

import pytest
import torch

from conftest import CHECKPOINTS, build_hf_model, save_hf_model
from qwen2rt import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():  # an explicit mask: without one HF masks every prompt token equal to pad_token_id
        out = model.generate(x, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(x))
    return out[0, len(ids):].tolist()


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def engines(hf_checkpoints):
    return {name: LLM(path, device="cpu", dtype="float32", max_seq_len=256, max_batch_size=4)
            for name, (path, _) in hf_checkpoints.items()}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_logits_match_hf(name, hf_checkpoints, engines):
    _, hf = hf_checkpoints[name]
    llm = engines[name]
    for n, seed in ((1, 0), (7, 1), (45, 2)):  # 45 tokens cross two cache blocks of 16
        ids = random_prompt(n, hf.config.vocab_size, seed)
        ours = llm.logits(ids)
        assert ours.dtype == torch.float32 and ours.shape == (n, hf.config.vocab_size)
        assert rel_err(ours, hf_logits(hf, ids)) < 1e-4


def test_prefill_in_query_chunks_matches_hf(hf_checkpoints):
    path, hf = hf_checkpoints["dense_gqa"]
    llm = LLM(path, device="cpu", dtype="float32", max_seq_len=256)
    llm.backend.max_score_elements = 4 * 40 * 3  # 4 heads: chunks of 3 rows, then 2, then 1 as the context grows
    ids = random_prompt(50, hf.config.vocab_size, 8)
    assert rel_err(llm.logits(ids), hf_logits(hf, ids)) < 1e-4


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_greedy_generation_matches_hf(name, hf_checkpoints, engines):
    _, hf = hf_checkpoints[name]
    ids = random_prompt(11, hf.config.vocab_size, 3)
    out = engines[name].generate([ids], GREEDY)[0]
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 40
    assert out.token_ids == hf_greedy(hf, ids, 40)


@pytest.mark.parametrize("name", ["dense_gqa", "moe_renorm"])
def test_batch_equals_one_at_a_time(name, hf_checkpoints, engines):
    _, hf = hf_checkpoints[name]
    llm = engines[name]
    prompts = [random_prompt(n, hf.config.vocab_size, 10 + n) for n in (3, 17, 1, 30, 9, 5)]  # 6 > max_batch 4
    batched = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    single = [llm.generate([p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0] for p in prompts]
    assert [o.token_ids for o in batched] == [o.token_ids for o in single]
    assert [o.prompt_len for o in batched] == [len(p) for p in prompts]


@pytest.mark.parametrize("rope_extra, max_pos", [
    ({"rope_type": "linear", "factor": 2.0}, 512),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 128),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "beta_fast": 16.0,
      "attention_factor": 1.3}, 64),
])
def test_scaled_rope_matches_hf(rope_extra, max_pos, tmp_path):
    hf = build_hf_model("dense", seed=5, rope_extra=rope_extra, max_position_embeddings=max_pos)
    path = save_hf_model(hf, tmp_path / "ckpt")
    llm = LLM(path, device="cpu", dtype="float32", max_seq_len=max_pos, max_batch_size=1)
    ids = random_prompt(60, hf.config.vocab_size, 4)  # beyond original_max_position_embeddings
    assert rel_err(llm.logits(ids), hf_logits(hf, ids)) < 1e-4


def test_triton_backend_padded_decode_batch(hf_checkpoints):
    """Three prompts decode padded into the 4-row bucket (the rows a CUDA graph replays), each equal to HF."""
    path, hf = hf_checkpoints["moe_sparse_step_sharded"]
    llm = LLM(path, dtype="float32", backend="triton", max_seq_len=128, max_batch_size=4)
    prompts = [random_prompt(n, hf.config.vocab_size, 20 + n) for n in (3, 17, 9)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 12) for p in prompts]


@pytest.mark.parametrize("name", ["dense_gqa", "dense_tied_mha_sharded", "moe_renorm"])
def test_triton_backend_matches_hf(name, hf_checkpoints):
    """The Triton kernels (through the interpreter on CPU) inside the whole model."""
    path, hf = hf_checkpoints[name]
    llm = LLM(path, dtype="float32", backend="triton", max_seq_len=128, max_batch_size=2)
    assert llm.backend.name == "triton"
    ids = random_prompt(45, hf.config.vocab_size, 2)
    assert rel_err(llm.logits(ids).cpu(), hf_logits(hf, ids)) < 1e-4
    prompt = random_prompt(11, hf.config.vocab_size, 3)
    assert llm.generate([prompt], GREEDY)[0].token_ids == hf_greedy(hf, prompt, 40)

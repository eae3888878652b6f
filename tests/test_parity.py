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


def generate_recording_logits(llm, prompt: list[int], params: SamplingParams):
    """Generate for one prompt alone and record the logits each token was sampled from: the prefill's last row,
    then every decode step's (the engine's decode runner calls model.compute_logits once per step).
    -> (RequestOutput, float32 logits [tokens, V])."""
    recorded = []
    compute_logits = llm.model.compute_logits

    def record(hidden):
        logits = compute_logits(hidden)
        assert logits.shape[0] == 1, "one prompt alone: one row per step (decode bucket 1)"
        recorded.append(logits.detach().float().cpu().clone())
        return logits

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llm.model, "compute_logits", record)
        out = llm.generate([prompt], params)[0]
    return out, torch.cat(recorded)


def assert_steps_match_hf(hf, prompt: list[int], out, logits: torch.Tensor) -> None:
    """Every step's logits against HF's last-position logits for the same tokens (one causal forward over the
    prompt and all generated tokens but the last gives them all), each step to 1e-4 of its own largest logit."""
    assert logits.shape[0] == len(out.token_ids)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    ref = hf_logits(hf, prompt + out.token_ids[:-1])[len(prompt) - 1:]
    errors = [rel_err(ours, theirs) for ours, theirs in zip(logits, ref)]
    assert max(errors) < 1e-4, f"step {errors.index(max(errors))} (0 = prefill): relative error {max(errors):.2e}"


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_greedy_generation_matches_hf(name, hf_checkpoints, engines):
    """40 greedy tokens equal HF's, and so do the logits of the prefill and of every decode step (a decode-only
    RoPE position off by one or a 0.9x softmax scale leaves these tokens unchanged but not the logits)."""
    _, hf = hf_checkpoints[name]
    ids = random_prompt(11, hf.config.vocab_size, 3)
    out, logits = generate_recording_logits(engines[name], ids, GREEDY)
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 40
    assert out.token_ids == hf_greedy(hf, ids, 40)
    assert_steps_match_hf(hf, ids, out, logits)


def greedy_with_penalties(model, ids: list[int], n: int, repetition: float, presence: float,
                          frequency: float) -> list[int]:
    """Greedy decoding on HF's logits with the penalties applied by hand: repetition over prompt and output (HF's
    rule), presence and frequency over the output only (OpenAI's)."""
    out: list[int] = []
    for _ in range(n):
        logits = hf_logits(model, ids + out)[-1]
        seen = torch.tensor(sorted(set(ids + out)))
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / repetition, logits[seen] * repetition)
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
        out.append(int((logits - frequency * counts - presence * (counts > 0).float()).argmax()))
    return out


def test_penalised_greedy_generation_matches_hf(hf_checkpoints, engines):
    """Greedy with a repetition penalty is deterministic: the tokens equal HF generate's, which penalises the prompt
    tokens too; presence and frequency penalties (HF has none) equal a greedy loop over HF's logits."""
    _, hf = hf_checkpoints["dense_gqa"]
    llm = engines["dense_gqa"]
    ids = random_prompt(30, 40, 5)  # 30 tokens from 40 ids: the penalty hits prompt tokens the model favours
    plain = llm.generate([ids], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0].token_ids
    penalised = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, repetition_penalty=1.8)
    out = llm.generate([ids], penalised)[0].token_ids
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf.generate(x, max_new_tokens=16, do_sample=False, repetition_penalty=1.8,
                          attention_mask=torch.ones_like(x))[0, len(ids):].tolist()
    assert out == ref and out != plain
    for repetition, presence, frequency in ((1.0, 1.5, 0.0), (1.0, 0.0, 0.7), (1.3, -0.5, 0.6)):
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=repetition,
                                presence_penalty=presence, frequency_penalty=frequency)
        out = llm.generate([ids], params)[0].token_ids
        assert out == greedy_with_penalties(hf, ids, 12, repetition, presence, frequency), params


def test_min_tokens_and_logit_bias_match_hf(hf_checkpoints, engines):
    """Greedy with min_tokens and a stop id equals HF generate with min_new_tokens and that id as eos (both give it
    no probability before then), and logit_bias equals HF's sequence_bias on single tokens; each changes the
    tokens (not vacuous)."""
    _, hf = hf_checkpoints["dense_gqa"]
    llm = engines["dense_gqa"]
    ids = random_prompt(9, hf.config.vocab_size, 4)
    x = torch.tensor([ids])

    def hf_generate(**kw):
        with torch.no_grad():
            return hf.generate(x, max_new_tokens=14, do_sample=False, attention_mask=torch.ones_like(x),
                               pad_token_id=0, **kw)[0, len(ids):].tolist()

    plain = llm.generate([ids], SamplingParams(max_tokens=14, temperature=0, ignore_eos=True))[0].token_ids
    first = next(i for i in range(1, 8) if plain[i] not in plain[:i])  # a token's first appearance past index 0
    stop = plain[first]
    out = llm.generate([ids], SamplingParams(max_tokens=14, temperature=0, stop_token_ids=[stop], min_tokens=first + 3,
                                             ignore_eos=True))[0].token_ids
    assert out == hf_generate(eos_token_id=stop, min_new_tokens=first + 3) and out[:first + 1] != plain[:first + 1]
    # the hold ends exactly at min_tokens: the first later step whose argmax is the stop id ends the request there
    held = llm.generate([ids], SamplingParams(max_tokens=14, temperature=0, stop_token_ids=[stop], min_tokens=14,
                                              ignore_eos=True))[0].token_ids
    k = next(k for k in range(first + 1, 14) if int(llm.logits(ids + held[:k])[-1].argmax()) == stop)
    out = llm.generate([ids], SamplingParams(max_tokens=14, temperature=0, stop_token_ids=[stop], min_tokens=k,
                                             ignore_eos=True))[0]
    assert out.token_ids == held[:k] + [stop] and out.finish_reason == "stop"
    assert out.token_ids == hf_generate(eos_token_id=stop, min_new_tokens=k)
    bias = {plain[0]: -4.0, int(hf_logits(hf, ids)[-1].argsort()[-5]): 2.5}
    out = llm.generate([ids], SamplingParams(max_tokens=14, temperature=0, ignore_eos=True, logit_bias=bias))[0]
    assert out.token_ids == hf_generate(sequence_bias=[[[t], b] for t, b in bias.items()], eos_token_id=None)
    assert out.token_ids != plain


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


def test_yarn_extends_the_context_past_max_position_embeddings(tmp_path):
    """Qwen2.5's model-card setup: max_position_embeddings stays the trained length and YaRN factor 4 over it is
    added; the context (the default max_seq_len) is 4x that, and a prompt past max_position_embeddings matches HF."""
    hf = build_hf_model("dense", seed=6, max_position_embeddings=32,
                        rope_extra={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    path = save_hf_model(hf, tmp_path / "ckpt")
    llm = LLM(path, device="cpu", dtype="float32", max_batch_size=1)
    assert llm.max_seq_len == llm.config.max_context == 128
    ids = random_prompt(100, hf.config.vocab_size, 7)
    assert rel_err(llm.logits(ids), hf_logits(hf, ids)) < 1e-4
    with pytest.raises(ValueError, match=r"must be an integer in \[2, 128\], the model's context \(with its rope"):
        LLM(path, device="cpu", dtype="float32", max_seq_len=129)


def test_moe_without_a_shared_expert_matches_hf(tmp_path):
    """shared_expert_intermediate_size 0: transformers saves a shared expert of width 0 (empty weights) and its
    gate, which contribute nothing; the checkpoint loads as a MoE without a shared expert."""
    hf = build_hf_model("moe", seed=8, shared_expert_intermediate_size=0)
    path = save_hf_model(hf, tmp_path / "ckpt")
    llm = LLM(path, device="cpu", dtype="float32", max_seq_len=64, max_batch_size=1)
    assert llm.model.weights.layers[0].mlp.shared_gate_up is None
    ids = random_prompt(20, hf.config.vocab_size, 8)
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
    """The Triton kernels (through the interpreter on CPU) inside the whole model: prompt logits, then 40 greedy
    tokens and the logits of every decode step."""
    path, hf = hf_checkpoints[name]
    llm = LLM(path, dtype="float32", backend="triton", max_seq_len=128, max_batch_size=2)
    assert llm.backend.name == "triton"
    ids = random_prompt(45, hf.config.vocab_size, 2)
    assert rel_err(llm.logits(ids).cpu(), hf_logits(hf, ids)) < 1e-4
    prompt = random_prompt(11, hf.config.vocab_size, 3)
    out, logits = generate_recording_logits(llm, prompt, GREEDY)
    assert out.token_ids == hf_greedy(hf, prompt, 40)
    assert_steps_match_hf(hf, prompt, out, logits)

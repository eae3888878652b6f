"""SamplingParams(logprobs=N): each generated token's log-probability and the N most likely tokens at its step, from
the model's distribution before any sampling transform, computed on the device beside the sampler (prefill's first
token and every decode step), checked against log_softmax of the full-sequence logits."""

from __future__ import annotations

import math

import pytest
import torch

from qwen2rt import LLM, SamplingParams

TOL = 1e-4  # fp32 log-probabilities of the same logits computed in another order (prefill vs decode)


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", device="cpu", dtype="float32", max_seq_len=96, max_batch_size=4)


def reference(llm, prompt, out):
    """log_softmax of the full-sequence logits at each generated token's step: [len(out), V]."""
    logits = llm.logits(prompt + out.token_ids[:-1])
    return torch.log_softmax(logits[len(prompt) - 1:].float(), dim=-1)


def test_greedy_logprobs_match_the_models_distribution(llm):
    prompt = [5, 17, 101, 3, 64]
    out = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=5))[0]
    ref = reference(llm, prompt, out)
    assert len(out.logprobs) == len(out.token_ids) == 6
    for step, (token, (chosen, top)) in enumerate(zip(out.token_ids, out.logprobs)):
        assert abs(chosen - ref[step, token].item()) < TOL
        assert [t for t, _ in top] == ref[step].topk(5).indices.tolist()
        assert max(abs(lp - ref[step, t].item()) for t, lp in top) < TOL
        assert top[0][0] == token  # greedy: the chosen token is the most likely one
        assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))
    # the tolerance is tight: the next step's distribution (a token dropped) is far from it
    assert abs(out.logprobs[1][0] - ref[0, out.token_ids[1]].item()) > 100 * TOL


def test_prompt_logprobs_are_the_models_distribution_over_the_prompt():
    """prompt_logprobs = 3: None for the first prompt token, then each token's log-probability given those before
    it and the top 3, equal to log_softmax of the full-sequence logits, with the prompt prefilled in chunks of 16
    tokens, beside a request without them in the same steps; the first output token is not among them. The
    tolerance is tight (the previous position's distribution is far). A repeated prompt reads no prefix-cache block
    (its positions are all computed); one without prompt_logprobs then hits the cache."""
    llm = LLM("tiny", device="cpu", dtype="float32", max_seq_len=96, max_batch_size=4, max_prefill_tokens=16)
    prompt = torch.randint(0, 256, (45,), generator=torch.Generator().manual_seed(3)).tolist()
    other = [7, 8, 9]
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=3)
    seqs = [llm.new_request(other, SamplingParams(max_tokens=2)), llm.new_request(prompt, params)]
    llm.submit(seqs)  # the prompt_logprobs request second in its prefill steps: its rows start past the other's
    while not all(s.finished for s in seqs):
        llm.step()
    plain, out = (llm._output([s]) for s in seqs)
    ref = torch.log_softmax(llm.logits(prompt).float(), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        chosen, top = out.prompt_logprobs[pos]
        assert abs(chosen - ref[pos - 1, prompt[pos]].item()) < TOL
        assert [t for t, _ in top] == ref[pos - 1].topk(3).indices.tolist()
        assert max(abs(lp - ref[pos - 1, t].item()) for t, lp in top) < TOL
    # an off-by-one position is far outside the tolerance (tiny's distributions are near-uniform: ~80x)
    assert max(abs(out.prompt_logprobs[p][0] - ref[p - 2, prompt[p]].item()) for p in range(2, len(prompt))) > 10 * TOL
    assert plain.prompt_logprobs is None and plain.token_ids == llm.generate([other], SamplingParams(
        max_tokens=2, seed=seqs[0].seed))[0].token_ids
    again = llm.generate([prompt], params)[0]
    assert again.num_cached_tokens == 0 and len(again.prompt_logprobs) == len(prompt)  # alone: other GEMM rows
    assert max(abs(a[0] - b[0]) for a, b in zip(again.prompt_logprobs[1:], out.prompt_logprobs[1:])) < TOL
    assert llm.generate([prompt], SamplingParams(max_tokens=2))[0].num_cached_tokens == 32
    assert llm.generate([prompt], SamplingParams(max_tokens=2))[0].prompt_logprobs is None


def test_sampled_logprobs_are_before_penalties_and_temperature(llm):
    prompt = [9, 9, 9, 40, 41]
    params = SamplingParams(max_tokens=8, temperature=0.7, top_k=8, repetition_penalty=1.5, presence_penalty=1.0,
                            seed=11, ignore_eos=True, logprobs=2)
    out = llm.generate([prompt], params)[0]
    ref = reference(llm, prompt, out)
    chosen = torch.tensor([c for c, _ in out.logprobs])
    expected = ref.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(chosen, expected, rtol=0, atol=TOL)
    # the transformed distribution (temperature alone) is far from what is reported
    tempered = torch.log_softmax(ref / 0.7, dim=-1).gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert (tempered - expected).abs().max() > 100 * TOL
    assert all(len(top) == 2 for _, top in out.logprobs)


def test_logprobs_change_no_token_and_other_rows_get_none(llm):
    prompts = [[1, 2, 3], [7, 8, 9, 10], [50, 60]]
    sampled = dict(max_tokens=5, temperature=0.9, seed=4, ignore_eos=True)
    plain = llm.generate(prompts, SamplingParams(**sampled))
    mixed = llm.generate(prompts[:1], SamplingParams(**sampled, logprobs=0)) + llm.generate(
        prompts[1:], SamplingParams(**sampled))
    assert [o.token_ids for o in mixed] == [o.token_ids for o in plain]
    assert [len(top) for _, top in mixed[0].logprobs] == [0] * 5
    assert all(math.isfinite(c) and c <= 0 for c, _ in mixed[0].logprobs)
    assert mixed[1].logprobs is None and plain[0].logprobs is None
    # one batch, rows with and without logprobs (a decode step computes them for the batch, hands them to some)
    seqs = [llm._new_sequence(p, SamplingParams(**sampled, logprobs=n).resolved())
            for p, n in zip(prompts, (3, None, 1))]
    llm.submit(seqs)
    while not all(s.finished for s in seqs):
        llm.step()
    assert [s.output_ids for s in seqs] == [o.token_ids for o in plain]
    assert [None if s.logprobs is None else len(s.logprobs[0][1]) for s in seqs] == [3, None, 1]


@pytest.mark.parametrize("value", [-1, 21, 2.0, True])
def test_bad_logprobs(value):
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=value)


@pytest.mark.gpu
def test_logprobs_in_cuda_graphs_equal_eager():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=2, ignore_eos=True, logprobs=4)
    graphs = LLM("tiny", device="cuda", dtype="float32", max_batch_size=4).generate(prompts, params)
    eager = LLM("tiny", device="cuda", dtype="float32", max_batch_size=4, enforce_eager=True).generate(prompts, params)
    for g, e in zip(graphs, eager):
        assert g.token_ids == e.token_ids
        for (gc, gt), (ec, et) in zip(g.logprobs, e.logprobs):
            assert abs(gc - ec) < TOL and [t for t, _ in gt] == [t for t, _ in et]

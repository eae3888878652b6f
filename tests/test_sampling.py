"""SamplingParams validation and defaults; the sampler's filters and penalties against Hugging Face's logits
processors; the draw against the distribution it samples."""

from __future__ import annotations

import math

import pytest
import torch

from qwen2rt import SamplingParams
from qwen2rt.sampling import (GREEDY_TEMPERATURE, TOPK_CANDIDATES, SamplerState, apply_penalties,
                              defaults_from_generation_config, filter_sorted_logits, hash_uniform, ordered_candidates,
                              row_values, rows_tensor, sample_tokens, sampler_variant)


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", 2.5), ("temperature", -0.1), ("temperature", float("nan")),
    ("top_k", -2), ("top_k", 1.5), ("top_k", 2 ** 63), ("top_p", 0.0), ("top_p", 1.01), ("min_p", -0.1), ("min_p", 2),
    ("repetition_penalty", 0.0), ("presence_penalty", 2.5), ("frequency_penalty", -3), ("stop", ""),
    ("stop", ["ok", ""]), ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]), ("ignore_eos", 1),
    ("seed", -5), ("seed", "x"), ("min_tokens", -1), ("min_tokens", 1.0), ("logit_bias", [(1, 2.0)]),
    ("logit_bias", {"1": 2.0}), ("logit_bias", {-1: 2.0}), ("logit_bias", {1: 101}), ("logit_bias", {1: float("nan")}),
    ("logit_bias", {True: 1.0}), ("logit_bias", {1: 10 ** 400}), ("temperature", 10 ** 400), ("min_tokens", 2 ** 31),
    ("allowed_token_ids", []), ("allowed_token_ids", 5), ("allowed_token_ids", [1, -1]), ("allowed_token_ids", [True]),
    ("allowed_token_ids", {1: 2}), ("truncate_prompt_tokens", 0), ("truncate_prompt_tokens", -2),
    ("truncate_prompt_tokens", 1.5), ("truncate_prompt_tokens", True),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_min_tokens_past_max_tokens_and_logit_bias_copy():
    with pytest.raises(ValueError) as error:  # a bad entry is named, not the whole mapping echoed
        SamplingParams(logit_bias={**{i: 1.0 for i in range(10_000)}, 7: 500})
    assert len(str(error.value)) < 200 and "token 7" in str(error.value)
    with pytest.raises(ValueError, match=r"SamplingParams.min_tokens = 9: must be at most max_tokens \(8\)"):
        SamplingParams(max_tokens=8, min_tokens=9)
    with pytest.raises(ValueError, match="min_tokens"):  # max_tokens from the defaults
        SamplingParams(min_tokens=17).resolved()
    bias = {5: 1.5}
    p = SamplingParams(logit_bias=bias, min_tokens=3)
    bias[5] = 99.0  # the params keep their own copy
    assert p.resolved().logit_bias == {5: 1.5} and p.resolved().min_tokens == 3
    assert SamplingParams().resolved().min_tokens == 0 and SamplingParams().resolved().logit_bias is None
    hash(p)  # the dict is left out of the hash


def test_reset_replaces_what_a_slot_held_for_its_last_request():
    state = SamplerState(2, 50, "cpu")
    state.reset(0, [1, 2], {3: 2.0, 9: -1.0}, {4, 60})  # 60 is past the vocabulary: never drawn, dropped
    assert state.bias[0].nonzero().flatten().tolist() == [3, 9] and state.bias[0, 3] == 2.0
    assert state.held[0].nonzero().flatten().tolist() == [4]
    state.reset(0, [5], None, set())  # min_tokens with nothing to hold (ignore_eos, no stop ids)
    assert not state.held[0].any()
    state.reset(0, [5], {7: -1.0}, None)
    assert state.bias[0].nonzero().flatten().tolist() == [7]
    state.reset(0, [5], {7: -1.0, 8: 2.0}, None, (), (8, 30, 8))  # allowed_token_ids: -inf but there, with bias
    assert torch.isinf(state.bias[0]).sum() == 48 and state.bias[0, 8] == 2.0 and state.bias[0, 30] == 0.0
    assert state.bias[0, 7] == float("-inf")
    state.reset(0, [5], {7: -1.0}, None)  # the next request's row has none of it
    assert state.bias[0].nonzero().flatten().tolist() == [7]
    assert state.seen[0].nonzero().flatten().tolist() == [5] and not state.counts[0].any()


def test_unknown_field_is_an_error():
    with pytest.raises(TypeError, match="tempreature"):
        SamplingParams(tempreature=0.5)


def test_generation_config_defaults_unless_overridden():
    # Qwen2-7B-Instruct's generation_config.json
    gc = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
          "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
          "transformers_version": "4.37.0"}
    defaults = defaults_from_generation_config(gc)
    p = SamplingParams(top_p=0.5, max_tokens=3).resolved(defaults)
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.max_tokens) == (0.7, 20, 0.5, 1.05, 3)
    assert SamplingParams(temperature=0).resolved(defaults).greedy
    base = defaults_from_generation_config({"do_sample": False, "max_new_tokens": 2048})
    q = SamplingParams().resolved(base)
    assert q.greedy and q.max_tokens == 2048 and q.top_p == 1.0 and q.stop == ()


def hf_filtered(logits, temperature, top_k, top_p, min_p):
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    x = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k > 0:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(None, x)
    if min_p > 0:
        x = MinPLogitsWarper(min_p)(None, x)
    return torch.softmax(x, dim=-1)


def filter_logits(logits, temperature, top_k, top_p, min_p, variant="full"):
    """The sampler's filters in vocabulary order: [B, V] logits, per-row parameters [B] -> probabilities [B, V],
    on the candidates the sampler form `variant` sees (the whole vocabulary, or the TOPK_CANDIDATES largest)."""
    n = logits.shape[1] if variant == "full" else min(TOPK_CANDIDATES, logits.shape[1])
    sorted_logits, order = ordered_candidates(logits / temperature[:, None], n)
    return torch.zeros_like(logits).scatter(1, order, filter_sorted_logits(sorted_logits, top_k, top_p, min_p))


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 20, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (0.5, 0, 1.0, 0.1), (0.9, 40, 0.9, 0.05),
    (1.0, 1, 1.0, 0.0), (2.0, 0, 0.3, 0.0), (1.0, 1000, 1.0, 0.0),
])
def test_filters_match_hf(temperature, top_k, top_p, min_p):
    torch.manual_seed(top_k + int(100 * top_p))
    logits = torch.randn(5, 313) * 3
    ours = filter_logits(logits, torch.full((5,), temperature), torch.full((5,), top_k), torch.full((5,), top_p),
                         torch.full((5,), min_p))
    ref = hf_filtered(logits, temperature, top_k, top_p, min_p)
    assert torch.equal(ours > 0, ref > 0)  # same kept set
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


def test_per_row_parameters_are_independent():
    logits = torch.randn(3, 50)
    probs = filter_logits(logits, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1, 0, 5]), torch.tensor([1.0, 1.0, 1.0]),
                          torch.tensor([0.0, 0.0, 0.0]))
    assert (probs[0] > 0).sum() == 1 and (probs[1] > 0).sum() == 50 and (probs[2] > 0).sum() == 5


def penalty_inputs(prompt, output, vocab):
    seen = torch.zeros(1, vocab, dtype=torch.bool)
    seen[0, prompt + output] = True
    counts = torch.zeros(1, vocab, dtype=torch.int32)
    for t in output:
        counts[0, t] += 1
    return seen, counts


def test_repetition_penalty_matches_hf():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(1, 100)
    prompt, output = [3, 7, 7, 99], [12, 3, 50]
    seen, counts = penalty_inputs(prompt, output, 100)
    ours = apply_penalties(logits, seen, counts, torch.tensor([1.3]), torch.tensor([0.0]), torch.tensor([0.0]))
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(ours, ref)


def test_presence_and_frequency_penalties_on_output_only():
    seen, counts = penalty_inputs([1, 2], [2, 2, 5], 10)
    out = apply_penalties(torch.zeros(1, 10), seen, counts, torch.tensor([1.0]), torch.tensor([0.5]),
                          torch.tensor([0.25]))
    expected = torch.zeros(10)
    expected[2] = -(0.5 + 2 * 0.25)
    expected[5] = -(0.5 + 0.25)
    torch.testing.assert_close(out[0], expected)


def test_neutral_penalties_change_nothing():
    logits = torch.randn(2, 50)
    seen = torch.rand(2, 50) > 0.5
    counts = torch.randint(0, 3, (2, 50), dtype=torch.int32)
    out = apply_penalties(logits, seen, counts, torch.ones(2), torch.zeros(2), torch.zeros(2))
    assert torch.equal(out, logits)


def test_hash_uniforms():
    u = hash_uniform(torch.arange(64), torch.zeros(64, dtype=torch.long), torch.arange(5000)[None, :])
    assert u.shape == (64, 5000) and (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert not torch.equal(u[0], u[1])  # seeds differ
    again = hash_uniform(torch.tensor([5, 5]), torch.tensor([0, 1]), torch.arange(5000)[None, :])
    torch.testing.assert_close(again[0], u[5], rtol=0, atol=0)  # a pure function of (seed, step, token)
    assert not torch.equal(again[0], again[1])  # steps differ


def rows_for(params, seeds, steps, slots):
    return rows_tensor([row_values(p, s, t, slot) for p, s, t, slot in zip(params, seeds, steps, slots)], "cpu")


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 4000
    p = SamplingParams(temperature=1.0).resolved()
    state = SamplerState(1, 4, "cpu")
    rows = rows_for([p] * n, range(n), [0] * n, [state.padding_slot] * n)  # 4000 requests, 4000 seeds
    tokens = sample_tokens(probs.log()[None].repeat(n, 1), rows, state)
    freq = torch.bincount(tokens, minlength=4).float() / n
    assert (freq - probs).abs().max() < 0.03  # ~4 standard errors at n=4000


def test_greedy_rows_seeds_and_recorded_tokens():
    logits = torch.randn(3, 64)
    greedy = SamplingParams(temperature=0).resolved()
    hot = SamplingParams(temperature=1.0).resolved()
    state = SamplerState(3, 64, "cpu")
    out = sample_tokens(logits, rows_for([greedy, hot, hot], [1, 2, 3], [0, 0, 0], [0, 1, 2]), state)
    assert out[0] == logits[0].argmax()
    again = sample_tokens(logits[1:2], rows_for([hot], [2], [0], [1]), state)
    assert again[0] == out[1]  # same seed and step, alone in the batch: same token
    assert state.counts[1, out[1]] == 2 and state.seen[0, out[0]] and state.counts[2].sum() == 1
    fast = sample_tokens(logits, rows_for([greedy] * 3, [0] * 3, [0] * 3, [0, 1, 2]), state, "greedy")
    assert torch.equal(fast, logits.argmax(-1))


def test_sampler_variant_is_the_cheapest_exact_one():
    greedy = SamplingParams(temperature=0).resolved()
    penalised = SamplingParams(temperature=0, repetition_penalty=1.1).resolved()
    top20 = SamplingParams(temperature=0.7, top_k=20, top_p=0.8).resolved()
    nucleus = SamplingParams(temperature=0.7, top_p=0.8).resolved()  # top_k off: needs the whole vocabulary
    assert sampler_variant([greedy, greedy]) == "greedy"
    assert sampler_variant([greedy, penalised]) == "topk"
    assert sampler_variant([greedy, top20, SamplingParams(top_k=TOPK_CANDIDATES).resolved()]) == "topk"
    assert sampler_variant([top20, SamplingParams(top_k=TOPK_CANDIDATES + 1).resolved()]) == "full"
    assert sampler_variant([top20, nucleus]) == "full"
    with pytest.raises(ValueError, match="sampler variant"):
        sample_tokens(torch.randn(1, 8), rows_for([greedy], [0], [0], [0]), SamplerState(1, 8, "cpu"), "fast")


def test_candidates_are_strictly_ordered_ties_toward_the_lower_id():
    logits = torch.randn(6, 3000).bfloat16().float()  # bf16 values: many exact ties, as real logits have
    logits[:, 100] = logits[:, 7] = logits.max() + 1  # a tie at the very top
    top, ids = ordered_candidates(logits, 3000)
    assert torch.equal(top, logits.sort(dim=-1, descending=True).values)
    keys = top * 1e5 - ids  # descending values, ascending ids among equal values
    assert (ids[:, 0] == 7).all() and (ids[:, 1] == 100).all()
    assert ((top[:, :-1] > top[:, 1:]) | ((top[:, :-1] == top[:, 1:]) & (ids[:, :-1] < ids[:, 1:]))).all(), keys
    assert torch.equal(ids[:, 0], logits.argmax(dim=-1))  # argmax also takes the first of equals
    top_k, ids_k = ordered_candidates(logits, 50)
    assert torch.equal(ids_k, ids[:, :50]) and torch.equal(top_k, top[:, :50])


def test_topk_variant_draws_what_the_full_sampler_draws():
    """Every row the top-k form accepts gets the same token from it as from the full sort, penalties included, on
    bf16-valued logits full of ties."""
    torch.manual_seed(0)
    b, vocab = 96, 2000
    logits = (3 * torch.randn(b, vocab)).bfloat16().float()
    g = torch.Generator().manual_seed(1)
    params = []
    for i in range(b):
        pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
        params.append(SamplingParams(
            temperature=pick([0.0, 0.5, 1.0, 1.7]), top_k=pick([1, 5, 20, 64, TOPK_CANDIDATES]),
            top_p=pick([1.0, 0.9, 0.5]), min_p=pick([0.0, 0.05]), repetition_penalty=pick([1.0, 1.2]),
            presence_penalty=pick([0.0, 0.5]), frequency_penalty=pick([0.0, 0.3])).resolved())
    assert sampler_variant(params) == "topk"
    tokens = {}
    for variant in ("topk", "full"):
        state = SamplerState(b, vocab, "cpu")
        for slot in range(b):
            state.reset(slot, list(range(slot, slot + 30)))
            state.counts[slot, slot:slot + 10] = 2
        rows = rows_for(params, range(100, 100 + b), [3] * b, range(b))
        tokens[variant] = sample_tokens(logits.clone(), rows, state, variant)
    assert torch.equal(tokens["topk"], tokens["full"])
    greedy_rows = torch.tensor([p.greedy for p in params])
    assert greedy_rows.any() and (~greedy_rows).any()


def test_hf_top_p_keeps_two_of_four_tied_tokens_at_half():
    """The oracle's boundary rule, pinned: a token goes once the mass before it reaches top_p exactly."""
    assert (hf_filtered(torch.zeros(1, 4), 1.0, 0, 0.5, 0.0) > 0).sum() == 2


def tied_rows(rows, vocab, tied, seed):
    """[rows, vocab] logits, each row with `tied` equal maxima at random ids and the rest ~200 below them: the tied
    tokens' probabilities are exactly 1 / tied (exp(-200) underflows to 0 in float32), so a top_p that is a
    multiple of 1 / tied equals the mass before one of them exactly."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) - 200
    for row in logits:
        row[torch.randperm(vocab, generator=g)[:tied]] = 3 * torch.randn((), generator=g)
    return logits


@pytest.mark.parametrize("variant, vocab, tied, top_k", [("full", 4, 4, 0), ("full", 300, 8, 0), ("topk", 300, 8, 8)])
def test_top_p_on_tied_logits_matches_hf(variant, vocab, tied, top_k):
    """When the mass before a token equals top_p exactly, HF's TopPLogitsWarper drops it; so must both sampler
    forms. HF keeps whichever tied tokens its sort puts first, so probabilities are compared sorted; ours keeps the
    lowest ids. (The top-k form sees 256 of the 300 tokens; top_k = 8 keeps all 8 tied maxima: HF keeps every
    token equal to the k-th logit, a strict order exactly k, which agree when no tie straddles the k-th place.)"""
    top_ps = [j / tied for j in range(1, tied)] + [0.3, 0.99]
    logits = tied_rows(len(top_ps), vocab, tied, seed=vocab + top_k)
    b = len(top_ps)
    for temperature in (1.0, 0.7):
        ours = filter_logits(logits, torch.full((b,), temperature), torch.full((b,), top_k), torch.tensor(top_ps),
                             torch.zeros(b), variant)
        for row, top_p in enumerate(top_ps):
            ref = hf_filtered(logits[row:row + 1], temperature, top_k, top_p, 0.0)[0]
            expected_kept = math.ceil(tied * top_p - 1e-9)  # the tokens with less than top_p before them
            assert (ref > 0).sum() == expected_kept and (ours[row] > 0).sum() == expected_kept, (top_p, temperature)
            torch.testing.assert_close(ours[row].sort().values, ref.sort().values, rtol=1e-6, atol=0)
            tied_ids = (logits[row] == logits[row].max()).nonzero()[:, 0]  # ascending
            assert torch.equal((ours[row] > 0).nonzero()[:, 0], tied_ids[:expected_kept])


@pytest.mark.parametrize("variant", ["topk", "full"])
def test_draws_stay_inside_the_top_p_set_on_tied_logits(variant):
    """Through sample_tokens itself: over many seeds (at a later step), the drawn tokens are exactly the tokens the
    top-p rule keeps, the boundary token excluded."""
    vocab, tied, n = 300, 8, 400
    top_ps = [0.125, 0.25, 0.5, 0.625]
    logits = tied_rows(len(top_ps), vocab, tied, seed=11)
    for row, top_p in enumerate(top_ps):
        p = SamplingParams(temperature=0.8, top_k=tied if variant == "topk" else 0, top_p=top_p).resolved()
        assert sampler_variant([p]) == variant
        state = SamplerState(1, vocab, "cpu")
        rows = rows_for([p] * n, range(1000, 1000 + n), [5] * n, [state.padding_slot] * n)
        drawn = set(sample_tokens(logits[row:row + 1].repeat(n, 1), rows, state, variant).tolist())
        ref = hf_filtered(logits[row:row + 1], 0.8, 0, top_p, 0.0)[0]
        assert len(drawn) == (ref > 0).sum() == round(tied * top_p), top_p
        tied_ids = (logits[row] == logits[row].max()).nonzero()[:, 0]
        assert drawn == set(tied_ids[:len(drawn)].tolist())  # ties toward the lower id


@pytest.mark.parametrize("step", [1, 2, 7, 1000, 2 ** 31 - 1])
def test_every_step_of_the_hash_depends_on_the_seed(step):
    """Two seeds must give different uniforms at every step, not only at step 0 (a hash that dropped the seed after
    the first token would still pass a first-token check); seeds that differ only in their high 32 bits too."""
    seeds = torch.tensor(list(range(32)) + [5 + (1 << 32), 5 + (7 << 40), 2 ** 63 - 1])
    u = hash_uniform(seeds, torch.full_like(seeds, step), torch.arange(2000)[None, :])
    for i in range(len(seeds)):
        for j in range(i):
            assert (u[i] != u[j]).float().mean() > 0.99, (seeds[i].item(), seeds[j].item())
    assert abs(u.mean().item() - 0.5) < 0.01


def test_seeds_give_different_draws_at_later_steps():
    """Uniform logits over 1000 tokens at step 5: 64 seeds draw (nearly) 64 different tokens; one seed at 64 steps
    also varies; the same (seed, step) draws the same token."""
    vocab, n = 1000, 64
    p = SamplingParams(temperature=1.0).resolved()
    state = SamplerState(1, vocab, "cpu")
    logits = torch.full((n, vocab), 0.5)
    by_seed = sample_tokens(logits, rows_for([p] * n, range(n), [5] * n, [state.padding_slot] * n), state)
    by_step = sample_tokens(logits, rows_for([p] * n, [3] * n, range(1, n + 1), [state.padding_slot] * n), state)
    assert len(set(by_seed.tolist())) > n - 8 and len(set(by_step.tolist())) > n - 8
    again = sample_tokens(logits[:2], rows_for([p] * 2, [0, 1], [5, 5], [state.padding_slot] * 2), state)
    assert torch.equal(again, by_seed[:2])


def test_a_temperature_below_greedy_temperature_is_greedy():
    """Logits divided by a subnormal temperature overflow (the Triton sampler then drew garbage): below 1e-5, as in
    vLLM, a request is greedy, and its sampler row says temperature 0."""
    for t in (0.0, 1e-40, GREEDY_TEMPERATURE / 2):
        p = SamplingParams(temperature=t).resolved()
        assert p.greedy and row_values(p, 0, 0, 0)[0] == 0.0
    p = SamplingParams(temperature=GREEDY_TEMPERATURE).resolved()
    assert not p.greedy and row_values(p, 0, 0, 0)[0] == GREEDY_TEMPERATURE

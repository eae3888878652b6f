"""The Python API: prompt forms, streaming, chat, stop conditions, limits, bad input (and the engine still working
after it), waiting for cache space, threads, cancellation."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
import torch

from qwen2rt import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(real_tok_dir):
    return LLM(real_tok_dir, device="cpu", max_seq_len=128, max_batch_size=4)


@pytest.fixture(scope="module")
def tiny():
    return LLM("tiny", device="cpu", max_seq_len=256, max_batch_size=4)


def test_defaults_and_generation_config(llm):
    assert llm.device.type == "cpu" and llm.dtype == torch.float32 and llm.backend.name == "torch"
    assert llm.max_seq_len == 128
    assert llm.generation_defaults == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    assert {151645, 151643} <= llm.eos_token_ids


def test_prompt_forms(llm):
    ids = llm.tokenizer.encode("Hello there")
    outs = llm.generate("Hello there", GREEDY)
    assert len(outs) == 1 and outs[0].prompt_token_ids == ids and outs[0].prompt_len == len(ids)
    assert llm.generate(ids, GREEDY)[0].token_ids == outs[0].token_ids
    many = llm.generate(["Hello there", "Guten Tag", "你好"], GREEDY)
    assert [o.prompt for o in many] == ["Hello there", "Guten Tag", "你好"]
    assert many[0].token_ids == outs[0].token_ids
    lists = llm.generate([ids, llm.tokenizer.encode("Guten Tag")], GREEDY)
    assert [o.token_ids for o in lists] == [o.token_ids for o in many[:2]]
    o = outs[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 24
    assert o.text == llm.tokenizer.decode(o.token_ids)
    assert o.time_to_first_token_s > 0 and o.decode_tokens_per_s > 0


def test_stream_equals_generate(llm):
    for prompt in ("Once upon a time", "Größe und 你好 👋"):
        for params in (GREEDY, SamplingParams(max_tokens=30, temperature=1.0, seed=3, ignore_eos=True)):
            text = llm.generate(prompt, params)[0].text
            pieces = list(llm.stream(prompt, params))
            # (a random model emits stray byte tokens, so U+FFFD may be part of the text itself; the tokenizer
            # tests check on real text that no piece splits a character)
            assert len(pieces) > 1 and "".join(pieces) == text


def test_chat_uses_the_template(llm):
    messages = [{"role": "user", "content": "Hi!"}]
    out = llm.chat(messages, GREEDY)
    expected = llm.tokenizer.encode("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    assert out.prompt_token_ids == expected


def test_chat_takes_a_batch_of_conversations(llm):
    """vLLM's chat also takes a list of conversations: one reply each, in order, as each alone; params one for all
    or one per conversation."""
    convs = [[{"role": "user", "content": "Hi!"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."}]]
    alone = [llm.chat(c, GREEDY) for c in convs]
    outs = llm.chat(convs, GREEDY)
    assert isinstance(outs, list) and [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert [o.prompt_token_ids for o in outs] == [o.prompt_token_ids for o in alone]
    short = dataclasses.replace(GREEDY, max_tokens=3)
    assert [len(o.token_ids) for o in llm.chat(convs, [short, GREEDY])] == [3, GREEDY.max_tokens]
    with pytest.raises(ValueError, match="a list of 1 SamplingParams for 2 prompts"):
        llm.chat(convs, [GREEDY])


def test_chat_continues_a_final_message(llm):
    """continue_final_message (vLLM's and HF's): the prompt ends inside the caller's begun assistant reply and the
    reply is its continuation: the same tokens as generating from that text; it needs add_generation_prompt=False."""
    messages = [{"role": "user", "content": "Give me JSON."}, {"role": "assistant", "content": '{"name": "'}]
    out = llm.chat(messages, GREEDY, add_generation_prompt=False, continue_final_message=True)
    text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith('{"name": "') and out.prompt_token_ids == llm.tokenizer.encode(text)
    assert out.token_ids == llm.generate(text, GREEDY)[0].token_ids
    assert out.prompt_token_ids != llm.chat(messages, GREEDY, add_generation_prompt=False).prompt_token_ids
    with pytest.raises(ValueError, match="cannot both be true"):
        llm.chat(messages, GREEDY, continue_final_message=True)


def test_chat_renders_tools_with_the_checkpoints_template(llm):
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Time?"}]
    with_tools = llm.chat(messages, dataclasses.replace(GREEDY, max_tokens=1), tools=tools)
    text = llm.tokenizer.decode(with_tools.prompt_token_ids, skip_special_tokens=False)
    assert '"name": "get_time"' in text and "<tools>" in text
    assert "<tools>" not in llm.tokenizer.decode(llm.chat(messages, dataclasses.replace(GREEDY, max_tokens=1))
                                                 .prompt_token_ids, skip_special_tokens=False)


def test_stop_strings(llm):
    base = llm.generate("Tell me a story", GREEDY)[0]
    assert len(base.text) > 12
    stop = base.text[8:11]
    cut = base.text.find(stop)
    out = llm.generate("Tell me a story", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == base.text[:cut]
    assert out.token_ids == base.token_ids[: len(out.token_ids)]
    streamed = "".join(llm.stream("Tell me a story",
                                  SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=stop)))
    assert streamed == out.text


def test_include_stop_str_in_output_and_skip_special_tokens(llm, tiny):
    """include_stop_str_in_output keeps the stop string (streamed alike, nothing held back) and the stop token's
    text; skip_special_tokens=False writes special tokens out (vLLM's two options)."""
    base = llm.generate("Tell me a story", GREEDY)[0]
    stop = base.text[8:11]
    cut = base.text.find(stop)
    kept = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    out = llm.generate("Tell me a story", kept)[0]
    assert out.finish_reason == "stop" and out.text == base.text[:cut + len(stop)]
    assert "".join(llm.stream("Tell me a story", kept)) == out.text
    im_end = 258  # the byte tokenizer's <|im_end|>, an eos id
    forced = dict(max_tokens=8, temperature=0, min_tokens=2, logit_bias={im_end: 100.0})
    out = tiny.generate("abc", SamplingParams(**forced))[0]
    assert out.token_ids[-1] == im_end and len(out.token_ids) == 3 and "<|im_end|>" not in out.text
    decode = tiny.tokenizer.decode
    for skip in (True, False):
        for include in (True, False):
            text = tiny.generate("abc", SamplingParams(**forced, include_stop_str_in_output=include,
                                                       skip_special_tokens=skip))[0].text
            assert text == decode(out.token_ids if include else out.token_ids[:-1], skip_special_tokens=skip)
    assert decode([im_end], skip_special_tokens=False) == "<|im_end|>"
    written = tiny.generate([[65, 257, 66]], SamplingParams(max_tokens=2, logit_bias={257: 100.0},
                                                            skip_special_tokens=False))[0]
    assert written.text == "<|im_start|><|im_start|>"
    assert tiny.generate([[65]], SamplingParams(max_tokens=2, logit_bias={257: 100.0}))[0].text == ""


def test_stop_token_ids_and_eos(llm):
    base = llm.generate("abc", GREEDY)[0]
    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    out = llm.generate("abc", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                             stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: first + 1]
    assert out.text == llm.tokenizer.decode(base.token_ids[:first])  # the stop token's text is not included


def test_min_tokens_holds_back_stop_ids_eos_and_stop_strings(llm):
    """min_tokens: a stop id (or eos) the greedy run would pick at index 2 gets no probability before index 6, so the
    tokens differ from there and a stop id may end the request only from index 6 on; a stop string completed before
    then is passed over (vLLM's rule). Without min_tokens each of them stops the request early: the cases are not
    vacuous."""
    prompt = "min tokens"
    base = llm.generate(prompt, GREEDY)[0]
    stop_id = base.token_ids[2]
    assert stop_id not in base.token_ids[:2]
    plain = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=[stop_id])
    assert llm.generate(prompt, plain)[0].token_ids == base.token_ids[:3]
    held = dataclasses.replace(plain, min_tokens=6)
    out = llm.generate(prompt, held)[0]
    assert out.token_ids[:2] == base.token_ids[:2] and out.token_ids[2] != stop_id
    assert stop_id not in out.token_ids[:6]
    assert out.finish_reason == "length" or (out.token_ids[-1] == stop_id and len(out.token_ids) > 6)
    assert "".join(llm.stream(prompt, held)) == out.text
    # eos counts as a stop id unless ignore_eos
    saved = llm.eos_token_ids
    llm.eos_token_ids = frozenset({stop_id})
    try:
        eos_held = SamplingParams(max_tokens=24, temperature=0, min_tokens=6)
        assert llm.generate(prompt, eos_held)[0].token_ids == out.token_ids
        assert llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0))[0].token_ids == base.token_ids[:3]
    finally:
        llm.eos_token_ids = saved
    # a stop string that the min_tokens-th token completes is passed over (vLLM V1 looks for stop strings only past
    # min_tokens tokens); one completed later still stops the request; without min_tokens it stops at once
    text, decode = base.text, llm.tokenizer.decode
    m = next(m for m in range(3, 12) if text.startswith(decode(base.token_ids[:m])) and len(decode(base.token_ids[:m]))
             > len(decode(base.token_ids[:m - 1])) >= 2)
    head = decode(base.token_ids[:m])
    stop = head[-2:]  # ends inside the m-th token's text
    first = text.find(stop)
    stopped = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[:first] and first + 2 <= len(head)
    late = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop],
                                               min_tokens=m))[0]
    assert late.token_ids[:m] == base.token_ids[:m]
    rest = text.find(stop, len(head) - len(stop) + 2)  # an occurrence that ends past the first m tokens' text
    if rest < 0:
        assert late.finish_reason == "length" and late.text == text
    else:
        assert late.finish_reason == "stop" and late.text == text[:rest]
    # min_tokens past what the context leaves the request: an error naming it (128-token context)
    with pytest.raises(ValueError, match=r"SamplingParams.min_tokens = 30: more than the 18 tokens"):
        llm.generate([list(range(1000, 1110))], SamplingParams(max_tokens=30, min_tokens=30))


def test_logit_bias(llm):
    """+100 on a token makes greedy decoding emit nothing else; -100 on each greedy token in turn changes the first
    one; ids past the vocabulary are an error that leaves the engine usable."""
    base = llm.generate("bias", GREEDY)[0]
    forced = next(t for t in range(50, 100) if t not in base.token_ids)
    out = llm.generate("bias", dataclasses.replace(GREEDY, logit_bias={forced: 100.0}))[0]
    assert out.token_ids == [forced] * len(base.token_ids)
    banned = llm.generate("bias", dataclasses.replace(GREEDY, logit_bias={base.token_ids[0]: -100.0}))[0]
    assert banned.token_ids[0] != base.token_ids[0] and base.token_ids[0] not in banned.token_ids
    # seeded sampling with a bias of 0 on every row's token: the same tokens as no bias (it only adds 0)
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    assert llm.generate("bias", dataclasses.replace(seeded, logit_bias={forced: 0.0}))[0].token_ids == \
        llm.generate("bias", seeded)[0].token_ids
    vocab = llm.config.vocab_size
    with pytest.raises(ValueError, match=f"logit_bias: token id {vocab} is outside the vocabulary"):
        llm.generate("bias", dataclasses.replace(GREEDY, logit_bias={vocab: 1.0}))
    assert llm.generate("bias", GREEDY)[0].token_ids == base.token_ids


def test_allowed_token_ids(tiny):
    """vLLM's allowed_token_ids: every token comes from the set, greedy and sampled (top-k wider than the set,
    top-p, penalties) and in a batch with unrestricted requests, which are unchanged; greedy takes the allowed token
    with the largest logit at each step (the logits recorded), a logit_bias applies inside the set; with min_tokens
    an allowed stop token waits; ids past the vocabulary, or min_tokens with only stop ids allowed, are errors."""
    from test_parity import generate_recording_logits

    allowed = [7, 99, 200, 401]
    greedy = dataclasses.replace(GREEDY, allowed_token_ids=allowed)
    out, logits = generate_recording_logits(tiny, [1, 2, 3], greedy)
    assert out.token_ids == [allowed[int(logits[i, allowed].argmax())] for i in range(len(out.token_ids))]
    assert out.token_ids != [int(t) for t in logits.argmax(dim=-1)]  # the restriction changed something
    plain = tiny.generate(["free", "x"], GREEDY)
    kw = dict(max_tokens=24, ignore_eos=True, allowed_token_ids=allowed)
    sampled = [SamplingParams(temperature=1.0, top_k=50, seed=s, repetition_penalty=1.2, **kw) for s in range(3)]
    sampled += [SamplingParams(temperature=0.9, top_p=0.7, seed=9, **kw)]
    outs = tiny.generate(["free", "a", "b", "c", "d", "x"], [GREEDY] + sampled + [GREEDY])
    assert all(set(o.token_ids) <= set(allowed) for o in outs[1:5])
    assert len({t for o in outs[1:5] for t in o.token_ids}) > 1
    assert [outs[0].token_ids, outs[5].token_ids] == [o.token_ids for o in plain]
    biased = dataclasses.replace(greedy, logit_bias={401: 100.0})
    assert tiny.generate("z", biased)[0].token_ids == [401] * GREEDY.max_tokens
    outside = dataclasses.replace(greedy, logit_bias={5: 100.0})  # a bias outside the set leaves it banned
    assert tiny.generate([[1, 2, 3]], outside)[0].token_ids == out.token_ids
    held = dataclasses.replace(GREEDY, max_tokens=6, allowed_token_ids=[7, 99], stop_token_ids=[7], min_tokens=3)
    assert tiny.generate("z", held)[0].token_ids[:3] == [99, 99, 99]
    vocab = tiny.config.vocab_size
    with pytest.raises(ValueError, match=f"allowed_token_ids: token id {vocab} is outside the vocabulary"):
        tiny.generate("z", dataclasses.replace(GREEDY, allowed_token_ids=[1, vocab]))
    with pytest.raises(ValueError, match="every token of allowed_token_ids is a stop token"):
        tiny.generate("z", dataclasses.replace(held, allowed_token_ids=[7]))
    assert not tiny.has_unfinished() and tiny.generate(["free"], GREEDY)[0].token_ids == plain[0].token_ids


def test_eos_ends_generation_unless_ignored(llm):
    base = llm.generate("hello", GREEDY)[0]
    eos = base.token_ids[3]
    saved = llm.eos_token_ids
    llm.eos_token_ids = frozenset({eos})  # pretend the 4th greedy token is the checkpoint's eos
    try:
        out = llm.generate("hello", SamplingParams(max_tokens=24, temperature=0))[0]
        assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: base.token_ids.index(eos) + 1]
        out = llm.generate("hello", GREEDY)[0]
        assert out.finish_reason == "length" and out.token_ids == base.token_ids
    finally:
        llm.eos_token_ids = saved


def test_context_limit(tiny):
    with pytest.raises(ValueError, match="prompt has 256 tokens but the context holds 256"):
        tiny.generate([[1] * 256], GREEDY)
    out = tiny.generate([[1] * 250], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6  # stopped by the context, not max_tokens
    # logits generate nothing: a whole context of tokens is fine, one more is not
    assert tiny.logits([1] * 256).shape == (256, tiny.config.vocab_size)
    with pytest.raises(ValueError, match=r"prompt has 257 tokens but the context holds 256 \(max_seq_len\)$"):
        tiny.logits([1] * 257)


def test_a_subnormal_temperature_decodes_greedily(tiny):
    want = tiny.generate("abc", GREEDY)[0].token_ids
    tiny_t = SamplingParams(max_tokens=GREEDY.max_tokens, temperature=1e-40, ignore_eos=True)
    assert tiny.generate("abc", tiny_t)[0].token_ids == want


def test_seeded_sampling_is_reproducible_in_any_batch(tiny):
    p = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = tiny.generate("abc", p)[0].token_ids
    batched = tiny.generate(["xyz", "abc", "hello world"], p)
    assert batched[1].token_ids == alone
    other = tiny.generate("abc", SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=99,
                                                ignore_eos=True))[0].token_ids
    assert other != alone


def test_one_sampling_params_per_prompt(tiny):
    """generate takes a list of SamplingParams, one per prompt (as vLLM does): each prompt gets what it gets alone
    with its own."""
    prompts = ["abc", "hello world", "xyz"]
    params = [SamplingParams(max_tokens=3 + i, temperature=0.9, seed=i, ignore_eos=True) for i in range(3)]
    together = tiny.generate(prompts, params)
    assert [o.token_ids for o in together] == [tiny.generate(p, q)[0].token_ids for p, q in zip(prompts, params)]
    assert [len(o.token_ids) for o in together] == [3, 4, 5]


def test_n_completions_per_prompt_as_vllm(tiny):
    """SamplingParams.n: RequestOutput.outputs holds n CompletionOutputs (vLLM's layout); a seeded request's
    completion i draws what n = 1 with seed + i draws; the flat fields are the first completion's; greedy
    completions are equal; agenerate and chat return them too; one request of the request-level API or a stream is
    one completion."""
    params = SamplingParams(n=3, max_tokens=6, temperature=0.9, seed=5, ignore_eos=True, logprobs=1)
    prompts = ["abc", "hello world"]
    outs = tiny.generate(prompts, [params, dataclasses.replace(params, n=2)])
    assert [len(o.outputs) for o in outs] == [3, 2]
    for prompt, out in zip(prompts, outs):
        for i, c in enumerate(out.outputs):
            alone = tiny.generate(prompt, dataclasses.replace(params, n=1, seed=5 + i))[0]
            assert (c.index, c.token_ids, c.text, c.finish_reason) == (i, alone.token_ids, alone.text, "length")
            assert [lp for lp, _ in c.logprobs] == pytest.approx([lp for lp, _ in alone.logprobs], abs=1e-5)
            assert c.cumulative_logprob == pytest.approx(sum(lp for lp, _ in c.logprobs))
        assert (out.text, out.token_ids, out.logprobs) == (out.outputs[0].text, out.outputs[0].token_ids,
                                                             out.outputs[0].logprobs)
        assert len({tuple(c.token_ids) for c in out.outputs}) == len(out.outputs)  # seeds differ: so do draws
    one = tiny.generate("abc", SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert [(c.index, c.token_ids) for c in one.outputs] == [(0, one.token_ids)] and one.outputs[0].logprobs is None
    greedy = tiny.generate("abc", SamplingParams(n=2, max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids
    outs_async = asyncio.run(tiny.agenerate(prompts, [params, dataclasses.replace(params, n=2)]))
    assert [[c.token_ids for c in o.outputs] for o in outs_async] == [[c.token_ids for c in o.outputs] for o in outs]
    reply = tiny.chat([{"role": "user", "content": "hi"}], dataclasses.replace(params, n=2))
    assert len(reply.outputs) == 2
    for call in (lambda: tiny.new_request("abc", params), lambda: next(tiny.stream("abc", params))):
        with pytest.raises(ValueError, match="SamplingParams.n = 3: a request of the request-level API"):
            call()
    with pytest.raises(ValueError, match="SamplingParams.n = 0: must be an integer >= 1"):
        SamplingParams(n=0)
    assert len(tiny.engine.free_slots) == tiny.max_batch_size and not tiny.engine.running


@pytest.mark.parametrize("call, match", [
    (lambda m: m.generate(""), "prompt is empty"),
    (lambda m: m.generate([]), "prompts is empty"),
    (lambda m: m.generate([[1, 2, 99999]]), "token id 99999 is outside the vocabulary"),
    (lambda m: m.generate([[1, -1]]), "token id -1"),
    (lambda m: m.generate(123), "prompts must be"),
    (lambda m: m.generate("hi", {"temperature": 0}), "params must be a SamplingParams"),
    (lambda m: m.generate(["a", "b"], [GREEDY]), "a list of 1 SamplingParams for 2 prompts"),
    (lambda m: m.generate(["a", "b"], [GREEDY, {"temperature": 0}]), "params must be a SamplingParams"),
    (lambda m: m.generate("hi", SamplingParams(max_tokens=10_000)), None),  # capped by the context: fine
    (lambda m: m.logits([]), "prompt is empty"),
    (lambda m: m.chat([]), "non-empty list"),
])
def test_bad_input_then_engine_still_works(tiny, call, match):
    before = tiny.generate("abc", GREEDY)[0].token_ids
    free = tiny.kv_cache.num_free_blocks
    if match is None:
        call(tiny)
    else:
        with pytest.raises(ValueError, match=match):
            call(tiny)
    assert tiny.kv_cache.num_free_blocks == free
    assert tiny.generate("abc", GREEDY)[0].token_ids == before


def test_text_encoded_past_the_vocabulary_is_an_error(tiny, monkeypatch):
    """A tokenizer.json with more ids than config.json's vocabulary: a clear error, not an embedding lookup past
    the table (on a GPU, a device-side assert that ends the process's CUDA context)."""
    monkeypatch.setattr(tiny.tokenizer, "encode", lambda text: [1, tiny.config.vocab_size])
    with pytest.raises(ValueError, match=f"id {tiny.config.vocab_size}, outside the model's vocabulary"):
        tiny.generate("x", GREEDY)
    monkeypatch.undo()
    assert len(tiny.generate("x", GREEDY)[0].token_ids) == GREEDY.max_tokens


def test_truncate_prompt_tokens(tiny):
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens only, the output then that of those tokens given
    alone (the prompt text is theirs, decoded); -1 keeps as many as the context takes with room for one token; a k
    that leaves no room is an error; without it a prompt past the context is still an error."""
    prompt = [(7 * i) % 200 + 1 for i in range(50)]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    out = tiny.generate([prompt], dataclasses.replace(greedy, truncate_prompt_tokens=10))[0]
    assert out.prompt_token_ids == prompt[-10:] and out.token_ids == tiny.generate([prompt[-10:]], greedy)[0].token_ids
    assert out.token_ids != tiny.generate([prompt], greedy)[0].token_ids
    assert tiny.generate([prompt], dataclasses.replace(greedy, truncate_prompt_tokens=80))[0].prompt_token_ids == prompt
    text = tiny.generate("hello world", dataclasses.replace(greedy, truncate_prompt_tokens=5))[0]
    assert text.prompt_token_ids == tiny.tokenizer.encode("world") and text.prompt == "world"
    long = [(3 * i) % 200 + 1 for i in range(300)]  # past the 256-token context
    with pytest.raises(ValueError, match="prompt has 300 tokens but the context holds 256"):
        tiny.generate([long], greedy)
    whole = tiny.generate([long], dataclasses.replace(greedy, truncate_prompt_tokens=-1))[0]
    assert whole.prompt_token_ids == long[-255:] and len(whole.token_ids) == 1 and whole.finish_reason == "length"
    with pytest.raises(ValueError, match="truncate_prompt_tokens = 256: must be below the context"):
        tiny.generate([long], dataclasses.replace(greedy, truncate_prompt_tokens=256))


def test_request_larger_than_the_cache_is_an_error():
    small = LLM("tiny", device="cpu", max_seq_len=256, num_kv_blocks=4, block_size=16)
    with pytest.raises(ValueError, match="needs 7 KV cache blocks .* holds 4"):
        small.generate("a" * 90, SamplingParams(max_tokens=10))
    assert len(small.generate("a" * 40, SamplingParams(max_tokens=10, ignore_eos=True))[0].token_ids) == 10
    # the k/v of every token but the last generated one is written: 64 tokens of cache hold a 65-token request,
    # which runs to its end alone, and its tokens are those of a large cache's
    prompt = small.tokenizer.encode("a" * 40)
    fits = SamplingParams(max_tokens=65 - len(prompt), ignore_eos=True, temperature=0)
    out = small.generate([prompt], fits)[0].token_ids
    roomy = LLM("tiny", device="cpu", max_seq_len=256, num_kv_blocks=8, block_size=16)
    assert len(out) == fits.max_tokens and out == roomy.generate([prompt], fits)[0].token_ids
    with pytest.raises(ValueError, match="needs 5 KV cache blocks .* holds 4"):
        small.generate([prompt], dataclasses.replace(fits, max_tokens=fits.max_tokens + 1))


def test_requests_wait_when_the_cache_is_full(tiny):
    small = LLM("tiny", device="cpu", max_seq_len=256, num_kv_blocks=3, block_size=16, max_batch_size=8)
    prompts = ["first prompt", "second", "a third, longer prompt"]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)  # 2 blocks each: one fits at the end
    together = small.generate(prompts, params)
    assert [o.token_ids for o in together] == [tiny.generate(p, params)[0].token_ids for p in prompts]
    assert small.kv_cache.num_free_blocks == 3


def test_threads_generate_what_they_generate_alone(tiny):
    prompts = [f"thread {i} says" + "!" * i for i in range(6)]
    expected = [tiny.generate(p, GREEDY)[0].token_ids for p in prompts]
    results = [None] * len(prompts)

    def run(i):
        results[i] = tiny.generate(prompts[i], GREEDY)[0].token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected
    assert tiny.kv_cache.num_free_blocks == tiny.kv_cache.num_blocks


def test_cancelling_a_stream_frees_its_blocks(tiny):
    free = tiny.kv_cache.num_free_blocks
    it = tiny.stream("cancel me", SamplingParams(max_tokens=200, temperature=1.0, ignore_eos=True))
    next(it)
    assert tiny.kv_cache.num_free_blocks < free
    it.close()
    assert tiny.kv_cache.num_free_blocks == free
    assert len(tiny.engine.free_slots) == tiny.max_batch_size and not tiny.engine.running


def test_request_level_api(tiny):
    """new_request / submit / step / abort, as a server drives them: two requests stepped together give what
    generate gives each; a bad request is a ValueError at new_request; abort frees a running request's blocks."""
    prompts = ["request level one", "and two"]
    expected = [tiny.generate(p, GREEDY)[0].token_ids for p in prompts]
    seqs = [tiny.new_request(p, GREEDY) for p in prompts]
    assert not tiny.has_unfinished()
    tiny.submit(seqs)
    assert tiny.has_unfinished()
    while not all(s.finished for s in seqs):
        tiny.step()
    assert [list(s.output_ids) for s in seqs] == expected and not tiny.has_unfinished()
    tiny.abort(seqs)  # finished: frees their blocks
    assert tiny.kv_cache.num_free_blocks == tiny.kv_cache.num_blocks
    with pytest.raises(ValueError, match="prompt has 300 tokens but the context holds 256"):
        tiny.new_request("x" * 300, GREEDY)
    long = tiny.new_request("abort me", SamplingParams(max_tokens=100, ignore_eos=True))
    tiny.submit([long])
    tiny.step()
    tiny.abort([long])
    assert long.finished and tiny.kv_cache.num_free_blocks == tiny.kv_cache.num_blocks and not tiny.has_unfinished()


def test_a_sequence_runs_once(tiny):
    """Submitting a sequence again (queued, running, finished or aborted) is an error that leaks nothing: it would
    otherwise be admitted twice, holding a slot and blocks for ever."""
    seq = tiny.new_request("once", GREEDY)
    tiny.submit([seq])
    with pytest.raises(ValueError, match="already submitted and is queued or running"):
        tiny.submit([seq])
    while not seq.finished:
        tiny.step()
    with pytest.raises(ValueError, match=r"already submitted and is finished \(length\)"):
        tiny.submit([seq])
    twice = tiny.new_request("twice", GREEDY)
    with pytest.raises(ValueError, match="already submitted"):
        tiny.submit([twice, twice])  # all or none: the first is aborted too
    assert twice.finish_reason == "abort"
    early = tiny.new_request("aborted before it was queued", GREEDY)
    tiny.abort([early])
    with pytest.raises(ValueError, match=r"already finished \(abort\)"):
        tiny.submit([early])
    tiny.abort([seq])
    assert not tiny.has_unfinished() and tiny.kv_cache.num_free_blocks == tiny.kv_cache.num_blocks
    assert len(tiny.engine.free_slots) == tiny.max_batch_size


def test_a_step_that_fails_after_sampling_ends_its_sequences(tiny, monkeypatch):
    """A launch that raises after the sampler ran (here the log-probabilities: an out-of-memory error, say) has
    already advanced its sequences' sampler state: they are aborted, not continued from a state the host does not
    know (which gave wrong tokens, silently). Another caller's request in that step ends too; the LLM stays usable
    and its next requests are unaffected."""
    import qwen2rt.model_runner as runner

    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, repetition_penalty=1.3)
    want = tiny.generate("the other request", params)[0].token_ids
    real, calls = runner.token_logprobs, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (injected)")
        return real(*args, **kwargs)
    monkeypatch.setattr(runner, "token_logprobs", failing)
    other = tiny.new_request("the other request", params)
    tiny.submit([other])
    with pytest.raises(RuntimeError, match="injected"):
        tiny.generate("asks for logprobs", SamplingParams(max_tokens=8, temperature=0, logprobs=1))
    assert other.finish_reason == "abort"
    assert not tiny.has_unfinished() and tiny.kv_cache.num_free_blocks == tiny.kv_cache.num_blocks
    assert tiny.generate("the other request", params)[0].token_ids == want


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="int8"), "dtype 'int8' is not supported"),
    (dict(backend="cuda-magic"), "unknown backend 'cuda-magic'"),
    (dict(max_seq_len=10**9), "max_seq_len"),
    (dict(max_batch_size=0), "max_batch_size"),
    (dict(num_kv_blocks=0), "num_kv_blocks"),
    (dict(seed=-1), "seed"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM("tiny", device="cpu", **kwargs)


def test_cuda_device_index_past_the_devices_is_an_error(monkeypatch):
    """Checked before anything touches CUDA (here CUDA is faked present with one device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device 'cuda:3': torch sees 1 CUDA device"):
        LLM("tiny", device="cuda:3")


def test_unknown_model_name():
    with pytest.raises(ValueError, match="neither a checkpoint folder nor a built-in name"):
        LLM("qwen9-1t", device="cpu")


def test_folder_without_tokenizer(hf_checkpoints):
    path, hf = hf_checkpoints["dense_gqa"]
    m = LLM(path, device="cpu", max_seq_len=64)
    with pytest.raises(ValueError, match="ships no tokenizer.json"):
        m.generate("text")
    out = m.generate([[1, 2, 3]], GREEDY)[0]
    assert out.text is None and len(out.token_ids) == 24
    # stop strings match text: without a tokenizer they would be ignored, so they are an error
    with pytest.raises(ValueError, match=r"SamplingParams.stop = \('x',\): .*ships no tokenizer.json"):
        m.generate([[1, 2, 3]], SamplingParams(max_tokens=4, stop="x"))
    assert m.generate([[1, 2, 3]], GREEDY)[0].token_ids == out.token_ids
    # token ids as a tensor: the same logits as a list
    assert torch.equal(m.logits(torch.tensor([1, 2, 3])), m.logits([1, 2, 3]))


def test_builtin_weights_are_deterministic_per_seed():
    a = LLM("tiny-moe", device="cpu", seed=3)
    b = LLM("tiny-moe", device="cpu", seed=3)
    c = LLM("tiny-moe", device="cpu", seed=4)
    ids = list(range(1, 30))
    torch.testing.assert_close(a.logits(ids), b.logits(ids), rtol=0, atol=0)
    assert not torch.allclose(a.logits(ids), c.logits(ids))


def script_output(llm, monkeypatch, text: str) -> None:
    """Make the model emit `text` byte by byte (one-hot logits: greedy picks each byte), whatever it computes."""
    script = iter(text.encode())
    vocab = llm.config.vocab_size

    def compute_logits(hidden):
        return torch.nn.functional.one_hot(torch.tensor([next(script) for _ in range(hidden.shape[0])]), vocab).float()

    monkeypatch.setattr(llm.model, "compute_logits", compute_logits)


def test_stop_string_split_across_tokens_through_the_stream(tiny, monkeypatch):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop="XYZ")
    script_output(tiny, monkeypatch, "abcXYZdef")
    pieces = list(tiny.stream("hi", params))
    assert "".join(pieces) == "abc" and not any("X" in p for p in pieces)
    script_output(tiny, monkeypatch, "abcXYZdef")
    out = tiny.generate("hi", params)[0]
    assert out.finish_reason == "stop" and out.text == "abc" and out.token_ids == list(b"abcXYZ")

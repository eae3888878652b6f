"""Structured outputs (runtime/structured.py): the JSON-object grammar against json.loads, the choice grammar, the
allowed-token sets of the prefix walk against a token-by-token check (a random vocabulary and Qwen's), and the
engine: every step's token is the best one its mask allows (the logits recorded), outputs complete and end with a
stop token, alone or batched with free requests (which are unchanged), through preemption, and clear errors."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest

from qwen2rt import LLM, SamplingParams, StructuredOutputs
from qwen2rt.structured import (DONE, JSON_OBJECT, ChoiceGrammar, Matcher, TokenIndex, check_json_object,
                                run)
from qwen2rt.tokenizer import HFTokenizer

pytestmark = pytest.mark.timeout(300)

JSON = StructuredOutputs(json_object=True)
# random weights seldom close a string or an object: these biases make the outputs complete within a few dozen tokens
CLOSE = {ord('"'): 6.0, ord("}"): 6.0, ord("]"): 4.0}
NOISE = list('{}[]:,"\\ \n0123456789-+.eEtrufalsn') + ["x", "u", "A", "\x01", "\u00e9"]


def random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice([rng.randint(-1000, 1000), rng.random() * 10 ** rng.randint(-5, 5), True, False, None,
                           "s\"\\\n\u00e9x\t", ""])
    if r < 0.65:
        return {f"k{rng.randint(0, 9)}": random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]


def random_document(rng: random.Random) -> str:
    return json.dumps({"a": random_value(rng)}, indent=rng.choice([None, 1, 2]), ensure_ascii=rng.random() < 0.5,
                      separators=rng.choice([None, (",", ":")]))


def completes(text: str) -> bool:
    state = run(JSON_OBJECT, text.encode())
    return state is not None and state[0] == DONE


def test_json_grammar_agrees_with_json_loads():
    """Every prefix of a JSON object is alive and the whole completes; documents mutated at random (bytes inserted,
    deleted, replaced) complete exactly when json.loads reads an object from them with nothing around it."""
    rng = random.Random(0)
    valid = 0
    for _ in range(3000):
        text = random_document(rng)
        data = text.encode()
        assert all(run(JSON_OBJECT, data[:k]) is not None for k in range(len(data))), text
        assert completes(text), text
        chars = list(text)
        for _ in range(rng.randint(1, 3)):
            op, pos = rng.random(), rng.randrange(len(chars))
            if op < 0.4:
                chars.insert(pos, rng.choice(NOISE))
            elif op < 0.7:
                del chars[pos]
            else:
                chars[pos] = rng.choice(NOISE)
        mutated = "".join(chars)
        assert completes(mutated) == check_json_object(mutated), mutated
        valid += completes(mutated)
    assert 200 < valid < 2800  # both kinds were tried


@pytest.mark.parametrize("text, ok", [
    ('{}', True), ('{"a":[1,-0.5e+3,0,-0,1E9,true,false,null,{"b":"\\u00e9\\n\\/"}]}', True),
    ('{ "a" : [ ] , "b" : { } }', True), ('{"a":01}', False), ('{"a":-01}', False), ('{"a":1,}', False),
    ("{'a':1}", False), ('[1]', False), (' {}', False), ('{} ', False), ('{"a":"\x01"}', False),
    ('{"a":"\\x"}', False), ('{"a":tru}', False), ('{"a":NaN}', False), ('{"a" 1}', False), ('{"a":1}}', False),
    ('{"a":-}', False), ('{"a":1.}', False), ('{"a":1e}', False), ('{"a":"\\u12G4"}', False), ('{a:1}', False),
    ('{"a":[1 2]}', False), ('{"a":[1,]}', False), ('{"a":{]}', False), ('{"a":.5}', False), ('{"a":+1}', False),
])
def test_json_grammar_cases(text, ok):
    assert completes(text) == ok == check_json_object(text)


def test_choice_grammar():
    g = ChoiceGrammar(["yes", "no", "yes!", "\u00e9t\u00e9"])
    for text, alive, done in [("", True, False), ("ye", True, False), ("yes", True, True), ("yes!", True, True),
                              ("yes!!", False, False), ("n", True, False), ("x", False, False),
                              ("\u00e9t\u00e9", True, True), ("no ", False, False)]:
        state = run(g, text.encode())
        assert (state is not None) == alive and (alive and g.accepting(state)) == done, text


def brute_allowed(index: TokenIndex, grammar, state) -> np.ndarray:
    return np.array([b is not None and run(grammar, b, state) is not None for b in index.token_bytes])


def reachable_states(rng: random.Random, grammar, texts: list[str], count: int) -> list:
    states = set()
    for text in texts:
        data = text.encode()
        for k in sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, 6))):
            state = run(grammar, data[:k])
            if state is not None:
                states.add(state)
    return sorted(states, key=repr)[:count]


def test_allowed_sets_equal_a_token_by_token_check():
    """TokenIndex.allowed (the sorted prefix walk, pruned, whole plain ranges inside strings) against running the
    grammar over every token's bytes, at states reached inside random documents: a random vocabulary of JSON-ish
    pieces (every single byte, then strings of the noise alphabet, many sharing prefixes, some special tokens
    without bytes), for the JSON and the choice grammars; each set is also the same from the cache."""
    rng = random.Random(1)
    alphabet = [c.encode() for c in NOISE] + [b'"', b'":', b'",', b"  ", b'"}', b'\\"', b"\\u00", b"true", b"\xc3"]
    pieces = {bytes((i,)) for i in range(256)}
    while len(pieces) < 3000:
        pieces.add(b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))))
    token_bytes = sorted(pieces) + [None] * 5
    rng.shuffle(token_bytes)
    index = TokenIndex(token_bytes, len(token_bytes) + 3)  # ids past the tokenizer's: never allowed
    docs = [random_document(rng) for _ in range(30)]
    choice = ChoiceGrammar(["yes", "yes!", "no", "\u00e9t\u00e9 {x}"])
    cases = [(JSON_OBJECT, s) for s in reachable_states(rng, JSON_OBJECT, docs, 60)]
    cases += [(choice, s) for s in reachable_states(rng, choice, ["yes!", "no", "\u00e9t\u00e9 {x}"], 20)]
    kinds = set()
    for grammar, state in cases:
        want = brute_allowed(index, grammar, state)
        assert (index.allowed(grammar, state) == want).all(), state
        assert (index.allowed(grammar, state) == want).all(), state  # cached
        kinds.add(state[0] if grammar is JSON_OBJECT else "choice")
    assert len(kinds) >= 10  # strings, numbers, keys, values, literals ... were all tried


def test_allowed_sets_over_qwens_vocabulary(qwen_tokenizer_dir):
    """The same check over Qwen's real vocabulary (its byte-level BPE token bytes, which decode as the tokenizer
    decodes them), at every state a JSON document's tokens pass through, each token allowed where it came."""
    tokenizer = HFTokenizer(qwen_tokenizer_dir)
    token_bytes = tokenizer.token_bytes()
    rng = random.Random(2)
    for _ in range(300):
        ids = [rng.randrange(151643) for _ in range(rng.randint(1, 6))]
        assert b"".join(token_bytes[i] for i in ids).decode("utf-8", "replace") == tokenizer.decode(ids)
    assert token_bytes[151645] is None and token_bytes[151657] == b"<tool_call>"  # special / plain added tokens
    index = TokenIndex(token_bytes, 151936)
    doc = json.dumps({"name": "Zo\u00eb \"Z\"", "n": [1, -2.5e-3, True, None], "o": {"k": "v\\n"}}, indent=2)
    matcher = Matcher(JSON_OBJECT, index, {151645})
    checked = set()
    for token in tokenizer.encode(doc):
        mask = matcher.mask()
        assert mask[token] and not mask[151645]
        if matcher.state not in checked and len(checked) < 12:
            checked.add(matcher.state)
            assert (mask == brute_allowed(index, JSON_OBJECT, matcher.state)).all(), matcher.state
        matcher.advance(token)
    assert matcher.complete and np.flatnonzero(matcher.mask()).tolist() == [151645]


@pytest.fixture(scope="module")
def tiny():
    return LLM("tiny", device="cpu", max_seq_len=256, max_batch_size=4)


def masked_argmax(llm, params: SamplingParams, out_ids: list[int], logits) -> list[int]:
    """The greedy tokens a structured request must get: at each step the allowed token (brute force over the
    vocabulary from the grammar's state after the tokens before) of the largest logit + bias."""
    index = TokenIndex(llm.tokenizer.token_bytes(), llm.config.vocab_size)
    grammar, state, want = params.structured_outputs.grammar(), None, []
    for step, token in enumerate(out_ids):
        state = grammar.start if state is None else state
        allowed = brute_allowed(index, grammar, state)
        if grammar.accepting(state):
            allowed[sorted(llm.eos_token_ids)] = True
        row = logits[step].numpy().copy()
        for t, b in (params.logit_bias or {}).items():
            row[t] += b
        want.append(int(np.where(allowed, row, -np.inf).argmax()))
        if token not in llm.eos_token_ids:
            state = run(grammar, llm.tokenizer.token_bytes()[token], state)
    return want


def test_greedy_takes_the_best_allowed_token_at_every_step(tiny):
    """Greedy, every step's token is the allowed one of the largest logit (its mask from the tokens before, not
    one step stale): a JSON object and a choice, both complete, each ending with eos; unconstrained, the same
    request is not JSON at all."""
    from test_parity import generate_recording_logits

    for prompt, so in [([5, 6, 7], JSON), ([9, 1], StructuredOutputs(choice=["yes", "no", "maybe so"]))]:
        params = SamplingParams(max_tokens=80, temperature=0, logit_bias=CLOSE, structured_outputs=so)
        out, logits = generate_recording_logits(tiny, prompt, params)
        assert out.token_ids == masked_argmax(tiny, params, out.token_ids, logits)
        assert out.finish_reason == "stop" and out.token_ids[-1] in tiny.eos_token_ids
        assert check_json_object(out.text) if so.json_object else out.text in so.choice
        free = tiny.generate([prompt], dataclasses.replace(params, structured_outputs=None))[0]
        assert free.token_ids != out.token_ids and not check_json_object(free.text)


def test_sampled_outputs_complete_and_batch_with_free_requests(tiny):
    """Sampled structured requests (n choices, penalties, top-p) all complete (JSON objects, or one of the
    choices, several of them drawn), and batched with unconstrained requests they are what they are alone
    (seeded), and so are the unconstrained ones; json.loads reads each object."""
    json_params = SamplingParams(max_tokens=120, temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=3, n=4,
                                 logit_bias=CLOSE, structured_outputs=JSON)
    choice = StructuredOutputs(choice=["red", "green", "blue", "\u00e9t\u00e9"])
    choice_params = SamplingParams(max_tokens=20, temperature=1.5, seed=11, n=6, structured_outputs=choice)
    free = SamplingParams(max_tokens=30, temperature=1.0, seed=5, ignore_eos=True)
    alone = [tiny.generate("A", json_params)[0], tiny.generate("B", choice_params)[0], tiny.generate("C", free)[0]]
    together = tiny.generate(["A", "B", "C"], [json_params, choice_params, free])
    for a, b in zip(alone, together):
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    objects = together[0].outputs
    assert all(o.finish_reason == "stop" and check_json_object(o.text) for o in objects)
    assert all(isinstance(json.loads(o.text), dict) for o in objects) and len({o.text for o in objects}) > 1
    picked = [o.text for o in together[1].outputs]
    assert set(picked) <= set(choice.choice) and len(set(picked)) > 1
    assert all(o.finish_reason == "stop" for o in together[1].outputs)


def test_structured_requests_through_preemption():
    """A cache too small for four structured requests at once preempts some (they recompute their tokens); their
    outputs equal those of a cache large enough for all."""
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=s, logit_bias={34: 3.0}, structured_outputs=JSON)
              for s in range(4)]
    prompts = [[1 + i] * 20 for i in range(4)]
    small = LLM("tiny", device="cpu", max_seq_len=256, max_batch_size=4, num_kv_blocks=12, block_size=8)
    roomy = LLM("tiny", device="cpu", max_seq_len=256, max_batch_size=4, num_kv_blocks=64, block_size=8)
    outs = small.generate(prompts, params)
    assert small.engine.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy.generate(prompts, params)]
    assert all(check_json_object(o.text) or o.finish_reason == "length" for o in outs)


def test_structured_outputs_errors(tiny, hf_checkpoints, monkeypatch):
    for kwargs, words in [(dict(), "exactly one"), (dict(choice=["a"], json_object=True), "exactly one"),
                          (dict(choice=[]), "non-empty list"), (dict(choice=["a", ""]), "'' is not a non-empty"),
                          (dict(choice=["a", 3]), "3 is not"), (dict(json_object="yes"), "must be a bool")]:
        with pytest.raises(ValueError, match=words):
            StructuredOutputs(**kwargs)
    for kwargs, words in [(dict(ignore_eos=True), "ignore_eos = True: cannot be combined"),
                          (dict(min_tokens=2), "min_tokens = 2: cannot be combined"),
                          (dict(allowed_token_ids=[1, 2]), "allowed_token_ids: cannot be combined")]:
        with pytest.raises(ValueError, match=f"SamplingParams.{words}"):
            SamplingParams(structured_outputs=JSON, **kwargs)
    with pytest.raises(ValueError, match="SamplingParams.structured_outputs = .*must be None or"):
        SamplingParams(structured_outputs={"json_object": True})
    with monkeypatch.context() as patch:  # a tokenizer without eos, and no stop_token_ids
        patch.setattr(tiny, "eos_token_ids", frozenset())
        with pytest.raises(ValueError, match="no stop token id"):
            tiny.generate("x", SamplingParams(structured_outputs=JSON))
        assert tiny.generate("x", SamplingParams(structured_outputs=JSON, stop_token_ids=[5], max_tokens=2))
    no_tokenizer = LLM(hf_checkpoints["dense_gqa"][0], device="cpu", max_seq_len=64)
    with pytest.raises(ValueError, match="ships no tokenizer.json"):
        no_tokenizer.generate([[1, 2]], SamplingParams(structured_outputs=JSON))
    assert len(tiny.generate("x", SamplingParams(max_tokens=3, temperature=0))[0].token_ids) == 3  # still usable

"""The OpenAI-compatible server (runtime/server.py) against a live uvicorn on 127.0.0.1, through the official
`openai` client and raw httpx: outputs equal the offline API's, streaming, stop strings, seeds, usage, every error
path, client disconnects, metrics, and a bounded load test. Skipped without the serve extra and openai / httpx."""

from __future__ import annotations

import asyncio
import datetime
import inspect
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

from qwen2rt import LLM, SamplingParams  # noqa: E402
from qwen2rt.server import TokenLogprob, build_app, chat_logprobs, completion_logprobs  # noqa: E402

pytestmark = pytest.mark.timeout(120)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "tiny"
LLM_ARGS = dict(device="cpu", backend="torch", max_seq_len=256, max_batch_size=16, seed=0)
HAS_PREFIX_CACHE = "enable_prefix_caching" in inspect.signature(LLM).parameters


class Live:
    def __init__(self, llm, url):
        self.llm, self.url = llm, url
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)

    def post(self, path, body, **kw):
        return httpx.post(self.url + path, content=body if isinstance(body, (str, bytes)) else json.dumps(body),
                          headers={"Content-Type": "application/json"}, timeout=60, **kw)

    def idle(self, timeout=10.0) -> bool:
        """True once the engine has no request and every KV block is free again."""
        engine, cache = self.llm.engine, self.llm.kv_cache
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not engine.running and not engine.waiting and cache.num_free_blocks == cache.num_blocks:
                return True
            time.sleep(0.01)
        return False

    def metric(self, name, **labels) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total


@pytest.fixture(scope="module")
def live():
    yield from serve(LLM(MODEL, **LLM_ARGS))


def serve(llm):
    """A uvicorn server of `llm` on a free port for the generator's life -> Live."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(llm, MODEL), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield Live(llm, f"http://127.0.0.1:{port}")
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.fixture(scope="module")
def offline():
    """The reference: the same weights in a fresh LLM of the offline API, without prefix caching."""
    return LLM(MODEL, **LLM_ARGS, **({"enable_prefix_caching": False} if HAS_PREFIX_CACHE else {}))


def stream_text(events, chat):
    pieces, finish, usage = [], [], []
    for ev in events:
        if ev.usage is not None:
            usage.append(ev.usage)
        for c in ev.choices:
            pieces.append((c.delta.content or "") if chat else c.text)
            if c.finish_reason is not None:
                finish.append(c.finish_reason)
    return "".join(pieces), finish, usage


def test_models_health_and_routes(live):
    assert [m.id for m in live.client.models.list().data] == [MODEL]
    assert live.client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        live.client.models.retrieve("other")
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    import qwen2rt
    assert httpx.get(live.url + "/version").json() == {"version": qwen2rt.__version__}  # vLLM's route
    r = httpx.get(live.url + "/v1/nothing")
    assert r.status_code == 404 and "message" in r.json()["error"]
    r = httpx.get(live.url + "/v1/completions")
    assert r.status_code == 405 and "message" in r.json()["error"]


def test_completion_equals_offline_streamed_or_not(live, offline):
    prompt, params = "The quick brown fox", SamplingParams(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True)
    want = offline.generate(prompt, params)[0]
    kw = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0.8, seed=7, extra_body={"ignore_eos": True})
    got = live.client.completions.create(**kw)
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
    assert got.object == "text_completion" and got.model == MODEL
    u = got.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(want.prompt_token_ids), 12,
                                                                      len(want.prompt_token_ids) + 12)
    text, finish, usage = stream_text(live.client.completions.create(stream=True, **kw), chat=False)
    assert text == want.text and finish == ["length"] and usage == []
    events = list(live.client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text, finish, usage = stream_text(events, chat=False)
    assert text == want.text and finish == ["length"]
    assert [(x.prompt_tokens, x.completion_tokens) for x in usage] == [(u.prompt_tokens, 12)]
    assert events[-1].choices == [] and events[-1].usage is not None  # the usage chunk comes last
    # vLLM's continuous_usage_stats: the running usage in every chunk (it needs include_usage, as in vLLM)
    options = {"include_usage": True, "continuous_usage_stats": True}
    events = list(live.client.completions.create(stream=True, stream_options=options, **kw))
    text, finish, usage = stream_text(events, chat=False)
    running = [x.completion_tokens for x in usage]
    assert text == want.text and finish == ["length"] and len(usage) == len(events) > 2
    assert all(x.prompt_tokens == u.prompt_tokens and x.total_tokens == x.prompt_tokens + x.completion_tokens
               for x in usage)
    assert running == sorted(running) and running[-2:] == [12, 12]  # the finish chunk, the usage chunk
    # as in vLLM, include_usage is on once stream_options is given (unless false), and continuous needs it
    for options, with_usage in (({"continuous_usage_stats": True}, "every chunk"), ({}, "the last chunk"),
                                ({"include_usage": False, "continuous_usage_stats": True}, "none")):
        got = list(live.client.completions.create(stream=True, stream_options=options, **kw))
        want_count = {"every chunk": len(got), "the last chunk": 1, "none": 0}[with_usage]
        assert len(stream_text(got, chat=False)[2]) == want_count, options
    # a token-id prompt
    got = live.client.completions.create(model=MODEL, prompt=list(want.prompt_token_ids), max_tokens=12,
                                         temperature=0.8, seed=7, extra_body={"ignore_eos": True})
    assert got.choices[0].text == want.text


def test_chat_equals_offline_streamed_or_not(live, offline):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    want = offline.chat(messages, SamplingParams(max_tokens=10, temperature=0.7, top_k=50, seed=3, ignore_eos=True))
    kw = dict(model=MODEL, messages=messages, temperature=0.7, seed=3, extra_body={"top_k": 50, "ignore_eos": True})
    got = live.client.chat.completions.create(max_completion_tokens=10, **kw)
    assert got.choices[0].message.role == "assistant" and got.object == "chat.completion"
    assert got.choices[0].message.content == want.text and got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(want.prompt_token_ids) and got.usage.completion_tokens == 10
    events = list(live.client.chat.completions.create(max_tokens=10, stream=True,
                                                      stream_options={"include_usage": True}, **kw))
    assert events[0].choices[0].delta.role == "assistant"
    text, finish, usage = stream_text(events, chat=True)
    assert text == want.text and finish == ["length"] and usage[0].completion_tokens == 10
    events = list(live.client.chat.completions.create(max_tokens=10, stream=True,
                                                      stream_options={"continuous_usage_stats": True}, **kw))
    assert events[0].choices[0].delta.role == "assistant" and events[0].usage.completion_tokens == 0
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == 10
    # content as a list of text parts renders the same prompt
    parts = [dict(m, content=[{"type": "text", "text": m["content"]}]) for m in messages]
    got = live.client.chat.completions.create(max_tokens=10, **dict(kw, messages=parts))
    assert got.choices[0].message.content == want.text


def test_stop_strings(live, offline):
    prompt = "Once upon a time"
    full = offline.generate(prompt, SamplingParams(max_tokens=40, temperature=1.0, seed=5, ignore_eos=True))[0].text
    stop = full[8:10]
    want = full[:full.find(stop)]
    kw = dict(model=MODEL, prompt=prompt, max_tokens=40, temperature=1.0, seed=5, stop=[stop, "never seen"],
              extra_body={"ignore_eos": True})
    got = live.client.completions.create(**kw).choices[0]
    assert (got.text, got.finish_reason) == (want, "stop")
    text, finish, _ = stream_text(live.client.completions.create(stream=True, **kw), chat=False)
    assert (text, finish) == (want, ["stop"])


def test_min_tokens_and_logit_bias_equal_the_offline_api(live, offline):
    prompt = "biased"
    base = offline.generate(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    stop_id = base.token_ids[1]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop_id], min_tokens=4,
                            logit_bias={base.token_ids[0]: -100.0, 70: 3.0})
    want = offline.generate(prompt, params)[0]
    assert want.token_ids[:2] != base.token_ids[:2]  # the bias and the hold change the tokens
    got = live.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                         logit_bias={str(base.token_ids[0]): -100, "70": 3.0},
                                         extra_body={"ignore_eos": True, "stop_token_ids": [stop_id], "min_tokens": 4})
    assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.token_ids)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
TOOL_REPLY = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
# a template that renders tools and tool-calling turns, as Qwen2.5's does (shortened)
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}"
    "\n</tools><|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{%- for c in m.tool_calls or [] %}"
    "<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}"
    "\n</tool_call>"
    "{%- endfor %}<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


@pytest.fixture(scope="module")
def live_long():
    """A server with a longer context: the byte tokenizer spends a token per character of the tools' JSON."""
    yield from serve(LLM(MODEL, **dict(LLM_ARGS, max_seq_len=1024)))


@pytest.fixture
def scripted_replies(live_long, monkeypatch):
    """live_long's model replies `text` then eos, whatever the prompt (each row's token is chosen by its step), and
    chat renders tools; -> a function setting the text."""
    from qwen2rt import model_runner

    tokenizer = live_long.llm.tokenizer
    script = {}

    def sample(logits, rows, state, variant="full", impl="auto"):
        ids = script["ids"]
        return torch.tensor([ids[min(s, len(ids) - 1)] for s in rows.step.tolist()], device=logits.device)

    def set_reply(text):
        script["ids"] = tokenizer.encode(text) + [tokenizer.encode("<|im_end|>")[0]]

    monkeypatch.setattr(model_runner, "sample_tokens", sample)
    monkeypatch.setattr(tokenizer, "chat_template", TOOL_TEMPLATE)
    return set_reply


def test_tool_calls_parsed_from_the_reply_streamed_or_not(live_long, scripted_replies):
    """A reply with two Hermes tool calls after some text: message.tool_calls (names, arguments as JSON strings),
    the text before them as content, finish_reason "tool_calls"; streamed: the content as deltas, then one delta per
    call. tool_choice "none" or no tools: the same reply is all content. The tools reach the template."""
    scripted_replies(TOOL_REPLY)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Weather and time in Paris?"}], max_tokens=200)
    got = live_long.client.chat.completions.create(tools=TOOLS, **kw)
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    calls = [(c.type, c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert calls == [("function", "get_weather", {"city": "Paris"}), ("function", "get_time", {})]
    with_tools = live_long.llm.tokenizer.apply_chat_template(kw["messages"], tools=TOOLS)
    assert got.usage.prompt_tokens == len(live_long.llm.tokenizer.encode(with_tools)) and '"get_time"' in with_tools
    content, deltas, finish = "", {}, []
    for ev in live_long.client.chat.completions.create(tools=TOOLS, stream=True, **kw):
        delta = ev.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            entry = deltas.setdefault(d.index, {"name": "", "arguments": ""})
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
        finish += [ev.choices[0].finish_reason] if ev.choices[0].finish_reason else []
    assert content == "Let me check." and finish == ["tool_calls"]
    assert [(d["name"], json.loads(d["arguments"])) for _, d in sorted(deltas.items())] == [c[1:] for c in calls]
    # parallel_tool_calls false: the first call only, streamed or not
    one = live_long.client.chat.completions.create(tools=TOOLS, parallel_tool_calls=False, **kw).choices[0]
    assert [c.function.name for c in one.message.tool_calls] == ["get_weather"] and one.finish_reason == "tool_calls"
    streamed_calls = [d.function.name for ev in live_long.client.chat.completions.create(
        tools=TOOLS, parallel_tool_calls=False, stream=True, **kw) for d in ev.choices[0].delta.tool_calls or []]
    assert streamed_calls == ["get_weather"]
    for extra in ({"tool_choice": "none", "tools": TOOLS}, {}):
        plain = live_long.client.chat.completions.create(**kw, **extra).choices[0]
        assert plain.message.content == TOOL_REPLY and not plain.message.tool_calls and plain.finish_reason == "stop"
        events = live_long.client.chat.completions.create(stream=True, **kw, **extra)
        streamed, finish, _ = stream_text(events, chat=True)
        assert streamed == TOOL_REPLY and finish == ["stop"]
    # a block that is no JSON: all content; a multi-turn conversation with a tool-calling turn renders
    scripted_replies("<tool_call>{not json}</tool_call>")
    bad = live_long.client.chat.completions.create(tools=TOOLS, **kw).choices[0]
    assert bad.message.content == "<tool_call>{not json}</tool_call>" and bad.finish_reason == "stop"
    scripted_replies("It is 18 degrees.")
    turns = kw["messages"] + [
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in choice.message.tool_calls]},
        {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "18 degrees"}]
    reply = live_long.client.chat.completions.create(**dict(kw, messages=turns), tools=TOOLS)
    assert reply.choices[0].message.content == "It is 18 degrees." and reply.choices[0].finish_reason == "stop"
    # the earlier call's arguments reach the template as an object (OpenAI sends a JSON string; vLLM parses it), so
    # `| tojson` renders {"city": "Paris"}, not a quoted string
    as_objects = [dict(t, content=t["content"] or "") for t in turns]
    as_objects[1]["tool_calls"] = [{"id": c.id, "type": "function", "function": {
        "name": c.function.name, "arguments": json.loads(c.function.arguments)}} for c in choice.message.tool_calls]
    rendered = live_long.llm.tokenizer.apply_chat_template(as_objects, tools=TOOLS)
    assert '"arguments": {"city": "Paris"}' in rendered
    assert reply.usage.prompt_tokens == len(live_long.llm.tokenizer.encode(rendered))
    bad_turn = [dict(turns[1], tool_calls=[{"id": "x", "type": "function",
                                            "function": {"name": "f", "arguments": "{not json"}}])]
    r = live_long.post("/v1/chat/completions", {"model": MODEL, "messages": kw["messages"] + bad_turn})
    assert r.status_code == 400 and "are not JSON" in r.json()["error"]["message"]
    assert live_long.idle()


def test_include_stop_str_in_output_and_skip_special_tokens_equal_the_offline_api(live, offline):
    extra = {"ignore_eos": True, "skip_special_tokens": False, "include_stop_str_in_output": True,
             "logit_bias": {"257": 2.0}}  # <|im_start|> now and then: written out
    params = SamplingParams(max_tokens=12, temperature=0.9, seed=4, ignore_eos=True, skip_special_tokens=False,
                            include_stop_str_in_output=True, logit_bias={257: 2.0})
    want = offline.generate("special", params)[0]
    assert "<|im_start|>" in want.text
    got = live.client.completions.create(model=MODEL, prompt="special", max_tokens=12, temperature=0.9, seed=4,
                                         extra_body=extra)
    assert got.choices[0].text == want.text
    r = live.post("/v1/completions", {"model": MODEL, "prompt": "a", "skip_special_tokens": 1})
    assert r.status_code == 400 and "skip_special_tokens" in r.json()["error"]["message"]


def test_requests_are_tokenized_off_the_event_loop(live, monkeypatch):
    """Parsing, rendering and tokenizing a prompt (~130 ms for 100k tokens on 2 cores) run in a worker thread, not on
    the loop that streams every other request's chunks."""
    threads = []
    new_request, encode = live.llm.new_request, live.llm.tokenizer.encode

    def recording_request(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return new_request(*args, **kwargs)

    def recording_encode(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return encode(*args, **kwargs)

    monkeypatch.setattr(live.llm, "new_request", recording_request)
    monkeypatch.setattr(live.llm.tokenizer, "encode", recording_encode)
    live.client.completions.create(model=MODEL, prompt="off the loop", max_tokens=1)
    live.post("/tokenize", {"prompt": "off the loop"})
    loop_thread = next(t.name for t in threading.enumerate() if t.name.endswith("(run)"))
    assert threads and loop_thread not in threads and all(name.startswith("asyncio") for name in threads), threads


def test_tokenize_and_detokenize(live, offline):
    """vLLM's /tokenize (a prompt, or messages rendered as chat renders them) and /detokenize."""
    tok = offline.tokenizer
    r = live.post("/tokenize", {"prompt": "héllo<|im_end|>", "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("héllo<|im_end|>") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == live.llm.max_seq_len and r["token_strs"][-1] == "<|im_end|>"
    assert live.post("/tokenize", {"model": MODEL, "prompt": "x"}).json()["token_strs"] is None
    chat = live.post("/tokenize", {"messages": USER}).json()
    assert chat["tokens"] == tok.encode(tok.apply_chat_template(USER, add_generation_prompt=True))
    # the same prompt the chat endpoint generates from
    usage = live.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1).usage
    assert usage.prompt_tokens == chat["count"]
    bare = live.post("/tokenize", {"messages": USER, "add_generation_prompt": False}).json()
    assert bare["tokens"] == tok.encode(tok.apply_chat_template(USER, add_generation_prompt=False))
    assert bare["count"] < chat["count"]
    assert live.post("/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "héllo<|im_end|>"}
    for path, body, words in (("/tokenize", {"prompt": 3}, "'prompt' must be a string"),
                              ("/tokenize", {"prompt": "a", "add_special_tokens": True}, "unknown field"),
                              ("/detokenize", {"tokens": [1, 100000]}, "'tokens' must be a list"),
                              ("/detokenize", {"tokens": [1], "model": "other"}, "does not exist")):
        r = live.post(path, body)
        assert r.status_code in (400, 404) and words in r.json()["error"]["message"], (path, body)


def test_seeded_requests_are_reproducible(live):
    def run(seed):
        return live.client.completions.create(model=MODEL, prompt="seed test", max_tokens=16, temperature=1.0,
                                              seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    assert run(1) == run(1)
    assert run(1) != run(2)


def choices_streamed(events, n, chat):
    """Streamed chunks of an n > 1 request -> (text per choice index, finish reasons per index, usage chunks)."""
    texts, finish, usage = [""] * n, [[] for _ in range(n)], []
    for ev in events:
        if ev.usage is not None:
            usage.append(ev.usage)
        for c in ev.choices:
            texts[c.index] += (c.delta.content or "") if chat else c.text
            if c.finish_reason is not None:
                finish[c.index].append(c.finish_reason)
    return texts, finish, usage


def test_n_choices_equal_the_offline_api_with_seeds_seed_plus_index(live, offline):
    """n = 3: choice i is the offline API's generation with seed + i (vLLM's rule), streamed or not; the usage
    counts the prompt once and every choice's tokens; each choice ends once in the stream; a stop string ends
    some choices early while the others run on."""
    prompt, n = "Many choices", 3
    want = [offline.generate(prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=7 + i, ignore_eos=True))[0]
            for i in range(n)]
    assert len({w.text for w in want}) == n  # the seeds give different texts: the comparison below is not vacuous
    kw = dict(model=MODEL, prompt=prompt, max_tokens=10, temperature=1.0, seed=7, n=n, extra_body={"ignore_eos": True})
    got = live.client.completions.create(**kw)
    assert [c.index for c in got.choices] == list(range(n))
    assert [c.text for c in got.choices] == [w.text for w in want]
    assert [c.finish_reason for c in got.choices] == ["length"] * n
    prompt_len = len(want[0].prompt_token_ids)
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (prompt_len, 10 * n)
    options = {"include_usage": True, "continuous_usage_stats": True}
    events = list(live.client.completions.create(stream=True, stream_options=options, **kw))
    texts, finish, usage = choices_streamed(events, n, chat=False)
    assert texts == [w.text for w in want] and finish == [["length"]] * n
    assert usage[-1].completion_tokens == 10 * n and {u.prompt_tokens for u in usage} == {prompt_len}
    per_choice = {}  # as vLLM: each chunk carries its own choice's running usage
    for ev in events[:-1]:
        per_choice.setdefault(ev.choices[0].index, []).append(ev.usage.completion_tokens)
    assert all(r == sorted(r) and r[-1] == 10 for r in per_choice.values()) and len(per_choice) == n
    # a stop string that only some choices contain: those end early with "stop", the others at max_tokens
    stop = next(w.text[3:5] for w in want if w.text[3:5] not in want[0].text)
    expect = [(w.text[:w.text.find(stop)], "stop") if stop in w.text else (w.text, "length") for w in want]
    assert {e[1] for e in expect} == {"stop", "length"}
    got = live.client.completions.create(stop=[stop], **kw)
    assert [(c.text, c.finish_reason) for c in got.choices] == expect
    texts, finish, _ = choices_streamed(live.client.completions.create(stop=[stop], stream=True, **kw), n, False)
    assert list(zip(texts, (f[0] for f in finish))) == expect and all(len(f) == 1 for f in finish)
    assert live.idle()


def test_a_batch_of_prompts_with_n_choices_each(live, offline):
    """prompt as a list (strings and token ids): choice k*n + i is prompt k's choice i (seed + i), as vLLM numbers
    them; usage counts each prompt once; streamed the same; the blocks are all freed."""
    texts = ["first prompt", "the second one", "3"]
    ids = offline.tokenizer.encode(texts[1])
    n = 2
    want = [offline.generate(t, SamplingParams(max_tokens=6, temperature=1.0, seed=5 + i, ignore_eos=True))[0]
            for t in texts for i in range(n)]
    kw = dict(model=MODEL, prompt=[texts[0], ids, texts[2]], max_tokens=6, temperature=1.0, seed=5, n=n,
              extra_body={"ignore_eos": True})
    got = live.client.completions.create(**kw)
    assert [c.index for c in got.choices] == list(range(3 * n))
    assert [c.text for c in got.choices] == [w.text for w in want]
    prompt_tokens = sum(len(w.prompt_token_ids) for w in want[::n])
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (prompt_tokens, 6 * 3 * n)
    events = list(live.client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    streamed, finish, usage = choices_streamed(events, 3 * n, chat=False)
    assert streamed == [w.text for w in want] and finish == [["length"]] * (3 * n)
    assert usage[-1].prompt_tokens == prompt_tokens
    assert live.idle()


def test_echo_with_prompt_logprobs_as_lm_eval_asks(live, offline):
    """echo: each choice's text starts with its prompt; with logprobs, the prompt's tokens come first with their
    log-probabilities (None for the first) as the offline API's prompt_logprobs, then the generated ones; with
    max_tokens 0 (lm-eval's loglikelihood requests) the prompt alone, no completion token, finish "length";
    streamed: the prompt in each choice's first chunk. A token-id prompt echoes its decoded text."""
    texts = ["The capital of", "x"]
    ref = [offline.generate(t, SamplingParams(max_tokens=1, prompt_logprobs=2))[0] for t in texts]
    decode = offline.tokenizer.decode
    got = live.client.completions.create(model=MODEL, prompt=texts, echo=True, logprobs=2, max_tokens=0,
                                         temperature=0)
    for choice, want in zip(got.choices, ref, strict=True):
        lp = choice.logprobs
        assert choice.text == decode(want.prompt_token_ids) and choice.finish_reason == "length"
        assert lp.tokens == [decode([t], skip_special_tokens=False) for t in want.prompt_token_ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx([p[0] for p in want.prompt_logprobs[1:]], abs=1e-5)
        assert all(2 <= len(t) <= 3 and t[token] == v
                   for t, token, v in zip(lp.top_logprobs[1:], lp.tokens[1:], lp.token_logprobs[1:]))
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert got.usage.completion_tokens == 0
    assert got.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in ref)
    # with generated tokens: prompt entries, then the generated ones; text = prompt + completion
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=1)
    want = offline.generate(texts[0], params)[0]
    kw = dict(model=MODEL, prompt=texts[0], echo=True, logprobs=1, max_tokens=3, temperature=0,
              extra_body={"ignore_eos": True})
    one = live.client.completions.create(**kw).choices[0]
    assert one.text == texts[0] + want.text and len(one.logprobs.tokens) == len(want.prompt_token_ids) + 3
    assert one.logprobs.token_logprobs[-3:] == pytest.approx([lp for lp, _ in want.logprobs], abs=1e-5)
    events = list(live.client.completions.create(stream=True, **kw))
    assert events[0].choices[0].text == texts[0] and events[0].choices[0].logprobs.token_logprobs[0] is None
    assert "".join(e.choices[0].text for e in events if e.choices) == texts[0] + want.text
    streamed = sum((e.choices[0].logprobs.token_logprobs for e in events if e.choices and e.choices[0].logprobs), [])
    assert streamed[1:] == pytest.approx(one.logprobs.token_logprobs[1:], abs=1e-6)
    hidden = list(live.client.completions.create(**dict(kw, max_tokens=0), stream=True))
    assert [e.choices[0].text for e in hidden if e.choices] == [texts[0], ""]
    assert hidden[-1].choices[0].finish_reason == "length"
    ids = list(want.prompt_token_ids)
    assert live.client.completions.create(model=MODEL, prompt=ids, echo=True, max_tokens=2).choices[0].text \
        .startswith(decode(ids))
    # a character of several tokens (each decodes alone to U+FFFD): the completion's offsets follow the prompt text
    # sent, streamed or not; logprobs 0 gives the chosen token alone in each top_logprobs entry
    kw = dict(model=MODEL, prompt="café", echo=True, logprobs=0, max_tokens=2, temperature=0)
    lp = live.client.completions.create(**kw).choices[0].logprobs
    assert lp.text_offset[-2] == len("café") and lp.text_offset != list(range(len(lp.tokens)))
    events = list(live.client.completions.create(stream=True, **kw))
    assert sum((e.choices[0].logprobs.text_offset for e in events if e.choices and e.choices[0].logprobs), []) \
        == lp.text_offset
    assert lp.top_logprobs[0] is None and all(t == {k: v} for t, k, v in zip(lp.top_logprobs[1:], lp.tokens[1:],
                                                                          lp.token_logprobs[1:]))
    assert live.idle()


def test_n_choices_in_chat_greedy_and_unseeded(live, offline):
    messages = [{"role": "user", "content": "Pick one"}]
    want = [offline.chat(messages, SamplingParams(max_tokens=6, temperature=0.7, seed=3 + i, ignore_eos=True)).text
            for i in range(2)]
    kw = dict(model=MODEL, messages=messages, max_tokens=6, temperature=0.7, seed=3, n=2,
              extra_body={"ignore_eos": True})
    got = live.client.chat.completions.create(**kw)
    assert [c.message.content for c in got.choices] == want and got.usage.completion_tokens == 12
    events = list(live.client.chat.completions.create(stream=True, **kw))
    assert [(e.choices[0].index, e.choices[0].delta.role) for e in events[:2]] == [(0, "assistant"), (1, "assistant")]
    texts, finish, _ = choices_streamed(events, 2, chat=True)
    assert texts == want and finish == [["length"]] * 2
    # greedy: the choices are equal; unseeded sampling: each choice draws its own seed
    greedy = live.client.chat.completions.create(**dict(kw, temperature=0, seed=None, n=3))
    assert len({c.message.content for c in greedy.choices}) == 1
    sampled = live.client.chat.completions.create(**dict(kw, temperature=1.0, seed=None, n=4, max_tokens=16))
    assert len({c.message.content for c in sampled.choices}) == 4
    assert live.idle()


def test_logprobs_equal_the_offline_api(live, offline):
    """completions' logprobs = N and chat's logprobs + top_logprobs: the offline API's log-probabilities, each token
    decoded alone; streaming with logprobs is refused (not supported yet)."""
    prompt = "logprobs test"
    params = SamplingParams(max_tokens=5, temperature=0.8, seed=3, ignore_eos=True, logprobs=2)
    ref = offline.generate([prompt], params)[0]
    got = live.client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.8, seed=3,
                                         logprobs=2, extra_body={"ignore_eos": True}).choices[0].logprobs
    decode = offline.tokenizer.decode
    assert got.tokens == [decode([t], skip_special_tokens=False) for t in ref.token_ids]
    assert got.token_logprobs == pytest.approx([lp for lp, _ in ref.logprobs], abs=1e-5)
    # the top 2 and the chosen token (OpenAI's "up to logprobs + 1", as vLLM answers): distinct byte tokens
    assert all(len(top) == 2 + (token not in dict(list(top.items())[:2])) and top[token] == lp
               for top, token, lp in zip(got.top_logprobs, got.tokens, got.token_logprobs))
    assert any(len(top) == 3 for top in got.top_logprobs)  # a sampled token outside the top 2 (temperature 0.8)
    chat = live.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)  # greedy: the top one
    none = live.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=2, temperature=0)
    assert none.choices[0].logprobs is None
    # streamed: every token's entry arrives once, across the chunks, equal to the non-streamed response's
    chunks = list(live.client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.8, seed=3,
                                                 logprobs=2, stream=True, extra_body={"ignore_eos": True}))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs is not None]
    assert sum((lp.tokens for lp in streamed), []) == got.tokens
    assert sum((lp.token_logprobs for lp in streamed), []) == pytest.approx(got.token_logprobs, abs=1e-6)
    chat_chunks = list(live.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0, logprobs=True,
        top_logprobs=3, stream=True))
    streamed_chat = sum((c.choices[0].logprobs.content for c in chat_chunks
                         if c.choices and c.choices[0].logprobs is not None), [])
    assert [c.logprob for c in streamed_chat] == pytest.approx([c.logprob for c in content], abs=1e-6)
    # the response fields parse as the client's types
    from openai.types.chat.chat_completion import ChoiceLogprobs
    from openai.types.completion_choice import Logprobs

    entries = [TokenLogprob("He", -0.5, [("He", -0.5), ("A", -1.5)]), TokenLogprob("llo", -0.1, [("llo", -0.1)])]
    c = Logprobs(**completion_logprobs(entries))
    assert c.tokens == ["He", "llo"] and c.text_offset == [0, 2] and c.top_logprobs[0] == {"He": -0.5, "A": -1.5}
    ch = ChoiceLogprobs(**chat_logprobs(entries))
    assert ch.content[0].top_logprobs[1].token == "A" and ch.content[1].bytes == list(b"llo")
    # non-finite log-probabilities (overflowed logits) become vLLM's -9999.0: the body stays valid JSON
    from qwen2rt.server import token_logprobs
    from qwen2rt.tokenizer import ByteTokenizer

    odd = token_logprobs(ByteTokenizer(300), [104, 105], [(float("-inf"), [(104, float("nan"))]), (-0.25, [])])
    assert [(e.logprob, e.top) for e in odd] == [(-9999.0, [("h", -9999.0)]), (-0.25, [])]
    json.dumps(completion_logprobs(odd), allow_nan=False)


@pytest.mark.skipif(not HAS_PREFIX_CACHE, reason="this LLM has no prefix caching (enable_prefix_caching) yet")
def test_cached_tokens_on_a_repeated_prompt(live):
    block = live.llm.kv_cache.block_size
    prompt = "A repeated prompt, longer than two cache blocks of tokens."  # byte tokenizer: one token a byte
    assert len(prompt) > 2 * block
    hits_before = live.metric("qwen2rt_prefix_cache_hit_tokens_total")
    kw = dict(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    first = live.client.completions.create(**kw).usage
    second = live.client.completions.create(**kw).usage
    assert first.prompt_tokens_details.cached_tokens == 0
    cached = second.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.prompt_tokens and cached % block == 0
    events = list(live.client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert events[-1].usage.prompt_tokens_details.cached_tokens == cached
    assert live.metric("qwen2rt_prefix_cache_hit_tokens_total") - hits_before == 2 * cached
    assert live.metric("qwen2rt_prefix_cache_hit_rate") > 0


USER = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    # (route, body, status, words in the message)
    ("/v1/completions", "{not json", 400, "not valid JSON"),
    ("/v1/completions", "[1, 2]", 400, "JSON object"),
    ("/v1/completions", {"prompt": "a"}, 400, "'model' is required"),
    ("/v1/completions", {"model": "other", "prompt": "a"}, 404, "does not exist"),
    ("/v1/chat/completions", {"model": "other", "messages": USER}, 404, "does not exist"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "bogus": 1}, 400, "unknown field 'bogus'"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "priority": 1}, 400, "--scheduling-policy priority"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "allowed_token_ids": 5}, 400, "'allowed_token_ids' must be"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "allowed_token_ids": [1, -2]}, 400,
     "allowed_token_ids: token id '-2'"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "allowed_token_ids": [1, 10 ** 6]}, 400,
     "allowed_token_ids: token id 1000000 is outside the vocabulary"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "priority": "high"}, 400, "'priority' must be an int"),
    ("/v1/completions", {"model": MODEL}, 400, "'prompt' must be"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "'prompt' must be"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", 3]}, 400, "'prompt' must be"),
    ("/v1/completions", {"model": MODEL, "prompt": [[1, 2], []]}, 400, "'prompt' must be"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "x" * 300]}, 400, "prompt[1]: prompt has 300 tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "x" * 200], "max_tokens": 100}, 400,
     "prompt[1]: This model's maximum context length"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "empty"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 300}, 400, "max_seq_len"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": "8"}, 400, "'max_tokens' must be an int"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "top_k": 2 ** 63}, 400, "top_k"),  # not the whole batch's 500
    ("/v1/completions", {"model": MODEL, "prompt": "a", "min_p": 2}, 400, "min_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stop": 3}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "ignore_eos": "yes"}, 400, "ignore_eos"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "n": 0}, 400, "n = 0: must be an integer in [1, 128]"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "n": 129}, 400, "n = 129"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "n": 1.5}, 400, "'n' must be an int"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "logprobs": True}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "echo": "yes"}, 400, "'echo' must be a bool"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "echo": False, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "suffix": "z"}, 400, "suffix"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "best_of": 2}, 400, "only best_of = n (1)"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "n": 2, "best_of": 3}, 400, "best_of = 3"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "logit_bias": [1, 5]}, 400, "'logit_bias' must be an object"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "logit_bias": {"x1": 5}}, 400, "'x1' is not a token id"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "logit_bias": {"1": 200}}, 400,
     "the bias of token 1 must be a number in [-100, 100]"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "logit_bias": {"100000": 5}}, 400,
     "token id 100000 is outside the vocabulary"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 4, "min_tokens": 5}, 400,
     "min_tokens = 5: must be at most max_tokens (4)"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "min_tokens": 250}, 400,
     "min_tokens = 250: more than the"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "logit_bias": {"1": 10 ** 400}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stream_options": {"include_usage": True}}, 400,
     "stream = true"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stream": True, "stream_options": {"x": 1}}, 400,
     "include_usage"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stream": True,
                         "stream_options": {"continuous_usage_stats": 1}}, 400, "continuous_usage_stats must be"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "'messages' must be"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "'messages' must be"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "x"}]}, 400, "'role'"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "only text parts"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "logprobs": 1}, 400, "logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "top_logprobs": 1}, 400, "needs 'logprobs'"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "logprobs": True, "top_logprobs": 30}, 400,
     "top_logprobs = 30"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "tools": [{}]}, 400, "tools[0] must be"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "tools": {"type": "function"}}, 400,
     "'tools' must be a list"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "tool_choice": "required"}, 400,
     "tool_choice forces a tool call, and the request has no tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "tool_choice": "always", "tools": TOOLS}, 400,
     "tool_choice = 'always': must be"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "tools": TOOLS,
                              "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400,
     "names the function 'nope', which is not in tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "tool_choice": "required", "tools": TOOLS,
                              "guided_choice": ["a"]}, 400, "tool_choice and guided_choice both constrain"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "response_format": {"type": "json_schema"}}, 400,
     "response_format json_schema needs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "response_format": {"type": "xml"}}, 400,
     "response_format of type 'xml' is not supported"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "uniqueItems": True}}}}, 400,
     "keyword 'uniqueItems' at # is not implemented"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "guided_json": "{"}, 400,
     "guided_json: StructuredOutputs.json"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "response_format": "json"}, 400,
     "response_format of type None"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "guided_choice": "yes"}, 400,
     "guided_choice: the choices must be a list"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "guided_choice": ["yes", ""]}, 400,
     "'' is not a non-empty string"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "structured_outputs": {"grammar": "root ::= 'a'"}}, 400,
     "structured_outputs: StructuredOutputs.grammar: grammar line 1: unexpected \"'a'\""),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "guided_grammar": "root ::= a\na ::= a \"x\" | \"y\""}, 400,
     "guided_grammar: StructuredOutputs.grammar: grammar rule 'a' is left-recursive"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "structured_outputs": {"grammar": ["root"]}}, 400,
     "structured_outputs: the grammar must be a string"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "structured_outputs": {"structural_tag": "x"}}, 400,
     "'structural_tag' is not implemented"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "guided_regex": "(?=a)a"}, 400,
     "guided_regex: StructuredOutputs.regex: regex '(?=a)a': group syntax '(?=a'... is not implemented"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "structured_outputs": {"regex": 5}}, 400,
     "structured_outputs: the regex must be a string"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "guided_json": {"type": "string", "format": "x"}},
     400, "guided_json: StructuredOutputs.json: json schema at #: format 'x' is not implemented"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "structured_outputs": {"json_object": 1}}, 400,
     "json_object = 1: must be a bool"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "guided_choice": ["a"],
                         "response_format": {"type": "json_object"}}, 400, "response_format and guided_choice"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "guided_choice": ["a"], "ignore_eos": True}, 400,
     "ignore_eos = True: cannot be combined with structured_outputs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "max_completion_tokens": -1}, 400,
     "max_completion_tokens = -1"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 200, "max_tokens": 100}, 400,
     "maximum context length is 256 tokens. However, you requested 300 tokens (200 in the prompt, 100 in the "
     "completion)"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 250}, 400, "maximum context length"),
    ("/v1/chat/completions", {"model": MODEL, "messages": USER, "chat_template_kwargs": 3}, 400,
     "chat_template_kwargs"),
]


def test_pathological_bodies_get_400s_not_500s(live):
    """Found by fuzzing: each was a 500 (or an unclear 400) before; the server keeps serving after them."""
    deep = "[" * 1001
    raw = [("/v1/completions", deep, "not valid JSON"),
           ("/v1/completions", '{"model": "tiny", "prompt": "hi", "\\ud800": 1}', "unknown field"),
           ("/tokenize", '{"prompt": "\\ud800"}', "cannot be tokenized"),
           ("/v1/completions", '{"model": "tiny", "prompt": "\\ud800"}', "surrogate")]
    for path, body, words in raw:
        r = live.post(path, body)
        assert r.status_code == 400 and words in r.json()["error"]["message"], (path, body[:40], r.text[:200])
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": deep}}]}
    cases = [
        ("/v1/chat/completions", {"messages": [call, {"role": "user", "content": "x"}]}, "are not JSON"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"1" * 5000: 1}}, "is not a token id"),
        ("/v1/completions", {"prompt": "hi", "echo": True, "max_tokens": 0, "min_tokens": 2}, "max_tokens is 0"),
        ("/v1/chat/completions", {"messages": USER, "chat_template_kwargs": {"add_generation_prompt": False}},
         "may not set 'add_generation_prompt'"),
        ("/v1/completions", {"prompt": "hi", "temperature": 1e300}, "float32"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 5, "min_tokens": 5, "stop_token_ids": list(range(512))},
         "every token of the vocabulary is a stop token"),
        ("/v1/chat/completions", {"messages": [{"role": "tool", "tool_call_id": "c"}]},
         "messages[0].content is required for the role 'tool'"),
        ("/v1/completions", {"prompt": ["a"] * 33, "n": 128}, "more than 4096 per request")]
    for path, body, words in cases:
        r = live.post(path, dict(body, model=MODEL))
        assert r.status_code == 400 and words in r.json()["error"]["message"], (path, r.text[:300])
    assert httpx.get(live.url + "/health").status_code == 200 and live.idle()
    assert live.client.completions.create(model=MODEL, prompt="alive", max_tokens=3).usage.completion_tokens == 3


@pytest.mark.parametrize("route,body,status,words", BAD_REQUESTS, ids=[f"{i}" for i in range(len(BAD_REQUESTS))])
def test_bad_requests_get_openai_errors(live, route, body, status, words):
    r = live.post(route, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"


def test_error_params_and_codes_name_what_the_request_sent(live):
    cases = [({"prompt": "x" * 200, "max_tokens": 100}, "max_tokens", "context_length_exceeded"),
             ({"messages": USER, "max_completion_tokens": 250}, "max_completion_tokens", "context_length_exceeded"),
             ({"messages": USER, "max_completion_tokens": -1}, "max_completion_tokens", None),
             ({"messages": USER, "logprobs": True, "top_logprobs": 30}, "top_logprobs", None),
             ({"prompt": "a", "logit_bias": {"100000": 1}}, "logit_bias", None),
             ({"messages": USER, "min_tokens": 250}, "min_tokens", None),
             ({"messages": USER, "max_completion_tokens": 4, "min_tokens": 5}, "min_tokens", None),
             ({"messages": [{"role": "user", "content": "x" * 300}]}, "messages", None)]
    for body, param, code in cases:
        route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        error = live.post(route, dict(body, model=MODEL)).json()["error"]
        assert (error["param"], error["code"]) == (param, code), error
    # a default max_tokens is capped by the context, not refused: the reply ends at it
    r = live.post("/v1/completions", {"model": MODEL, "prompt": "x" * 250, "ignore_eos": True}).json()
    assert r["usage"]["completion_tokens"] == 6 and r["choices"][0]["finish_reason"] == "length"
    # "no tools", spelled the ways clients send it
    for extra in ({"tools": []}, {"tool_choice": "none"}, {"tools": [], "tool_choice": "auto"}):
        r = live.post("/v1/chat/completions", dict(model=MODEL, messages=USER, max_tokens=2, **extra))
        assert r.status_code == 200, r.text
    assert live.idle()


def test_chat_without_max_tokens_fits_a_cache_smaller_than_the_context():
    """The chat default (the rest of the context) is capped to what the KV cache holds: a server whose cache is
    smaller than one context still answers, and the reply ends at the cache's end (64 tokens of k/v: 65 tokens, the
    last one generated is never written)."""
    llm = LLM(MODEL, **dict(LLM_ARGS, num_kv_blocks=4, block_size=16))  # 64 tokens of cache, a 256-token context
    for live in serve(llm):
        r = live.post("/v1/chat/completions", {"model": MODEL, "messages": USER, "ignore_eos": True})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 65
        assert r.json()["choices"][0]["finish_reason"] == "length" and live.idle()


def test_concurrent_chats_without_max_tokens_share_a_small_cache(offline):
    """Four chat requests without max_tokens, each allowed the whole 192-token cache, run together (blocks are
    taken as tokens come, not reserved for the whole reply); when the cache runs out, the newest are preempted and
    recompute later. Each reply equals the offline API's alone (seeded), and /metrics counts the preemptions."""
    llm = LLM(MODEL, **dict(LLM_ARGS, num_kv_blocks=12, block_size=16))
    running, step, has_unfinished = [], llm.step, llm.has_unfinished

    def watched_step():
        running.append(len(llm.engine.running))
        return step()

    def all_four_queued():  # the server steps once all four requests are queued: the engine admits them together
        return has_unfinished() and (bool(running) or len(llm.engine.waiting) == 4)

    llm.step, llm.has_unfinished = watched_step, all_four_queued
    messages = [[{"role": "user", "content": f"tell me about {i}"}] for i in range(4)]
    for live in serve(llm):
        def ask(i):
            return live.post("/v1/chat/completions", {"model": MODEL, "messages": messages[i], "seed": i,
                                                      "temperature": 0.8, "ignore_eos": True})
        threads = [threading.Thread(target=lambda i=i: replies.__setitem__(i, ask(i))) for i in range(4)]
        replies = [None] * 4
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        # three start at once (3 prompt blocks each, and a watermark block kept free; the fourth joins once their
        # shared first block is cached); with whole replies reserved they would run one at a time
        assert running[1] == 3 and live.metric("qwen2rt_num_preemptions_total") >= 2 and live.idle()
    for i, r in enumerate(replies):
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 193  # the last token's k/v is never written
        want = offline.chat(messages[i], SamplingParams(max_tokens=usage["completion_tokens"], temperature=0.8,
                                                        seed=i, ignore_eos=True))
        assert r.json()["choices"][0]["message"]["content"] == want.text


def test_chat_continues_a_final_message(live, offline):
    """vLLM's continue_final_message (with add_generation_prompt false): the reply continues the caller's begun
    assistant message, as the offline API's; /tokenize renders the same prompt; both flags true is a 400."""
    messages = [{"role": "user", "content": "Give me JSON."}, {"role": "assistant", "content": '{"name": "'}]
    flags = dict(add_generation_prompt=False, continue_final_message=True)
    r = live.post("/v1/chat/completions", dict(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                               ignore_eos=True, **flags))
    assert r.status_code == 200, r.text
    want = offline.chat(messages, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), **flags)
    assert r.json()["choices"][0]["message"]["content"] == want.text
    assert r.json()["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
    assert live.post("/tokenize", dict(messages=messages, **flags)).json()["tokens"] == want.prompt_token_ids
    r = live.post("/v1/chat/completions", dict(model=MODEL, messages=messages, continue_final_message=True))
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


def test_allowed_token_ids_restrict_the_reply(live, offline):
    """vLLM's extra field: the reply's tokens come from the set, as the offline API's with the same params."""
    ids = [int(t) for t in offline.tokenizer.encode(" yes no maybe")]
    for route, body in (("/v1/completions", {"prompt": "Answer:"}), ("/v1/chat/completions", {"messages": USER})):
        r = live.post(route, dict(body, model=MODEL, max_tokens=6, temperature=0, ignore_eos=True,
                                  allowed_token_ids=ids, logprobs=True if "messages" in body else 1))
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, allowed_token_ids=ids)
        want = offline.chat(USER, params) if "messages" in body else offline.generate("Answer:", params)[0]
        assert set(want.token_ids) <= set(ids)
        assert (choice["message"]["content"] if "messages" in body else choice["text"]) == want.text


def test_structured_outputs_json_object_and_choices(live, offline):
    """response_format json_object (OpenAI's JSON mode) and json_schema, vLLM's guided_json, guided_choice,
    guided_regex, guided_grammar and structured_outputs: the replies equal the offline API's with StructuredOutputs
    (seeded), streamed or not; a JSON reply is an object json.loads reads (its keys the schema's, its strings matching
    their pattern and format), a choice reply one of the choices, a regex reply a whole match, a grammar's reply a
    sentence of it (the n choices different); the server keeps serving."""
    from qwen2rt import StructuredOutputs
    from qwen2rt.structured import check_json_object, run

    bias = {str(ord(c)): 6.0 for c in '"}'}
    json_object = StructuredOutputs(json_object=True)
    choices = ["alpha", "beta", "gamma delta"]
    schema = {"type": "object", "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["id", "ok"]}
    coded = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                                              "day": {"type": "string", "format": "date"},
                                              "n": {"type": "integer", "minimum": 10, "maximum": 12}},
             "required": ["code", "day", "n"], "additionalProperties": False}
    pattern = r"(yes|no), [a-z]{1,6}\."
    grammar = 'start: "(" [item ("," item)*] ")"\nitem: /[a-z]{1,4}/ | start'  # (Lark; a list of nested lists)
    cases = [("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_object"}}, json_object),
             ("/v1/chat/completions", {"messages": USER, "response_format": {
                 "type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": True}}},
              StructuredOutputs(json=schema)),
             ("/v1/completions", {"prompt": "JSON:", "guided_json": schema}, StructuredOutputs(json=schema)),
             ("/v1/completions", {"prompt": "JSON:", "structured_outputs": {"json_object": True}}, json_object),
             ("/v1/completions", {"prompt": "Pick:", "guided_choice": choices, "n": 3},
              StructuredOutputs(choice=choices)),
             ("/v1/chat/completions", {"messages": USER, "structured_outputs": {"choice": choices}},
              StructuredOutputs(choice=choices)),
             ("/v1/chat/completions", {"messages": USER, "response_format": {
                 "type": "json_schema", "json_schema": {"name": "coded", "schema": coded}}},
              StructuredOutputs(json=coded)),
             ("/v1/completions", {"prompt": "Say:", "guided_regex": pattern, "n": 2}, StructuredOutputs(regex=pattern)),
             ("/v1/chat/completions", {"messages": USER, "structured_outputs": {"regex": pattern}},
              StructuredOutputs(regex=pattern)),
             ("/v1/completions", {"prompt": "Nest:", "guided_grammar": grammar, "n": 2},
              StructuredOutputs(grammar=grammar)),
             ("/v1/chat/completions", {"messages": USER, "structured_outputs": {"grammar": grammar}},
              StructuredOutputs(grammar=grammar)),
             ("/v1/completions", {"prompt": "JSON:", "structured_outputs": {"json": schema,
                                                                            "disable_any_whitespace": True}},
              StructuredOutputs(json=schema, disable_any_whitespace=True))]
    for route, body, so in cases:
        chat = "messages" in body
        params = SamplingParams(max_tokens=120, temperature=1.0, seed=4, n=body.get("n", 1), structured_outputs=so,
                                logit_bias={int(k): v for k, v in bias.items()})
        want = offline.chat(USER, params) if chat else offline.generate(body["prompt"], params)[0]
        texts = [o.text for o in want.outputs]
        if so.regex is not None:
            assert all(re.fullmatch(pattern, t) for t in texts), texts
        elif so.grammar is not None:
            ends = [run(so.automaton(), t.encode()) for t in texts]
            assert all(e is not None and so.automaton().accepting(e) for e in ends), texts
            assert len(set(texts)) == len(texts), texts
        else:
            assert all((t in choices) if so.choice else check_json_object(t) for t in texts)
        if so.json is schema:
            assert all(set(json.loads(t)) == {"id", "ok"} for t in texts)
        if so.disable_any_whitespace:
            assert all(t == json.dumps(json.loads(t), separators=(",", ":")) for t in texts), texts
        if so.json is coded:
            for t in texts:
                value = json.loads(t)
                assert re.fullmatch("[A-Z]{2}-[0-9]{3}", value["code"]) and 10 <= value["n"] <= 12, t
                datetime.date.fromisoformat(value["day"])
        request = dict(body, model=MODEL, max_tokens=120, temperature=1.0, seed=4, logit_bias=bias)
        r = live.post(route, request)
        assert r.status_code == 200, r.text
        got = [c["message"]["content"] if chat else c["text"] for c in r.json()["choices"]]
        assert got == texts and all(c["finish_reason"] == "stop" for c in r.json()["choices"])
        if body.get("n", 1) == 1:
            r = live.post(route, dict(request, stream=True))
            events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            pieces = [e["choices"][0]["delta"].get("content") or "" if chat else e["choices"][0]["text"]
                      for e in events if e["choices"]]
            assert "".join(pieces) == texts[0]
    assert live.idle()


def test_forced_tool_calls_required_and_named(live):
    """tool_choice "required": the reply is one or more tool calls (Hermes blocks under the schema of each tool's
    name and parameters), finish_reason "tool_calls"; a named function: one call to it, finish_reason "stop" (as
    OpenAI and vLLM answer); parallel_tool_calls false: one call. Streamed, the same calls arrive as delta.tool_calls
    and nothing as content."""
    bias = {str(ord(c)): 6.0 for c in '"}'}
    base = {"model": MODEL, "messages": USER, "tools": TOOLS, "max_tokens": 200, "temperature": 1.0,
            "logit_bias": bias}
    named = {"type": "function", "function": {"name": "get_weather"}}
    seen = set()
    for seed in range(4):
        for choice, parallel in (("required", True), ("required", False), (named, True)):
            body = dict(base, seed=seed, tool_choice=choice, parallel_tool_calls=parallel)
            reply = live.post("/v1/chat/completions", body).json()["choices"][0]
            calls = reply["message"]["tool_calls"]
            assert reply["message"]["content"] is None and calls, reply
            assert reply["finish_reason"] == ("stop" if choice is named else "tool_calls")
            assert len(calls) == 1 or (parallel and choice == "required")
            for call in calls:
                arguments = json.loads(call["function"]["arguments"])
                assert call["function"]["name"] in ({"get_weather"} if choice is named else {"get_weather",
                                                                                            "get_time"})
                assert isinstance(arguments, dict) and set(arguments) <= ({"city"} if call["function"]["name"] ==
                                                                          "get_weather" else set(arguments))
                seen.add(call["function"]["name"])
            events = [json.loads(line[6:]) for line in live.post("/v1/chat/completions", dict(body, stream=True))
                      .text.splitlines() if line.startswith("data: {")]
            deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
            streamed = [c["function"] for d in deltas for c in d.get("tool_calls") or []]
            assert streamed == [c["function"] for c in calls] and not "".join(d.get("content") or "" for d in deltas)
            assert events[-1]["choices"][0]["finish_reason"] == reply["finish_reason"]
    assert seen == {"get_weather", "get_time"} and live.idle()


def test_truncate_prompt_tokens(live, offline):
    """vLLM's extra field: the prompt's last k tokens only (usage counts them; echo shows them), the reply that of
    the offline API with the same field; a prompt past the context is a 400 without it, answered with -1."""
    prompt = "the quick brown fox jumps over the lazy dog " * 3
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, truncate_prompt_tokens=12)
    want = offline.generate(prompt, params)[0]
    r = live.post("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 5, "temperature": 0,
                                      "ignore_eos": True, "truncate_prompt_tokens": 12, "echo": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 12 and r.json()["choices"][0]["text"] == prompt[-12:] + want.text
    long = "x" * 300
    body = {"model": MODEL, "prompt": long, "max_tokens": 1}
    assert live.post("/v1/completions", body).status_code == 400
    r = live.post("/v1/completions", dict(body, truncate_prompt_tokens=-1))
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 255
    r = live.post("/v1/completions", dict(body, truncate_prompt_tokens=0))
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens"


def test_forced_calls_schema():
    """The structured outputs a forced tool choice asks for: every tool (or the named one) as {"name": const,
    "arguments": its parameters (any object without)}, one block when named or without parallel tool calls."""
    from qwen2rt import StructuredOutputs
    from qwen2rt.server import _forced_calls
    from qwen2rt.structured import run

    spec = _forced_calls({"tools": TOOLS}, "required")
    assert spec["tool_call_blocks"] == 0 and [c["properties"]["name"] for c in spec["json"]["anyOf"]] == \
        [{"const": "get_weather"}, {"const": "get_time"}]
    assert spec["json"]["anyOf"][0]["properties"]["arguments"] == {"$ref": "#/$defs/tool0"}
    assert spec["json"]["$defs"]["tool0"] == TOOLS[0]["function"]["parameters"]
    assert _forced_calls({"tools": TOOLS, "parallel_tool_calls": False}, "required")["tool_call_blocks"] == 1
    named = _forced_calls({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
                          "named")
    assert named["tool_call_blocks"] == 1 and len(named["json"]["anyOf"]) == 1
    bare = _forced_calls({"tools": [{"type": "function", "function": {"name": "f"}}]}, "required")
    assert bare["json"]["$defs"]["tool0"] == {"type": "object"}
    # parameters with their own $defs and local refs (as pydantic writes them), one recursive through "#"
    point = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    tools = [{"type": "function", "function": {"name": "p", "parameters": {
                 "type": "object", "properties": {"at": {"$ref": "#/$defs/P"}, "tag": {"const": {"$ref": "#"}}},
                 "required": ["at"], "$defs": {"P": point}}}},
             {"type": "function", "function": {"name": "t", "parameters": {
                 "type": "object", "properties": {"sub": {"$ref": "#"}, "v": {"type": "integer"},
                                                  "const": {"$ref": "#/properties/v"}}}}}]
    grammar = StructuredOutputs(**_forced_calls({"tools": tools}, "required")).automaton()
    for text, ok in [('{"name": "p", "arguments": {"at": {"x": 1}}}', True),
                     ('{"name": "p", "arguments": {"at": {"x": 1}, "tag": {"$ref":"#"}}}', True),  # (as written)
                     ('{"name": "p", "arguments": {"at": {"y": 1}}}', False),
                     ('{"name": "t", "arguments": {"sub": {"sub": {"v": 2}}}}', True),
                     ('{"name": "t", "arguments": {"const": 3}}', True),  # a property named like a keyword
                     ('{"name": "t", "arguments": {"const": "3"}}', False),
                     ('{"name": "t", "arguments": {"sub": {"name": "t", "arguments": {}}}}', False)]:
        state = run(grammar, f"<tool_call>\n{text}\n</tool_call>".encode())
        assert (state is not None and grammar.accepting(state)) == ok, text


def test_priority_orders_requests_on_a_priority_server(offline, monkeypatch):
    """--scheduling-policy priority: the 'priority' field (vLLM's extra) reaches the scheduler; with one slot, an
    urgent request preempts a long streaming one and is answered while it streams, and both get the offline API's
    text (the long one recomputes its tokens)."""
    import argparse

    from qwen2rt.server import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--scheduling-policy", "priority"]).scheduling_policy == "priority"
    llm = LLM(MODEL, **dict(LLM_ARGS, max_batch_size=1), scheduling_policy="priority")
    step = llm.step
    monkeypatch.setattr(llm, "step", lambda: time.sleep(0.02) or step())  # the long request outlasts the urgent one
    greedy = dict(model=MODEL, ignore_eos=True, temperature=0)
    for live in serve(llm):
        body = dict(greedy, prompt="a long one", max_tokens=60, stream=True, priority=5)
        events = []

        def stream():
            with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as r:
                events.extend(line for line in r.iter_lines() if line.startswith("data:"))
        thread = threading.Thread(target=stream)
        thread.start()
        deadline = time.monotonic() + 30  # (random weights: its text may be held back as partial UTF-8)
        while not (llm.engine.running and len(llm.engine.running[0].output_ids) >= 5):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        urgent = live.post("/v1/completions", dict(greedy, prompt="now", max_tokens=4, priority=-1))
        assert urgent.status_code == 200 and llm.engine.num_preemptions == 1 and thread.is_alive()
        thread.join()
    text = "".join(c["text"] for e in events[:-1] for c in json.loads(e[5:])["choices"])
    assert events[-1] == "data: [DONE]"
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    assert text == offline.generate("a long one", params)[0].text
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    assert urgent.json()["choices"][0]["text"] == offline.generate("now", params)[0].text


def test_errors_through_the_client_and_the_server_keeps_serving(live):
    with pytest.raises(openai.NotFoundError):
        live.client.completions.create(model="other", prompt="a", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="unknown field"):
        live.client.completions.create(model=MODEL, prompt="a", max_tokens=2, extra_body={"bogus": True})
    with pytest.raises(openai.BadRequestError, match="top_p"):
        live.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, top_p=7)
    # a model without a chat template: chat is a 400 that says so, completions still work
    tokenizer = live.llm.tokenizer
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            live.client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    finally:
        tokenizer.chat_template = template
    assert live.client.completions.create(model=MODEL, prompt="still here", max_tokens=3).usage.completion_tokens
    assert live.metric("qwen2rt_rejected_requests_total", status="400") > 0
    assert live.idle()


def test_a_failed_engine_step_fails_its_requests_and_the_server_keeps_serving(live, monkeypatch):
    def broken():
        raise RuntimeError("injected step failure")

    monkeypatch.setattr(live.llm, "step", broken)
    r = live.post("/v1/completions", {"model": MODEL, "prompt": "doomed", "max_tokens": 4})
    assert r.status_code == 500 and "injected step failure" in r.json()["error"]["message"]
    r = live.post("/v1/completions", {"model": MODEL, "prompt": "doomed", "max_tokens": 4, "stream": True})
    assert r.status_code == 200 and "injected step failure" in r.text and r.text.endswith("data: [DONE]\n\n")
    r = live.post("/v1/completions", {"model": MODEL, "prompt": "doomed", "max_tokens": 4, "n": 3})
    assert r.status_code == 500 and "injected step failure" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert live.idle()
    assert live.client.completions.create(model=MODEL, prompt="alive", max_tokens=3).usage.completion_tokens == 3
    assert httpx.get(live.url + "/health").status_code == 200


def test_client_disconnect_aborts_and_frees_blocks(live, monkeypatch):
    assert live.idle()
    step = live.llm.step

    def slow_step():  # 30 ms a token at least: a request left running would hold the engine past idle's 5 s
        time.sleep(0.03)
        return step()

    monkeypatch.setattr(live.llm, "step", slow_step)
    aborted = live.metric("qwen2rt_requests_total", finish_reason="abort")
    body = {"model": MODEL, "prompt": "never finish", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert live.llm.engine.running and live.llm.kv_cache.num_free_blocks < live.llm.kv_cache.num_blocks
    assert live.idle(timeout=5), "the request still holds the engine after its client left"
    # a non-streamed request whose client gives up
    body = dict(body, stream=False, max_tokens=240)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/completions", json=body, timeout=0.5)
    assert live.idle(timeout=5), "the request still holds the engine after its client left"
    # n = 3, streamed: every choice is aborted (each counts as a request in the metrics)
    body = dict(body, stream=True, n=3)
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert len(live.llm.engine.running) == 3
    assert live.idle(timeout=5), "the choices still hold the engine after their client left"
    assert live.metric("qwen2rt_requests_total", finish_reason="abort") == aborted + 5


def test_load_32_streaming_clients_match_offline(live, offline):
    n_clients, per_client = 32, 2
    prompts = [[f"c{c}r{k} says" for k in range(per_client)] for c in range(n_clients)]
    kw = dict(model=MODEL, max_tokens=8, temperature=0.9, seed=11, stream=True,
              stream_options={"include_usage": True}, extra_body={"ignore_eos": True})

    async def client_run(prompts_of_one):
        async with openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0,
                                      timeout=60) as client:
            out = []
            for p in prompts_of_one:
                pieces, usage = [], None
                async for ev in await client.completions.create(prompt=p, **kw):
                    pieces += [c.text for c in ev.choices]
                    usage = ev.usage or usage
                out.append(("".join(pieces), usage.completion_tokens))
            return out

    async def main():
        return await asyncio.gather(*(client_run(p) for p in prompts))

    start = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - start
    flat = [p for ps in prompts for p in ps]
    want = offline.generate(flat, SamplingParams(max_tokens=8, temperature=0.9, seed=11, ignore_eos=True))
    got = [r for rs in results for r in rs]
    assert [g[1] for g in got] == [8] * len(flat)
    assert [g[0] for g in got] == [w.text for w in want]
    assert live.idle(timeout=5), "blocks leaked after the load test"
    assert elapsed < 60


def test_metrics_exposition(live):
    live.client.completions.create(model=MODEL, prompt="metrics", max_tokens=4)
    assert live.metric("qwen2rt_requests_total", endpoint="completions") > 0
    assert live.metric("qwen2rt_generation_tokens_total") > 0
    assert live.metric("qwen2rt_time_to_first_token_seconds_count") > 0
    assert live.metric("qwen2rt_inter_token_latency_seconds_count") > 0
    assert live.metric("qwen2rt_kv_cache_blocks_total") == live.llm.kv_cache.num_blocks
    assert live.metric("qwen2rt_kv_cache_usage_ratio") == 0.0 and live.metric("qwen2rt_requests_running") == 0
    assert "qwen2rt_prefix_cache_hit_rate" in httpx.get(live.url + "/metrics").text


def test_import_needs_no_server_packages_and_the_cli_serves():
    code = ("import sys, qwen2rt, qwen2rt.cli, qwen2rt.server; "
            "print(sorted(m for m in ('starlette', 'uvicorn', 'prometheus_client') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "qwen2rt", "serve", "--model", MODEL, "--port", str(port),
                             "--max-seq-len", "64", "--served-model-name", "my-tiny", "--log-level", "warning"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["my-tiny"]
        assert client.completions.create(model="my-tiny", prompt="hi", max_tokens=3).usage.completion_tokens == 3
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "serving tiny as 'my-tiny'" in out


def test_a_streams_last_piece_handed_over_while_it_waits_on_the_client_is_sent():
    """_events directly: while the generator waits at the yield of choice 0's first piece (a slow client), the
    driver hands over choice 0's last piece and its end, and choice 1's text and end, in one go (as _deliver does).
    Every piece is sent: reading the end after taking the text lost "B"."""
    from qwen2rt.server import ServerRequest, _events

    class Seq:
        prompt_ids, logprobs, num_cached_tokens = [1, 2], None, 0

        def __init__(self):
            self.output_ids, self.finish_reason = [], None

    async def main():
        changed = asyncio.Event()
        reqs = [ServerRequest(Seq(), "completions", changed) for _ in range(2)]
        reqs[0].pending.append("A")
        changed.set()
        texts = {}
        async for event in _events(reqs, "id", 0, MODEL, False, False, n=2):
            if event.startswith("data: {"):
                choice = json.loads(event[6:])["choices"][0]
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if texts.get(0) == "A" and not reqs[0].done.is_set():
                for req, piece, reason in ((reqs[0], "B", "stop"), (reqs[1], "X", "length")):
                    req.pending.append(piece)
                    req.seq.finish_reason = reason
                    req.done.set()
                changed.set()
        return texts

    assert asyncio.run(main()) == {0: "AB", 1: "X"}

"""Tool calls in the Hermes format (runtime/tool_calls.py): a finished reply parsed into OpenAI's tool_calls as
vLLM's hermes parser reads it, and the streamed reply split at every place giving the same content and calls."""

from __future__ import annotations

import json
import random

import pytest

from qwen2rt.tool_calls import ToolCallStream, parse

CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


def names_and_args(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_parse_content_and_calls():
    content, calls = parse("Let me check. " + CALLS)
    assert content == "Let me check. "
    assert names_and_args(calls) == [("get_weather", {"city": "Paris", "unit": "°C"}), ("get_time", {})]
    assert '"°C"' in calls[0].arguments  # not escaped (ensure_ascii off, as vLLM)
    assert len({c.id for c in calls}) == 2 and calls[0].openai(0)["index"] == 0
    assert calls[1].openai() == {"id": calls[1].id, "type": "function",
                                 "function": {"name": "get_time", "arguments": "{}"}}
    assert parse(CALLS)[0] is None  # nothing before the first call: no content


@pytest.mark.parametrize("text", [
    "plain text, no call", "a <tool_call> that is no JSON </tool_call>",
    '<tool_call>\n{"name": "f"}\n</tool_call>',  # no arguments
    '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
    '<tool_call>\n["f", {}]\n</tool_call>', CALLS + '<tool_call>{"name": broken}</tool_call>',
    "<tool_call>" + "[" * 1200])  # nested past Python's recursion limit
def test_a_reply_with_no_valid_calls_is_all_content(text):
    assert parse(text) == (text, [])


def test_a_closing_tag_inside_a_string_is_part_of_it():
    """A call's JSON is read as JSON: a "</tool_call>" inside one of its strings does not end the block (a forced
    tool call's grammar lets it through; a regex up to the first tag made the reply all content). Text after the JSON
    other than whitespace still makes the reply content."""
    text = '<tool_call>\n{"name": "echo", "arguments": {"s": "a</tool_call>b"}}\n</tool_call>'
    content, calls = parse(text)
    assert content is None and names_and_args(calls) == [("echo", {"s": "a</tool_call>b"})]
    for junk in ('<tool_call>\n{"name": "f", "arguments": {}} x\n</tool_call>',
                 '<tool_call>\n{"name": "f", "arguments": {}} x'):
        assert parse(junk) == (junk, [])


def test_a_last_unclosed_call_counts():
    content, calls = parse('ok<tool_call>\n{"name": "f", "arguments": {"x": [1, 2]}}\n')
    assert content == "ok" and names_and_args(calls) == [("f", {"x": [1, 2]})]


@pytest.mark.parametrize("text", [
    "Let me check. " + CALLS, CALLS, "no calls at all <tool_ but a near miss <tool_cal", "ends inside the tag <tool_c",
    "a <tool_call> that is no JSON </tool_call>", "<<tool_call>\n{\"name\": \"f\", \"arguments\": 1}\n</tool_call>"])
def test_the_stream_gives_what_parse_gives_however_the_text_is_split(text):
    want_content, want_calls = parse(text)
    rng = random.Random(0)
    splits = [[text[i:i + 1] for i in range(len(text))], [text]]
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(5, len(text) - 1)))
        splits.append([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])])
    for pieces in splits:
        stream = ToolCallStream()
        sent = [stream.feed(p) for p in pieces]
        rest, calls = stream.finish()
        assert "".join(sent) + rest == (text if not want_calls else want_content or "")
        assert names_and_args(calls) == names_and_args(want_calls)
        if "<tool_call>" not in text:  # plain text streams at once, holding back at most a possible start of the tag
            fed = sent_len = 0
            for piece, out in zip(pieces, sent):
                fed, sent_len = fed + len(piece), sent_len + len(out)
                assert fed - sent_len <= len("<tool_call>") - 1

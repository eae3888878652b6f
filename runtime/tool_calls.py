"""Tool calls in the Hermes format that Qwen2 / Qwen2.5 chat templates ask for: the model answers a request with
`tools` by writing one or more

    <tool_call>
    {"name": "<function name>", "arguments": {...}}
    </tool_call>

blocks, after an optional text reply. `parse` turns a finished reply into OpenAI's `tool_calls` and the content
before the first block, as vLLM's `hermes` tool parser reads it: a last block the reply ended inside (no closing tag)
counts too, and a reply in which any block is not such a JSON object is plain content with no calls. Text between
or after the blocks is dropped, as vLLM drops it. `ToolCallStream` does the same for a streamed reply: text before
the first block streams as content at once (holding back only what could still become the opening tag), and the
calls arrive whole in the last chunks of the reply."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_WS = " \t\n\r"  # JSON's whitespace


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it (a string)
    id: str

    def openai(self, index: int | None = None) -> dict:
        """The call as OpenAI's message.tool_calls[] entry; with `index`, as a streamed delta.tool_calls[] entry."""
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def parse(text: str) -> tuple[str | None, list[ToolCall]]:
    """A finished reply -> (its content: the text before the first tool call, None when empty; its tool calls).
    A reply with no block, or with a block that is not a JSON object with a "name" string and "arguments" (and
    nothing but whitespace after it), is all content and no calls. Each block's JSON is read as JSON (so a
    closing tag inside one of its strings is part of the string)."""
    start = text.find(OPEN)
    if start < 0:
        return text, []
    calls, at, decoder = [], start, json.JSONDecoder()
    while (at := text.find(OPEN, at)) >= 0:
        body = at + len(OPEN)
        while body < len(text) and text[body] in _WS:  # (raw_decode takes no whitespace before the value)
            body += 1
        try:
            call, end = decoder.raw_decode(text, body)
        except (ValueError, RecursionError):  # RecursionError: nested past Python's limit
            return text, []
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and "arguments" in call):
            return text, []
        close = text.find(CLOSE, end)
        if text[end:len(text) if close < 0 else close].strip(_WS):
            return text, []
        calls.append(ToolCall(call["name"], json.dumps(call["arguments"], ensure_ascii=False),
                              f"chatcmpl-tool-{uuid.uuid4().hex}"))
        if close < 0:  # the reply ended inside its last block
            break
        at = close + len(CLOSE)
    return text[:start] or None, calls


class ToolCallStream:
    """The content of a streamed reply to a request with tools: `feed` each new piece of text and send what it
    returns as content now; once the reply has ended, `finish` -> (content still to send, the tool calls). Text
    from the first opening tag on is held until the end and parsed there; text that might still turn into that tag
    (a suffix of the text that is a prefix of it) waits for the next piece."""

    def __init__(self):
        self._pending = ""  # text not sent yet: a possible start of the tag, or everything from the tag on
        self._in_calls = False
        self._sent = ""  # the content sent so far

    def feed(self, piece: str) -> str:
        if self._in_calls:
            self._pending += piece
            return ""
        text = self._pending + piece
        start = text.find(OPEN)
        if start >= 0:
            self._in_calls = True
            self._pending = text[start:]
            return self._send(text[:start])
        keep = next((n for n in range(min(len(OPEN) - 1, len(text)), 0, -1) if OPEN.startswith(text[-n:])), 0)
        self._pending = text[len(text) - keep:]
        return self._send(text[:len(text) - keep])

    def _send(self, text: str) -> str:
        self._sent += text
        return text

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The rest of the reply: (content to send, tool calls). Calls that do not parse are sent as content."""
        rest, self._pending = self._pending, ""
        if not self._in_calls:
            return self._send(rest), []
        _, calls = parse(rest)
        return ("", calls) if calls else (self._send(rest), [])

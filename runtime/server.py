"""The OpenAI-compatible HTTP server: `python -m qwen2rt serve --model M [--host H] [--port P]`.

Routes: POST /v1/completions and /v1/chat/completions (JSON, or server-sent events with `"stream": true`), GET
/v1/models, /health and /metrics (Prometheus text). Built on Starlette and uvicorn (the `serve` extra), imported
only when an app is built, so `import qwen2rt` never needs them.

One asyncio task, the driver, owns the engine: it steps it in a worker thread while any request is unfinished, and
between steps (on the event loop, with no step running, so the engine lock is always free there) it adds new
requests, aborts those whose client went away, and hands each request its new text. Every engine change thus
happens between steps and never blocks the event loop; a client that disconnects has its request aborted and its
blocks freed right after the step in flight, if any.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass

from . import tool_calls
from .sequence import check_min_tokens

log = logging.getLogger("qwen2rt.server")

# request fields each endpoint reads; anything else is a 400 naming the field
_COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
                  "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids", "seed", "n", "ignore_eos",
                  "logprobs", "stream", "stream_options", "user", "min_tokens", "logit_bias", "skip_special_tokens",
                  "include_stop_str_in_output", "priority", "allowed_token_ids", "response_format",
                  "guided_json", "guided_choice", "guided_regex", "guided_grammar", "structured_outputs",
                  "truncate_prompt_tokens"}
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"}
_CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools",
                                 "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
                                 "add_generation_prompt", "continue_final_message"}
_TOKENIZE_FIELDS = {"model", "prompt", "return_token_strs"}
_TOKENIZE_CHAT_FIELDS = {"model", "messages", "add_generation_prompt", "chat_template_kwargs", "tools",
                         "return_token_strs", "continue_final_message"}
_SAMPLING_FIELD = re.compile(r"SamplingParams\.(\w+)")
MAX_N = 128  # the most choices (`n`) one request may ask for, OpenAI's limit
MAX_CHOICES = 4096  # the most sequences one request may start (prompts x n): no request monopolises the engine

# Prometheus histogram buckets, seconds
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)


class RequestError(Exception):
    """A request the server refuses: an OpenAI-style error body with this status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---- requests -----------------------------------------------------------------------------------------------------
@dataclass
class Parsed:
    """A validated request: what to generate and how to answer."""

    prompts: list[str | list[int]]  # completions may batch prompts; chat has one
    params: object  # SamplingParams
    stream: bool
    include_usage: bool
    max_tokens_field: str | None = None  # the request field that set max_tokens; None: a default did
    continuous_usage: bool = False  # stream_options.continuous_usage_stats (and include_usage): usage in each chunk
    n: int = 1  # completions of the prompt to return (choices 0 .. n-1)
    tool_calls: bool = False  # chat with tools (tool_choice "auto"): replies are parsed for tool calls
    parallel_tool_calls: bool = True  # false: a reply's first tool call only (OpenAI's "at most one")
    named_tool: bool = False  # tool_choice names a function: finish_reason stays "stop" (OpenAI's and vLLM's)
    echo: bool = False  # completions: each choice starts with its prompt (and its logprobs with the prompt's)
    hide_output: bool = False  # echo with max_tokens 0: one token is generated to run the prefill, none is shown
    field_names: dict | None = None  # SamplingParams field -> the request's field, where they differ (errors)
    priority: int = 0  # vLLM's extra field: with scheduling_policy "priority", a lower value is scheduled first

    def choice_params(self) -> list:
        """SamplingParams of each of the n choices (SamplingParams.choices: a seeded request's choice i draws with
        seed + i, as in vLLM)."""
        return dataclasses.replace(self.params, n=self.n).choices()


def _check_fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}", param=unknown[0])


def _typed(body: dict, name: str, kind: str):
    """body[name] or None, checked against kind: int, number, bool, str."""
    value = body.get(name)
    if value is None:
        return None
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, str)}[kind]
    if not ok(value):
        raise RequestError(f"{name!r} must be {'an' if kind == 'int' else 'a'} {kind}, got {value!r}", param=name)
    return value


def _num_choices(body: dict, chat: bool) -> int:
    """`n`: how many completions of the prompt to return (1 to MAX_N). Completions' `best_of` may only equal it:
    choosing the best of more samples is not implemented."""
    n = _typed(body, "n", "int")
    if n is not None and not 1 <= n <= MAX_N:
        raise RequestError(f"n = {n}: must be an integer in [1, {MAX_N}]", param="n")
    n = 1 if n is None else n
    best_of = None if chat else _typed(body, "best_of", "int")
    if best_of is not None and best_of != n:
        raise RequestError(f"best_of = {best_of}: only best_of = n ({n}) is supported (no choosing among more "
                           "samples than are returned)", param="best_of")
    return n


def _unsupported(body: dict, chat: bool) -> None:
    """Fields the OpenAI API has and this server does not implement yet: a 400 rather than a silent default."""
    if not chat:
        if body.get("suffix") is not None:
            raise RequestError("suffix is not supported", param="suffix")


def _tool_choice(body: dict) -> str:
    """Chat's tool_choice: "auto" (the default with tools: the model may call them), "none", "required" (at least
    one call) or "named" ({"type": "function", "function": {"name": ...}}: that one); the forced ones need tools."""
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "none"):
        return choice or "auto"
    named = isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
    if choice != "required" and not (named and isinstance(choice["function"].get("name"), str)):
        raise RequestError(f"tool_choice = {str(choice)[:80]!r}: must be \"auto\", \"none\", \"required\" or "
                           "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
    if not _tools(body):
        raise RequestError("tool_choice forces a tool call, and the request has no tools", param="tool_choice")
    if named and not any(t["function"]["name"] == choice["function"]["name"] for t in body["tools"]):
        raise RequestError(f"tool_choice names the function {choice['function']['name']!r}, which is not in tools",
                           param="tool_choice")
    return "named" if named else "required"


def _forced_calls(body: dict, choice: str) -> dict:
    """StructuredOutputs' arguments for a forced tool call (tool_choice "required" or named): the reply is tool-call
    blocks in Qwen's Hermes format (what its chat template asks for and tool_calls.py reads), each a JSON object
    {"name": one of the tools (the named one), "arguments": an object of that function's parameters schema}; one
    block when named or without parallel_tool_calls, else one or more."""
    tools = body["tools"]
    if choice == "named":
        tools = [t for t in tools if t["function"]["name"] == body["tool_choice"]["function"]["name"]]
    # each function's parameters under $defs, their local $refs ("#...") rewritten to point into them there
    defs = {f"tool{i}": _rebased(t["function"].get("parameters") or {"type": "object"}, f"#/$defs/tool{i}")
            for i, t in enumerate(tools)}
    calls = [{"type": "object", "required": ["name", "arguments"], "properties": {
        "name": {"const": t["function"]["name"]}, "arguments": {"$ref": f"#/$defs/tool{i}"}}}
        for i, t in enumerate(tools)]
    one = choice == "named" or body.get("parallel_tool_calls") is False
    return dict(json={"anyOf": calls, "$defs": defs}, tool_call_blocks=1 if one else 0)


def _rebased(schema, base: str):
    """A schema moved to `base` (a JSON pointer into a larger schema): its local $refs ("#", "#/...") rewritten
    to point under it; enum and const values are data, left as they are."""
    if isinstance(schema, list):
        return [_rebased(x, base) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = base + value[1:]
        elif key in ("enum", "const"):
            out[key] = value
        elif key in ("properties", "$defs", "definitions") and isinstance(value, dict):  # names -> schemas
            out[key] = {name: _rebased(sub, base) for name, sub in value.items()}
        else:
            out[key] = _rebased(value, base)
    return out


def _structured(body: dict, tool_choice: str = "auto") -> tuple[object | None, str | None]:
    """-> (StructuredOutputs or None, the request field that asked for it): response_format {"type":
    "json_schema", "json_schema": {"schema": ...}} or {"type": "json_object"} (OpenAI's), vLLM's guided_json (a
    schema), guided_choice (a list of strings), guided_regex (a pattern), guided_grammar (GBNF or Lark) or
    structured_outputs ({"json": schema}, {"json_object": true}, {"choice": [...]}, {"regex": pattern} or
    {"grammar": text}; "disable_any_whitespace": true beside json or json_object), or chat's tool_choice "required"
    / named (_forced_calls); at most one of them. Structural tags are not implemented: a 400."""
    from .structured import StructuredOutputs

    asked = []
    if tool_choice in ("required", "named"):
        try:
            asked.append(("tool_choice", _forced_calls(body, tool_choice)))
        except RecursionError:
            raise RequestError("tools: a parameters schema nests too deeply", param="tools") from None
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            asked.append(("response_format", dict(json_object=True)))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise RequestError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': "
                                   "{...}}}", param="response_format")
            asked.append(("response_format", dict(json=spec["schema"])))
        elif kind != "text":
            raise RequestError(f"response_format of type {kind!r} is not supported (\"text\", \"json_object\" "
                               "and \"json_schema\" are)", param="response_format")
    for name, key in (("guided_json", "json"), ("guided_choice", "choice"), ("guided_regex", "regex"),
                      ("guided_grammar", "grammar")):
        if body.get(name) is not None:
            asked.append((name, {key: body[name]}))
    spec = body.get("structured_outputs")
    if spec is not None:
        keys = {"json", "json_object", "choice", "regex", "grammar", "disable_any_whitespace"}
        if not isinstance(spec, dict) or not spec or set(spec) - keys:
            other = sorted(set(spec) - keys) if isinstance(spec, dict) else []
            why = f" ({other[0]!r} is not implemented)" if other else ""
            raise RequestError("structured_outputs must be {'json': schema}, {'json_object': true}, {'choice': "
                               f"[strings]}}, {{'regex': pattern}} or {{'grammar': text}}{why}",
                               param="structured_outputs")
        asked.append(("structured_outputs", spec))
    if not asked:
        return None, None
    if len(asked) > 1:
        raise RequestError(f"{asked[0][0]} and {asked[1][0]} both constrain the output: give one", param=asked[1][0])
    field, spec = asked[0]
    if "choice" in spec and not isinstance(spec["choice"], list):
        raise RequestError(f"{field}: the choices must be a list of strings", param=field)
    for key in ("regex", "grammar"):
        if key in spec and not isinstance(spec[key], str):
            raise RequestError(f"{field}: the {key} must be a string", param=field)
    try:
        return StructuredOutputs(**spec), field
    except (TypeError, ValueError) as e:
        raise RequestError(f"{field}: {e}", param=field) from None


def _logprobs(body: dict, chat: bool) -> int | None:
    """SamplingParams.logprobs from the request: completions' `logprobs` (the number of alternatives), chat's
    `logprobs` (bool) with `top_logprobs` (the number, which needs logprobs = true)."""
    if not chat:
        return _typed(body, "logprobs", "int")
    top = _typed(body, "top_logprobs", "int")
    if not _typed(body, "logprobs", "bool"):
        if top is not None:
            raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return None
    return 0 if top is None else top


def _logit_bias(body: dict) -> dict[int, float] | None:
    """OpenAI's logit_bias, {"token id": bias} with the ids as JSON strings -> {int: bias} (SamplingParams checks
    the ids and the [-100, 100] range)."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise RequestError("'logit_bias' must be an object mapping token ids to biases", param="logit_bias")
    out = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 12):
            raise RequestError(f"logit_bias: {key[:40]!r} is not a token id", param="logit_bias")
        out[int(key)] = value
    return out


def _sampling_params(body: dict, max_tokens, logprobs: int | None = None, fields: dict | None = None,
                     tool_choice: str = "auto"):
    """fields: SamplingParams field -> the request field that set it, where the names differ (errors name the
    request's); the field that asked for structured outputs is added to it."""
    from .sampling import SamplingParams

    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and not isinstance(stop_ids, list):
        raise RequestError("'stop_token_ids' must be a list of token ids", param="stop_token_ids")
    allowed = body.get("allowed_token_ids")
    if allowed is not None and not isinstance(allowed, list):
        raise RequestError("'allowed_token_ids' must be a list of token ids", param="allowed_token_ids")
    structured, structured_field = _structured(body, tool_choice)
    if structured_field is not None and fields is not None:
        fields["structured_outputs"] = structured_field  # (the caller's: errors after this one name it too)
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=_typed(body, "temperature", "number"),
            top_p=_typed(body, "top_p", "number"), top_k=_typed(body, "top_k", "int"),
            min_p=_typed(body, "min_p", "number"), presence_penalty=_typed(body, "presence_penalty", "number"),
            frequency_penalty=_typed(body, "frequency_penalty", "number"),
            repetition_penalty=_typed(body, "repetition_penalty", "number"), stop=stop, stop_token_ids=stop_ids,
            ignore_eos=_typed(body, "ignore_eos", "bool"), seed=_typed(body, "seed", "int"), logprobs=logprobs,
            min_tokens=_typed(body, "min_tokens", "int"), logit_bias=_logit_bias(body),
            skip_special_tokens=_typed(body, "skip_special_tokens", "bool"),
            include_stop_str_in_output=_typed(body, "include_stop_str_in_output", "bool"), allowed_token_ids=allowed,
            structured_outputs=structured, truncate_prompt_tokens=_typed(body, "truncate_prompt_tokens", "int"))
    except ValueError as e:
        raise _field_error(e, fields) from None


def _field_error(e: ValueError, fields: dict | None = None, default_param: str | None = None,
                 where: str = "") -> RequestError:
    """A SamplingParams ValueError as a 400 naming the request's field (fields: SamplingParams field -> the request
    field that set it, where the names differ)."""
    field = _SAMPLING_FIELD.search(str(e))
    if field is None:
        return RequestError(where + str(e), param=default_param)
    name = (fields or {}).get(field.group(1), field.group(1))
    return RequestError(where + str(e).replace(field.group(0), name), param=name)


def _stream_options(body: dict) -> tuple[bool, bool, bool]:
    """-> (stream, include_usage, continuous_usage_stats: vLLM's option, the running usage in every chunk). As in
    vLLM, include_usage defaults to true once stream_options is given, and continuous_usage_stats needs it."""
    stream = bool(_typed(body, "stream", "bool"))
    options = body.get("stream_options")
    if options is None:
        return stream, False, False
    if not stream:
        raise RequestError("stream_options is only allowed with stream = true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise RequestError("stream_options must be {'include_usage': bool, 'continuous_usage_stats': bool}",
                           param="stream_options")
    flags = [options.get("include_usage", True), options.get("continuous_usage_stats")]
    for key, value in zip(("include_usage", "continuous_usage_stats"), flags):
        if value is not None and not isinstance(value, bool):
            raise RequestError(f"stream_options.{key} must be a bool", param="stream_options")
    return stream, bool(flags[0]), bool(flags[0] and flags[1])


def _is_ids(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in prompt)


def parse_completion(body: dict) -> Parsed:
    """A /v1/completions body -> Parsed. prompt: a string, a list of token ids, or a batch of either (a list of
    strings, or a list of token-id lists), as OpenAI and vLLM take it."""
    _check_fields(body, _COMPLETION_FIELDS)
    _unsupported(body, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise RequestError("'prompt' must be a string, a list of token ids, or a non-empty list of either",
                           param="prompt")
    max_tokens = _typed(body, "max_tokens", "int")
    echo = bool(_typed(body, "echo", "bool"))
    hide_output = echo and max_tokens == 0  # the prompt alone (lm-eval's loglikelihood requests), as vLLM allows
    if hide_output and body.get("min_tokens"):
        raise RequestError("min_tokens needs generated tokens, and max_tokens is 0 (echo the prompt alone)",
                           param="min_tokens")
    logprobs = _logprobs(body, chat=False)
    fields: dict = {}
    params = _sampling_params(body, 1 if hide_output else max_tokens, logprobs, fields)
    if echo and logprobs is not None:
        params = dataclasses.replace(params, prompt_logprobs=logprobs)
    stream, include_usage, continuous = _stream_options(body)
    n = _num_choices(body, chat=False)
    if len(prompts) * n > MAX_CHOICES:
        raise RequestError(f"{len(prompts)} prompts x n = {n} is {len(prompts) * n} choices, more than "
                           f"{MAX_CHOICES} per request: split the batch", param="prompt")
    return Parsed(prompts, params, stream, include_usage, None if max_tokens is None else "max_tokens", continuous,
                  n, echo=echo, hide_output=hide_output, field_names=fields,
                  priority=_typed(body, "priority", "int") or 0)


def _tools(body: dict) -> list[dict] | None:
    """OpenAI's `tools`: function definitions, handed to the chat template as they are (None: none)."""
    tools = body.get("tools")
    if not tools:
        return None
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list of {'type': 'function', 'function': {...}}", param="tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(function, dict)
                and isinstance(function.get("name"), str) and function["name"]):
            raise RequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': str, ...}}}}",
                               param="tools")
    return tools


def _calls_for_template(calls, index: int) -> list:
    """An assistant turn's tool_calls with each function's arguments parsed from OpenAI's JSON string to an object."""
    if not isinstance(calls, list):
        raise RequestError(f"messages[{index}].tool_calls must be a list", param="messages")
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise RequestError(f"messages[{index}].tool_calls: each needs a 'function' object", param="messages")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except (ValueError, RecursionError):
                raise RequestError(f"messages[{index}].tool_calls: arguments {arguments[:80]!r} are not JSON",
                                   param="messages") from None
        out.append(dict(call, function=dict(function, arguments={} if arguments is None else arguments)))
    return out


def _message_text(content, index: int) -> str:
    if isinstance(content, str) or content is None:
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"messages[{index}].content: only text parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"messages[{index}].content must be a string or a list of text parts", param="messages")


def render_chat(body: dict, tokenizer, tools: list[dict] | None) -> str:
    """A request's messages rendered with the checkpoint's chat template (with the tools, if any), with vLLM's
    add_generation_prompt (default true) and continue_final_message (default false: true ends the text inside the
    final message, which the model continues; it needs add_generation_prompt false, as vLLM checks)."""
    import jinja2

    add_generation_prompt = _typed(body, "add_generation_prompt", "bool") is not False
    continue_final = bool(_typed(body, "continue_final_message", "bool"))
    if continue_final and add_generation_prompt:
        raise RequestError("continue_final_message = true needs add_generation_prompt = false (one continues the "
                           "final message, the other opens a new assistant turn)", param="continue_final_message")

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {'role': ..., 'content': ...}", param="messages")
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a 'role' string", param="messages")
        content = _message_text(m.get("content"), i)
        if content is None and m["role"] != "assistant":
            raise RequestError(f"messages[{i}].content is required for the role {m['role']!r}", param="messages")
        m = dict(m, content=content)
        if m["role"] == "assistant":  # a tool-calling turn: templates test or slice the text, and render the
            m["content"] = content or ""  # arguments with tojson (Qwen2.5's): an object, not OpenAI's JSON string,
            if m.get("tool_calls"):  # as vLLM hands them to the template
                m["tool_calls"] = _calls_for_template(m["tool_calls"], i)
        rendered.append(m)
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise RequestError("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    reserved = {"messages", "add_generation_prompt", "continue_final_message"} | (
        {"tools"} if tools is not None else set())
    if reserved & set(kwargs):
        raise RequestError(f"chat_template_kwargs may not set {sorted(reserved & set(kwargs))[0]!r} (the request "
                           "sets it)", param="chat_template_kwargs")
    if tokenizer is None or not tokenizer.chat_template:
        raise RequestError("this model has no chat template (none in tokenizer_config.json or chat_template.jinja): "
                           "use /v1/completions", param="messages")
    if tools is not None:  # rendered whatever tool_choice says, as vLLM does by default
        kwargs = dict(kwargs, tools=tools)
    try:
        return tokenizer.apply_chat_template(rendered, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final, **kwargs)
    except (ValueError, TypeError, jinja2.TemplateError) as e:
        raise RequestError(f"the chat template failed on these messages: {e}", param="messages") from None


def parse_chat(body: dict, tokenizer, max_seq_len: int, default_max_tokens: bool) -> Parsed:
    """A /v1/chat/completions body -> Parsed, the prompt rendered with the checkpoint's chat template. With no
    max_completion_tokens / max_tokens (and none in generation_config.json) the reply may fill the context (the
    server caps that default to what the KV cache can hold)."""
    _check_fields(body, _CHAT_FIELDS)
    _unsupported(body, chat=True)
    tools = _tools(body)
    prompt = render_chat(body, tokenizer, tools)
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _typed(body, field, "int")
    explicit = max_tokens is not None
    if max_tokens is None and default_max_tokens:
        max_tokens = max_seq_len  # a sequence stops at the end of the context: this is "the rest of the context"
    fields = {"max_tokens": field, "logprobs": "top_logprobs"}
    tool_choice = _tool_choice(body)
    params = _sampling_params(body, max_tokens, _logprobs(body, chat=True), fields, tool_choice)
    stream, include_usage, continuous = _stream_options(body)
    return Parsed([prompt], params, stream, include_usage, field if explicit else None, continuous,
                  _num_choices(body, chat=True), tool_calls=tools is not None and tool_choice != "none",
                  named_tool=tool_choice == "named",
                  parallel_tool_calls=_typed(body, "parallel_tool_calls", "bool") is not False, field_names=fields,
                  priority=_typed(body, "priority", "int") or 0)


# ---- responses ----------------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclass
class TokenLogprob:
    """One generated token's log-probability and its most likely alternatives, for the `logprobs` fields of the
    responses (from RequestOutput / Sequence.logprobs: the model's distribution before sampling transforms)."""

    token: str
    logprob: float | None  # None (and top None): the first prompt token, which has no context (echo)
    top: list[tuple[str, float]] | None


def token_logprobs(tokenizer, token_ids: list[int], logprobs: list) -> list[TokenLogprob]:
    """A sequence's output ids and Sequence.logprobs entries -> TokenLogprob per token (each id decoded alone).
    A non-finite log-probability (logits that overflowed) is reported as -9999.0, as vLLM does: JSON has no NaN or
    infinity, and the response must stay valid."""
    def text(token_id):
        return tokenizer.decode([token_id], skip_special_tokens=False)

    def finite(lp):
        return lp if math.isfinite(lp) else -9999.0

    return [TokenLogprob(text(t), finite(lp), [(text(a), finite(alp)) for a, alp in top])
            for t, (lp, top) in zip(token_ids, logprobs)]


def prompt_token_logprobs(tokenizer, seq) -> list[TokenLogprob]:
    """The prompt's tokens with Sequence.prompt_logprobs (echo with logprobs): the first one without any."""
    first = TokenLogprob(tokenizer.decode(seq.prompt_ids[:1], skip_special_tokens=False), None, None)
    return [first] + token_logprobs(tokenizer, seq.prompt_ids[1:], seq.prompt_logprobs[1:])


def completion_logprobs(entries: list[TokenLogprob], text_offset: int = 0) -> dict:
    """/v1/completions choices[].logprobs. Each top_logprobs entry holds the chosen token too (OpenAI: "up to
    logprobs + 1" entries; vLLM adds it), so logprobs = 0 gives the chosen token alone."""
    offsets, at = [], text_offset
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.top is None else {**dict(e.top), e.token: e.logprob} for e in entries],
            "text_offset": offsets}


def joined_logprobs(first: dict, then: dict) -> dict:
    """Two completion_logprobs of consecutive text (echo: the prompt's, then the completion's) as one."""
    return {key: first[key] + then[key] for key in first}


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """/v1/chat/completions choices[].logprobs."""
    def one(token, logprob):
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [dict(one(e.token, e.logprob), top_logprobs=[one(t, lp) for t, lp in e.top])
                        for e in entries]}


# ---- the engine driver --------------------------------------------------------------------------------------------
class ServerRequest:
    """One request in flight: its sequence, the text the driver has handed it and not yet sent, and its end."""

    def __init__(self, seq, endpoint: str, changed: asyncio.Event | None = None):
        self.seq = seq
        self.endpoint = endpoint
        self.pending: list[str] = []  # text pieces not yet sent
        self.changed = changed or asyncio.Event()  # new text, or the end (one event for all choices of a request)
        self.done = asyncio.Event()
        self.error: str | None = None
        self.num_seen = 0  # output tokens the driver has accounted for
        self.last_token_time: float | None = None
        self.released = False

    def take(self) -> str:
        """The text not yet sent. (The reader clears `changed` before it takes from every request sharing it, so a
        piece handed over meanwhile sets it again.)"""
        piece = "".join(self.pending)
        self.pending.clear()
        return piece

    @property
    def num_cached_tokens(self) -> int:
        return getattr(self.seq, "num_cached_tokens", 0) or 0


def group_usage(reqs: list[ServerRequest], n: int = 1, counted: str = "all") -> dict:
    """The usage of one request's choices, n per prompt: each prompt counted once and the completion tokens of every
    choice (as OpenAI and vLLM count n > 1), the prefix-cache hits of each prompt's first choice. counted: "all" the
    generated tokens, "handed" those the driver has handed over so far (continuous usage), "none"."""
    firsts = reqs[::n]
    done = 0 if counted == "none" else sum(r.num_seen if counted == "handed" else len(r.seq.output_ids) for r in reqs)
    return usage(sum(len(r.seq.prompt_ids) for r in firsts), done, sum(r.num_cached_tokens for r in firsts))


class EngineDriver:
    """Steps the engine while requests are unfinished; adds and aborts requests between steps (see the module
    docstring)."""

    def __init__(self, llm, metrics: "Metrics"):
        self.llm = llm
        self.metrics = metrics
        self.active: dict[int, ServerRequest] = {}  # by Sequence.id: the requests the engine is working on
        self._to_add: list[tuple[list[ServerRequest], asyncio.Future]] = []
        self._to_abort: list[ServerRequest] = []
        self._stepping = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for req in list(self.active.values()):
            self.release(req)
        self._apply_pending()

    async def submit(self, seqs: list, endpoint: str) -> list[ServerRequest]:
        """Queue validated sequences (the choices of one request) for the engine, all or none. Raises RequestError
        when the engine refuses one (e.g. it can never fit the KV cache)."""
        changed = asyncio.Event()
        reqs = [ServerRequest(seq, endpoint, changed) for seq in seqs]
        future = asyncio.get_running_loop().create_future()
        self._to_add.append((reqs, future))
        self._wake.set()
        await future  # cancelled with its caller: the driver then skips the request
        return reqs

    def release(self, req: ServerRequest) -> None:
        """The caller is done with the request (finished, or its client went away): abort it if it is still running,
        now if no step is running, else right after the step."""
        if req.released:
            return
        req.released = True
        if self.active.pop(req.seq.id, None) is not None:
            self.metrics.finished(req, "abort")
            self._to_abort.append(req)
            if not self._stepping:
                self._apply_pending()
            self._wake.set()

    def _apply_pending(self) -> None:
        """Between steps only: aborts, then additions."""
        aborts, self._to_abort = self._to_abort, []
        if aborts:
            self.llm.abort([r.seq for r in aborts])
        adds, self._to_add = self._to_add, []
        for reqs, future in adds:
            if future.done():  # its caller is gone
                continue
            try:
                self.llm.submit([r.seq for r in reqs])
            except ValueError as e:
                future.set_exception(RequestError(str(e)))
                continue
            self.active.update((r.seq.id, r) for r in reqs)
            future.set_result(None)

    async def _run(self) -> None:
        while True:
            self._apply_pending()
            if not self.llm.has_unfinished():
                self._wake.clear()
                if not (self._to_add or self._to_abort):
                    await self._wake.wait()
                continue
            self._stepping = True
            received = None
            try:
                received = await asyncio.to_thread(self.llm.step)
            except Exception as e:  # fail the requests in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(f"engine step failed: {e!r}")
            finally:
                self._stepping = False
            self._deliver(received)

    def _deliver(self, received=None) -> None:
        """Hand each request its new text and its end. received: the sequences the step gave a token (only their
        text can have changed; the step's cost stays independent of the requests waiting for a slot); None: all."""
        now = time.perf_counter()
        reqs = list(self.active.values()) if received is None else \
            [r for r in (self.active.get(s.id) for s in received) if r is not None]
        for req in reqs:
            seq = req.seq
            new = len(seq.output_ids) - req.num_seen
            if new > 0:
                self.metrics.tokens(req, new, now)
                req.num_seen = len(seq.output_ids)
            piece = seq.take_new_text()
            if piece:
                req.pending.append(piece)
            if seq.finished:
                del self.active[seq.id]
                if seq.finish_reason == "abort":
                    req.error = seq.error or "the request was aborted by a failed engine step"
                self.metrics.finished(req, "error" if req.error else seq.finish_reason)
                req.done.set()
            if piece or seq.finished:
                req.changed.set()

    def _fail_all(self, message: str) -> None:
        failed = list(self.active.values())
        self.active.clear()
        self.llm.abort([r.seq for r in failed])
        for req in failed:
            req.error = message
            self.metrics.finished(req, "error")
            req.done.set()
            req.changed.set()


# ---- metrics ------------------------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics in a registry of the app's own (so several apps can live in one process)."""

    def __init__(self, llm, model_name: str):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        self._labels = labels
        self.requests = Counter("qwen2rt_requests", "Requests ended, by endpoint and finish reason (stop, length, "
                                "abort: the client went away, error)", ["model_name", "endpoint", "finish_reason"],
                                registry=self.registry)
        self.rejected = Counter("qwen2rt_rejected_requests", "Requests refused with an error status",
                                ["model_name", "status"], registry=self.registry)
        self.prompt_tokens = Counter("qwen2rt_prompt_tokens", "Prompt tokens of ended requests", ["model_name"],
                                     registry=self.registry).labels(**labels)
        self.generation_tokens = Counter("qwen2rt_generation_tokens", "Generated tokens", ["model_name"],
                                         registry=self.registry).labels(**labels)
        self.ttft = Histogram("qwen2rt_time_to_first_token_seconds", "Arrival to first generated token",
                              ["model_name"], buckets=_TTFT_BUCKETS, registry=self.registry).labels(**labels)
        self.itl = Histogram("qwen2rt_inter_token_latency_seconds", "Time between generated tokens",
                             ["model_name"], buckets=_ITL_BUCKETS, registry=self.registry).labels(**labels)
        self.e2e = Histogram("qwen2rt_e2e_request_latency_seconds", "Arrival to last token", ["model_name"],
                             buckets=_E2E_BUCKETS, registry=self.registry).labels(**labels)
        self.registry.register(_EngineCollector(llm, model_name))

    def tokens(self, req: ServerRequest, new: int, now: float) -> None:
        """`new` tokens arrived for req in one step, at perf_counter `now`."""
        seq = req.seq
        self.generation_tokens.inc(new)
        gaps = new
        if req.last_token_time is None:
            self.ttft.observe((seq.first_token_time or now) - seq.arrival)
            req.last_token_time = seq.first_token_time or now
            gaps -= 1
        if gaps > 0:
            gap = (now - req.last_token_time) / gaps
            for _ in range(gaps):
                self.itl.observe(gap)
        req.last_token_time = now

    def finished(self, req: ServerRequest, reason: str) -> None:
        self.requests.labels(endpoint=req.endpoint, finish_reason=reason, **self._labels).inc()
        self.prompt_tokens.inc(len(req.seq.prompt_ids))
        self.e2e.observe(time.perf_counter() - req.seq.arrival)

    def reject(self, status: int) -> None:
        self.rejected.labels(status=str(status), **self._labels).inc()


class _EngineCollector:
    """Engine state read at scrape time: running / waiting requests, KV cache blocks, prefix cache counters."""

    def __init__(self, llm, model_name: str):
        self.llm = llm
        self.model_name = model_name

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        engine, cache, name = self.llm.engine, self.llm.kv_cache, self.model_name

        def gauge(metric, doc, value):
            g = GaugeMetricFamily(metric, doc, labels=["model_name"])
            g.add_metric([name], value)
            return g

        yield gauge("qwen2rt_requests_running", "Requests admitted to the engine", len(engine.running))
        yield gauge("qwen2rt_requests_waiting", "Requests waiting for a slot or cache blocks", len(engine.waiting))
        yield gauge("qwen2rt_kv_cache_blocks_total", "KV cache blocks", cache.num_blocks)
        yield gauge("qwen2rt_kv_cache_blocks_free", "KV cache blocks a request may take (free, or cached and "
                    "unreferenced)", cache.num_free_blocks)
        yield gauge("qwen2rt_kv_cache_usage_ratio", "Fraction of KV cache blocks held by requests",
                    1.0 - cache.num_free_blocks / cache.num_blocks)
        stats_of = getattr(engine, "prefix_cache_stats", None)
        stats = stats_of() if stats_of is not None else {}
        queried, hits = stats.get("queried_tokens", 0), stats.get("hit_tokens", 0)
        for metric, doc, value in (("qwen2rt_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix "
                                    "cache", queried),
                                   ("qwen2rt_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache",
                                    hits)):
            c = CounterMetricFamily(metric, doc, labels=["model_name"])
            c.add_metric([name], value)
            yield c
        yield gauge("qwen2rt_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up",
                    hits / queried if queried else 0.0)
        c = CounterMetricFamily("qwen2rt_num_preemptions", "Requests preempted: their KV cache blocks taken back "
                                "when the cache ran out, their tokens recomputed later", labels=["model_name"])
        c.add_metric([name], getattr(engine, "num_preemptions", 0))
        yield c


# ---- the app ------------------------------------------------------------------------------------------------------
def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build_app(llm, served_model_name: str | None = None):
    """A Starlette app serving `llm` (a qwen2rt.LLM) under the model name `served_model_name` (default: the
    model argument the LLM was built with). The app drives the engine itself: nothing else should step it while
    the app runs."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    name = served_model_name or llm.model_name
    created = int(time.time())
    metrics = Metrics(llm, name)
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        driver = EngineDriver(llm, metrics)
        driver.start()
        state["driver"] = driver
        try:
            yield
        finally:
            await driver.stop()

    def error(e: RequestError) -> Response:
        metrics.reject(e.status)  # ASCII JSON: a field name the client sent may hold a lone surrogate (not UTF-8)
        return Response(json.dumps(e.body(), ensure_ascii=True), status_code=e.status, media_type="application/json")

    async def read_body(request: Request, model_required: bool = True) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested past Python's limit
            raise RequestError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        model = body.get("model")
        if model is None and not model_required:
            return body
        if model is None:
            raise RequestError("'model' is required", param="model")
        if model != name:
            raise RequestError(f"the model {model!r} does not exist (this server serves {name!r})", status=404,
                               param="model", code="model_not_found")
        return body

    # the most tokens one request may hold: the context, or all of the KV cache when that is smaller (the k/v of
    # every token but the last generated one is written)
    reservable = min(llm.max_seq_len, llm.kv_cache.num_blocks * llm.kv_cache.block_size + 1)

    def new_sequences(parsed: Parsed, chat: bool) -> list:
        """The request's choices as sequences, prompt by prompt: n of each (each prompt encoded once). Choice
        index = prompt index x n + i, as vLLM numbers them."""
        params, seqs = parsed.choice_params(), []
        try:
            llm.engine.scheduler.check_priority(parsed.priority)
        except ValueError as e:
            raise RequestError(f"{e}: start the server with --scheduling-policy priority", param="priority") from None
        for k, prompt in enumerate(parsed.prompts):
            where = f"prompt[{k}]: " if len(parsed.prompts) > 1 else ""
            first = new_sequence(prompt, params[0], parsed, chat, where)
            seqs += [first] + [new_sequence(first.prompt_ids, p, parsed, chat, where) for p in params[1:]]
        return seqs

    def new_sequence(prompt, params, parsed: Parsed, chat: bool, where: str = ""):
        try:
            seq = llm.new_request(prompt, params, parsed.priority)
        except ValueError as e:  # the prompt, or a sampling field checked against the model (logit_bias's ids)
            raise _field_error(e, parsed.field_names, "messages" if chat else "prompt", where) from None
        prompt_len, asked = len(seq.prompt_ids), seq.params.max_tokens
        if parsed.max_tokens_field is not None and prompt_len + asked > llm.max_seq_len:
            # as OpenAI and vLLM answer it; a default max_tokens is capped by the context instead
            raise RequestError(f"{where}This model's maximum context length is {llm.max_seq_len} tokens. However, you "
                               f"requested {prompt_len + asked} tokens ({prompt_len} in the "
                               f"{'messages' if chat else 'prompt'}, {asked} in the completion). Please reduce the "
                               f"length of the {'messages' if chat else 'prompt'} or completion.",
                               param=parsed.max_tokens_field, code="context_length_exceeded")
        if parsed.max_tokens_field is None:  # a default: never more than the cache can hold
            seq.max_len = min(seq.max_len, max(reservable, prompt_len + 1))
            try:
                check_min_tokens(seq, llm.config.vocab_size)
            except ValueError as e:
                raise _field_error(e, parsed.field_names, where=where) from None
        return seq

    async def wait_or_disconnect(request: Request, reqs: list[ServerRequest]) -> bool:
        """Wait for the requests' ends; False (and the requests aborted) if the client disconnects first."""
        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        async def all_done():
            for req in reqs:
                await req.done.wait()

        listener = asyncio.ensure_future(disconnected())
        finished = asyncio.ensure_future(all_done())
        try:
            await asyncio.wait({listener, finished}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            listener.cancel()
            finished.cancel()
        return all(req.done.is_set() for req in reqs)

    def release_all(driver: EngineDriver, reqs: list[ServerRequest]) -> None:
        for req in reqs:
            driver.release(req)

    def prepare(body: dict, chat: bool) -> tuple[Parsed, list]:
        """Parse, render (chat) and tokenize a request: in a worker thread, as the text may be long (tokenizing
        100k tokens takes ~130 ms on the 2-core machine, which would stall every other stream on the loop)."""
        if chat:
            parsed = parse_chat(body, llm.tokenizer, llm.max_seq_len, "max_tokens" not in llm.generation_defaults)
        else:
            parsed = parse_completion(body)
        return parsed, new_sequences(parsed, chat)

    async def generate(request: Request, chat: bool) -> Response:
        try:
            body = await read_body(request)
            parsed, seqs = await asyncio.to_thread(prepare, body, chat)
            reqs = await state["driver"].submit(seqs, "chat" if chat else "completions")
        except RequestError as e:
            return error(e)
        driver: EngineDriver = state["driver"]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        now = int(time.time())
        if parsed.stream:
            return _EventStream(_events(reqs, rid, now, name, chat, parsed.include_usage, llm.tokenizer,
                                        parsed.continuous_usage, parsed.tool_calls and (
                                            "named" if parsed.named_tool else
                                            "all" if parsed.parallel_tool_calls else "first"), parsed.n,
                                        (lambda i: echo_part(parsed, reqs, i)) if parsed.echo else None,
                                        parsed.hide_output),
                                lambda: release_all(driver, reqs))
        try:
            if not await wait_or_disconnect(request, reqs):
                return Response(status_code=499)  # nobody reads it
        finally:
            release_all(driver, reqs)
        failed = next((req.error for req in reqs if req.error), None)
        if failed:
            return error(RequestError(failed, status=500))
        choices = []
        echoes = [echo_part(parsed, reqs, i) for i in range(len(reqs))] if parsed.echo else None
        for index, req in enumerate(reqs):
            seq, logprobs = req.seq, None
            if seq.logprobs is not None:
                entries = [] if parsed.hide_output else token_logprobs(llm.tokenizer, seq.output_ids, seq.logprobs)
                if chat:
                    logprobs = chat_logprobs(entries)
                elif echoes is None:
                    logprobs = completion_logprobs(entries)
                else:  # the completion's offsets follow the prompt text sent, as in the stream
                    text, prompt_entries = echoes[index]
                    logprobs = joined_logprobs(completion_logprobs(prompt_entries),
                                               completion_logprobs(entries, len(text)))
            if chat:
                message, finish = {"role": "assistant", "content": seq.text}, seq.finish_reason
                if parsed.tool_calls:  # as vLLM answers: finish_reason "tool_calls" when the reply calls one
                    message["content"], calls = tool_calls.parse(seq.text)
                    calls = calls if parsed.parallel_tool_calls else calls[:1]
                    message["tool_calls"] = [c.openai() for c in calls]
                    finish = "tool_calls" if calls and not parsed.named_tool else finish
                choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
            else:
                text = "" if parsed.hide_output else seq.text
                choices.append({"index": index, "text": text if echoes is None else echoes[index][0] + text,
                                "logprobs": logprobs,
                                "finish_reason": "length" if parsed.hide_output else seq.finish_reason})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now,
                             "model": name, "choices": choices,
                             "usage": group_usage(reqs, parsed.n, "none" if parsed.hide_output else "all")})

    def echo_part(parsed: Parsed, reqs: list[ServerRequest], index: int) -> tuple[str, list[TokenLogprob]]:
        """Echo: choice `index`'s prompt text (as sent; token ids decoded) and, with logprobs, the prompt's entries
        (the first without a log-probability)."""
        first = reqs[index // parsed.n * parsed.n].seq  # the choice that encoded the prompt: it kept the text
        text = first.prompt if first.prompt is not None else \
            llm.tokenizer.decode(first.prompt_ids, skip_special_tokens=False)
        seq = reqs[index].seq
        return text, [] if seq.prompt_logprobs is None else prompt_token_logprobs(llm.tokenizer, seq)

    class _EventStream(StreamingResponse):
        """Server-sent events; the request is released however the response ends (done, client gone, error)."""

        def __init__(self, events, on_close):
            super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self._on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self._on_close()

    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "qwen2rt",
                "max_model_len": llm.max_seq_len}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        wanted = request.path_params["model"]
        if wanted != name:
            return error(RequestError(f"the model {wanted!r} does not exist", status=404, param="model",
                                      code="model_not_found"))
        return JSONResponse(model_card())

    async def health(request: Request) -> Response:
        driver = state.get("driver")
        if driver is None or not driver.alive:
            return JSONResponse({"status": "engine not running"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def version(request: Request) -> Response:  # vLLM's GET /version
        from . import __version__

        return JSONResponse({"version": __version__})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error(RequestError(str(exc.detail), status=exc.status_code))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("request failed", exc_info=exc)
        return error(RequestError(f"internal error: {exc!r}", status=500))

    def text_tokenizer():
        if llm.tokenizer is None:
            raise RequestError(f"{name} ships no tokenizer.json: there is nothing to tokenize with", status=400)
        return llm.tokenizer

    async def tokenize(request: Request) -> Response:
        """vLLM's /tokenize: a prompt, or chat messages rendered with the template (and tools), -> its token ids."""
        try:
            body = await read_body(request, model_required=False)
            return JSONResponse(await asyncio.to_thread(tokenized, body))  # in a worker: see prepare
        except RequestError as e:
            return error(e)

    def tokenized(body: dict) -> dict:
        """/tokenize's answer (see tokenize)."""
        chat = "messages" in body
        _check_fields(body, _TOKENIZE_CHAT_FIELDS if chat else _TOKENIZE_FIELDS)
        tokenizer = text_tokenizer()
        if chat:
            text = render_chat(body, tokenizer, _tools(body))
        else:
            text = body.get("prompt")
            if not isinstance(text, str):
                raise RequestError("'prompt' must be a string (or send 'messages')", param="prompt")
        try:
            ids = tokenizer.encode(text)
        except ValueError as e:  # e.g. a lone surrogate, which UTF-8 cannot encode
            raise RequestError(f"the text cannot be tokenized: {e}", param="messages" if chat else "prompt") \
                from None
        strs = [tokenizer.decode([t], skip_special_tokens=False) for t in ids] \
            if _typed(body, "return_token_strs", "bool") else None
        return {"count": len(ids), "max_model_len": llm.max_seq_len, "tokens": ids, "token_strs": strs}

    async def detokenize(request: Request) -> Response:
        """vLLM's /detokenize: token ids -> their text (special tokens written out)."""
        try:
            body = await read_body(request, model_required=False)
            _check_fields(body, {"model", "tokens"})
            tokens = body.get("tokens")
            vocab = llm.config.vocab_size
            if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                     for t in tokens)):
                raise RequestError(f"'tokens' must be a list of token ids in [0, {vocab})", param="tokens")
            text = text_tokenizer().decode(tokens, skip_special_tokens=False)
        except RequestError as e:
            return error(e)
        return JSONResponse({"prompt": text})

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/tokenize", tokenize, methods=["POST"]),
              Route("/detokenize", detokenize, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{model:path}", model, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/version", version, methods=["GET"]),
              Route("/metrics", prometheus, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.llm = llm
    app.state.metrics = metrics
    return app


async def _events(reqs: list[ServerRequest], rid: str, created: int, model: str, chat: bool, include_usage: bool,
                  tokenizer=None, continuous_usage: bool = False, with_tool_calls: bool | str = False, n: int = 1,
                  echoes=None, hide_output: bool = False):
    """The SSE body of a streamed request whose choices are `reqs`, n per prompt (they share one `changed` event): per
    choice (its index in `choices`), a chunk per batch of new text and a chunk with its finish reason once it ends;
    when all have ended, (include_usage) a chunk with the usage and no choices, then `data: [DONE]`. Every chunk
    before that has "usage": null, or with continuous_usage its choice's usage so far (the tokens the driver has
    handed over: vLLM's). With logprobs, each text chunk and the finish one carry the log-probabilities of the choice's
    tokens generated since its previous chunk (text held back for a possible stop string does not hold back its
    tokens' log-probabilities). A failed choice ends the stream with an error event. with_tool_calls (chat with
    tools: "all", "first" without parallel tool calls, "named" for a named tool_choice): the text from a choice's
    first <tool_call> on is held back to its end, then sent as one chunk per tool call (delta.tool_calls) and the
    finish reason "tool_calls" ("stop" when named, as OpenAI answers) (tool_calls.ToolCallStream); text before it
    streams.
    echoes (completions with echo): a function of a choice's index -> (prompt text, prompt logprob entries), sent as
    the choice's first chunk once its prefill has run; hide_output (echo with max_tokens 0): nothing generated is sent,
    the usage counts no completion token and every choice ends with "length"."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    sent = [{"logprobs": 0, "text": 0} for _ in reqs]  # per choice: log-probability entries and characters sent
    tool_streams = [tool_calls.ToolCallStream() for _ in reqs] if with_tool_calls else None

    def new_logprobs(index: int):
        seq, done = reqs[index].seq, sent[index]
        if seq.logprobs is None or hide_output:
            return None
        upto = min(len(seq.logprobs), len(seq.output_ids))  # a step may be appending in the driver's thread
        entries = token_logprobs(tokenizer, seq.output_ids[done["logprobs"]:upto], seq.logprobs[done["logprobs"]:upto])
        done["logprobs"] = upto
        return chat_logprobs(entries) if chat else completion_logprobs(entries, done["text"])

    def chunk(index: int, delta_text: str | None, finish_reason: str | None, role: bool = False,
              call: dict | None = None, logprobs=False) -> dict:
        logprobs = None if role else new_logprobs(index) if logprobs is False else logprobs
        if chat:
            delta = {} if delta_text is None else {"content": delta_text}
            if role:
                delta["role"] = "assistant"
            if call is not None:
                delta["tool_calls"] = [call]
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": delta_text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        sent[index]["text"] += len(delta_text or "")
        out = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
        if include_usage:  # the role chunks come before any token (vLLM: 0 there)
            out["usage"] = None
            if continuous_usage:  # the chunk's choice's own usage, as vLLM reports it (the last chunk sums them)
                out["usage"] = group_usage(reqs[index:index + 1], 1, "none" if role or hide_output else "handed")
        return out

    if chat:
        for index in range(len(reqs)):
            yield _sse(chunk(index, "", None, role=True))
    finished = [False] * len(reqs)
    echoed = [echoes is None] * len(reqs)
    changed = reqs[0].changed
    while not all(finished):
        await changed.wait()
        changed.clear()
        for index, req in enumerate(reqs):
            if finished[index]:
                continue
            # read before taking: the driver hands over a request's last piece and its end together, maybe while
            # this generator waits at a yield below (a slow client); taken now, the end is certain to follow it
            ended = req.done.is_set()
            # its prompt's log-probabilities are complete once it has a token (or ended without error)
            if not echoed[index] and (req.seq.output_ids or (ended and not req.error)):
                echoed[index] = True
                text, entries = echoes(index)
                yield _sse(chunk(index, text, None, logprobs=completion_logprobs(entries) if entries else None))
            piece = req.take()
            if hide_output:
                piece = ""
            if piece and tool_streams is not None:
                piece = tool_streams[index].feed(piece)
            if piece:
                yield _sse(chunk(index, piece, None))
            if ended:
                if req.error:
                    yield _sse(RequestError(req.error, status=500).body())
                    yield "data: [DONE]\n\n"
                    return
                finished[index] = True
                finish = "length" if hide_output else req.seq.finish_reason
                if tool_streams is not None:
                    rest, calls = tool_streams[index].finish()
                    calls = calls[:1] if with_tool_calls in ("first", "named") else calls
                    if rest:
                        yield _sse(chunk(index, rest, None))
                    for k, call in enumerate(calls):
                        yield _sse(chunk(index, None, None, call=call.openai(k)))
                    finish = "tool_calls" if calls and with_tool_calls != "named" else finish
                yield _sse(chunk(index, None, finish))
    if include_usage:
        yield _sse({"id": rid, "object": kind, "created": created, "model": model, "choices": [],
                    "usage": group_usage(reqs, n, "none" if hide_output else "all")})
    yield "data: [DONE]\n\n"


# ---- the command --------------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    """`serve`'s own options (the model options come from the cli)."""
    p.add_argument("--host", default="127.0.0.1")
    from .cli import number_in

    p.add_argument("--port", type=number_in(int, 0, 65535), default=8000)
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-prefill-tokens", type=int, default=2048)
    p.add_argument("--enforce-eager", action="store_true", help="decode without CUDA graphs")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    p.add_argument("--scheduling-policy", default="fcfs", choices=("fcfs", "priority"),
                   help="priority: requests' 'priority' field orders them (lower first) and preempts less urgent ones")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def serve(args, model_name: str) -> int:
    """Build the LLM from the parsed command line and serve it until interrupted."""
    import inspect

    try:
        import uvicorn
    except ImportError as e:
        raise ImportError(f"`qwen2rt serve` needs the serve extra ({e}): pip install -e \".[serve]\"") from e
    from . import LLM

    kwargs = dict(device=args.device, dtype=args.dtype, backend=args.backend, max_seq_len=args.max_seq_len,
                  seed=args.seed, quantization=args.quantization, max_batch_size=args.max_batch_size,
                  num_kv_blocks=args.num_kv_blocks, block_size=args.block_size,
                  max_prefill_tokens=args.max_prefill_tokens, enforce_eager=args.enforce_eager,
                  scheduling_policy=args.scheduling_policy)
    if args.no_prefix_caching:
        if "enable_prefix_caching" not in inspect.signature(LLM).parameters:
            raise ValueError("--no-prefix-caching: this build has no prefix cache")
        kwargs["enable_prefix_caching"] = False
    llm = LLM(model_name, **kwargs)
    app = build_app(llm, args.served_model_name or model_name)
    log.warning("serving %s as %r on http://%s:%d", model_name, args.served_model_name or model_name, args.host,
                args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0

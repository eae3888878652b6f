"""Structured outputs (vLLM's guided decoding, `StructuredOutputsParams`): a request's output held to a JSON schema
(`json`, OpenAI's response_format {"type": "json_schema"}), to any JSON object (`json_object`, OpenAI's JSON mode)
or to one of a list of strings (`choice`).

A grammar is a byte-level automaton: `step(state, byte)` -> the next state, or None when the byte cannot follow
(json_schema.py's for JSON, ChoiceGrammar here). Before each token the request may sample, its `Matcher` turns the
automaton's state into the set of token ids whose bytes the automaton accepts from there (`TokenIndex.allowed`),
plus its stop token ids once the output is complete; the sampler gives every other token -inf (the request's
SamplerState bias row, as allowed_token_ids does). A complete output that cannot go on allows only its stop ids, so
the request ends with "stop" as soon as it is complete (or at max_tokens).

The set is found by a walk over the vocabulary's token bytes, sorted, so that the tokens that share a prefix are a
contiguous range and the automaton steps through a shared prefix once; a range is pruned at the first byte the
automaton rejects, and inside a JSON string a range whose remaining bytes are all plain string bytes (no quote,
backslash or control byte) is taken whole, since such bytes leave the state as it is. Sets are cached per (grammar,
state) in an LRU, packed to bits. The engine waits for a structured request's token before it plans the request's
next step (engine.py): the set depends on it.
"""

from __future__ import annotations

import bisect
import json
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class StructuredOutputs:
    """What a request's output must be, exactly one of: `json`, a JSON schema (a dict, or its JSON text; the subset
    json_schema.py implements: other keywords are a ValueError); `json_object=True`, any JSON object; `choice`, one
    of a list of strings. (vLLM's StructuredOutputsParams; its regexes and grammars are not implemented.)"""

    json: dict | str | None = field(default=None, hash=False)
    json_object: bool = False
    choice: tuple[str, ...] | None = None
    # with json: the output is 1 to tool_call_blocks (0: any number of) tool-call blocks in Qwen's Hermes format,
    # "<tool_call>\n" + a value of the schema + "\n</tool_call>" (the server's forced tool calls; see tool_calls.py)
    tool_call_blocks: int | None = None

    def __post_init__(self):
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.choice is not None:
            if not isinstance(self.choice, tuple) or not self.choice:
                raise ValueError("StructuredOutputs.choice must be a non-empty list of strings")
            bad = [c for c in self.choice if not isinstance(c, str) or not c]
            if bad:
                raise ValueError(f"StructuredOutputs.choice: {repr(bad[0])[:40]} is not a non-empty string")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"StructuredOutputs.json_object = {self.json_object!r}: must be a bool")
        if (self.json is not None) + self.json_object + (self.choice is not None) != 1:
            raise ValueError("StructuredOutputs: give exactly one of json (a JSON schema), json_object=True and "
                             "choice (a list of strings)")
        if self.tool_call_blocks is not None and (self.json is None or not isinstance(self.tool_call_blocks, int)
                                                  or isinstance(self.tool_call_blocks, bool)
                                                  or self.tool_call_blocks < 0):
            raise ValueError(f"StructuredOutputs.tool_call_blocks = {self.tool_call_blocks!r}: an integer >= 0, "
                             "with json")
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise ValueError(f"StructuredOutputs.json: not a JSON schema's text ({e})") from None
            from .json_schema import JsonSchemaGrammar

            try:  # compiled now: a schema it cannot follow is an error here, not at the first step
                object.__setattr__(self, "_grammar", JsonSchemaGrammar(schema, self.tool_call_blocks))
            except ValueError as e:
                raise ValueError(f"StructuredOutputs.json: {e}") from None
            except RecursionError:
                raise ValueError("StructuredOutputs.json: the schema nests too deeply to compile") from None

    def grammar(self):
        if self.json is not None:
            return self._grammar
        if self.json_object:
            from .json_schema import JSON_OBJECT

            return JSON_OBJECT
        return ChoiceGrammar(self.choice)


# ---- grammars -----------------------------------------------------------------------------------------------------
def plain_string_byte(b: int) -> bool:
    """A byte that stands for itself inside a JSON string (not a quote, a backslash or a control byte)."""
    return b >= 0x20 and b != 0x22 and b != 0x5C


class ChoiceGrammar:
    """Exactly one of the strings (UTF-8 bytes); the state is the bytes so far."""

    start = b""

    def __init__(self, choices):
        self.choices = sorted({c.encode("utf-8") for c in choices})
        self._set = frozenset(self.choices)
        self.key = ("choice", tuple(self.choices))

    def accepting(self, state: bytes) -> bool:
        return state in self._set

    @staticmethod
    def plain(state) -> bool:
        return False

    def step(self, state: bytes, b: int):
        nxt = state + bytes((b,))
        i = bisect.bisect_left(self.choices, nxt)
        return nxt if i < len(self.choices) and self.choices[i].startswith(nxt) else None


def run(grammar, data: bytes, state=None):
    """The state after `data` from `state` (the grammar's start by default), or None if a byte is rejected."""
    state = grammar.start if state is None else state
    for b in data:
        state = grammar.step(state, b)
        if state is None:
            return None
    return state


def check_json_object(text: str) -> bool:
    """Whether `text` is exactly what the JSON-object grammar completes on: a JSON object, nothing around it (a test
    oracle's and a caller's check; json.loads decides)."""
    if not text.startswith("{") or text != text.strip(" \t\n\r"):
        return False
    try:
        return isinstance(json.loads(text, parse_constant=_reject), dict)
    except ValueError:
        return False


def _reject(name):
    raise ValueError(f"{name} is not JSON")


# ---- the vocabulary -----------------------------------------------------------------------------------------------
class TokenIndex:
    """A vocabulary's token bytes (a tokenizer's Tokenizer.token_bytes, for ids below the model's vocab_size), sorted
    for the prefix walk, and the LRU of allowed-token sets. Tokens without bytes (special tokens) are never allowed
    by a grammar."""

    CACHE_ENTRIES = 1024  # packed sets: vocab_size / 8 bytes each (19 KB for Qwen's 151,936)

    def __init__(self, token_bytes: list[bytes | None], vocab_size: int):
        self.vocab_size = vocab_size
        self.token_bytes = [b if b else None for b in token_bytes[:vocab_size]]
        self.token_bytes += [None] * (vocab_size - len(self.token_bytes))
        pairs = sorted((b, i) for i, b in enumerate(self.token_bytes) if b)
        self.sorted_bytes = [b for b, _ in pairs]
        self.sorted_ids = np.array([i for _, i in pairs], dtype=np.int64)
        # per sorted token: the index of its last byte that is not a plain string byte (-1: none)
        self.last_special = np.array([max((k for k, c in enumerate(b) if not plain_string_byte(c)), default=-1)
                                      for b in self.sorted_bytes], dtype=np.int64)
        self._cache: OrderedDict = OrderedDict()

    def allowed(self, grammar, state) -> np.ndarray:
        """bool [vocab_size]: the tokens whose bytes the grammar accepts from `state` (cached)."""
        key = (grammar.key, state)
        packed = self._cache.get(key)
        if packed is None:
            packed = np.packbits(self._walk(grammar, state))
            self._cache[key] = packed
            if len(self._cache) > self.CACHE_ENTRIES:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return np.unpackbits(packed, count=self.vocab_size).astype(bool)

    def _walk(self, grammar, state) -> np.ndarray:
        toks, ids = self.sorted_bytes, self.sorted_ids
        mask = np.zeros(self.vocab_size, dtype=bool)
        todo = [(0, 0, len(toks), state)]  # (depth, sorted range [lo, hi) sharing `depth` bytes, state after them)
        while todo:
            depth, lo, hi, s = todo.pop()
            plain = grammar.plain(s)
            if plain and self.last_special[lo:hi].max() < depth:
                mask[ids[lo:hi]] = True  # nothing but plain string bytes from here on
                continue
            i = lo
            while i < hi and len(toks[i]) == depth:  # tokens that end here (sorted first: a prefix sorts first)
                mask[ids[i]] = True
                i += 1
            while i < hi:
                b = toks[i][depth]
                j = hi if b == 255 else bisect.bisect_left(toks, toks[i][:depth] + bytes((b + 1,)), i, hi)
                nxt = s if plain and plain_string_byte(b) else grammar.step(s, b)
                if nxt is not None:
                    todo.append((depth + 1, i, j, nxt))
                i = j
        return mask


class Matcher:
    """One request's place in its grammar: the tokens it may sample next (`mask`) and `advance` with the one it
    got. Its stop ids (eos, stop_token_ids) are allowed only where the output is complete."""

    def __init__(self, grammar, index: TokenIndex, stop_ids):
        self.grammar, self.index = grammar, index
        self.stop_ids = sorted(t for t in stop_ids if t < index.vocab_size)
        self.state = grammar.start

    @property
    def complete(self) -> bool:
        return self.grammar.accepting(self.state)

    def mask(self) -> np.ndarray:
        """bool [vocab_size]: the tokens that may come next."""
        mask = self.index.allowed(self.grammar, self.state)
        if self.complete:
            mask[self.stop_ids] = True
        if not mask.any():  # (every state of a pruned schema or a choice can go on byte by byte, and a byte-level
            # vocabulary has every byte: a bug, or a vocabulary without some byte; Engine._guide ends the request)
            raise RuntimeError("structured outputs: no token of the vocabulary can continue the output here")
        return mask

    def advance(self, token: int) -> None:
        """The request got `token` (one `mask` allowed): a stop id ends it, other tokens move the state."""
        if token in self.stop_ids:
            return
        data = self.index.token_bytes[token] if token < self.index.vocab_size else None
        state = run(self.grammar, data, self.state) if data else None
        if state is None:
            raise RuntimeError(f"structured outputs: token {token} cannot follow the output so far (its mask allowed "
                               "it: a bug)")
        self.state = state

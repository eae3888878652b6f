"""Structured outputs (vLLM's guided decoding, `StructuredOutputsParams`): a request's output held to a JSON object
(`json_object`, OpenAI's response_format {"type": "json_object"}) or to one of a list of strings (`choice`).

A grammar is a byte-level automaton: `step(state, byte)` -> the next state, or None when the byte cannot follow.
Before each token the request may sample, its `Matcher` turns the automaton's state into the set of token ids whose
bytes the automaton accepts from there (`TokenIndex.allowed`), plus its stop token ids once the output is complete;
the sampler gives every other token -inf (the request's SamplerState bias row, as allowed_token_ids does). A complete
output allows only its stop ids, so the request ends with "stop" as soon as it is complete (or at max_tokens).

The set is found by a walk over the vocabulary's token bytes, sorted, so that the tokens that share a prefix are a
contiguous range and the automaton steps through a shared prefix once; a range is pruned at the first byte the
automaton rejects, and inside a JSON string a range whose remaining bytes are all plain string bytes (no quote,
backslash or control byte) is taken whole, since such bytes leave the state as it is. Sets are cached per (grammar,
state) in an LRU, packed to bits. The engine waits for a structured request's token before it plans the request's
next step (engine.py): the set depends on it.

A JSON object here is RFC 8259's, with these limits: no whitespace before the object or after it (inside, JSON's
whitespace anywhere it may go), and bytes >= 0x80 inside strings are taken as they come (not checked as UTF-8).
"""

from __future__ import annotations

import bisect
import json
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StructuredOutputs:
    """What a request's output must be: one of `choice` (a list of strings), or with `json_object` a JSON object.
    Exactly one of them. (vLLM's StructuredOutputsParams; its json schemas, regexes and grammars are not
    implemented.)"""

    choice: tuple[str, ...] | None = None
    json_object: bool = False

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
        if (self.choice is not None) == self.json_object:
            raise ValueError("StructuredOutputs: give exactly one of choice (a list of strings) and json_object=True")

    def grammar(self) -> "JsonObjectGrammar | ChoiceGrammar":
        return JSON_OBJECT if self.json_object else ChoiceGrammar(self.choice)


# ---- grammars -----------------------------------------------------------------------------------------------------
WHITESPACE = frozenset(b" \t\n\r")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPED = frozenset(b'"\\/bfnrt')
DIGITS = frozenset(b"0123456789")


def plain_string_byte(b: int) -> bool:
    """A byte that stands for itself inside a JSON string (not a quote, a backslash or a control byte)."""
    return b >= 0x20 and b != 0x22 and b != 0x5C


# JSON states are (mode, stack, aux): stack a str of the open containers, "{" and "[", outermost first
(START, VALUE, VALUE_OR_CLOSE, KEY_OR_CLOSE, KEY, COLON, AFTER, STRING, ESCAPE, UNICODE, NUMBER, LITERAL,
 DONE) = range(13)
_WS_MODES = frozenset((VALUE, VALUE_OR_CLOSE, KEY_OR_CLOSE, KEY, COLON, AFTER))
# a number's parts: the state after each byte, and those at which the number may end
_NUMBER = {("minus", 0x30): "zero", ("zero", 0x2E): "dot", ("int", 0x2E): "dot", ("zero", 0x65): "e",
           ("zero", 0x45): "e", ("int", 0x65): "e", ("int", 0x45): "e", ("frac", 0x65): "e", ("frac", 0x45): "e",
           ("e", 0x2B): "esign", ("e", 0x2D): "esign"}
_NUMBER_DIGIT = {"minus": "int", "int": "int", "dot": "frac", "frac": "frac", "e": "exp", "esign": "exp",
                 "exp": "exp"}
_NUMBER_ENDS = frozenset(("zero", "int", "frac", "exp"))
_LITERALS = {0x74: b"rue", 0x66: b"alse", 0x6E: b"ull"}


class JsonObjectGrammar:
    """One JSON object (RFC 8259), byte by byte; see the module's docstring for its limits."""

    key = ("json_object",)
    start = (START, "", None)

    @staticmethod
    def accepting(state) -> bool:
        return state[0] == DONE

    @staticmethod
    def plain(state) -> bool:
        """Whether every plain string byte (plain_string_byte) leaves the state as it is: inside a string."""
        return state[0] == STRING

    def step(self, state, b: int):
        mode, stack, aux = state
        if mode == STRING:
            if b == 0x22:
                return (COLON, stack, None) if aux else self._after_value(stack)
            if b == 0x5C:
                return ESCAPE, stack, aux
            return state if b >= 0x20 else None
        if mode == ESCAPE:
            if b in ESCAPED:
                return STRING, stack, aux
            return (UNICODE, stack, (aux, 4)) if b == 0x75 else None
        if mode == UNICODE:
            if b not in HEX:
                return None
            is_key, left = aux
            return (STRING, stack, is_key) if left == 1 else (UNICODE, stack, (is_key, left - 1))
        if mode == NUMBER:
            if b in DIGITS and aux != "zero" and not (aux == "minus" and b == 0x30):
                nxt = _NUMBER_DIGIT[aux]
            else:
                nxt = _NUMBER.get((aux, b))
            if nxt is not None:
                return NUMBER, stack, nxt
            return self.step(self._after_value(stack), b) if aux in _NUMBER_ENDS else None
        if mode == LITERAL:
            if b != aux[0]:
                return None
            return (LITERAL, stack, aux[1:]) if len(aux) > 1 else self._after_value(stack)
        if b in WHITESPACE:
            return state if mode in _WS_MODES else None
        if mode == START:
            return (KEY_OR_CLOSE, "{", None) if b == 0x7B else None
        if mode == VALUE or mode == VALUE_OR_CLOSE:
            if mode == VALUE_OR_CLOSE and b == 0x5D:
                return self._after_value(stack[:-1])
            return self._value_start(stack, b)
        if mode == KEY or mode == KEY_OR_CLOSE:
            if b == 0x22:
                return STRING, stack, True
            return self._after_value(stack[:-1]) if mode == KEY_OR_CLOSE and b == 0x7D else None
        if mode == COLON:
            return (VALUE, stack, None) if b == 0x3A else None
        if mode == AFTER:
            top = stack[-1]
            if b == 0x2C:
                return (KEY if top == "{" else VALUE), stack, None
            if (b == 0x7D and top == "{") or (b == 0x5D and top == "["):
                return self._after_value(stack[:-1])
        return None  # DONE, or a byte that cannot come here

    @staticmethod
    def _after_value(stack: str):
        return (AFTER, stack, None) if stack else (DONE, "", None)

    @staticmethod
    def _value_start(stack: str, b: int):
        if b == 0x7B:
            return KEY_OR_CLOSE, stack + "{", None
        if b == 0x5B:
            return VALUE_OR_CLOSE, stack + "[", None
        if b == 0x22:
            return STRING, stack, False
        if b == 0x2D:
            return NUMBER, stack, "minus"
        if b in DIGITS:
            return NUMBER, stack, ("zero" if b == 0x30 else "int")
        if b in _LITERALS:
            return LITERAL, stack, _LITERALS[b]
        return None


JSON_OBJECT = JsonObjectGrammar()


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
            if grammar.plain(s) and self.last_special[lo:hi].max() < depth:
                mask[ids[lo:hi]] = True  # nothing but plain string bytes from here on
                continue
            i = lo
            while i < hi and len(toks[i]) == depth:  # tokens that end here (sorted first: a prefix sorts first)
                mask[ids[i]] = True
                i += 1
            while i < hi:
                b = toks[i][depth]
                j = hi if b == 255 else bisect.bisect_left(toks, toks[i][:depth] + bytes((b + 1,)), i, hi)
                nxt = grammar.step(s, b)
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
        if not mask.any():  # cannot happen with a byte-level vocabulary (every byte is a token)
            raise RuntimeError("structured outputs: no token of the vocabulary can continue the output")
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

    def bias_row(self, logit_bias=None) -> np.ndarray:
        """float32 [vocab_size]: the sampler's bias row for the next token, -inf but at the allowed tokens, which
        keep their logit_bias."""
        row = np.full(self.index.vocab_size, -np.inf, dtype=np.float32)
        row[self.mask()] = 0.0
        for token, value in (logit_bias or {}).items():
            if row[token] == 0.0:
                row[token] = value
        return row

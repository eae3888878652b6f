"""Structured outputs (vLLM's guided decoding, `StructuredOutputsParams`): a request's output held to a JSON schema
(`json`, OpenAI's response_format {"type": "json_schema"}), to any JSON object (`json_object`, OpenAI's JSON mode),
to one of a list of strings (`choice`), to a regular expression (`regex`) or to a context-free grammar (`grammar`,
GBNF or Lark).

Each is followed as a byte-level automaton (StructuredOutputs.automaton()): `step(state, byte)` -> the next state,
or None when the byte cannot follow (json_schema.py's for JSON, regex.py's for regexes, ebnf.py's for grammars,
ChoiceGrammar here). Before each token the request may sample, its `Matcher` turns the automaton's state into the
set of token ids whose bytes the automaton accepts from there (`TokenIndex.allowed`), plus its stop token ids once
the output is complete; the sampler gives every other token -inf (the request's SamplerState bias row, as
allowed_token_ids does). A complete output that cannot go on allows only its stop ids, so the request ends with
"stop" as soon as it is complete (or at max_tokens).

The set is found by a walk over the vocabulary's token bytes, sorted, so that the tokens that share a prefix are a
contiguous range and the automaton steps through a shared prefix once; a range is pruned at the first byte the
automaton rejects, and a range whose remaining bytes all leave the state as it is (the grammar's `shortcut`: inside
a JSON string, any byte but a quote, a backslash or a control byte; in a regex, a class under `*`) is taken whole.
Where the bytes go through a regex (the grammar's `dfa` view: a regex, a string with a pattern or lengths), the
tokens of a range run through its DFA all at once with numpy, counting characters against a maxLength. Sets are
cached per (grammar, state) in an LRU, packed to bits. The engine samples a structured request's next token only
once the one before is read back and its set written (engine.py): the set depends on it.
"""

from __future__ import annotations

import bisect
import json
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .regex import ALL_BYTES


@dataclass(frozen=True)
class StructuredOutputs:
    """What a request's output must be, exactly one of: `json`, a JSON schema (a dict, or its JSON text; the subset
    json_schema.py implements: other keywords are a ValueError); `json_object=True`, any JSON object; `choice`, one
    of a list of strings; `regex`, a whole match of a regular expression (the syntax regex.py implements: other
    syntax is a ValueError); `grammar`, a context-free grammar's text, GBNF (`root ::= ...`) or Lark (`start: ...`)
    (what ebnf.py implements). With json or json_object, `disable_any_whitespace=True` allows no whitespace between
    the JSON's tokens. (vLLM's StructuredOutputsParams; its structural tags are not implemented.)"""

    json: dict | str | None = field(default=None, hash=False)
    json_object: bool = False
    choice: tuple[str, ...] | None = None
    regex: str | None = None
    grammar: str | None = None
    # with json: the output is 1 to tool_call_blocks (0: any number of) tool-call blocks in Qwen's Hermes format,
    # "<tool_call>\n" + a value of the schema + "\n</tool_call>" (the server's forced tool calls; see tool_calls.py)
    tool_call_blocks: int | None = None
    # with json or json_object: no whitespace between the JSON's tokens (vLLM's option of the same name; a model
    # under a mask may otherwise fill every run of whitespace the grammar allows)
    disable_any_whitespace: bool = False

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
        if (self.json is not None) + self.json_object + (self.choice is not None) + (self.regex is not None) + (
                self.grammar is not None) != 1:
            raise ValueError("StructuredOutputs: give exactly one of json (a JSON schema), json_object=True, choice "
                             "(a list of strings), regex (a pattern) and grammar (GBNF or Lark)")
        if not isinstance(self.disable_any_whitespace, bool) or (
                self.disable_any_whitespace and self.json is None and not self.json_object):
            raise ValueError(f"StructuredOutputs.disable_any_whitespace = {self.disable_any_whitespace!r}: a bool, "
                             "true only with json or json_object")
        if self.regex is not None or self.grammar is not None:
            from .ebnf import compiled
            from .regex import RegexGrammar

            name, text, make = ("regex", self.regex, RegexGrammar) if self.regex is not None else (
                "grammar", self.grammar, compiled)
            try:  # compiled now, as a schema
                object.__setattr__(self, "_grammar", make(text))
            except ValueError as e:
                raise ValueError(f"StructuredOutputs.{name}: {e}") from None
            except RecursionError:
                raise ValueError(f"StructuredOutputs.{name}: the {name} nests too deeply to compile") from None
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
                object.__setattr__(self, "_grammar", JsonSchemaGrammar(schema, self.tool_call_blocks,
                                                                        not self.disable_any_whitespace))
            except ValueError as e:
                raise ValueError(f"StructuredOutputs.json: {e}") from None
            except RecursionError:
                raise ValueError("StructuredOutputs.json: the schema nests too deeply to compile") from None

    def automaton(self):
        """The byte-level automaton the output follows (see the module's docstring)."""
        if self.json is not None or self.regex is not None or self.grammar is not None:
            return self._grammar
        if self.json_object:
            from .json_schema import COMPACT_JSON_OBJECT, JSON_OBJECT

            return COMPACT_JSON_OBJECT if self.disable_any_whitespace else JSON_OBJECT
        return ChoiceGrammar(self.choice)


# ---- grammars -----------------------------------------------------------------------------------------------------
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
    def shortcut(state):
        return None

    @staticmethod
    def dfa(state):
        return None

    def step(self, state: bytes, b: int):
        nxt = state + bytes((b,))
        i = bisect.bisect_left(self.choices, nxt)
        return nxt if i < len(self.choices) and self.choices[i].startswith(nxt) else None


class TooAmbiguous(RuntimeError):
    """A grammar's step that would hold more parses than it keeps (ebnf.MAX_PARSES): TokenIndex's byte-by-byte walk
    counts the byte as refused (a token that leads there is not allowed); a token its DFA walk allowed through such a
    state, or a state whose every way on is refused, fails the request with it."""


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
    # a range of fewer tokens goes byte by byte even where the grammar has a DFA view (numpy's setup costs more)
    DFA_WALK_MIN = 64
    POSITIONS_CACHED = 8

    def __init__(self, token_bytes: list[bytes | None], vocab_size: int):
        self.vocab_size = vocab_size
        self.token_bytes = [b if b else None for b in token_bytes[:vocab_size]]
        self.token_bytes += [None] * (vocab_size - len(self.token_bytes))
        pairs = sorted((b, i) for i, b in enumerate(self.token_bytes) if b)
        self.sorted_bytes = [b for b, _ in pairs]
        self.sorted_ids = np.array([i for _, i in pairs], dtype=np.int64)
        # all sorted tokens' bytes end to end, where each one starts, and its characters (bytes that do not continue
        # a UTF-8 sequence)
        self._flat = np.frombuffer(b"".join(self.sorted_bytes), dtype=np.uint8)
        self._lengths = np.array([len(b) for b in self.sorted_bytes], dtype=np.int64)
        self._shared = _common_prefixes(self.sorted_bytes)  # bytes each sorted token shares with the one before
        self._starts = np.cumsum(self._lengths) - self._lengths
        self._cumulative_chars = np.concatenate([[0], np.cumsum((self._flat & 0xC0) != 0x80)])
        self._in_characters = _in_characters(self._flat, self._starts, self._lengths)
        self._outside: OrderedDict = OrderedDict()  # byte set -> per sorted token, its last byte outside the set
        self._positions: OrderedDict = OrderedDict()  # byte set -> where the bytes outside it are (outside_positions)
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

    def outside_positions(self, byteset: bytes, characters: bool = False) -> np.ndarray:
        """The positions in all sorted tokens' bytes end to end of the bytes not in `byteset` (with `characters`,
        nor in a whole multi-byte UTF-8 character within its token), then the end of them all (cached)."""
        key = (byteset, characters)
        out = self._positions.get(key)
        if out is None:  # (int32: ~4 MB for Qwen's vocabulary; POSITIONS_CACHED sets kept)
            inside = np.frombuffer(byteset, dtype=np.uint8)[self._flat] != 0
            if characters:
                inside |= self._in_characters
            out = np.append(np.flatnonzero(~inside).astype(np.int32), np.int32(len(self._flat)))
            self._positions[key] = out
            if len(self._positions) > self.POSITIONS_CACHED:
                self._positions.popitem(last=False)
        else:
            self._positions.move_to_end(key)
        return out

    def last_outside(self, byteset: bytes) -> np.ndarray:
        """Per sorted token, the index of its last byte that is not in `byteset` (256 bytes, 1 for a member), or
        -1 (cached for a few sets)."""
        out = self._outside.get(byteset)
        if out is None:
            position = np.arange(len(self._flat), dtype=np.int64)
            outside = np.where(np.frombuffer(byteset, dtype=np.uint8)[self._flat] == 0, position, -1)
            out = np.maximum.reduceat(outside, self._starts) if len(self._starts) else outside
            out = np.where(out >= 0, out - self._starts, -1)
            self._outside[byteset] = out
            if len(self._outside) > 64:
                self._outside.popitem(last=False)
        else:
            self._outside.move_to_end(byteset)
        return out

    def _dfa_walk(self, step, view, depth: int, lo: int, hi: int, mask: np.ndarray) -> list:
        """The sorted tokens lo..hi, which share `depth` bytes, from a state where the grammar's `dfa` view says
        that the bytes of a set go through a regex: each token's bytes from `depth` go through the regex's DFA, all
        tokens at once, while they are in the set; a token whose bytes all go through (its state alive, within the
        budget of characters) is allowed. Those that reach a byte outside the set alive come back as ranges for the
        prefix walk, grouped by their bytes up to and including that byte, with the grammar's state after them (the
        view's `resume` of the regex's state there, stepped with that byte). A view with a 6th element True (a
        grammar's terminal: what follows it may begin only where it may end) stops at a byte outside the set only
        where the regex's state is accepting; elsewhere every byte goes through the regex."""
        regex, rstate, takes, budget, resume = view[:5]
        gated = len(view) > 5 and view[5]
        here = ALL_BYTES if gated and not regex.accepting(rstate) else takes  # what goes through from rstate
        regex.renumber_if_full()
        start = regex.state_id(rstate)
        toks, i = self.sorted_bytes, lo
        while i < hi and len(toks[i]) == depth:  # tokens that end here
            mask[self.sorted_ids[i]] = True
            i += 1
        # the ranges of tokens whose next byte the regex takes or that leave the set there (a few, for a narrow
        # pattern: the rest are never looked at)
        through_set = np.frombuffer(takes, dtype=np.uint8).astype(bool)
        live = (regex.next_ids(np.full(256, start, dtype=np.int32), np.arange(256)) >= 0) | \
            ~np.frombuffer(here, dtype=np.uint8).astype(bool)
        pieces = []
        while i < hi:
            b = toks[i][depth]
            j = hi if b == 255 else bisect.bisect_left(toks, toks[i][:depth] + bytes((b + 1,)), i, hi)
            if live[b]:
                pieces.append(np.arange(i, j))
            i = j
        rows = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        first, end = self._starts[rows] + depth, self._starts[rows] + self._lengths[rows]
        # first each token's run of bytes that leave the state as it is, at once (searched in the positions of the
        # bytes that do not): single bytes, and whole multi-byte characters where every one of them does
        loops = regex.loops(rstate, here)  # (the same state all along: accepting or not all along)
        characters = any(loops) and all(here[0x80:]) and regex.characters_loop(rstate)  # (a counted one: no)
        at = first
        if any(loops) or characters:
            outside = self.outside_positions(loops, characters)
            at = np.minimum(outside[np.searchsorted(outside, first)], end)
        chars = self._cumulative_chars[at] - self._cumulative_chars[first]
        if budget is not None:
            fits = chars <= budget
            rows, at, end, chars = rows[fits], at[fits], end[fits], chars[fits]
        states = np.full(len(rows), start, dtype=np.int32)
        stops = []  # arrays: (tokens' sorted indices, where they stop, regex state numbers there, characters before)
        while len(rows):  # then byte by byte (all tokens at once) through the DFA
            ended = at >= end
            mask[self.sorted_ids[rows[ended]]] = True
            rows, at, end, states, chars = rows[~ended], at[~ended], end[~ended], states[~ended], chars[~ended]
            data = self._flat[at]
            through = through_set[data]
            if gated:
                through |= ~regex.accepting_ids(states)
            if not through.all():
                stopped = ~through
                stops.append((rows[stopped], at[stopped] - self._starts[rows[stopped]], states[stopped],
                              chars[stopped]))
            rows, at, end, states, chars, data = (rows[through], at[through], end[through], states[through],
                                                  chars[through], data[through])
            states = regex.next_ids(states, data)
            chars += (data & 0xC0) != 0x80
            alive = states >= 0 if budget is None else (states >= 0) & (chars <= budget)
            rows, at, end, states, chars = rows[alive], at[alive] + 1, end[alive], states[alive], chars[alive]
        out = []
        for i, at, rid, nchars in self._first_of_each_prefix(stops):
            prefix = self.sorted_bytes[i][:at + 1]
            nxt = step(resume(regex.state_of(rid), nchars), prefix[-1])
            if nxt is not None:
                end = hi if prefix[-1] == 255 else bisect.bisect_left(
                    self.sorted_bytes, prefix[:-1] + bytes((prefix[-1] + 1,)), i, hi)
                out.append((at + 1, i, end, nxt))
        return out

    def _first_of_each_prefix(self, stops: list) -> list[tuple[int, int, int, int]]:
        """The stops (arrays of sorted token indices, offsets, regex states, characters), one per distinct prefix
        (a token's bytes up to and including its stop byte): the first token of each, in sorted order (the tokens
        that share a prefix are a range of the sorted ones, and went the same way through the DFA)."""
        if not stops:
            return []
        rows, at, rid, chars = (np.concatenate(column) for column in zip(*stops))
        order = np.argsort(rows, kind="stable")
        rows, at, rid, chars = rows[order], at[order], rid[order], chars[order]
        first = np.ones(len(rows), dtype=bool)
        if len(rows) > 1:  # the bytes two stopped tokens share: the least shared by any pair between them
            shared = np.minimum.reduceat(self._shared[:rows[-1] + 1], rows[:-1] + 1)
            first[1:] = (at[1:] != at[:-1]) | (shared < at[1:] + 1)
        return list(zip(rows[first].tolist(), at[first].tolist(), rid[first].tolist(), chars[first].tolist()))

    def _walk(self, grammar, state) -> np.ndarray:
        toks, ids = self.sorted_bytes, self.sorted_ids
        mask = np.zeros(self.vocab_size, dtype=bool)
        todo = [(0, 0, len(toks), state)]  # (depth, sorted range [lo, hi) sharing `depth` bytes, state after them)
        steps: dict = {}  # (state, byte) -> the next state: ranges that a DFA walk gives back often share them

        def step(s, b: int):
            key = (s, b)
            if key not in steps:
                try:
                    steps[key] = grammar.step(s, b)
                except TooAmbiguous:
                    steps[key] = None
            return steps[key]

        while todo:
            depth, lo, hi, s = todo.pop()
            view = grammar.dfa(s) if hi - lo >= self.DFA_WALK_MIN else None
            if view is not None:  # the range at once through a regex's DFA (numpy), then the tokens it cannot take
                todo += self._dfa_walk(step, view, depth, lo, hi, mask)
                continue
            loops = grammar.shortcut(s)  # bytes that leave the state as it is
            if loops is not None and self.last_outside(loops)[lo:hi].max() < depth:
                mask[ids[lo:hi]] = True  # nothing but such bytes from here on
                continue
            i = lo
            while i < hi and len(toks[i]) == depth:  # tokens that end here (sorted first: a prefix sorts first)
                mask[ids[i]] = True
                i += 1
            while i < hi:
                b = toks[i][depth]
                j = hi if b == 255 else bisect.bisect_left(toks, toks[i][:depth] + bytes((b + 1,)), i, hi)
                nxt = s if loops is not None and loops[b] else step(s, b)
                if nxt is not None:
                    todo.append((depth + 1, i, j, nxt))
                i = j
        return mask


def _common_prefixes(sorted_bytes: list[bytes]) -> np.ndarray:
    """Per token of a sorted list, how many bytes it shares with the one before (0 for the first)."""
    out = np.zeros(len(sorted_bytes), dtype=np.int64)
    for k in range(1, len(sorted_bytes)):
        a, b = sorted_bytes[k - 1], sorted_bytes[k]
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        out[k] = n
    return out


def _in_characters(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per byte of the tokens end to end: whether it belongs to a valid multi-byte UTF-8 character that lies whole
    within its token (no overlong form, no surrogate, nothing past U+10FFFF)."""
    n = len(flat)
    position, end = np.arange(n), np.repeat(starts + lengths, lengths)
    byte = flat.astype(np.int32)

    def ahead(k: int) -> np.ndarray:  # the byte k further in the same token, or -1
        out = np.full(n, -1, dtype=np.int32)
        inside = position + k < end
        out[inside] = byte[position[inside] + k]
        return out

    b1, b2, b3 = ahead(1), ahead(2), ahead(3)
    c1, c2, c3 = ((b >= 0x80) & (b <= 0xBF) for b in (b1, b2, b3))
    two = (byte >= 0xC2) & (byte <= 0xDF) & c1
    three = ((byte >= 0xE0) & (byte <= 0xEF) & c1 & c2 & ~((byte == 0xE0) & (b1 < 0xA0))
             & ~((byte == 0xED) & (b1 > 0x9F)))
    four = ((byte >= 0xF0) & (byte <= 0xF4) & c1 & c2 & c3 & ~((byte == 0xF0) & (b1 < 0x90))
            & ~((byte == 0xF4) & (b1 > 0x8F)))
    out = np.zeros(n, dtype=bool)
    for size, lead in ((2, two), (3, three), (4, four)):
        at = np.flatnonzero(lead)
        for k in range(size):
            out[at + k] = True
    return out


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
            # vocabulary has every byte: a bug, or a vocabulary without some byte, or a grammar whose every way on
            # is past its bound on parses; Engine._guide ends the request)
            for b in range(256):
                self.grammar.step(self.state, b)  # (raises TooAmbiguous where that is why)
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

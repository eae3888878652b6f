"""Regular expressions for structured outputs: StructuredOutputs(regex=...) (vLLM's guided_regex), and a JSON schema's
`pattern` and `format` (json_schema.py). A pattern is parsed into a small tree, compiled into an NFA over UTF-8
bytes (a character class becomes the byte sequences that encode its code points), and followed as a DFA built
lazily: a state is the frozenset of NFA states the bytes so far reach, and each state's 256 successors are found
once and cached.

The whole output (or the whole string) must match: a pattern is anchored at both ends, as vLLM's guided_regex,
outlines, xgrammar and llguidance treat a JSON schema's pattern (JSON Schema's own `pattern` searches; a full
match is one of the strings a search accepts). The syntax, the part Python's re and ECMAScript share:
- characters, `.` (any character but a line feed or a carriage return), classes `[...]` and `[^...]` with ranges,
  escapes `\\d \\w \\s` (ASCII: [0-9], [A-Za-z0-9_], [ \\t\\n\\r\\f\\v]) and `\\D \\W \\S`, `\\n \\t \\r \\f \\v \\0`,
  `\\xHH \\uHHHH \\UHHHHHHHH`, any escaped punctuation;
- groups `(...)`, `(?:...)`, `(?P<name>...)` / `(?<name>...)`; alternation `|`; quantifiers `* + ? {n} {n,} {n,m}`,
  lazy ones too (the same strings);
- `^` at the start and `$` at the end of the pattern or of a top-level branch (the match is whole anyway).
Anything else (backreferences, lookaround, `\\b`, inline flags, possessive quantifiers, anchors elsewhere), and what
the two read differently (`{,m}`, a `]` first in a class), is a ValueError that names it: nothing is silently
matched differently. Every state the DFA reaches can still reach a match (a class that matches no character is an
error), so a masked output never gets stuck.
"""

from __future__ import annotations

import functools
import re

import numpy as np

MAX_REPEAT = 1000  # the largest count a quantifier may give
MAX_NFA_STATES = 100_000  # a pattern whose NFA is larger is an error ("too large")
MAX_CODE = 0x10FFFF
NO_CHARACTER = ()
DIGIT = ((0x30, 0x39),)
WORD = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
SPACE = ((0x09, 0x0D), (0x20, 0x20))
_QUANTIFIER = re.compile(r"\{([0-9]*)(,([0-9]*))?\}")
_SIMPLE_ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B}


def _normal(ranges) -> tuple:
    """Code point ranges sorted and merged (surrogates are not characters: cut out)."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        for a, b in ((lo, min(hi, 0xD7FF)), (max(lo, 0xE000), hi)):
            if a > b:
                continue
            if out and a <= out[-1][1] + 1:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
    return tuple((a, b) for a, b in out)


def _complement(ranges) -> tuple:
    out, nxt = [], 0
    for lo, hi in _normal(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CODE:
        out.append((nxt, MAX_CODE))
    return _normal(out)


DOT = _complement(((0x0A, 0x0A), (0x0D, 0x0D)))


def utf8_sequences(lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """The code points lo..hi (no surrogates) as byte-range sequences: each a list of (first byte, last byte) per
    position, so that a string of bytes is one of these code points' UTF-8 encodings iff some sequence matches it."""
    for edge in (0x7F, 0x7FF, 0xFFFF):  # one encoded length per piece
        if lo <= edge < hi:
            return utf8_sequences(lo, edge) + utf8_sequences(edge + 1, hi)
    if hi <= 0x7F:
        return [[(lo, hi)]]
    n = 2 if hi <= 0x7FF else 3 if hi <= 0xFFFF else 4
    for i in range(1, n):  # split until every continuation position spans its whole range or a common prefix
        m = (1 << (6 * i)) - 1
        if lo & ~m != hi & ~m:
            if lo & m:
                return utf8_sequences(lo, lo | m) + utf8_sequences((lo | m) + 1, hi)
            if hi & m != m:
                return utf8_sequences(lo, (hi & ~m) - 1) + utf8_sequences(hi & ~m, hi)
    a, b = chr(lo).encode("utf-8"), chr(hi).encode("utf-8")
    return [list(zip(a, b))]


class _Parser:
    """pattern -> tree: ("set", code point ranges), ("cat", items), ("alt", branches), ("rep", item, min, max or
    None)."""

    def __init__(self, pattern: str):
        self.p, self.i = pattern, 0
        self.depth = 0  # groups open

    def error(self, what: str):
        raise ValueError(f"regex {self.p[:80]!r}: {what} (at position {self.i})")

    def parse(self):
        node = self.alt()
        if self.i < len(self.p):
            self.error("unbalanced ')'")
        return node

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def alt(self):
        branches = [self.seq()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.seq())
        return branches[0] if len(branches) == 1 else ("alt", tuple(branches))

    def seq(self):
        items = []
        while self.peek() is not None and self.peek() not in "|)":
            c = self.peek()
            if c in "^$":  # the match is whole: an anchor at the start or end of a top-level branch matches nothing
                if self.depth == 0 and (not items if c == "^" else self.p[self.i + 1:self.i + 2] in ("", "|")):
                    self.i += 1
                    continue
                self.error(f"an anchor {c!r} that does not begin or end the pattern (or a top-level branch) is not "
                           "implemented")
            items.append(self.quantified(self.atom()))
        return items[0] if len(items) == 1 else ("cat", tuple(items))

    def quantified(self, atom):
        c = self.peek()
        if c is None:
            return atom
        if c in "*+?":
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            self.i += 1
        elif c == "{" and _QUANTIFIER.match(self.p, self.i):
            m = _QUANTIFIER.match(self.p, self.i)
            if not m.group(1) and m.group(2):
                self.error("{,m} is a count in Python's re but text in ECMAScript: write {0,m}")
            if not m.group(2):
                lo = hi = int(m.group(1)) if m.group(1) else self.error("a quantifier {} needs a count")
            else:
                lo, hi = int(m.group(1) or 0), (int(m.group(3)) if m.group(3) else None)
            self.i = m.end()
        else:
            return atom
        if max(lo, hi or 0) > MAX_REPEAT:
            self.error(f"a quantifier's count is larger than {MAX_REPEAT}")
        if hi is not None and hi < lo:
            self.error(f"quantifier {{{lo},{hi}}}: min > max")
        if self.peek() == "?":  # lazy: matches the same strings
            self.i += 1
        elif self.peek() == "+":
            self.error("possessive quantifiers are not implemented")
        c = self.peek()
        if c is not None and (c in "*+?" or (c == "{" and _QUANTIFIER.match(self.p, self.i))):
            self.error("multiple repeat")
        return ("rep", atom, lo, hi)

    def atom(self):
        c = self.p[self.i]
        if c == "(":
            self.i += 1
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?P<", self.i) or (self.p.startswith("?<", self.i)
                                                       and not self.p.startswith(("?<=", "?<!"), self.i)):
                end = self.p.find(">", self.i)
                name = self.p[self.p.index("<", self.i) + 1:end] if end > 0 else ""
                if not name.isidentifier():
                    self.error("a bad group name")
                self.i = end + 1
            elif self.peek() == "?":
                self.error(f"group syntax {self.p[self.i - 1:self.i + 3]!r}... is not implemented (lookaround, "
                           "flags, backreferences, conditionals)")
            self.depth += 1
            node = self.alt()
            self.depth -= 1
            if self.peek() != ")":
                self.error("missing ')'")
            self.i += 1
            return node
        if c == "[":
            return ("set", self.klass())
        if c == "\\":
            return ("set", self.escape(in_class=False))
        if c in "*+?" or (c == "{" and _QUANTIFIER.match(self.p, self.i)):
            self.error("nothing to repeat")
        self.i += 1
        if c == ".":
            return ("set", DOT)
        return ("set", ((ord(c), ord(c)),))

    def escape(self, in_class: bool) -> tuple:
        self.i += 1
        c = self.peek()
        if c is None:
            self.error("a trailing backslash")
        self.i += 1
        classes = {"d": DIGIT, "w": WORD, "s": SPACE}
        if c.lower() in classes:
            ranges = classes[c.lower()]
            return ranges if c.islower() else _complement(ranges)
        if c in _SIMPLE_ESCAPES:
            return ((_SIMPLE_ESCAPES[c],) * 2,)
        if c == "b" and in_class:  # backspace inside a class
            return ((0x08, 0x08),)
        if c == "0":
            if self.peek() is not None and self.peek() in "01234567":
                self.error("octal escapes are not implemented")
            return ((0, 0),)
        if c in "xuU":
            digits = {"x": 2, "u": 4, "U": 8}[c]
            text = self.p[self.i:self.i + digits]
            if len(text) != digits or any(ch not in "0123456789abcdefABCDEF" for ch in text):
                self.error(f"\\{c} needs {digits} hex digits")
            self.i += digits
            code = int(text, 16)
            if code > MAX_CODE or 0xD800 <= code <= 0xDFFF:
                self.error(f"\\{c}{text} is not a character")
            return ((code, code),)
        if c.isdigit():
            self.error("backreferences are not implemented")
        if c.isalnum() or c == "_":
            self.error(f"the escape \\{c} is not implemented")
        return ((ord(c), ord(c)),)  # escaped punctuation (or any other non-word character) stands for itself

    def klass(self) -> tuple:
        self.i += 1
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        ranges, first = [], True
        while True:
            c = self.peek()
            if c is None:
                self.error("missing ']'")
            if c == "]" and not first:
                self.i += 1
                break
            if c == "]":
                self.error("a ']' first in a class is text in Python's re but ends the class in ECMAScript: "
                           "escape it")
            first = False
            item = self.class_item()
            single = len(item) == 1 and item[0][0] == item[0][1]
            if self.peek() == "-" and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                if not single:
                    self.error("a range's start is a class")
                self.i += 1
                end = self.class_item()
                if len(end) != 1 or end[0][0] != end[0][1]:
                    self.error("a range's end is a class")
                if end[0][0] < item[0][0]:
                    self.error("a range out of order")
                item = ((item[0][0], end[0][0]),)
            ranges += item
        ranges = _complement(ranges) if negate else _normal(ranges)
        if not ranges:
            self.error("a class that matches no character")
        return ranges

    def class_item(self) -> tuple:
        if self.peek() == "\\":
            return self.escape(in_class=True)
        c = self.p[self.i]
        self.i += 1
        return ((ord(c), ord(c)),)


def _lengths(node) -> tuple[int, int | None]:
    """The fewest and most characters a match of the tree has (None: no most)."""
    kind = node[0]
    if kind == "set":
        return 1, 1
    if kind == "cat":
        lo, hi = 0, 0
        for item in node[1]:
            a, b = _lengths(item)
            lo, hi = lo + a, (hi + b if hi is not None and b is not None else None)
        return lo, hi
    if kind == "alt":
        spans = [_lengths(b) for b in node[1]]
        return min(a for a, _ in spans), (None if any(b is None for _, b in spans) else max(b for _, b in spans))
    a, b = _lengths(node[1])
    lo, hi = node[2], node[3]
    return a * lo, (b * hi if b is not None and hi is not None else 0 if b == 0 or hi == 0 else None)


class NumberedDFA:
    """A DFA's states numbered, for TokenIndex's walk over many tokens at once (numpy): a subclass gives
    `_successors(state)` (its 256 next states, None for none) and `accepting(state)`."""

    NUMBERED = 16384  # states numbered for `next_ids` before the numbering starts over (~32 MB of tables)

    def _number_states(self) -> None:
        self._ids: dict = {}
        self._states: list = []
        self._next = np.full((64, 256), -2, dtype=np.int32)  # -2: not found yet, -1: no state
        self._final = np.zeros(64, dtype=bool)  # per number: whether the state is accepting

    def state_id(self, state) -> int:
        """A number for `state` (the same until the numbering starts over: see next_ids)."""
        i = self._ids.get(state)
        if i is None:
            i = self._ids[state] = len(self._states)
            self._states.append(state)
            if i >= len(self._final):
                self._final = np.concatenate([self._final, np.zeros(len(self._final), dtype=bool)])
            self._final[i] = self.accepting(state)
        return i

    def accepting_ids(self, ids: np.ndarray) -> np.ndarray:
        """Per state number, whether that state is accepting."""
        return self._final[ids]

    def state_of(self, i: int):
        return self._states[i]

    def next_ids(self, ids: np.ndarray, data: np.ndarray) -> np.ndarray:
        """Per pair, the number of the state after byte data[k] from state number ids[k], or -1."""
        for i in np.unique(ids).tolist():
            if len(self._states) > len(self._next):
                grown = np.full((2 * len(self._states), 256), -2, dtype=np.int32)
                grown[:len(self._next)] = self._next
                self._next = grown
            if self._next[i, 0] == -2:
                self._next[i] = [-1 if t is None else self.state_id(t) for t in self._successors(self._states[i])]
        return self._next[ids, data]

    def renumber_if_full(self) -> None:
        """Start the numbering over once it holds NUMBERED states (only between walks: numbers are not kept)."""
        if len(self._states) > self.NUMBERED:
            self._number_states()


class Regex(NumberedDFA):
    """A compiled pattern, followed byte by byte: `start`, `step(state, byte)` -> the next state or None (no match
    can go on), `accepting(state)` (the bytes so far are a whole match) and `loops(state)` (the bytes that leave the
    state as it is). States are frozensets of NFA state ids (hashable, the same in every process)."""

    TABLE_ENTRIES = 4096  # DFA states whose successor tables are kept

    def __init__(self, pattern: str, tree=None):
        """`tree`: the pattern already parsed (_Parser's tree; ebnf.py builds its terminals' trees itself), which
        `pattern` then only names in errors."""
        if not isinstance(pattern, str):
            raise ValueError(f"a regex must be a string, got {type(pattern).__name__}")
        self.pattern = pattern
        tree = _Parser(pattern).parse() if tree is None else tree
        self.min_chars, self.max_chars = _lengths(tree)
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[int, int, int]]] = []
        start, self.final = self._build(tree)
        self._tables: dict[frozenset, list] = {}
        self._loops: dict = {}  # (state, within) -> loops; ("characters", state) -> characters_loop
        self.start = self._closure_of(frozenset((start,)))
        self._number_states()

    # ---- NFA (Thompson's construction over bytes) -------------------------------------------------------------
    def _new(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise ValueError(f"regex {self.pattern[:80]!r} is too large (over {MAX_NFA_STATES} NFA states: lower its "
                             "counts)")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def _build(self, node) -> tuple[int, int]:
        kind = node[0]
        start = self._new()
        if kind == "set":
            end = self._new()
            for lo, hi in node[1]:
                for seq in utf8_sequences(lo, hi):
                    at = start
                    for k, (a, b) in enumerate(seq):
                        nxt = end if k == len(seq) - 1 else self._new()
                        self.edges[at].append((a, b, nxt))
                        at = nxt
            return start, end
        if kind == "cat":
            at = start
            for item in node[1]:
                a, b = self._build(item)
                self.eps[at].append(a)
                at = b
            return start, at
        if kind == "alt":
            end = self._new()
            for branch in node[1]:
                a, b = self._build(branch)
                self.eps[start].append(a)
                self.eps[b].append(end)
            return start, end
        _, item, lo, hi = node
        at = start
        for _ in range(lo):
            a, b = self._build(item)
            self.eps[at].append(a)
            at = b
        end = self._new()
        self.eps[at].append(end)
        if hi is None:  # then any number more
            a, b = self._build(item)
            self.eps[at].append(a)
            self.eps[b] += [a, end]
        else:  # then up to hi - lo more, each optional
            for _ in range(hi - lo):
                a, b = self._build(item)
                self.eps[at].append(a)
                self.eps[b].append(end)
                at = b
        return start, end

    # ---- the DFA, built as it is walked -----------------------------------------------------------------------
    def _table(self, state: frozenset) -> list:
        """The 256 successors of a DFA state (None: no match goes on), found once: the state's byte edges grouped by
        range, the byte space cut where a range begins or ends, and per piece the closure of the union of the
        targets of the ranges that cover it (each distinct union closed once)."""
        table = self._tables.get(state)
        if table is None:
            ranges: dict[tuple[int, int], set] = {}
            for s in state:
                for a, b, t in self.edges[s]:
                    ranges.setdefault((a, b), set()).add(t)
            cuts = sorted({a for a, _ in ranges} | {b + 1 for _, b in ranges} | {0, 256})
            closed: dict[frozenset, frozenset] = {}
            table = [None] * 256
            for x, y in zip(cuts, cuts[1:]):
                targets = frozenset(t for (a, b), ts in ranges.items() if a <= x <= b for t in ts)
                if targets:
                    if targets not in closed:
                        closed[targets] = self._closure_of(targets)
                    table[x:y] = [closed[targets]] * (y - x)
            if len(self._tables) >= self.TABLE_ENTRIES:
                self._tables.clear()
                self._loops.clear()
            self._tables[state] = table
        return table

    _successors = _table

    def _closure_of(self, targets: frozenset) -> frozenset:
        """The NFA states that matter (with byte edges, or the final one) reached from any of `targets` through
        epsilons."""
        seen, todo, out = set(targets), list(targets), []
        while todo:
            s = todo.pop()
            if self.edges[s] or s == self.final:
                out.append(s)
            for t in self.eps[s]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(out)

    def step(self, state: frozenset, b: int) -> frozenset | None:
        return self._table(state)[b]

    def accepting(self, state: frozenset) -> bool:
        return self.final in state

    def ends(self, state: frozenset) -> bool:
        """Whether no byte can follow (the match is complete and can only stop)."""
        key = ("ends", state)
        out = self._loops.get(key)
        if out is None:
            out = self._loops[key] = all(t is None for t in self._table(state))
        return out

    def characters_loop(self, state: frozenset) -> bool:
        """Whether every character of two or more UTF-8 bytes leaves `state` as it is (cached)."""
        key = ("characters", state)
        out = self._loops.get(key)
        if out is None:
            out = True
            for lo, hi in ((0x80, 0xD7FF), (0xE000, MAX_CODE)):
                for seq in utf8_sequences(lo, hi):
                    frontier = {state}
                    for a, b in seq:
                        frontier = {self.step(s, x) for s in frontier for x in range(a, b + 1)}
                        if None in frontier:
                            break
                    out = out and frontier == {state}
            self._loops[key] = out
        return out

    def loops(self, state: frozenset, within: bytes | None = None) -> bytes:
        """256 bytes, 1 where that byte leaves `state` as it is (and is 1 in `within`)."""
        out = self._loops.get((state, within))
        if out is None:
            out = bytes(int(t == state) for t in self._table(state))
            if within is not None:
                out = bytes(a & b for a, b in zip(out, within))
            self._loops[(state, within)] = out
        return out


def compiled(pattern: str) -> Regex:
    """The Regex of a pattern, compiled once for all the requests (and schemas) that use it: its DFA's tables are
    built once too."""
    if not isinstance(pattern, str):
        raise ValueError(f"a regex must be a string, got {type(pattern).__name__}")
    return _compiled(pattern)


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> Regex:
    return Regex(pattern)


class RegexGrammar:
    """The whole output is one match of a pattern (StructuredOutputs(regex=...)): structured.py's grammar
    interface over Regex."""

    def __init__(self, pattern: str):
        self.regex = compiled(pattern)
        self.start = self.regex.start
        self.key = ("regex", pattern)

    def accepting(self, state) -> bool:
        return self.regex.accepting(state)

    def step(self, state, b: int):
        return self.regex.step(state, b)

    def dfa(self, state):
        """Every byte goes through the regex: (regex, its state, the bytes it takes (all), no length budget, and
        the grammar's state from the regex's (the same)). (So TokenIndex never asks it for a `shortcut`: the DFA
        walk takes runs of bytes that leave the state as it is itself.)"""
        return self.regex, state, ALL_BYTES, None, _same


def _same(state, chars: int):
    return state


ALL_BYTES = bytes([1]) * 256

"""Context-free grammars for structured outputs: StructuredOutputs(grammar=...) (vLLM's guided_grammar /
structured_outputs.grammar), in either of the two notations vLLM takes:

- GBNF (llama.cpp's, xgrammar's EBNF; a text with a line `name ::= ...`): rules `name ::= alternatives`, the start
  rule `root`; strings `"..."` (escapes `\\n \\r \\t \\\\ \\" \\xHH \\uHHHH \\UHHHHHHHH`), classes `[...]` / `[^...]`
  with ranges, `.` (any character), rule names (letters, digits, `-`, `_`), groups `( )`, `|`, quantifiers `* + ?` and
  `{m} {m,} {m,n}`, comments `# ...`. A rule may span lines (a new rule starts at `name ::=`).
- Lark (outlines' and vLLM's examples; a text without such a line): rules `name: ...` (`?name` and `!name` too) and
  terminals `NAME: ...` (a priority `NAME.2` is ignored), the start rule `start`; strings `"..."` (`"..."i`: either
  case), `"a".."z"` ranges, regexes `/.../` (regex.py's syntax, no flags), `[item]` (optional), `( )`, `|`, `* + ?`,
  `~ n` / `~ n..m` and `{m,n}`, aliases `-> name` (ignored: they only name tree nodes), comments `//` and `#`,
  `%import common.NAME` / `%import common (A, B)` for Lark's common terminals (COMMON), and `%ignore X`: any number
  of X may come before each terminal of a rule (a string, a regex or a TERMINAL, not inside a terminal's own
  definition) and at the end, as Lark's lexer skips them between tokens.

Anything else is a ValueError that names it. The grammar is scannerless: every string, class and regex matches the
output's characters exactly where the rules put them.

Compiled as follows. Rules that do not reach a recursive rule are regular: each is inlined into one regex tree
(regex.py's), and so is every run of regular items in the other rules' alternatives, so a literal, a class and a
regular rule in a row are one terminal, followed by a DFA; a rule's alternatives that begin with a terminal and go on
alike are one, its terminal their alternation (a list of keywords each followed by the same rule). The recursive rest
is a pushdown automaton over those terminals: a parse is a stack, its top a terminal and the state its DFA is in,
below it the places in alternatives to go on from when that terminal ends (the last item of an alternative pushes
none: right recursion and `*` keep the stack flat). A state is the frozenset of the parses the bytes so far allow,
plus END when the output may stop there. A step to more than MAX_PARSES parses is refused (structured.TooAmbiguous:
where the mask walk goes byte by byte, a token that leads there is not allowed; a token whose bytes go there through a
terminal's DFA view, or a state whose every way on goes there, fails the request saying so). Left recursion (a rule
that can begin with itself with something after it) never ends the expansion: it is a ValueError naming the rule, as
llama.cpp and xgrammar reject it; so are a rule that never ends and a terminal too large once its rules are written
out (MAX_TERMINAL_NODES).

For TokenIndex's walk, a state whose parses are inside terminals (up to MAX_VIEW_PARSES of them: one, or
alternatives that begin alike) has a `dfa` view: the tokens run through the terminals' DFAs (side by side, _Product)
with numpy, while the bytes are ones nothing after a terminal can take, or no terminal may end yet; other states go
byte by byte.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from .regex import MAX_CODE, MAX_REPEAT, NumberedDFA, Regex, _complement, _normal, _Parser
from .structured import TooAmbiguous

IGNORED = " ignored"  # the rule of what Lark's %ignore names (a space: no rule of the text has it)
# parses one state may hold: a byte that would lead past it is refused (structured.TooAmbiguous; see the docstring)
MAX_PARSES = 1000
MAX_VIEW_PARSES = 32  # a state of up to this many parses runs the tokens through their DFAs side by side
MAX_TERMINAL_NODES = 100_000  # a terminal's tree, written out (rules inlined), may have at most this many parts
END = ()  # in a state: the output may stop here
ANY_CHARACTER = _normal(((0, MAX_CODE),))
_ESCAPES = {"n": 0x0A, "r": 0x0D, "t": 0x09, "\\": 0x5C, '"': 0x22, "[": 0x5B, "]": 0x5D, "'": 0x27, "-": 0x2D,
            "/": 0x2F, "^": 0x5E, "0": 0x00, "f": 0x0C, "v": 0x0B, "b": 0x08, "a": 0x07, "e": 0x1B}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_LARK_NAME = re.compile(r"[?!]?([A-Za-z_][A-Za-z0-9_]*)(\.-?[0-9]+)?\s*:(?!:)")
# Lark's common.lark terminals (the ones grammars import), as regex.py patterns
COMMON = {
    "DIGIT": r"[0-9]", "HEXDIGIT": r"[a-fA-F0-9]", "INT": r"[0-9]+", "SIGNED_INT": r"[+-]?[0-9]+",
    "DECIMAL": r"[0-9]+\.[0-9]*|\.[0-9]+", "_EXP": r"[eE][+-]?[0-9]+",
    "FLOAT": r"[0-9]+[eE][+-]?[0-9]+|([0-9]+\.[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?",
    "SIGNED_FLOAT": r"[+-]?([0-9]+[eE][+-]?[0-9]+|([0-9]+\.[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?)",
    "NUMBER": r"[0-9]+[eE][+-]?[0-9]+|([0-9]+\.[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[0-9]+",
    "SIGNED_NUMBER": r"[+-]?([0-9]+[eE][+-]?[0-9]+|([0-9]+\.[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[0-9]+)",
    "ESCAPED_STRING": r'"([^"\\\n]|\\.)*"', "LCASE_LETTER": r"[a-z]", "UCASE_LETTER": r"[A-Z]",
    "LETTER": r"[A-Za-z]", "WORD": r"[A-Za-z]+", "CNAME": r"[A-Za-z_][A-Za-z0-9_]*", "WS_INLINE": r"[ \t]+",
    "WS": r"[ \t\f\r\n]+", "CR": r"\r", "LF": r"\n", "NEWLINE": r"(\r?\n)+",
    "SH_COMMENT": r"#[^\n]*", "CPP_COMMENT": r"//[^\n]*", "C_COMMENT": r"/\*([^*]|\*+[^*/])*\*+/",
    "SQL_COMMENT": r"--[^\n]*",
}


def _cases(code: int) -> set[int]:
    """A character and its lower and upper case (those that are one character)."""
    c = chr(code)
    return {code} | {ord(x) for x in (c.lower(), c.upper()) if len(x) == 1}


_GBNF_RULE = re.compile(r"^[ \t]*[A-Za-z0-9_-]+[ \t]*::=", re.M)  # a text with a rule `name ::=` is GBNF, else Lark
_COUNT = re.compile(r"\{\s*([0-9]*)\s*(,\s*([0-9]*)\s*)?\}")
_TILDE = re.compile(r"\s*~\s*([0-9]+)(\s*\.\.\s*([0-9]+))?")


def _error(text: str, at: int, what: str):
    line = text.count("\n", 0, at) + 1
    raise ValueError(f"grammar line {line}: {what}")


# ---- parsing ------------------------------------------------------------------------------------------------------
class _GrammarParser:
    """text -> {rule name: tree}: regex.py's trees ("set", "cat", "alt", "rep") plus ("ref", name)."""

    def __init__(self, text: str, lark: bool):
        self.text, self.i, self.lark = text, 0, lark
        self.rules: dict[str, tuple] = {}
        self.imports: set[str] = set()
        # Lark's %ignore: what may come before any terminal of a rule (and end the output), as its lexer skips it
        self.ignores: list[tuple] = []
        self.ignoring = lark and re.search(r"^[ \t]*%ignore\b", text, re.M) is not None
        self.in_rule = False  # parsing a rule's body (lowercase name), not a terminal's

    def error(self, what: str):
        _error(self.text, self.i, what)

    def space(self) -> None:
        t = self.text
        while self.i < len(t):
            c = t[self.i]
            if c in " \t\r\n":
                self.i += 1
            elif c == "#" or (self.lark and t.startswith("//", self.i)):
                end = t.find("\n", self.i)
                self.i = len(t) if end < 0 else end
            else:
                break

    def rule_start(self) -> tuple[str, int] | None:
        """At a rule's head (`name ::=` or Lark's `name:`): -> (name, where its body starts)."""
        if self.lark:
            m = _LARK_NAME.match(self.text, self.i)
            return (m.group(1), m.end()) if m else None
        m = _NAME.match(self.text, self.i)
        if not m:
            return None
        j = m.end()
        while j < len(self.text) and self.text[j] in " \t\r\n":
            j += 1
        return (m.group(0), j + 3) if self.text.startswith("::=", j) else None

    def parse(self) -> dict[str, tuple]:
        self.space()
        while self.i < len(self.text):
            if self.lark and self.text.startswith("%", self.i):
                self.directive()
            else:
                head = self.rule_start()
                if head is None:
                    self.error(f"expected a rule ({'name: ...' if self.lark else 'name ::= ...'}), found "
                               f"{self.text[self.i:self.i + 20]!r}")
                name, self.i = head
                if name in self.rules:
                    self.error(f"rule {name!r} is defined twice")
                self.in_rule = self.lark and not name.isupper()
                self.rules[name] = self.alternatives(top=True)
                self.in_rule = False
            self.space()
        for name in sorted(self.imports):
            if name not in self.rules:
                self.rules[name] = _Parser(COMMON[name]).parse()
        if self.ignoring:
            self.rules[IGNORED] = ("rep", self.ignores[0] if len(self.ignores) == 1 else ("alt", tuple(self.ignores)),
                                   0, None)
            if "start" in self.rules:
                self.rules["start"] = ("cat", (self.rules["start"], ("ref", IGNORED)))
        return self.rules

    def directive(self) -> None:
        end = self.text.find("\n", self.i)
        line = self.text[self.i:len(self.text) if end < 0 else end].strip()
        if line.startswith("%ignore") and line[7:8] in (" ", "\t"):
            inner = _GrammarParser(line[8:], lark=True)  # (its comments too: not cut inside a string)
            inner.space()
            self.ignores.append(inner.alternatives())
            if inner.i < len(inner.text):
                self.error(f"{line[:60]!r}: unexpected {inner.text[inner.i:inner.i + 10]!r}")
            self.i = len(self.text) if end < 0 else end
            return
        line = re.sub(r"\s*(//|#).*$", "", line)
        m = re.fullmatch(r"%import\s+common\.([A-Z_][A-Z0-9_]*)(\s*->\s*([A-Za-z_]\w*))?", line) or \
            re.fullmatch(r"%import\s+common\s*\(([A-Z0-9_,\s]+)\)", line)
        if m is None:
            self.error(f"{line[:60]!r}: only %import common.NAME and %import common (A, B) are implemented")
        names = [n.strip() for n in m.group(1).split(",") if n.strip()]
        for n in names:
            if n not in COMMON:
                self.error(f"%import common.{n}: not one of Lark's common terminals implemented "
                           f"({', '.join(sorted(COMMON))})")
        if m.re.groups >= 3 and m.group(3):  # %import common.X -> Y
            if m.group(3) in self.rules:
                self.error(f"rule {m.group(3)!r} is defined twice")
            self.rules[m.group(3)] = _Parser(COMMON[names[0]]).parse()
        else:
            self.imports.update(names)
        self.i = len(self.text) if end < 0 else end

    def alternatives(self, top: bool = False) -> tuple:
        branches = [self.sequence(top)]
        while True:
            self.space()
            if self.i < len(self.text) and self.text[self.i] == "|":
                self.i += 1
                branches.append(self.sequence(top))
            else:
                break
        return branches[0] if len(branches) == 1 else ("alt", tuple(branches))

    def sequence(self, top: bool) -> tuple:
        items = []
        while True:
            self.space()
            if self.i >= len(self.text):
                break
            c = self.text[self.i]
            if c in "|)]" or (top and self.lark and c == "%"):
                break
            if self.lark and self.text.startswith("->", self.i):  # an alias: names the tree node only
                self.i += 2
                self.space()
                m = _NAME.match(self.text, self.i)
                if not m:
                    self.error("an alias '->' without a name")
                self.i = m.end()
                continue
            if top and self.rule_start() is not None:
                break
            items.append(self.quantified(self.atom()))
        return items[0] if len(items) == 1 else ("cat", tuple(items))

    def quantified(self, node) -> tuple:
        while True:
            t, i = self.text, self.i
            while i < len(t) and t[i] in " \t":  # (`"a" *` is `"a"*`, as llama.cpp and Lark read it)
                i += 1
            if i < len(t) and t[i] in "*+?{~":
                self.i = i
            else:
                i = self.i
            if i < len(t) and t[i] in "*+?":
                self.i += 1
                node = ("rep", node, 0 if t[i] != "+" else 1, None if t[i] != "?" else 1)
                continue
            m = _COUNT.match(t, i)
            if self.lark and not m:
                m2 = _TILDE.match(t, i)
                if m2:
                    lo = int(m2.group(1))
                    node = self.counted(node, lo, int(m2.group(3)) if m2.group(3) else lo)
                    self.i = m2.end()
                    continue
            if m and m.group(1) != "":
                lo = int(m.group(1))
                hi = lo if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
                self.i = m.end()
                node = self.counted(node, lo, hi)
                continue
            if m:
                self.error("a count {,n} needs its minimum: write {0,n}")
            return node

    def counted(self, node, lo: int, hi: int | None) -> tuple:
        if (hi is not None and hi < lo) or max(lo, hi or 0) > MAX_REPEAT:
            self.error(f"a count {{{lo},{'' if hi is None else hi}}} out of order or over {MAX_REPEAT}")
        return ("rep", node, lo, hi)

    def atom(self) -> tuple:
        start = self.text[self.i]
        node = self._atom()
        terminal = start in "\"/" or (node[0] == "ref" and node[1].isupper())  # not a group or a rule's name
        if self.in_rule and self.ignoring and terminal:
            return ("cat", (("ref", IGNORED), node))  # what %ignore names may come first
        return node

    def _atom(self) -> tuple:
        t, c = self.text, self.text[self.i]
        if c == '"':
            node = self.string()
            if self.lark and t.startswith("..", self.i):  # "a".."z"
                self.i += 2
                end = self.string()
                if node[0] != "set" or end[0] != "set" or node[1][0][0] != node[1][0][1] or \
                        end[1][0][0] != end[1][0][1] or end[1][0][0] < node[1][0][0]:
                    self.error("a range \"a\"..\"z\" needs two single characters in order")
                return ("set", ((node[1][0][0], end[1][0][0]),))
            return node
        if c == "[":
            if self.lark:  # [item]: optional
                self.i += 1
                inner = self.alternatives()
                self.expect("]")
                return ("rep", inner, 0, 1)
            return ("set", self.klass())
        if c == "(":
            self.i += 1
            inner = self.alternatives()
            self.expect(")")
            return inner
        if c == "." and not self.lark:
            self.i += 1
            return ("set", ANY_CHARACTER)
        if c == "/" and self.lark:
            return self.lark_regex()
        m = _NAME.match(t, self.i)
        if m:
            self.i = m.end()
            return ("ref", m.group(0))
        self.error(f"unexpected {t[self.i:self.i + 10]!r}")

    def expect(self, c: str) -> None:
        self.space()
        if self.i >= len(self.text) or self.text[self.i] != c:
            self.error(f"missing {c!r}")
        self.i += 1

    def char(self, in_class: bool) -> int:
        """One character of a string or class (an escape decoded)."""
        t = self.text
        if self.i >= len(t):
            self.error("an unterminated string or class")
        c = t[self.i]
        self.i += 1
        if c != "\\":
            return ord(c)
        if self.i >= len(t):
            self.error("a trailing backslash")
        e = t[self.i]
        self.i += 1
        if e in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[e]
            digits = t[self.i:self.i + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                self.error(f"\\{e} needs {n} hex digits")
            self.i += n
            code = int(digits, 16)
            if code > MAX_CODE or 0xD800 <= code <= 0xDFFF:
                self.error(f"\\{e}{digits} is not a character")
            return code
        if e in _ESCAPES:
            return _ESCAPES[e]
        if not e.isalnum():
            return ord(e)
        self.error(f"the escape \\{e} is not implemented")

    def string(self) -> tuple:
        self.i += 1
        codes = []
        while True:
            if self.i >= len(self.text) or self.text[self.i] == "\n":
                self.error("an unterminated string")
            if self.text[self.i] == '"':
                self.i += 1
                break
            codes.append(self.char(in_class=False))
        fold = self.lark and self.text.startswith("i", self.i) and not _NAME.match(self.text, self.i + 1)
        if fold:
            self.i += 1
        items = tuple(("set", _normal({(x, x) for x in _cases(k)} if fold else {(k, k)})) for k in codes)
        return items[0] if len(items) == 1 else ("cat", items)

    def klass(self) -> tuple:
        self.i += 1
        negate = self.text.startswith("^", self.i)
        self.i += negate
        ranges = []
        while True:
            if self.i >= len(self.text):
                self.error("an unterminated class")
            if self.text[self.i] == "]":
                self.i += 1
                break
            lo = self.char(in_class=True)
            hi = lo
            if self.text.startswith("-", self.i) and not self.text.startswith("-]", self.i):
                self.i += 1
                hi = self.char(in_class=True)
                if hi < lo:
                    self.error("a range out of order in a class")
            ranges.append((lo, hi))
        ranges = _complement(ranges) if negate else _normal(ranges)
        if not ranges:
            self.error("a class that matches no character")
        return ranges

    def lark_regex(self) -> tuple:
        t, start = self.text, self.i + 1
        j = start
        while j < len(t) and t[j] != "/":
            if t[j] == "\n":
                break
            j += 2 if t[j] == "\\" else 1
        if j >= len(t) or t[j] != "/":
            self.i = start
            self.error("an unterminated /regex/")
        pattern = t[start:j]
        self.i = j + 1
        m = re.compile(r"[imslux]+").match(t, self.i)
        if m and not _NAME.match(t, m.end()):
            self.error(f"/regex/ flags {m.group(0)!r} are not implemented")
        try:
            return _Parser(pattern.replace("\\/", "/")).parse()
        except ValueError as e:
            self.error(str(e))


# ---- compiling ----------------------------------------------------------------------------------------------------
def _refs(node, out: set) -> set:
    kind = node[0]
    if kind == "ref":
        out.add(node[1])
    elif kind in ("cat", "alt"):
        for item in node[1]:
            _refs(item, out)
    elif kind == "rep":
        _refs(node[1], out)
    return out


def _parse_order(parse: tuple):
    """A parse's place in a fixed order (a state's frozenset iterates in an order of hashes)."""
    stack, rid, q = parse
    return stack, rid, sorted(q)


class _Product(NumberedDFA):
    """Several terminals' DFAs run side by side (the parses of one grammar state), with Regex's interface for
    TokenIndex's DFA walk: a state is the tuple of their states (None where one is gone), accepting where one is, and
    numbered like Regex's."""

    def __init__(self, parts: tuple[Regex, ...]):
        self.parts = parts
        self._dead = [None] * 256
        self._number_states()

    def _number_states(self) -> None:
        super()._number_states()
        self._loops: dict = {}

    def accepting(self, state: tuple) -> bool:
        return any(q is not None and r.accepting(q) for r, q in zip(self.parts, state))

    def _successors(self, state: tuple) -> list:
        rows = [self._dead if q is None else r._table(q) for r, q in zip(self.parts, state)]
        return [None if all(x is None for x in column) else column for column in zip(*rows)]

    def loops(self, state: tuple, within: bytes) -> bytes:
        key = (state, within)
        out = self._loops.get(key)
        if out is None:
            i = self.state_id(state)
            row = self.next_ids(np.full(256, i, dtype=np.int32), np.arange(256))
            out = (row == i) & (np.frombuffer(within, dtype=np.uint8) != 0)
            out = self._loops[key] = out.astype(np.uint8).tobytes()
        return out

    def characters_loop(self, state: tuple) -> bool:
        return all(q is None or r.characters_loop(q) for r, q in zip(self.parts, state))


def _written_size(node, memo: dict) -> int:
    """Parts of a tree once every shared part is written out (inlined rules share their trees), found in time linear
    in the distinct parts, capped past MAX_TERMINAL_NODES."""
    key = id(node)
    out = memo.get(key)
    if out is None:
        kind = node[0]
        if kind in ("cat", "alt"):
            out = 1 + sum(_written_size(x, memo) for x in node[1])
        elif kind == "rep":
            out = 1 + _written_size(node[1], memo)
        else:
            out = 1
        out = memo[key] = min(out, MAX_TERMINAL_NODES + 1)
    return out


class Grammar:
    """A compiled grammar: structured.py's interface (`start`, `step`, `accepting`, `shortcut`, `dfa`, `key`)."""

    STEPS_CACHED = 65536

    def __init__(self, text: str):
        if not isinstance(text, str) or not text.strip():
            raise ValueError("a grammar must be a non-empty string")
        lark = not _GBNF_RULE.search(re.sub(r"(#|//)[^\n]*", "", text))
        rules = _GrammarParser(text, lark).parse()
        root = "start" if lark else "root"
        if root not in rules:
            raise ValueError(f"the grammar has no {root!r} rule (its start{', as Lark' if lark else ''} names it)")
        refs = {name: _refs(tree, set()) for name, tree in rules.items()}
        for name, used in refs.items():
            missing = sorted(used - set(rules))
            if missing:
                raise ValueError(f"grammar rule {name!r} refers to {missing[0]!r}, which is not defined")
        reach = self._reachable(refs)
        recursive = {n for n in rules if n in reach[n]}
        self.regular = {n for n in rules if not (reach[n] | {n}) & recursive}
        self.rules, self.key = rules, ("grammar", text)
        self._inlined: dict[str, tuple] = {}
        self.regexes: list[Regex] = []
        self._regex_ids: dict = {}
        # the pushdown part: alternatives (tuples of symbols: ("T", regex id) or ("N", rule)), per rule
        self.alts: dict[str, list[int]] = {}
        self.alt_symbols: list[tuple] = []
        self._helpers = 0
        self._trees: list = []  # each terminal's regex tree
        self._pending = [root]  # rules referred to and not lowered yet
        while self._pending:
            name = self._pending.pop()
            if name not in self.alts:
                self.alts[name] = []  # (placeholder: it may refer to itself)
                self.alts[name] = self._merged(self._lower_alts(self.rules[name]))
        self.root = root
        self._prune()
        self._check_left_recursion()
        self._expansions: dict[tuple[int, int], tuple] = {}
        self._pops: dict[tuple, frozenset] = {}
        self._steps: dict = {}
        self._views: dict = {}
        self._firsts: dict = {}
        self._products: dict = {}
        start = set()
        for a in self.alts[root]:
            start |= self._expand(a, 0, ())
        self.start = frozenset(start)

    @staticmethod
    def _reachable(refs: dict[str, set]) -> dict[str, set]:
        """Per rule, the rules it reaches through one or more references."""
        out = {}
        for name in refs:
            seen, todo = set(), list(refs[name])
            while todo:
                n = todo.pop()
                if n not in seen:
                    seen.add(n)
                    todo += refs.get(n, ())
            out[name] = seen
        return out

    # regular parts -> regex trees -> Regex
    def _inline(self, node) -> tuple:
        kind = node[0]
        if kind == "ref":
            name = node[1]
            if name not in self._inlined:
                self._inlined[name] = self._inline(self.rules[name])
            return self._inlined[name]
        if kind in ("cat", "alt"):
            return (kind, tuple(self._inline(x) for x in node[1]))
        if kind == "rep":
            return ("rep", self._inline(node[1]), node[2], node[3])
        return node

    def _is_regular(self, node) -> bool:
        return _refs(node, set()) <= self.regular

    def _regex(self, tree) -> int:
        size = _written_size(tree, {})
        if size > MAX_TERMINAL_NODES:
            raise ValueError(f"grammar: a terminal is too large once its rules are written out (over "
                             f"{MAX_TERMINAL_NODES} parts: rules that use others twice, nested)")
        i = self._regex_ids.get(tree)
        if i is None:
            try:
                regex = Regex("(a grammar terminal)", tree)
            except ValueError as e:
                raise ValueError(f"grammar: {e}") from None
            i = self._regex_ids[tree] = len(self.regexes)
            self.regexes.append(regex)
            self._trees.append(tree)
        return i

    # the rest -> alternatives of symbols
    def _add_alt(self, symbols: list) -> int:
        self.alt_symbols.append(tuple(symbols))
        return len(self.alt_symbols) - 1

    def _merged(self, alternatives: list[list]) -> list[int]:
        """A rule's alternatives, those that begin with a terminal and go on alike joined into one whose terminal is
        the alternation of theirs (a list of keywords each followed by the same rest is one parse, not one each)."""
        groups: dict[tuple, list] = {}
        for seq in alternatives:
            key = ("T",) + tuple(seq[1:]) if seq and seq[0][0] == "T" else ("seq",) + tuple(seq)
            groups.setdefault(key, []).append(seq)
        out = []
        for key, seqs in groups.items():
            if key[0] == "T" and len(seqs) > 1:
                first = ("T", self._regex(("alt", tuple(self._trees[seq[0][1]] for seq in seqs))))
                out.append(self._add_alt([first] + list(key[1:])))
            else:
                out += [self._add_alt(seq) for seq in seqs]
        return out

    def _helper(self, alternatives: list[list]) -> tuple:
        self._helpers += 1
        name = f" helper {self._helpers}"  # (a space: never a rule name of the text)
        self.alts[name] = self._merged(alternatives)
        return ("N", name)

    def _lower_alts(self, node) -> list[list]:
        if node[0] == "alt" and not self._is_regular(node):
            return [self._lower_seq(b) for b in node[1]]
        return [self._lower_seq(node)]

    def _lower_seq(self, node) -> list:
        """A sequence of symbols for `node`: ("T", regex id) and ("N", rule), adjacent regular parts joined into one
        terminal."""
        if self._is_regular(node):
            return [("T", self._regex(self._inline(node)))]
        kind = node[0]
        if kind == "ref":
            if node[1] not in self.alts:
                self._pending.append(node[1])
            return [("N", node[1])]
        if kind == "cat":
            pieces: list = []  # regular trees (joined) and symbols
            for item in node[1]:
                if self._is_regular(item):
                    tree = self._inline(item)
                    if pieces and pieces[-1][0] == "R":
                        pieces[-1] = ("R", ("cat", (pieces[-1][1], tree)))
                    else:
                        pieces.append(("R", tree))
                else:
                    pieces += self._lower_seq(item)
            return [("T", self._regex(p[1])) if p[0] == "R" else p for p in pieces]
        if kind == "alt":
            return [self._helper(self._lower_alts(node))]
        _, item, lo, hi = node  # a repetition of something recursive
        body = self._lower_seq(item)
        one = body if len(body) == 1 else [self._helper([body])]
        out = one * lo
        if hi is None:  # S ::= X S | ""
            star = self._helper([])
            self.alts[star[1]] = [self._add_alt(one + [star]), self._add_alt([])]
            out.append(star)
        elif hi > lo:  # up to k = hi - lo more, nested: R_1 ::= "" | X, R_k ::= "" | X R_(k-1)
            rest = self._helper([[], one])
            for _ in range(hi - lo - 1):
                rest = self._helper([[], one + [rest]])
            out.append(rest)
        return out

    def _prune(self) -> None:
        """Drop the alternatives that cannot end (they use a rule none of whose alternatives ever ends), so that
        every parse can reach the end of the output; a ValueError if the start rule cannot end."""
        done: set[str] = set()
        changed = True
        while changed:
            changed = False
            for name, alts in self.alts.items():
                if name not in done and any(all(k == "T" or x in done for k, x in self.alt_symbols[a])
                                            for a in alts):
                    done.add(name)
                    changed = True
        if self.root not in done:
            raise ValueError(f"grammar rule {self.root!r} never ends (every way through it uses itself again)")
        for name in done:
            self.alts[name] = [a for a in self.alts[name]
                               if all(k == "T" or x in done for k, x in self.alt_symbols[a])]

    # ---- the pushdown automaton ----------------------------------------------------------------------------------
    def _expand(self, alt: int, pos: int, below: tuple) -> set:
        """The parses that begin where alternative `alt` goes on at symbol `pos`, with the stack `below`."""
        items, nullable = self._expansion(alt, pos)
        out = {(below + suffix, rid, self.regexes[rid].start) for suffix, rid in items}
        if nullable:
            out |= self._pop(below)
        return out

    def _expansion(self, alt: int, pos: int) -> tuple:
        """-> ((stack suffix, terminal) pairs where alternative `alt` from symbol `pos` may be at its first byte,
        whether it may end with no byte), found once: every way through rules, and through what may match nothing,
        up to a terminal's first byte (a search over (suffix, position); `_check_left_recursion` made it finite)."""
        key = (alt, pos)
        out = self._expansions.get(key)
        if out is None:
            items: dict = {}
            nullable = False
            seen = set()
            todo = [((), alt, pos)]
            while todo:
                item = todo.pop()
                if item in seen:
                    continue
                seen.add(item)
                suffix, a, i = item
                symbols = self.alt_symbols[a]
                if i == len(symbols):  # this alternative ends here: back to what it was pushed by, or the end
                    if suffix:
                        todo.append((suffix[:-1],) + suffix[-1])
                    else:
                        nullable = True
                    continue
                kind, x = symbols[i]
                push = suffix + ((a, i + 1),) if i + 1 < len(symbols) else suffix  # the last symbol pushes nothing
                if kind == "T":
                    regex = self.regexes[x]
                    if not regex.ends(regex.start):  # (a terminal that matches only "" is skipped)
                        items[(push, x)] = None
                    if regex.accepting(regex.start):
                        todo.append((suffix, a, i + 1))
                else:
                    todo += [(push, b, 0) for b in reversed(self.alts[x])]
            out = self._expansions[key] = (tuple(items), nullable)
        return out

    def _check_left_recursion(self) -> None:
        """A ValueError if a rule can begin with itself with something after it (left recursion: its expansion
        would never end). A rule that is all of itself again (`a ::= a` via what may match nothing, or a `*` of
        what may match nothing) is harmless: the expansion's search sees it once."""
        nullable: set[str] = set()
        changed = True
        while changed:
            changed = False
            for name, alts in self.alts.items():
                if name not in nullable and any(all(self._nullable_symbol(sym, nullable)
                                                    for sym in self.alt_symbols[a]) for a in alts):
                    nullable.add(name)
                    changed = True
        begins: dict[str, list[tuple[str, bool]]] = {}  # rule -> (rule it may begin with, something after it)
        for name, alts in self.alts.items():
            for a in alts:
                symbols = self.alt_symbols[a]
                for i, sym in enumerate(symbols):
                    if sym[0] == "N":
                        begins.setdefault(name, []).append((sym[1], i + 1 < len(symbols)))
                    if not self._nullable_symbol(sym, nullable):
                        break
        for name, edges in begins.items():
            for target, pushed in edges:
                if not pushed:
                    continue
                seen, todo = set(), [target]
                while todo:
                    n = todo.pop()
                    if n == name:
                        raise ValueError(f"grammar rule {self._shown(name)!r} is left-recursive (it can begin with "
                                         "itself before any character): not implemented; write the repetition with "
                                         "* or +")
                    if n not in seen:
                        seen.add(n)
                        todo += [t for t, _ in begins.get(n, ())]

    def _nullable_symbol(self, sym: tuple, nullable: set) -> bool:
        if sym[0] == "T":
            return self.regexes[sym[1]].accepting(self.regexes[sym[1]].start)
        return sym[1] in nullable

    @staticmethod
    def _shown(name: str) -> str:
        return name if not name.startswith(" ") else "(a group or repetition)"

    def _pop(self, stack: tuple) -> frozenset:
        """The parses after a terminal ends on `stack`: where its top goes on (END if it is empty)."""
        out = self._pops.get(stack)
        if out is None:
            parses, below = set(), stack
            while True:  # (a loop, not recursion: every open level may end at once)
                if not below:
                    parses.add(END)
                    break
                (alt, pos), below = below[-1], below[:-1]
                items, nullable = self._expansion(alt, pos)
                parses |= {(below + suffix, rid, self.regexes[rid].start) for suffix, rid in items}
                if not nullable:
                    break
            out = frozenset(parses)
            if len(self._pops) > self.STEPS_CACHED:
                self._pops.clear()
            self._pops[stack] = out
        return out

    def accepting(self, state: frozenset) -> bool:
        return END in state

    def step(self, state: frozenset, b: int):
        key = (state, b)
        out = self._steps.get(key, False)
        if out is False:
            nxt = set()
            for parse in state:
                if parse is END:
                    continue
                stack, rid, q = parse
                regex = self.regexes[rid]
                q = regex.step(q, b)
                if q is None:
                    continue
                if not regex.ends(q):
                    nxt.add((stack, rid, q))
                if regex.accepting(q):
                    nxt |= self._pop(stack)
            if len(nxt) > MAX_PARSES:
                raise TooAmbiguous(f"structured outputs: the grammar allows more than {MAX_PARSES} parses of the "
                                   "output here (too ambiguous)")
            out = frozenset(nxt) if nxt else None
            if len(self._steps) > self.STEPS_CACHED:
                self._steps.clear()
            self._steps[key] = out
        return out

    @staticmethod
    def shortcut(state):
        return None

    def dfa(self, state: frozenset):
        """A state that is one parse inside a terminal (with, where the terminal may end there, the parses after
        it): the bytes nothing after the terminal can take go through its DFA, and where it cannot end, every byte
        -> (regex, its state, those bytes, no budget, the grammar's state from the regex's, True: gated by its
        accepting states). A state of several parses (alternatives that begin alike) likewise, through their
        terminals' DFAs side by side (_Product), up to MAX_VIEW_PARSES of them. Else None."""
        if state in self._views:
            return self._views[state]
        view = None
        parses = sorted((p for p in state if p is not END), key=_parse_order)
        for stack, rid, q in parses:
            if self._resume(stack, rid, q) == state:
                takes = bytes(1 - x for x in self._first(self._pop(stack)))
                view = (self.regexes[rid], q, takes, None, functools.partial(self._resumed, stack, rid), True)
                break
        if view is None and 1 < len(parses) <= MAX_VIEW_PARSES:
            stacks, rids, states = zip(*parses)
            if self._resumed_all(stacks, rids, states, 0) == state:
                first = bytearray(256)
                for stack in set(stacks):
                    first = bytearray(a | b for a, b in zip(first, self._first(self._pop(stack))))
                product = self._products.get(rids)
                if product is None:
                    if len(self._products) > 1024:
                        self._products.clear()
                    product = self._products[rids] = _Product(tuple(self.regexes[r] for r in rids))
                view = (product, states, bytes(1 - x for x in first), None,
                        functools.partial(self._resumed_all, stacks, rids), True)
        if len(self._views) > self.STEPS_CACHED:
            self._views.clear()
        self._views[state] = view
        return view

    def _resumed_all(self, stacks: tuple, rids: tuple, states: tuple, chars: int) -> frozenset:
        """The grammar's state from the terminals' states side by side (None: that parse is gone)."""
        out = frozenset()
        for stack, rid, q in zip(stacks, rids, states):
            if q is not None:
                out |= self._resume(stack, rid, q)
        return out

    def _resume(self, stack: tuple, rid: int, q) -> frozenset:
        regex = self.regexes[rid]
        out = frozenset() if regex.ends(q) else frozenset(((stack, rid, q),))
        return out | self._pop(stack) if regex.accepting(q) else out

    def _resumed(self, stack: tuple, rid: int, q, chars: int) -> frozenset:
        return self._resume(stack, rid, q)

    def _first(self, parses: frozenset) -> bytes:
        """256 bytes, 1 where some parse of `parses` takes that byte first."""
        out = self._firsts.get(parses)
        if out is None:
            first = bytearray(256)
            for parse in parses:
                if parse is not END:
                    _, rid, q = parse
                    for b, t in enumerate(self.regexes[rid]._table(q)):
                        if t is not None:
                            first[b] = 1
            if len(self._firsts) > self.STEPS_CACHED:
                self._firsts.clear()
            out = self._firsts[parses] = bytes(first)
        return out


def compiled(text: str) -> Grammar:
    """The Grammar of a text, compiled once for all the requests that use it."""
    if not isinstance(text, str):
        raise ValueError(f"a grammar must be a string, got {type(text).__name__}")
    return _compiled(text)


@functools.lru_cache(maxsize=64)
def _compiled(text: str) -> Grammar:
    return Grammar(text)


__all__ = ["COMMON", "END", "Grammar", "MAX_PARSES", "compiled"]

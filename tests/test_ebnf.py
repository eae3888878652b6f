"""Grammars for structured outputs (runtime/ebnf.py): GBNF and Lark. Regular grammars (random ones too) against
Python's re on the same language written as a pattern; recursive grammars (random ones too) against a reference
recognizer written apart (the set of positions where each part of the parsed grammar can end, memoized, over the
text's characters), on strings derived from the grammar, mutations of them and noise; every prefix of a member
alive; random byte walks with no dead end; the allowed-token sets against a token-by-token check (a random
vocabulary and Qwen's); Lark's %ignore; the bound on parses; errors that name what is wrong."""

from __future__ import annotations

import functools
import json
import random
import re

import numpy as np
import pytest

from benchmarks.bench_structured import SQL_LARK
from qwen2rt import StructuredOutputs
from qwen2rt.ebnf import MAX_PARSES, Grammar, _GrammarParser, _Product
from qwen2rt.structured import Matcher, TokenIndex, run
from test_structured import brute_allowed, random_byte_walks, reachable_states

pytestmark = pytest.mark.timeout(300)

JSON_GBNF = r'''
# llama.cpp's grammars/json.gbnf
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

ws ::= | " " | "\n" [ \t]{0,20}
'''
SQL_GBNF = r'''
root ::= select_statement
select_statement ::= "SELECT " column " from " table " where " condition
column ::= "col_1 " | "col_2 "
table ::= "table_1 " | "table_2 "
condition ::= column "= " number
number ::= "1 " | "2 "
'''  # vLLM's example of guided_grammar
JSON_LARK = r'''
?start: value
?value: object
      | array
      | string
      | SIGNED_NUMBER      -> number
      | "true"             -> true
      | "false"            -> false
      | "null"             -> null

array  : "[" [value ("," value)*] "]"
object : "{" [pair ("," pair)*] "}"
pair   : string ":" value
string : ESCAPED_STRING

%import common.ESCAPED_STRING
%import common.SIGNED_NUMBER
%import common.WS
%ignore WS
'''  # Lark's own JSON example
ANSWER = r'''
root ::= summary | detailed
summary ::= "Answer: " [^\n]{1,200} "\n"
detailed ::= "Answer: " [^\n]{1,200} "\n" "Reasons:\n" item+
item ::= "- " [^\n]+ "\n" ("  " item)*
'''  # two parses side by side through a counted free text (a review's example)
SIDE = r'''
root ::= "<" b
b ::= [a-z\u00e9]* ">" | [a-z]* "?" b | "(" b ")"
'''  # after "<": a letter leaves two parses side by side; only one of them takes "\u00e9"
ARITHMETIC = r'''
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= [0-9]+ | "(" expr ")" | "-" factor
'''


# ---- the reference recognizer -------------------------------------------------------------------------------------
def reference(text: str, lark: bool = False):
    """-> a function: string -> whether the grammar (parsed by ebnf's parser, followed apart from its automaton)
    derives exactly that string. Per (part of the grammar, position): the positions where that part can end."""
    rules = _GrammarParser(text, lark).parse()
    root = "start" if lark else "root"

    def member(s: str) -> bool:
        @functools.lru_cache(maxsize=None)
        def ends(node, i: int) -> frozenset:
            kind = node[0]
            if kind == "set":
                return frozenset((i + 1,)) if i < len(s) and any(a <= ord(s[i]) <= b for a, b in node[1]) \
                    else frozenset()
            if kind == "ref":
                return ends(rules[node[1]], i)
            if kind == "alt":
                return frozenset().union(*(ends(b, i) for b in node[1]))
            if kind == "cat":
                at = {i}
                for item in node[1]:
                    at = {j for k in at for j in ends(item, k)}
                return frozenset(at)
            _, item, lo, hi = node
            at = {i}
            for _ in range(lo):
                at = {j for k in at for j in ends(item, k)}
            out, seen, n = set(at), set(at), lo
            while at and (hi is None or n < hi):
                at = {j for k in at for j in ends(item, k)} - (seen if hi is None else set())
                seen |= at
                out |= at
                n += 1
            return frozenset(out)

        return len(s) in ends(rules[root], 0)

    return member


def shortest(rules: dict) -> dict[str, float]:
    """The fewest characters each rule derives (a fixpoint)."""
    best = {name: float("inf") for name in rules}

    def size(node) -> float:
        kind = node[0]
        if kind == "set":
            return 1
        if kind == "ref":
            return best[node[1]]
        if kind == "alt":
            return min(size(b) for b in node[1])
        if kind == "cat":
            return sum(size(x) for x in node[1])
        return node[2] * size(node[1]) if node[2] else 0

    changed = True
    while changed:
        changed = False
        for name, tree in rules.items():
            n = size(tree)
            if n < best[name]:
                best[name], changed = n, True
    return best, size


class TooDeep(Exception):
    pass


def derive(rules: dict, node, rng: random.Random, depth: int = 0, sizes=None) -> str:
    """A random string the grammar derives (past depth 8, along the shortest branches, so that it ends; past depth
    80, where ties between them go round, a TooDeep)."""
    if sizes is None:
        sizes = shortest(rules)[1]
    if depth > 80:
        raise TooDeep
    kind = node[0]
    if kind == "set":
        a, b = rng.choice(node[1])
        return chr(rng.randint(a, min(b, a + 300)))
    if kind == "ref":
        return derive(rules, rules[node[1]], rng, depth + 1, sizes)
    if kind == "alt":
        branches = node[1]
        if depth > 8:
            least = min(sizes(b) for b in branches)
            branches = [b for b in branches if sizes(b) == least]
        return derive(rules, rng.choice(branches), rng, depth + 1, sizes)
    if kind == "cat":
        return "".join(derive(rules, item, rng, depth + 1, sizes) for item in node[1])
    _, item, lo, hi = node
    n = lo if depth > 8 else rng.randint(lo, lo + 2 if hi is None else min(hi, lo + 2))
    return "".join(derive(rules, item, rng, depth + 1, sizes) for _ in range(n))


def completes(grammar, text: str) -> bool:
    state = run(grammar, text.encode())
    return state is not None and grammar.accepting(state)


def mutations(rng: random.Random, text: str, alphabet: str, count: int) -> list[str]:
    out = []
    for _ in range(count):
        t = list(text)
        for _ in range(rng.randint(1, 2)):
            k = rng.randrange(len(t) + 1)
            r = rng.random()
            if r < 0.4 and k < len(t):
                del t[k]
            elif r < 0.7:
                t.insert(k, rng.choice(alphabet))
            elif k < len(t):
                t[k] = rng.choice(alphabet)
        out.append("".join(t))
    return out


def check_against_reference(text: str, rng: random.Random, alphabet: str, lark: bool = False, count: int = 30,
                            most: int = 80, ambiguous: list | None = None) -> int:
    """Members derived from the grammar, their mutations and noise: the grammar's automaton and the reference agree
    on each, and every prefix of a member is alive. -> how many members were checked. With `ambiguous` (a list),
    a member past MAX_PARSES is skipped and listed there."""
    grammar, member = Grammar(text), reference(text, lark)
    rules = _GrammarParser(text, lark).parse()
    root = "start" if lark else "root"
    members = 0
    for _ in range(count):
        try:
            good = derive(rules, rules[root], rng)
        except TooDeep:
            continue
        if len(good) > most:
            continue
        assert member(good), good  # (the reference accepts what the grammar derives)
        try:
            assert completes(grammar, good), (text, good)
            data = good.encode()
            assert all(run(grammar, data[:k]) is not None for k in range(len(data))), good
            members += 1
            for other in mutations(rng, good, alphabet, 6) + ["".join(rng.choice(alphabet) for _ in range(4))]:
                assert completes(grammar, other) == member(other), (text, other)
        except RuntimeError:
            if ambiguous is None:
                raise
            ambiguous.append((text, good))
    return members


# ---- regular grammars against re ------------------------------------------------------------------------------------
def random_regular(rng: random.Random, depth: int, lark: bool, refs: list[str]) -> tuple[str, str]:
    """A random regular expression as (grammar text, Python pattern) of the same language."""
    r = rng.random()
    if depth > 2 or r < 0.35:
        choice = rng.randrange(9 if refs else 8)
        if choice == 0:
            word = rng.choice(["a", "ab", "x\u00e9", "\u4e2d", '"q"', "a\\b", "\n", "-", "[]"])
            escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            return f'"{escaped}"', re.escape(word)
        if choice == 1:
            return ("[a-c]", "[a-c]") if lark is False else ('"a".."c"', "[a-c]")
        if choice == 2 and not lark:
            return "[^ab\\n]", "[^ab\\n]"
        if choice == 3 and not lark:
            return ".", "(?s:.)"
        if choice == 4:
            return ("[0-9]", "[0-9]") if not lark else ("/[0-9]/", "[0-9]")
        if choice == 5 and not lark:
            return "[\\u00e9-\\u00ff x]", "[\u00e9-\u00ff x]"
        if choice == 6 and lark:
            return "/[^a]b?/", "[^a]b?"
        if choice == 8:
            name = rng.choice(refs)
            return name, f"(?:{REGULAR_PATTERNS[name]})"
        return '"b"', "b"
    if r < 0.6:
        parts = [random_regular(rng, depth + 1, lark, refs) for _ in range(rng.randint(2, 3))]
        return " ".join(g for g, _ in parts), "".join(f"(?:{p})" for _, p in parts)
    if r < 0.75:
        parts = [random_regular(rng, depth + 1, lark, refs) for _ in range(rng.randint(2, 3))]
        return "(" + " | ".join(g for g, _ in parts) + ")", "(?:" + "|".join(p for _, p in parts) + ")"
    g, p = random_regular(rng, depth + 1, lark, refs)
    lo = rng.randint(0, 2)
    hi = lo + rng.randint(0, 2)
    q = rng.choice(["*", "+", "?", "{m}", "{m,}", "{m,n}"] + (["~m", "~m..n", "[]"] if lark else []))
    if q == "[]":
        return f"[{g}]", f"(?:{p})?"
    grammar_q = {"{m}": f"{{{lo}}}", "{m,}": f"{{{lo},}}", "{m,n}": f"{{{lo},{hi}}}", "~m": f" ~ {lo}",
                 "~m..n": f" ~ {lo}..{hi}"}.get(q, q)
    re_q = {"{m}": f"{{{lo}}}", "{m,}": f"{{{lo},}}", "{m,n}": f"{{{lo},{hi}}}", "~m": f"{{{lo}}}",
            "~m..n": f"{{{lo},{hi}}}"}.get(q, q)
    return f"({g}){grammar_q}", f"(?:{p}){re_q}"


REGULAR_PATTERNS: dict[str, str] = {}


@pytest.mark.parametrize("lark", [False, True])
def test_random_regular_grammars_against_re(lark):
    """Random grammars of literals, classes, groups, alternatives, every quantifier and references to other
    (regular) rules, against the same language as a Python pattern, on derived strings, mutations and noise."""
    rng = random.Random(5 + lark)
    alphabet = "abcx\u00e9\u4e2d\"\\\n-[]019 "
    checked = 0
    for _ in range(60):
        REGULAR_PATTERNS.clear()
        lines, names = [], []
        for k in range(rng.randint(0, 2)):
            name = f"r{k}"
            body, pattern = random_regular(rng, 1, lark, list(names))
            lines.append(f"{name} {':' if lark else '::='} {body}")
            REGULAR_PATTERNS[name] = pattern
            names.append(name)
        body, pattern = random_regular(rng, 0, lark, names)
        lines.insert(0, f"{'start:' if lark else 'root ::='} {body}")
        text = "\n".join(lines)
        grammar = Grammar(text)
        assert not grammar._helpers and len(grammar.regexes) == 1  # all one regex
        rules = _GrammarParser(text, lark).parse()
        for _ in range(12):
            good = derive(rules, rules["start" if lark else "root"], rng)
            for s in [good] + mutations(rng, good, alphabet, 4):
                assert completes(grammar, s) == (re.fullmatch(pattern, s) is not None), (text, pattern, s)
                checked += 1
    assert checked > 2000


# ---- recursive grammars against the reference ------------------------------------------------------------------------
@pytest.mark.parametrize("text, lark, alphabet", [
    (JSON_GBNF, False, '{}[]:,"\\ \n0123456789-.eEtrufalsnxu\u00e9'),
    (SQL_GBNF, False, "SELECT col_12 fromtable where= "),
    (ARITHMETIC, False, "0123456789+-*/() "),
    (JSON_LARK, True, '{}[]:,"\\ \n0123456789-.eEtrufalsnxu\u00e9\t'),
    (SQL_LARK, True, "SELECT *,name FROM t WHERE AND OR ='<>!()0123456789.; x"),
])
def test_grammars_against_the_reference(text, lark, alphabet):
    assert check_against_reference(text, random.Random(len(text)), alphabet, lark, count=40) >= 20


def random_recursive(rng: random.Random) -> str:
    """A random grammar of 3 rules that refer to each other (a rule refers to itself or an earlier one only after
    a literal, so that none is left-recursive), in GBNF."""
    def expr(k: int, depth: int) -> str:
        r = rng.random()
        if depth > 2 or r < 0.3:
            return rng.choice(['"a"', '"b"', "[a-c]", '"(" ' + f"r{rng.randint(0, 2)}" + ' ")"', '""', "[x-z]?"])
        if r < 0.45 and k < 2:
            return f"r{rng.randint(k + 1, 2)}"  # a later rule: no cycle through it at the start
        if r < 0.7:
            return " ".join(expr(k, depth + 1) for _ in range(rng.randint(2, 3)))
        if r < 0.85:
            return "(" + " | ".join(expr(k, depth + 1) for _ in range(2)) + ")"
        return "(" + expr(k, depth + 1) + ")" + rng.choice(["*", "+", "?", "{1,2}", "{2}"])

    lines = [f"r{k} ::= " + " | ".join(expr(k, 0) for _ in range(rng.randint(1, 3))) for k in range(3)]
    return "root ::= r0\n" + "\n".join(lines)


def test_random_recursive_grammars_against_the_reference():
    """Random grammars whose rules nest each other between parentheses (a pushdown, not a regex), against the
    reference; those the compiler rejects (a rule that never ends) are skipped, counted, and so are the few members
    a very ambiguous one has more than MAX_PARSES parses of."""
    rng = random.Random(9)
    compiled = members = 0
    ambiguous = []
    for _ in range(80):
        text = random_recursive(rng)
        try:
            grammar = Grammar(text)
        except ValueError as e:
            assert "never ends" in str(e), (text, e)
            continue
        compiled += 1
        assert grammar.alt_symbols  # (a pushdown part)
        members += check_against_reference(text, rng, "abcxyz()", count=8, most=40, ambiguous=ambiguous)
    assert compiled >= 50 and members >= 300 and len(ambiguous) < members // 20, (compiled, members, len(ambiguous))


def test_every_state_can_end():
    """Random byte walks over the JSON and arithmetic grammars: no state allows nothing, and every output the walk
    ends where the grammar accepts is a member (json.loads reads the JSON ones)."""
    rng = random.Random(3)
    outs = random_byte_walks(Grammar(JSON_GBNF), rng, 40, 120)
    assert len(outs) > 5 and all(isinstance(json.loads(o), dict) for o in outs)
    member = reference(ARITHMETIC)
    outs = random_byte_walks(Grammar(ARITHMETIC), rng, 60, 40)
    assert len(outs) > 20 and all(member(o.decode()) for o in outs)


def test_lark_ignore_and_json():
    """Lark's JSON grammar with %ignore WS: whitespace before any terminal of a rule and at the end, none inside
    a terminal (a number, a string's quotes, a literal); documents json.dumps writes in several layouts are
    members, and json.loads reads every member."""
    grammar = Grammar(JSON_LARK)
    rng = random.Random(4)
    from test_structured import random_value

    for _ in range(40):
        value = random_value(rng)
        for text in (json.dumps(value), json.dumps(value, indent=rng.randint(0, 3)),
                     json.dumps(value, separators=(" ,", " :  ")), "\n " + json.dumps(value) + "\t"):
            assert completes(grammar, text), text
    for text, ok in [("tr ue", False), ("- 1", False), ("1 .5", False), ('" a"', True), ('"a" "b"', False),
                     ("[1,2 ,3 ]", True), ("[,]", False), ("{ }", True), ("nul", False)]:
        assert completes(grammar, text) == ok, text


@pytest.mark.parametrize("text, cases", [
    ('start: "select"i " " NAME  // a keyword in any case\nNAME: /[a-z]+/',
     [("SeLeCt x", True), ("select x", True), ("SELECT X", False), ("selectx", False)]),
    ("start: A+ B\n%import common (DIGIT, LETTER)\nA: DIGIT\nB: LETTER", [("12a", True), ("a", False)]),
    ("start: n (\",\" n)*\n%import common.INT -> n", [("1,22,3", True), ("1,", False), ("-1", False)]),
    ('?start: "a" ~ 2..3 b\n!b: ["x"] "y" -> why', [("aay", True), ("aaaxy", True), ("ay", False), ("aaaay", False)]),
    ('start: "(" start ")" | "" \n%ignore " "', [("( ( ) )", True), (" ()", True), ("(( )", False)]),
    ('start: "a" * NAME " ::= " NAME  # a quantifier after a space\nNAME: /[a-z]+/', [("aax ::= y", True)]),
    ('start: "x" C_COMMENT\n%import common.C_COMMENT  // a comment\n%ignore "//" /[^\\n]*/',
     [("x/* a * b */", True), ("x/**/// d", True), ("x// c\n/**/", False), ("x/* a */ */", False)]),
])
def test_lark_syntax(text, cases):
    grammar = Grammar(text)
    for s, ok in cases:
        assert completes(grammar, s) == ok, s


def test_allowed_sets_equal_a_token_by_token_check():
    """TokenIndex.allowed against running the grammar over every token's bytes, at states reached by members, over
    a random vocabulary of pieces that cross the grammars' terminals: the DFA walk over a terminal (with what may
    follow it) and the byte walk of several parses."""
    rng = random.Random(6)
    alphabet = [c.encode() for c in '{}[]:,"\\ \n0123456789-.eEtrufalsnx()+*/'] + [
        b'": ', b'",', b"true", b"null", b" (", b"12", b"SELECT", b" FROM", b" WHERE", b"name", b"\xc3\xa9", b"\xc3",
        b"ab", b"<", b">", b"?", b"\xc3\xa9?", b"x?"]
    pieces = {bytes((i,)) for i in range(256)}
    while len(pieces) < 2500:
        pieces.add(b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))))
    index = TokenIndex(sorted(pieces), len(pieces))
    checked = products = 0
    for text, lark in [(JSON_GBNF, False), (ARITHMETIC, False), (SQL_LARK, True), (JSON_LARK, True),
                       (ANSWER, False), (SIDE, False)]:
        grammar = Grammar(text)
        rules = _GrammarParser(text, lark).parse()
        root = rules["start" if lark else "root"]
        texts = [derive(rules, root, rng) for _ in range(20)]
        for state in reachable_states(rng, grammar, [t for t in texts if len(t) < 200], 30):
            assert (index.allowed(grammar, state) == brute_allowed(index, grammar, state)).all(), (text, state)
            checked += 1
            products += isinstance((grammar.dfa(state) or [None])[0], _Product)
    assert checked >= 100 and products >= 10, (checked, products)


def test_allowed_sets_over_qwens_vocabulary(qwen_tokenizer_dir):
    """The same over Qwen's vocabulary, at every state an SQL query's and a JSON document's tokens pass through
    (the first few checked against every token), each token allowed where it came, and only eos at the end."""
    from qwen2rt.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(qwen_tokenizer_dir)
    index = TokenIndex(tokenizer.token_bytes(), 151936)
    sql = "SELECT name, born FROM people WHERE (born > 1800 AND name != 'Ada') OR city = 'London';"
    document = json.dumps({"name": "Zo\u00eb", "n": [1, -2.5e-3, True, None], "o": {"k": "v\\n"}}, indent=2)
    for text, grammar, most in [(sql, Grammar(SQL_LARK), 10), (document, Grammar(JSON_GBNF), 8)]:
        matcher, checked = Matcher(grammar, index, {151645}), 0
        for token in tokenizer.encode(text):
            mask = matcher.mask()
            assert mask[token] and not mask[151645]
            if checked < most:
                checked += 1
                assert (mask == brute_allowed(index, grammar, matcher.state)).all(), matcher.state
            matcher.advance(token)
        assert matcher.complete
        end = np.flatnonzero(matcher.mask()).tolist()
        # the SQL query is over at its ';'; the JSON object may still take the whitespace its `ws` allows
        assert end == [151645] if grammar.key[1] == SQL_LARK else end == [198, 220, 151645]
        assert tokenizer.decode([198, 220]) == "\n "


def test_parses_are_bounded():
    """A grammar whose parses double with every byte: past MAX_PARSES its step refuses, saying why, and a token
    that would lead there is not allowed (the walk counts the step as refused), while the others are."""
    grammar = Grammar('root ::= x\nx ::= "a" x y | "a" x z | ""\ny ::= "b"\nz ::= "b" | "c"')
    state = grammar.start
    sizes = []
    with pytest.raises(RuntimeError, match=f"more than {MAX_PARSES} parses"):
        for _ in range(12):
            state = grammar.step(state, ord("a"))
            sizes.append(len(state))
    # after k a's: each of the k open x's has y or z after it, and the next byte may open another x or close
    assert sizes == [3 * 2 ** k for k in range(1, 9)]
    index = TokenIndex([bytes((i,)) for i in range(256)] + [b"a" * 8, b"a" * 9, b"ab"], 259)
    allowed = index.allowed(grammar, grammar.start)
    assert allowed[[ord("a"), 256, 258]].all() and not allowed[257] and allowed.sum() == 3


def test_a_state_whose_every_way_on_is_too_ambiguous_fails_saying_so():
    """A review's grammar: after "aaaa" the only byte that goes on leads past MAX_PARSES, so nothing is allowed, and
    the mask says why (not "no token can continue", which would be a bug)."""
    grammar = Grammar('root ::= r0\nr0 ::= [a] r0 r0 ("a" | r0) (r0 | [a]) ("aa"){2,2} r0 r0 "a" |')
    index = TokenIndex([bytes((i,)) for i in range(256)] + [None], 257)
    matcher = Matcher(grammar, index, {256})
    for _ in range(4):
        assert matcher.mask()[ord("a")]
        matcher.advance(ord("a"))
    with pytest.raises(RuntimeError, match="too ambiguous"):
        matcher.mask()


def test_deep_nesting_wide_alternatives_and_large_terminals():
    """3,000 open levels (each may end at once: no recursion per level), 900 keywords each followed by the same rule
    (one parse, not 900), and rules that use others twice, nested 25 deep (2^25 parts written out): an error at
    once, not an expansion."""
    grammar = Grammar('root ::= x\nx ::= "a" x "c" | "b"')
    assert completes(grammar, "a" * 3000 + "b" + "c" * 3000) and not completes(grammar, "a" * 3000 + "b")
    grammar = Grammar('root ::= x\nx ::= "a" x " "? | "b"')  # (every open level may end at the "b": 1,000 parses)
    assert completes(grammar, "a" * 999 + "b") and completes(grammar, "aab  ") and not completes(grammar, "aab   ")
    words = " | ".join(f'"kw{k}" x' for k in range(900))
    grammar = Grammar(f'root ::= x\nx ::= {words} | "."')
    assert completes(grammar, "kw1kw899kw5.") and not completes(grammar, "kw900.")
    assert len(run(grammar, b"kw1")) <= 3
    text = "root ::= r0\n" + "\n".join(f"r{k} ::= r{k + 1} r{k + 1}" for k in range(25)) + '\nr25 ::= "a" | "b"'
    with pytest.raises(ValueError, match="too large once its rules are written out"):
        Grammar(text)


@pytest.mark.parametrize("text, words", [
    ("root ::= a\na ::= a \"x\" | \"y\"", "left-recursive"),
    ("root ::= b\nb ::= c \"x\"\nc ::= \"\" | b", "left-recursive"),
    ('root ::= "x" root', "never ends"),
    ("root ::= foo", "'foo', which is not defined"),
    ('start ::= "x"', "no 'root' rule"),
    ('a: "x"', "no 'start' rule"),
    ('root ::= "abc', "unterminated string"),
    ("root ::= [z-a]", "out of order"),
    ("root ::= [^\\x00-\\U0010FFFF]", "matches no character"),
    ('root ::= "\\q"', "escape \\q"),
    ('root ::= "a"{,3}', "{0,n}"),
    ('root ::= "a"{3,1}', "out of order"),
    ('root ::= "a"\nroot ::= "b"', "defined twice"),
    ("start: /a(?=b)/", "lookaround"),
    ("start: /ab/i", "flags 'i'"),
    ("start: X\n%import common.NOPE", "not one of Lark's common terminals"),
    ("start: X\n%declare X", "only %import common"),
    ("start: NAME\nNAME: \"a\"\n%import common.INT -> NAME", "'NAME' is defined twice"),
    ("", "non-empty"),
    ('root ::= "a" ) "b"', "expected a rule"),
])
def test_errors_name_what_is_wrong(text, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        StructuredOutputs(grammar=text)


def test_structured_outputs_grammar():
    so = StructuredOutputs(grammar=SQL_GBNF)
    assert completes(so.automaton(), "SELECT col_1  from table_2  where col_2 = 1 ")
    assert so == StructuredOutputs(grammar=SQL_GBNF) and so.automaton() is StructuredOutputs(
        grammar=SQL_GBNF).automaton()  # compiled once for all requests
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputs(grammar=SQL_GBNF, regex="a")

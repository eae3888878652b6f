"""The regex engine of structured outputs (runtime/regex.py) against Python's re: UTF-8 byte ranges against Python's
encoder, whole matches of fixed and random patterns over random strings and over strings drawn from the automaton
itself, no state that cannot reach a match, the numbered DFA against the frozenset one, lengths, and errors that name
what is not implemented."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from qwen2rt.regex import MAX_CODE, Regex, RegexGrammar, utf8_sequences
from qwen2rt.structured import run

pytestmark = pytest.mark.timeout(300)

# no carriage return: `.` leaves it out (as ECMAScript's does), Python's takes it
ALPHABET = "abcxyz AZ09_-.@\n\t\u00e9\u00ff\u4e2d\U0001f600\"\\"
FIXED = [r"[a-z]+@[a-z]+\.(com|org)", r"\d{3}-\d{4}", r"(ab|a)*b?", r"[^a-c]{2,4}x", r"\u00e9+[^\u00e9]?",
         r".{0,3}z", r"(?:a|b|)*c{0,2}", r"\w+\s\W", r"^(a|bc)$", r"^a|b$", r"[\d\-]+", r"\u00e9|\x41|\n",
         r"(a{2}){1,2}", r"[^\n]*", r"\U0001F600?[\u4e2d-\u4e2f]", r"(?P<word>[A-Z][a-z]*)",
         r"[\]a]+", r"[^\]a]", r"a{2,}?b", r"(?<name>x)|y{0}", r"\.\*\+\?\(\)\[\]\{\}\|\\\^\$", r"[\S\d]",
         r"\D\W", r"[+*?]", "a{\u0663}", "a{1,\u0663}b"]  # (a non-ASCII digit is no count: literal, as in re)


def random_pattern(rng: random.Random, depth: int = 0) -> str:
    r = rng.random()
    if depth > 2 or r < 0.35:
        return rng.choice(["a", "b", "x", ".", r"\d", r"\w", r"\s", "[a-c]", "[^ab]", "\u00e9", "[\u00e9-\u00ff]",
                           r"\.", "[^\u4e2d]", r"\W", "-"])
    if r < 0.6:
        return "".join(random_pattern(rng, depth + 1) for _ in range(rng.randint(2, 3)))
    if r < 0.75:
        return "(" + "|".join(random_pattern(rng, depth + 1) for _ in range(rng.randint(2, 3))) + ")"
    lo = rng.randint(0, 2)
    q = rng.choice(["*", "+", "?", f"{{{lo}}}", f"{{{lo},}}", f"{{{lo},{lo + rng.randint(0, 2)}}}"])
    return "(?:" + random_pattern(rng, depth + 1) + ")" + q + rng.choice(["", "?"])


def draw(regex: Regex, rng: random.Random, most: int = 40) -> bytes | None:
    """Bytes drawn from the automaton: each step a random byte it takes; stops at a match at random (None if no
    match was reached within `most` bytes)."""
    state, out = regex.start, b""
    for _ in range(most):
        if regex.accepting(state) and rng.random() < 0.3:
            return out
        live = [b for b in range(256) if regex.step(state, b) is not None]
        assert live or regex.accepting(state), (regex.pattern, out)  # every state can still reach a match
        if not live:
            return out
        b = rng.choice(live)
        state, out = regex.step(state, b), out + bytes((b,))
    return out if regex.accepting(state) else None


def matches(regex: Regex, data: bytes) -> bool:
    state = run(regex, data)
    return state is not None and regex.accepting(state)


def python_match(pattern: str, text: str) -> bool:
    return re.fullmatch(pattern.replace("(?<", "(?P<"), text, re.ASCII) is not None  # (3.11 has only (?P<)


def test_utf8_sequences_against_the_encoder():
    rng = random.Random(0)
    edges = [0, 0x7F, 0x80, 0x7FF, 0x800, 0xD7FF, 0xE000, 0xFFFF, 0x10000, MAX_CODE]
    for _ in range(400):
        lo = rng.choice(edges + [rng.randrange(MAX_CODE)])
        hi = min(MAX_CODE, lo + rng.choice([0, 1, 63, 64, 65, 4096, rng.randrange(MAX_CODE)]))
        if lo <= 0xDFFF and hi >= 0xD800:
            continue
        seqs = utf8_sequences(lo, hi)
        probes = [lo, hi, lo - 1, hi + 1] + [rng.randrange(MAX_CODE + 1) for _ in range(60)]
        for c in probes:
            if not 0 <= c <= MAX_CODE or 0xD800 <= c <= 0xDFFF:
                continue
            e = chr(c).encode("utf-8")
            hit = any(len(s) == len(e) and all(a <= x <= b for x, (a, b) in zip(e, s)) for s in seqs)
            assert hit == (lo <= c <= hi), (hex(lo), hex(hi), hex(c))


@pytest.mark.parametrize("pattern", FIXED)
def test_fixed_patterns_match_as_python_does(pattern):
    """Random strings (an alphabet of ASCII, 2-, 3- and 4-byte characters, quotes and backslashes) and strings
    drawn from the automaton: a whole match exactly where Python's re.fullmatch finds one."""
    regex, rng = Regex(pattern), random.Random(FIXED.index(pattern))
    matched = 0
    for _ in range(1500):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(7)))
        got = matches(regex, text.encode())
        assert got == python_match(pattern, text), (pattern, text)
        matched += got
    for _ in range(200):
        data = draw(regex, rng)
        if data is not None:
            assert python_match(pattern, data.decode("utf-8")), (pattern, data)
            matched += 1
    assert matched > 30  # (the checks above ran on matches too)


def test_random_patterns_match_as_python_does():
    rng = random.Random(5)
    for _ in range(150):
        pattern = random_pattern(rng)
        regex = Regex(pattern)
        for _ in range(150):
            text = "".join(rng.choice("abx.\u00e9\u4e2d 1_-") for _ in range(rng.randrange(6)))
            assert matches(regex, text.encode()) == python_match(pattern, text), (pattern, text)
        for _ in range(20):
            data = draw(regex, rng)
            if data is not None:
                assert python_match(pattern, data.decode("utf-8")), (pattern, data)


def test_dot_and_utf8():
    dot = Regex(".")
    assert [matches(dot, c.encode()) for c in "a\n\r\u00e9\U0001f600"] == [True, False, False, True, True]
    assert not matches(dot, b"\xc3") and not matches(dot, b"\xed\xa0\x80")  # cut short; a surrogate
    assert not matches(Regex("[^a]"), b"\xff") and matches(Regex("[^a]"), "\u4e2d".encode())


def test_numbered_states_follow_the_automaton():
    """next_ids (numbers, many pairs at once) against step (frozensets), over states found by drawing."""
    rng = random.Random(3)
    for pattern in (r"[a-z]{2,5}\d", r"(\u00e9|[^x])*y", r"a|b+c"):
        regex = Regex(pattern)
        states = [regex.start]
        for _ in range(40):
            s = states[rng.randrange(len(states))]
            b = rng.randrange(256)
            nxt = regex.step(s, b)
            ids = regex.next_ids(np.array([regex.state_id(s)], dtype=np.int32), np.array([b]))
            assert (ids[0] == -1) == (nxt is None)
            if nxt is not None:
                assert regex.state_of(int(ids[0])) == nxt
                states.append(nxt)
        loops = regex.loops(regex.start)
        assert all((regex.step(regex.start, b) == regex.start) == bool(loops[b]) for b in range(256))


@pytest.mark.parametrize("pattern, lengths", [
    ("abc", (3, 3)), ("a?b{2,4}", (2, 5)), ("(ab|c)*", (0, None)), ("x{0}", (0, 0)), ("(|a)+", (0, None)),
    ("[\u4e2d]{3}", (3, 3)), ("a{2}(b|cd){1,3}", (3, 8)), ("(?:)*", (0, 0)),
])
def test_lengths_in_characters(pattern, lengths):
    regex = Regex(pattern)
    assert (regex.min_chars, regex.max_chars) == lengths


@pytest.mark.parametrize("pattern, words", [
    ("(a)\\1", "backreferences are not implemented"), ("(?=a)a", "group syntax '(?=a'"),
    ("(?i)a", "group syntax"), ("a\\b", "the escape \\b is not implemented"), ("a{2}+", "possessive"),
    ("a**", "multiple repeat"), ("*a", "nothing to repeat"), ("[b-a]", "range out of order"), ("(a", "missing ')'"),
    ("a)", "unbalanced ')'"), ("a^b", "an anchor '^'"), ("(^a)", "an anchor '^'"), ("a$b", "an anchor '$'"),
    ("[^\\x00-\\U0010FFFF]", "matches no character"), ("a{1001}", "larger than 1000"), ("a{3,2}", "min > max"),
    ("(a{1000}){1000}", "too large"), ("a\\", "trailing backslash"), ("\\q", "the escape \\q"),
    ("\\x4", "needs 2 hex digits"), ("\\ud800", "is not a character"), ("[a", "missing ']'"),
    ("\\01", "octal escapes"), ("(?P<1>a)", "a bad group name"), ("a{,3}", "write {0,m}"), ("a{,}", "write {0,m}"),
    ("[]a]", "a ']' first in a class"), ("[^]a]", "a ']' first in a class"), ("[\\d-z]", "a range's start is a class"),
    ("[a-\\d]", "a range's end is a class"),
])
def test_errors_name_what_is_not_implemented(pattern, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        Regex(pattern)


def test_regex_grammar_interface():
    g = RegexGrammar(r"[a-z]*!")
    assert g.key == ("regex", r"[a-z]*!") and not g.accepting(g.start)
    loops = g.regex.loops(g.start)
    assert [b for b in range(256) if loops[b]] == list(range(0x61, 0x7B))
    end = g.step(g.start, ord("!"))
    assert g.accepting(end) and not any(g.regex.loops(end)) and g.step(end, ord("a")) is None

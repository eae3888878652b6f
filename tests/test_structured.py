"""Structured outputs (runtime/structured.py): the JSON-object grammar against json.loads, JSON schemas (patterns,
formats, lengths and bounds too) against a reference validator written apart, no state a dead end, the choice
grammar, the allowed-token sets of the prefix walk and the DFA walk against a token-by-token check (a random
vocabulary and Qwen's), and the engine: every step's token is the best one its mask allows (the logits recorded),
outputs complete and end with a stop token, alone or batched with free requests (which are unchanged), through
preemption, with Qwen's real vocabulary and tokenizer end to end, and clear errors. The regex engine itself:
test_regex.py."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import operator
import random
import re
import urllib.parse
import uuid
from fractions import Fraction

import numpy as np
import pytest

from qwen2rt import LLM, SamplingParams, StructuredOutputs, model_runner
from qwen2rt.json_schema import JSON_OBJECT, JsonSchemaGrammar
from qwen2rt.structured import ChoiceGrammar, Matcher, TokenIndex, check_json_object, run
from qwen2rt.tokenizer import HFTokenizer

pytestmark = pytest.mark.timeout(300)

JSON = StructuredOutputs(json_object=True)
# random weights seldom close a string or an object: these biases make the outputs complete within a few dozen tokens
CLOSE = {ord('"'): 6.0, ord("}"): 6.0, ord("]"): 4.0}
QUIET = {ord(c): -20.0 for c in " \t\r\n"}  # and this keeps them from filling every whitespace run they may
NOISE = list('{}[]:,"\\ \n0123456789-+.eEtrufalsn') + ["x", "u", "A", "\x01", "\u00e9"]


def random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice([rng.randint(-1000, 1000), rng.random() * 10 ** rng.randint(-5, 5), True, False, None,
                           "s\"\\\n\u00e9x\t", ""])
    if r < 0.65:
        return {f"k{rng.randint(0, 9)}": random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]


def random_document(rng: random.Random) -> str:
    return json.dumps({"a": random_value(rng)}, indent=rng.choice([None, 1, 2]), ensure_ascii=rng.random() < 0.5,
                      separators=rng.choice([None, (",", ":")]))


def mutate(text: str, rng: random.Random, most: int) -> str:
    """1 to `most` random edits: a noise character inserted, a character deleted or one replaced."""
    chars = list(text)
    for _ in range(rng.randint(1, most)):
        op, pos = rng.random(), rng.randrange(len(chars))
        if op < 0.4:
            chars.insert(pos, rng.choice(NOISE))
        elif op < 0.7 and len(chars) > 1:
            del chars[pos]
        else:
            chars[pos] = rng.choice(NOISE)
    return "".join(chars)


def completes(text: str, grammar=JSON_OBJECT) -> bool:
    state = run(grammar, text.encode())
    return state is not None and grammar.accepting(state)


def all_prefixes_alive_and_complete(grammar, text: str) -> bool:
    state = grammar.start
    for b in text.encode():
        state = grammar.step(state, b)
        if state is None:
            return False
    return grammar.accepting(state)


def state_kinds(grammar, state) -> set:
    """What a state is in the middle of (the innermost frame's kind and phase of each configuration)."""
    if isinstance(grammar, ChoiceGrammar):
        return {"choice"}
    if not isinstance(grammar, JsonSchemaGrammar):
        return {"regex"}
    return {c[-1][0] + str(c[-1][2] if c[-1][0] in ("obj", "arr", "num") else c[-1][1])[:8] if c else "done"
            for c in state}


def test_json_grammar_agrees_with_json_loads():
    """Every prefix of a JSON object is alive and the whole completes; documents mutated at random (bytes inserted,
    deleted, replaced) complete exactly when json.loads reads an object from them with nothing around it."""
    rng = random.Random(0)
    accepted = 0
    for _ in range(3000):
        text = random_document(rng)
        assert all_prefixes_alive_and_complete(JSON_OBJECT, text), text
        mutated = mutate(text, rng, 3)
        assert completes(mutated) == check_json_object(mutated), mutated
        accepted += completes(mutated)
    assert 200 < accepted < 2800  # both kinds were tried


@pytest.mark.parametrize("text, ok", [
    ('{}', True), ('{"a":[1,-0.5e+3,0,-0,1E9,true,false,null,{"b":"\\u00e9\\n\\/"}]}', True),
    ('{ "a" : [ ] , "b" : { } }', True), ('{"a":01}', False), ('{"a":-01}', False), ('{"a":1,}', False),
    ("{'a':1}", False), ('[1]', False), (' {}', False), ('{} ', False), ('{"a":"\x01"}', False),
    ('{"a":"\\x"}', False), ('{"a":tru}', False), ('{"a":NaN}', False), ('{"a" 1}', False), ('{"a":1}}', False),
    ('{"a":-}', False), ('{"a":1.}', False), ('{"a":1e}', False), ('{"a":"\\u12G4"}', False), ('{a:1}', False),
    ('{"a":[1 2]}', False), ('{"a":[1,]}', False), ('{"a":{]}', False), ('{"a":.5}', False), ('{"a":+1}', False),
])
def test_json_grammar_cases(text, ok):
    assert completes(text) == ok == check_json_object(text)


# ---- JSON schemas ---------------------------------------------------------------------------------------------------
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "description": "annotations are fine"}, "age": {"type": "integer"},
    "email": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "\u00e9t\u00e9", 7]}, "maxItems": 3},
    "score": {"type": "number"}, "active": {"type": "boolean"}, "address": {"$ref": "#/$defs/address"},
    "caf\u00e9": {"const": "\u00e9"}},
    "required": ["name", "age", "address"], "additionalProperties": False,
    "$defs": {"address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
                          "required": ["street", "zip"]}}}
TREE = {"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {
    "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
    "required": ["value"]}}}
LIST = {"type": "array", "items": {"type": ["string", "integer", "null"]}, "minItems": 1, "maxItems": 4}
MIXED = {"discriminator": {"propertyName": "kind"}, "oneOf": [{"const": "yes"}, {"enum": [1, 10, 100, True]},
                   {"type": "object", "additionalProperties": {"type": "number"}},
                   {"enum": [{"a": [1, "\u00e9"], "b": None}, [1, {"c": False}], "x\u00e9\"", []]}]}
# strings with patterns, formats and lengths, numbers with bounds (each pattern and format has examples, which
# generate() draws from: they are written apart from the grammar's regexes)
CONSTRAINED = {"type": "object", "required": ["code", "n"], "properties": {
    "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$", "examples": ["AB-123", "ZZ-000"]},
    "day": {"type": "string", "format": "date", "examples": ["2024-02-28", "1999-12-31", "2023-04-30"]},
    "at": {"type": "string", "format": "date-time",
           "examples": ["2024-12-07T22:36:05Z", "2000-01-01T00:00:00.5+05:30", "1970-06-30T23:59:59-11:59"]},
    "clock": {"type": "string", "format": "time", "examples": ["08:15:00Z", "23:59:59.999-00:00"]},
    "id": {"type": "string", "format": "uuid", "examples": ["123e4567-e89b-12d3-a456-426614174000"]},
    "ip": {"type": "string", "format": "ipv4", "examples": ["192.168.0.1", "8.8.8.8", "255.0.10.199"]},
    "mail": {"type": "string", "format": "email", "examples": ["a.b+c@example.org", "x@y-z.io"]},
    "host": {"type": "string", "format": "hostname", "examples": ["example.com", "a-b", "x1.y2.z3"]},
    "site": {"type": "string", "format": "uri", "examples": ["https://example.com", "http://a-b.io:8080/x/y%20z?q=1&r=/#top",
                                                            "https://x.y/~u/(a),b;c=d@e!"]},
    "name": {"type": "string", "minLength": 2, "maxLength": 5}, "nick": {"type": "string", "minLength": 3},
    "word": {"type": "string", "pattern": "[a-z\u00e9]{1,5}( [a-z\u00e9\u4e2d]{1,5})?", "maxLength": 11,
             "examples": ["\u00e9t\u00e9", "ab cd", "z \u4e2d\u4e2d"]},
    "n": {"type": "integer", "minimum": -3, "exclusiveMaximum": 120},
    "x": {"type": "number", "exclusiveMinimum": -1.5, "maximum": 2.25},
    "emoji": {"type": "string", "pattern": "^[\\U0001F600-\\U0001F64F]{1,3}$",
              "examples": ["\U0001F600", "\U0001F64F\U0001F601"]},  # (escaped as surrogate pairs by ensure_ascii)
    "big": {"minimum": 1000, "maximum": 1010, "type": "integer"}}}
# strings of several counted parses at once (anyOf of lengths)
UNIONS = {"type": "object", "properties": {
    "u": {"anyOf": [{"type": "string", "minLength": 20}, {"type": "string", "maxLength": 3}]},
    "v": {"anyOf": [{"type": "string", "minLength": 2}, {"type": "string", "minLength": 3}]},
    "w": {"type": "array",
          "items": {"anyOf": [{"type": "string", "minLength": 8}, {"type": "string", "maxLength": 2}]}}}}
# arrays whose first items have schemas of their own (pydantic's tuple[int, str], draft 4's items as a list)
TUPLES = {"type": "object", "required": ["pair"], "properties": {
    "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string", "maxLength": 3}],
             "minItems": 2, "maxItems": 2},
    "head": {"type": "array", "prefixItems": [{"const": "x"}], "items": {"type": "boolean"}, "maxItems": 3},
    "old": {"type": "array", "items": [{"type": "null"}, {"enum": [1, 2]}], "additionalItems": False},
    "free": {"prefixItems": [{"type": "number"}], "minItems": 1}}}
SCHEMAS = {"person": PERSON, "tree": TREE, "list": LIST, "mixed": MIXED, "any": {}, "constrained": CONSTRAINED,
           "tuples": TUPLES}


def deref(schema, root):
    """The schema a $ref points at (followed until it is no ref)."""
    while isinstance(schema, dict) and "$ref" in schema:
        target = root
        for part in (p for p in schema["$ref"][1:].split("/") if p):
            target = target[part]
        schema = target
    return schema


def schema_type(schema: dict):
    if "type" in schema:
        return schema["type"]
    if {"properties", "required", "additionalProperties"} & set(schema):
        return "object"
    if {"items", "prefixItems", "additionalItems", "minItems", "maxItems"} & set(schema):
        return "array"
    return None


def positions(schema) -> tuple[list, object]:
    """An array schema's first items' schemas, and the rest's (False: none)."""
    if isinstance(schema.get("items"), list):
        return schema["items"], schema.get("additionalItems", True)
    return schema.get("prefixItems", []), schema.get("items", True)


def generate(schema, root, rng: random.Random, depth: int = 0):
    """A random instance of the schema (the semantics json_schema.py documents), independent of its compiler."""
    schema = deref(schema, root)
    if schema is True or not schema or set(schema) <= {"description", "title", "$defs"}:
        return random_value(rng, depth + 2)
    if "enum" in schema or "const" in schema:
        return rng.choice(schema["enum"]) if "enum" in schema else schema["const"]
    for word in ("anyOf", "oneOf", "allOf"):
        if word in schema:
            return generate(rng.choice(schema[word]), root, rng, depth)
    kind = schema_type(schema)
    kind = rng.choice(kind) if isinstance(kind, list) else kind
    if kind is None:
        return random_value(rng, depth + 2)
    if kind == "object":
        props = schema.get("properties", {})
        if props:
            keys = [k for k in props if k in schema.get("required", []) or (depth < 3 and rng.random() < 0.6)]
            rng.shuffle(keys)
            return {k: generate(props[k], root, rng, depth + 1) for k in keys}
        extra = schema.get("additionalProperties", True)
        return {} if extra is False else {f"k{i}": generate(extra, root, rng, depth + 1)
                                          for i in range(rng.randint(0, 3 if depth < 3 else 0))}
    if kind == "array":
        lo, (firsts, rest) = schema.get("minItems", 0), positions(schema)
        most = min(schema.get("maxItems", lo + 3), lo + 3, len(firsts) if rest is False else 10 ** 9)
        n = rng.randint(lo, most) if depth < 3 else lo
        return [generate(firsts[k] if k < len(firsts) else rest, root, rng, depth + 1) for k in range(n)]
    if "examples" in schema:
        return rng.choice(schema["examples"])
    if kind == "string" and ("minLength" in schema or "maxLength" in schema):
        size = rng.randint(schema.get("minLength", 0), schema.get("maxLength", 8))
        return "".join(rng.choice("ab\"\\\n\u00e9\u4e2d\U0001f600") for _ in range(size))
    if kind == "integer" and "minimum" in schema:
        return rng.randint(schema["minimum"], schema.get("exclusiveMaximum", schema.get("maximum", 10 ** 6) + 1) - 1)
    if kind == "number" and "maximum" in schema:
        return round(rng.uniform(schema.get("exclusiveMinimum", -99) + 0.001, schema["maximum"]), 3)
    return {"string": lambda: rng.choice(["", "x", "q\"uote\\", "\u00e9\n\t", "long " * 5]),
            "integer": lambda: rng.randint(-10 ** 6, 10 ** 6),
            "number": lambda: rng.choice([rng.randint(-99, 99), rng.random() * 10 ** rng.randint(-6, 6)]),
            "boolean": lambda: rng.random() < 0.5, "null": lambda: None}[kind]()


class Pairs(dict):
    """A parsed object that remembers its (key, value) pairs in order, repeated keys included (parsed)."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.pairs = pairs


def valid(value, schema, root) -> bool:
    """The reference: whether a parsed value is an instance of the schema, with json_schema.py's documented
    semantics (an object with properties takes only those, each once; an object of any keys may repeat one; enum
    values compared as their JSON encodings; oneOf as anyOf), written apart from the grammar."""
    schema = deref(schema, root)
    if schema is True or not schema or set(schema) <= {"description", "title", "$defs"}:
        return True
    if "enum" in schema or "const" in schema:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        return any(json_equal(value, v) for v in values)
    for word in ("anyOf", "oneOf", "allOf"):
        if word in schema:
            return any(valid(value, alt, root) for alt in schema[word])
    kind = schema_type(schema)
    if isinstance(kind, list):
        return any(valid(value, dict(schema, type=k), root) for k in kind)
    if kind == "object":
        if not isinstance(value, dict):
            return False
        pairs = value.pairs if isinstance(value, Pairs) else list(value.items())
        props = schema.get("properties", {})
        if props:
            return (set(value) <= set(props) and set(schema.get("required", [])) <= set(value)
                    and len(pairs) == len(value) and all(valid(v, props[k], root) for k, v in pairs))
        extra = schema.get("additionalProperties", True)
        return not value if extra is False else all(valid(v, extra, root) for _, v in pairs)
    if kind == "array":
        firsts, rest = positions(schema)
        return (isinstance(value, list) and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 10 ** 9)
                and (rest is not False or len(value) <= len(firsts))
                and all(valid(v, firsts[k] if k < len(firsts) else rest, root) for k, v in enumerate(value)))
    if kind in ("integer", "number") and isinstance(value, (int, float)) and not isinstance(value, bool):
        ends = [("minimum", operator.ge), ("exclusiveMinimum", operator.gt), ("maximum", operator.le),
                ("exclusiveMaximum", operator.lt)]
        if not all(test(value, schema[word]) for word, test in ends if word in schema):
            return False
    if kind == "string" and isinstance(value, str):
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 10 ** 9):
            return False
        if "pattern" in schema and not re.fullmatch(schema["pattern"], value):
            return False
        if "format" in schema and not FORMAT_CHECKS[schema["format"]](value):
            return False
    return {"string": lambda: isinstance(value, str), "null": lambda: value is None,
            "integer": lambda: isinstance(value, int) and not isinstance(value, bool),
            "number": lambda: isinstance(value, (int, float)) and not isinstance(value, bool),
            "boolean": lambda: isinstance(value, bool), None: lambda: True}[kind]()


def _parses(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except ValueError:
        return False


def _time_ok(text: str) -> bool:
    """RFC 3339's full-time: hh:mm:ss[.frac] then Z or +hh:mm / -hh:mm, each field in range."""
    m = re.fullmatch(r"(\d\d:\d\d:\d\d(?:\.\d+)?)(Z|[+-](\d\d):(\d\d))", text)
    return bool(m) and _parses(datetime.time.fromisoformat, m.group(1)) and (
        m.group(2) == "Z" or (int(m.group(3)) < 24 and int(m.group(4)) < 60))


def _hostname_ok(text: str) -> bool:
    return all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?", label) and len(label) <= 63
               for label in text.split("."))


# the reference's format checks (Python's parsers and RFC 3339 / 1123 by hand, not the grammar's regexes)
FORMAT_CHECKS = {
    "date": lambda v: bool(re.fullmatch(r"\d{4}-\d\d-\d\d", v)) and _parses(datetime.date.fromisoformat, v),
    "time": _time_ok,
    "date-time": lambda v: v.count("T") == 1 and FORMAT_CHECKS["date"](v.split("T")[0]) and _time_ok(v.split("T")[1]),
    "uuid": lambda v: _parses(uuid.UUID, v) and str(uuid.UUID(v)) == v.lower(),
    "ipv4": lambda v: _parses(ipaddress.IPv4Address, v),
    "email": lambda v: v.count("@") == 1 and "" not in v.split("@")[0].split(".") and _hostname_ok(v.split("@")[1])
    and "." in v.split("@")[1] and not re.search(r"[\s\"(),:;<>@\[\\\]]", v.split("@")[0]),
    "hostname": _hostname_ok,
    "uri": lambda v: _uri_ok(v),
}


def _uri_ok(text: str) -> bool:
    """An http(s) URL of RFC 3986's characters (reserved, unreserved, well-formed %-escapes), with a host."""
    parts = urllib.parse.urlsplit(text)
    host = parts.netloc.rsplit(":", 1)
    return (parts.scheme in ("http", "https") and _hostname_ok(host[0]) and host[0] != ""
            and (len(host) == 1 or host[1].isdigit())
            and re.fullmatch(r"([A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*", text) is not None)


def json_equal(a, b) -> bool:
    """JSON's equality of two parsed values, as the reference sees it: objects by their keys and values (any order,
    each key once), arrays item by item, true and false apart from numbers, strings, numbers and null by value."""
    if isinstance(a, dict) or isinstance(b, dict):
        pairs = a.pairs if isinstance(a, Pairs) else list(a.items()) if isinstance(a, dict) else None
        return (isinstance(a, dict) and isinstance(b, dict) and len(pairs) == len(a) == len(b)
                and all(k in b and json_equal(v, b[k]) for k, v in pairs))
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(json_equal, a, b))
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return type(a) is type(b) and a == b
    return type(a) is type(b) and a == b  # (the grammar writes 1 for 1, not 1.0: the same type)


def parsed(text: str):
    """json.loads of text (objects as Pairs), with NaN / Infinity and whitespace around the value refused."""
    if text != text.strip(" \t\n\r"):
        raise ValueError("whitespace around the value")
    return json.loads(text, object_pairs_hook=Pairs, parse_constant=_reject_constant)


def _reject_constant(name):
    raise ValueError(name)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_grammar_against_the_reference(name):
    """Random instances of each schema (every keyword the compiler takes, recursion, unions, top-level arrays and
    scalars), written with random indentation and separators: every prefix is alive and the whole completes.
    Mutated at random, a document the grammar completes is an instance by the reference validator."""
    schema = SCHEMAS[name]
    grammar, rng = JsonSchemaGrammar(schema), random.Random(sorted(SCHEMAS).index(name))
    accepted = 0
    for _ in range(400):
        value = generate(schema, schema, rng)
        assert valid(value, schema, schema), value
        text = json.dumps(value, ensure_ascii=rng.random() < 0.3,
                          indent=rng.choice([None, 1, 2]), separators=rng.choice([None, (",", ":"), (", ", ": ")]))
        assert all_prefixes_alive_and_complete(grammar, text), text
        mutated = mutate(text, rng, 2)
        if completes(mutated, grammar):
            accepted += 1
            assert valid(parsed(mutated), schema, schema), mutated
    assert accepted > 10  # the check above ran


@pytest.mark.parametrize("schema, text", [
    (PERSON, '{"name":"x","age":1,"address":{"street":"s"}}'),  # a required key missing inside
    (PERSON, '{"name":"x","age":1,"address":{"street":"s","zip":"z"},"other":1}'),  # a key not in properties
    (PERSON, '{"name":"x","age":1.0,"address":{"street":"s","zip":"z"}}'),  # not an integer
    (PERSON, '{"name":"x","name":"y","age":1,"address":{"street":"s","zip":"z"}}'),  # a key twice
    (PERSON, '{"name":"x","age":1,"address":{"street":"s","zip":"z"},"tags":["a","a","a","a"]}'),  # maxItems
    (PERSON, '{"name":"x","age":1,"address":{"street":"s","zip":"z"},"tags":["c"]}'),  # not in the enum
    (PERSON, '{"name":"x","age":1,"address":{"street":"s","zip":"z"},"email":3}'),  # no alternative
    (PERSON, '{"na\\u006de":"x","age":1,"address":{"street":"s","zip":"z"}}'),  # a key not as json.dumps writes it
    (PERSON, '{"name":"x","age":1,"address":{"street":"s","zip":"z"},"caf\u00e9":"\u00e9","caf\\u00e9":"\u00e9"}'),
    (TREE, '{"value":1,"children":[{"value":2},{"value":3},{"value":4}]}'), (TREE, '{"children":[]}'),
    (LIST, '[]'), (LIST, '[1,2,3,4,5]'), (LIST, '[true]'), (MIXED, '"no"'), (MIXED, '{"a":"b"}'), (MIXED, '1000'),
    ({}, ' 1'), ({}, '1 '), ({"type": "array", "maxItems": 0}, "[1]"),
    (MIXED, '{"a":[1,"\u00e9"]}'), (MIXED, '{"a":[1,"\u00e9"],"b":null,"b":null}'), (MIXED, '[1]'),
    (MIXED, '[1,{"c":false},2]'), (MIXED, '{"a":[1,"e"],"b":null}'), (MIXED, '"x\u00e9"'), (MIXED, '[{}]'),
    (TUPLES, '{"pair":[1,"ab",2]}'), (TUPLES, '{"pair":["ab",1]}'), (TUPLES, '{"pair":[1,"abcd"]}'),
    (TUPLES, '{"pair":[1,"a"],"old":[null,1,2]}'), (TUPLES, '{"pair":[1,"a"],"head":["y"]}'),
    (TUPLES, '{"pair":[1,"a"],"free":[]}'), (TUPLES, '{"pair":[1,"a"],"head":["x",true,false,true]}'),
    # what can never end is pruned: an optional key that nests itself forever, items that do
    ({"properties": {"a": {"$ref": "#/properties/a"}, "b": {"type": "integer"}}}, '{"a":{'),
    ({"type": "array", "items": {"type": "array", "items": {"$ref": "#/items"}, "minItems": 1}}, "[["),
    ({"prefixItems": [{"type": "integer"}, {"$ref": "#/prefixItems/1"}]}, "[1,"),
])
def test_schema_grammar_refuses(schema, text):
    grammar = JsonSchemaGrammar(schema)
    state = run(grammar, text.encode())
    assert state is None or not grammar.accepting(state)
    if text in ('{"a":{', "[[", "[1,"):  # pruned at once (alive, the grammar would have been stuck there)
        assert state is None and completes('{"b":1}' if text[0] == "{" else "[]", grammar)


def test_whitespace_runs_are_bounded():
    """Between two tokens at most MAX_NEWLINES line breaks in a row, each followed by at most MAX_INDENT other
    whitespace bytes (a model stuck on newlines must go on), so any pretty-printing fits (indent 4, 16 deep)."""
    from qwen2rt.json_schema import MAX_INDENT, MAX_NEWLINES

    deep = {"a": 1}
    for _ in range(15):
        deep = {"a": deep}
    assert completes(json.dumps(deep, indent=4)) and not completes(json.dumps({"a": deep}, indent=4))
    for schema in ({"type": "object"}, PERSON, {}):
        grammar = JsonSchemaGrammar(schema)
        for gap, ok in [("\n" * MAX_NEWLINES, True), ("\n" * (MAX_NEWLINES + 1), False),
                        (" " * MAX_INDENT, True), (" " * (MAX_INDENT + 1), False),
                        (("\n" + "\t" * MAX_INDENT) * MAX_NEWLINES, True), ("\r" * (MAX_INDENT + 1), False),
                        (("\t" * (MAX_INDENT - 1) + "\r\n") * MAX_NEWLINES, True)]:
            text = '{"name":' + gap + '"x","age":1,"address":{"street":"","zip":""}}'
            assert completes(text, grammar) == ok, (schema, repr(gap))


@pytest.mark.parametrize("schema, words", [
    ({"type": "string", "uniqueItems": True}, "keyword 'uniqueItems' at # is not implemented"),
    ({"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 2}}}, "'multipleOf' at #/properties/a"),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": True}, "additionalProperties beside"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required key 'b' is not in properties"),
    ({"type": "strng"}, "type 'strng' is not one of"), ({"$ref": "#/$defs/x"}, "points at nothing"),
    ({"$ref": "other.json"}, "only local refs"), ({"allOf": [{}, {}]}, "allOf of more than one"),
    ({"enum": []}, "enum must be a non-empty list"), ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems"),
    ({"properties": {"a": False}}, "false matches nothing"), ([1], "must be a dict"),
    ('{"type": "object"', "not a JSON schema's text"), ({"enum": [{1, 2}]}, "is not JSON"),
    ({"$ref": "#"}, "no finite instance"), ({"type": "array", "minItems": 1, "items": {"$ref": "#"}}, "no finite"),
    ({"properties": {"a": {"$ref": "#"}}, "required": ["a"]}, "no finite instance"),
    (json.loads('{"items": ' * 900 + "{}" + "}" * 900), "nests too deeply"),
    ({"type": "string", "pattern": "a", "format": "date"}, "pattern beside format is not implemented"),
    ({"type": "string", "pattern": "a+", "maxLength": 3}, "implemented only where it implies them (its matches have "
                                                          "at least 1 and any number of characters)"),
    ({"type": "string", "format": "date", "minLength": 11}, "at least 10 and at most 10 characters"),
    ({"type": "string", "format": "ipv6"}, "format 'ipv6' is not implemented (formats: date, time"),
    ({"properties": {"p": {"pattern": "(?=a)"}}}, "at #/properties/p: pattern: regex '(?=a)': group syntax"),
    ({"type": "string", "pattern": 5}, "pattern must be a string"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "minLength / maxLength must be integers"),
    ({"type": "string", "minLength": -1}, "minLength / maxLength must be integers"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer is within its minimum / maximum"),
    ({"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 2}, "no integer is within"),
    ({"type": "number", "exclusiveMinimum": 1, "maximum": 1}, "no number is within"),
    ({"type": "integer", "exclusiveMinimum": True}, "draft 4's boolean"),
    ({"prefixItems": {"type": "integer"}}, "prefixItems must be a list of schemas"),
    ({"anyOf": [{"type": "integer"}, {"$ref": "#/anyOf/2"}]}, "$ref '#/anyOf/2' points at nothing"),
    ({"anyOf": [{"type": "integer"}, {"$ref": "#/anyOf/\u0660"}]}, "points at nothing"),
    ({"anyOf": [{"type": "integer"}, {"$ref": "#/anyOf/00"}]}, "points at nothing"),
    ({"type": "string", "format": ["date"]}, "format \"['date']\" is not implemented"),
    ({"const": {1: 2}}, "a constant object's keys must be strings"),
    ({"items": [{}], "prefixItems": [{}]}, "items as a list beside prefixItems"),
    ({"items": {}, "additionalItems": False}, "additionalItems without items as a list"),
    ({"prefixItems": [{}, {}], "items": False, "minItems": 3}, "minItems 3 is more than the 2 items it may have"),
    ({"type": "number", "minimum": "1"}, "minimum must be a finite number"),
    ({"type": "number", "maximum": float("inf")}, "maximum must be a finite number"),
])
def test_schema_errors_name_the_keyword(schema, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        StructuredOutputs(json=schema)


def test_number_bounds_against_the_reference():
    """A bounded number completes exactly when it is JSON's number syntax without an exponent and within its bounds
    (exact decimal comparisons), and every prefix of one that completes is alive: random texts near the bounds."""
    rng = random.Random(7)
    cases = [({"type": "integer", "minimum": -3, "exclusiveMaximum": 120}, True),
             ({"type": "number", "exclusiveMinimum": -1.5, "maximum": 2.25}, False),
             ({"type": "integer", "exclusiveMinimum": 2.5, "maximum": 7.9}, True),
             ({"type": "number", "minimum": 0.1, "maximum": 0.1}, False),
             ({"type": "number", "minimum": 1000, "maximum": 1234.5}, False),
             ({"type": "integer", "maximum": -10}, True), ({"type": "number", "exclusiveMinimum": 99.99}, False),
             ({"type": "integer", "minimum": 1e23, "maximum": 10 ** 400}, True)]  # (1e23 is 99999999999999991611392)
    for schema, integer in cases:
        grammar = JsonSchemaGrammar(schema)
        ends = [Fraction(v) if integer else Fraction(repr(v)) for k, v in schema.items() if k != "type"]
        accepted = 0
        for _ in range(1500):
            base = rng.choice(ends) + Fraction(rng.randint(-300, 300) * (rng.random() < 0.8), rng.choice([1, 10, 100]))
            small = abs(base) < 10 ** 300  # (as a float)
            text = rng.choice([str(int(base)), f"{float(base):.{rng.randint(0, 4)}f}" if small else str(int(base)),
                               f"{float(base):e}" if small else "1e400",
                               str(rng.randint(-2000, 2000)), "-0", "0.0", "-", "01", "1.", ".5", "-0.10"])
            try:
                value, ok = Fraction(text), re.fullmatch(r"-?(0|[1-9]\d*)(\.\d+)?", text) is not None
            except ValueError:
                value, ok = None, False
            ok = ok and not (integer and "." in text) and all(  # (an integer as Python compares it, exactly)
                test(int(text) if integer else value, schema[word] if integer else Fraction(repr(schema[word])))
                for word, test in [("minimum", operator.ge), ("exclusiveMinimum", operator.gt),
                                   ("maximum", operator.le), ("exclusiveMaximum", operator.lt)] if word in schema)
            assert completes(text, grammar) == ok, (schema, text)
            if ok:
                accepted += 1
                assert all_prefixes_alive_and_complete(grammar, text)
        assert accepted >= 20, schema


def test_constrained_strings_take_escapes():
    """A string with a pattern or lengths reads its escapes as the characters they spell (surrogate pairs too);
    a lone surrogate, or an escape no character of which may follow, is refused at the byte where that shows."""
    grammar = JsonSchemaGrammar(CONSTRAINED)
    for text, ok in [('"\\ud83d\\ude00"', True), ('"\\ud83d\\ude4f\\ud83d\\ude01\\ud83d\\ude02"', True),
                     ('"\\ud83d\\ude00\\ud83d\\ude00\\ud83d\\ude00\\ud83d\\ude00"', False),  # {1,3}
                     ('"\\ud83d"', False), ('"\\ude00"', False), ('"\\ud83d\\u0041"', False)]:
        assert completes('{"code":"AB-123","n":1,"emoji":' + text + "}", grammar) == ok, text
    for text, ok in [('"AB-\\u0031\\u00323"', True), ('"A\\u0042-123"', True), ('"AB\\/123"', False)]:
        assert completes('{"code":' + text + ',"n":1}', grammar) == ok, text
    prefix = b'{"n":1,"code":"AB-12'
    state = run(grammar, prefix)
    assert run(grammar, b"\\u003", state) is not None and run(grammar, b"\\u004", state) is None
    assert run(grammar, b"\\", run(grammar, b"3", state)) is None  # the pattern is whole: nothing may follow
    assert run(grammar, b'{"n":1,"name":"\\u00e9\\n\\"ab"') is not None  # 5 characters, escapes counted once
    assert run(grammar, b'{"n":1,"name":"\\u00e9\\n\\"abc') is None and completes('{"code":"XY-000","n":0,"name":"'
                                                                                  + "\u4e2d" * 5 + '"}', grammar)
    assert run(grammar, b'{"n":1,"name":"a\\xff') is None  # lengths count characters of valid UTF-8 only


def random_byte_walks(grammar, rng: random.Random, walks: int, most: int) -> list[bytes]:
    """Random walks over single bytes the grammar takes (its state's mask over a vocabulary of the 256 bytes):
    no state on the way may allow nothing (a masked request would be stuck there); the complete outputs."""
    index = TokenIndex([bytes((i,)) for i in range(256)] + [None], 257)
    done = []
    for _ in range(walks):
        matcher, out = Matcher(grammar, index, {256}), b""
        for _ in range(most):
            token = int(rng.choice(np.flatnonzero(matcher.mask())))  # (raises if nothing is allowed)
            if token == 256 or (matcher.complete and rng.random() < 0.2):
                done.append(out)
                break
            matcher.advance(token)
            out += bytes((token,))
    return done


def test_no_state_is_a_dead_end():
    """Random byte walks through the constrained schema, regexes with UTF-8 classes and counted repeats, and a
    choice: the mask is never empty, and every complete output is what the reference says."""
    rng = random.Random(12)
    from qwen2rt.regex import RegexGrammar

    outs = random_byte_walks(JsonSchemaGrammar(CONSTRAINED), rng, 60, 160)  # (whole objects seldom end)
    assert all(valid(parsed(o.decode("utf-8", "replace")), CONSTRAINED, CONSTRAINED) for o in outs)
    for key, schema in CONSTRAINED["properties"].items():
        outs = random_byte_walks(JsonSchemaGrammar(schema), rng, 30, 200)
        assert len(outs) > 5 and all(valid(parsed(o.decode("utf-8")), schema, schema) for o in outs), key
    for pattern in (r"(ab|c[^x]{0,3})+\d", r"\u00e9|\u4e2d+|[\U0001F600-\U0001F64F]", r"[^\n]{2,9}\n"):
        outs = random_byte_walks(RegexGrammar(pattern), rng, 80, 60)
        assert len(outs) > 20 and all(re.fullmatch(pattern, o.decode("utf-8")) for o in outs), pattern


def test_choice_grammar():
    g = ChoiceGrammar(["yes", "no", "yes!", "\u00e9t\u00e9"])
    for text, alive, done in [("", True, False), ("ye", True, False), ("yes", True, True), ("yes!", True, True),
                              ("yes!!", False, False), ("n", True, False), ("x", False, False),
                              ("\u00e9t\u00e9", True, True), ("no ", False, False)]:
        state = run(g, text.encode())
        assert (state is not None) == alive and (alive and g.accepting(state)) == done, text


def brute_allowed(index: TokenIndex, grammar, state) -> np.ndarray:
    return np.array([b is not None and run(grammar, b, state) is not None for b in index.token_bytes])


def reachable_states(rng: random.Random, grammar, texts: list[str], count: int) -> list:
    states = {}  # (in the order found: the same states whatever the hash seed)
    for text in texts:
        data = text.encode()
        for k in sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, 6))):
            state = run(grammar, data[:k])
            if state is not None:
                states.setdefault(state, None)
    return list(states)[:count]


def test_allowed_sets_equal_a_token_by_token_check(monkeypatch):
    """TokenIndex.allowed (the sorted prefix walk, pruned, whole ranges of bytes that leave the state as it is, the
    regex DFA run over many tokens at once with its length budget) against running the grammar over every token's
    bytes, at states reached inside random documents: a random vocabulary of JSON-ish pieces (every single byte,
    then strings of the noise alphabet, many sharing prefixes, some special tokens without bytes), for the JSON,
    constrained JSON, regex and choice grammars; each set is also the same from the cache. The regexes' DFA
    numbering starts over before most walks (as it does once it is large)."""
    from qwen2rt.regex import Regex, RegexGrammar

    monkeypatch.setattr(Regex, "NUMBERED", 8)
    rng = random.Random(1)
    alphabet = [c.encode() for c in NOISE] + [b'"', b'":', b'",', b"  ", b'"}', b'\\"', b"\\u00", b"true", b"\xc3"]
    alphabet += [b"AB-", b"12", b"2024-", b"\xe4\xb8\xad", b"\xf0\x9f\x98", b"\x80", b"\\ud83d", b"\\ude00", b"ab",
                 b"@x.", b"T1", b"Z", b"aaaaa", b'aa"']
    alphabet += [b"\xed\xa0\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf4\x90\x80\x80"]  # surrogate, overlong, > U+10FFFF
    pieces = {bytes((i,)) for i in range(256)}
    while len(pieces) < 3000:
        pieces.add(b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))))
    token_bytes = sorted(pieces) + [None] * 5
    rng.shuffle(token_bytes)
    index = TokenIndex(token_bytes, len(token_bytes) + 3)  # ids past the tokenizer's: never allowed
    docs = [random_document(rng) for _ in range(30)]
    choice = ChoiceGrammar(["yes", "yes!", "no", "\u00e9t\u00e9 {x}"])
    cases = [(JSON_OBJECT, s) for s in reachable_states(rng, JSON_OBJECT, docs, 60)]
    for schema in (PERSON, TREE, MIXED):
        grammar = JsonSchemaGrammar(schema)
        texts = [json.dumps(generate(schema, schema, rng), ensure_ascii=False, indent=1) for _ in range(10)]
        cases += [(grammar, s) for s in reachable_states(rng, grammar, texts, 25)]
    cases += [(choice, s) for s in reachable_states(rng, choice, ["yes!", "no", "\u00e9t\u00e9 {x}"], 20)]
    grammar = JsonSchemaGrammar(CONSTRAINED)
    texts = [json.dumps(generate(CONSTRAINED, CONSTRAINED, rng), ensure_ascii=rng.random() < 0.3) for _ in range(12)]
    cases += [(grammar, s) for s in reachable_states(rng, grammar, texts, 60)]
    grammar = JsonSchemaGrammar(UNIONS)  # states of several counted string parses at once
    texts = ['{"u":"aa","v":"aaaaa","w":["aaaaaaaaaaa","a"]}', '{"u":"' + "a" * 22 + '","v":"ab"}']
    cases += [(grammar, s) for s in reachable_states(rng, grammar, texts, 25)]
    for pattern, examples in [(r"[a-z ]{2,9}\d", ["ab 1", "x y z0"]),
                              (r"(\u00e9|\u4e2d)+[^a]?", ["\u00e9\u4e2d", "\u4e2dx"]),
                              (r"[^\n]*\n", ["any\u00e9 \"text\"\n"]),
                              (r"[^a]{1,3}x?", ["\u00e9\u4e2d", "\u4e2dx", "\u4e2d\u4e2d\u4e2dx"])]:
        regex = RegexGrammar(pattern)
        cases += [(regex, s) for s in reachable_states(rng, regex, examples, 12)]
    kinds = set()
    for grammar, state in cases:
        want = brute_allowed(index, grammar, state)
        assert (index.allowed(grammar, state) == want).all(), state
        assert (index.allowed(grammar, state) == want).all(), state  # cached
        kinds |= state_kinds(grammar, state)
    assert len(kinds) >= 25, kinds  # strings, numbers, keys, values, literals, patterns ... were all tried


def test_allowed_sets_over_qwens_vocabulary(qwen_tokenizer_dir):
    """The same check over Qwen's real vocabulary (its byte-level BPE token bytes, which decode as the tokenizer
    decodes them), at every state a JSON document's tokens pass through, each token allowed where it came."""
    tokenizer = HFTokenizer(qwen_tokenizer_dir)
    token_bytes = tokenizer.token_bytes()
    rng = random.Random(2)
    for _ in range(300):
        ids = [rng.randrange(151643) for _ in range(rng.randint(1, 6))]
        assert b"".join(token_bytes[i] for i in ids).decode("utf-8", "replace") == tokenizer.decode(ids)
    assert token_bytes[151645] is None and token_bytes[151657] == b"<tool_call>"  # special / plain added tokens
    index = TokenIndex(token_bytes, 151936)
    doc = json.dumps({"name": "Zo\u00eb \"Z\"", "n": [1, -2.5e-3, True, None], "o": {"k": "v\\n"}}, indent=2)
    matcher = Matcher(JSON_OBJECT, index, {151645})
    checked = set()
    for token in tokenizer.encode(doc):
        mask = matcher.mask()
        assert mask[token] and not mask[151645]
        if matcher.state not in checked and len(checked) < 12:
            checked.add(matcher.state)
            assert (mask == brute_allowed(index, JSON_OBJECT, matcher.state)).all(), matcher.state
        matcher.advance(token)
    assert matcher.complete and np.flatnonzero(matcher.mask()).tolist() == [151645]
    from qwen2rt.regex import RegexGrammar

    schema = {"type": "object", "properties": {k: CONSTRAINED["properties"][k] for k in ("code", "name", "word", "x")}}
    document = '{"code": "AB-123", "name": "Zo\u00eb", "word": "\u00e9t\u00e9 ab", "x": -1.25}'
    for grammar, text, most in [
            (RegexGrammar(r"[A-Za-z ,.']{1,40}\.( \u4e2d+)?"), "It's a test, of sorts. \u4e2d\u4e2d", 8),
            (JsonSchemaGrammar(schema), document, 6)]:
        matcher, checked = Matcher(grammar, index, {151645}), 0
        for token in tokenizer.encode(text):
            mask = matcher.mask()
            assert mask[token]
            if checked < most and grammar.dfa(matcher.state) is not None:  # (states the DFA walk serves)
                checked += 1
                assert (mask == brute_allowed(index, grammar, matcher.state)).all(), matcher.state
            matcher.advance(token)
        assert matcher.complete and checked >= 3


@pytest.fixture(scope="module")
def tiny():
    return LLM("tiny", device="cpu", max_seq_len=256, max_batch_size=4)


def masked_argmax(llm, params: SamplingParams, out_ids: list[int], logits) -> list[int]:
    """The greedy tokens a structured request must get: at each step the allowed token (brute force over the
    vocabulary from the grammar's state after the tokens before) of the largest logit + bias."""
    index = TokenIndex(llm.tokenizer.token_bytes(), llm.config.vocab_size)
    grammar, state, want = params.structured_outputs.automaton(), None, []
    for step, token in enumerate(out_ids):
        state = grammar.start if state is None else state
        allowed = brute_allowed(index, grammar, state)
        if grammar.accepting(state):
            allowed[sorted(llm.eos_token_ids)] = True
        row = logits[step].numpy().copy()
        for t, b in (params.logit_bias or {}).items():
            row[t] += b
        want.append(int(np.where(allowed, row, -np.inf).argmax()))
        if token not in llm.eos_token_ids:
            state = run(grammar, llm.tokenizer.token_bytes()[token], state)
    return want


SQL_GBNF = "\n".join([  # (vLLM's example of guided_grammar, written shorter)
    'root ::= "SELECT " column " from " table " where " column "= " number',
    'column ::= "col_1 " | "col_2 "', 'table ::= "table_1 " | "table_2 "', 'number ::= "1 " | "2 "'])
NESTED_LARK = 'start: "[" [item ("," item)*] "]"\nitem: /[a-c]/ | start'


def test_greedy_takes_the_best_allowed_token_at_every_step(tiny):
    """Greedy, every step's token is the allowed one of the largest logit (its mask from the tokens before, not
    one step stale): a JSON object, a schema, a schema of patterns, formats and bounds, a choice and regexes, all
    complete, each ending with eos; unconstrained, the same request is not what was asked. Grammars too: GBNF
    and Lark, the nested one a pushdown."""
    from test_parity import generate_recording_logits

    coded = {"type": "object", "required": ["code", "n", "day"], "properties": {
        "code": CONSTRAINED["properties"]["code"], "n": {"type": "integer", "minimum": 10, "maximum": 12},
        "day": CONSTRAINED["properties"]["day"], "name": CONSTRAINED["properties"]["name"]}}
    cases = [([5, 6, 7], JSON, CLOSE), ([9, 1], StructuredOutputs(choice=["yes", "no", "maybe so"]), CLOSE),
             ([4, 4, 2], StructuredOutputs(json=PERSON), {**CLOSE, ord(","): 6.0, ord('"'): 9.0, **QUIET}),
             ([8, 3], StructuredOutputs(json=coded), {**CLOSE, ord(","): 6.0, **QUIET}),
             ([2, 7], StructuredOutputs(regex=r"(yes|no), [a-z]{1,8}\."), {}),
             ([6], StructuredOutputs(regex=r"\d{3}-[A-Z\u00e9]{2,4}( \w+)?"), {}),
             ([3, 5], StructuredOutputs(grammar=SQL_GBNF), {}),
             ([7, 7], StructuredOutputs(grammar=NESTED_LARK), {ord("["): 1.0, ord("b"): 2.0})]
    for prompt, so, bias in cases:
        params = SamplingParams(max_tokens=150, temperature=0, logit_bias=bias, structured_outputs=so)
        out, logits = generate_recording_logits(tiny, prompt, params)
        assert out.token_ids == masked_argmax(tiny, params, out.token_ids, logits)
        assert out.finish_reason == "stop" and out.token_ids[-1] in tiny.eos_token_ids
        if so.choice:
            assert out.text in so.choice
        elif so.regex:
            assert re.fullmatch(so.regex, out.text), out.text
        elif so.grammar:
            assert run(so.automaton(), out.text.encode()) is not None and so.automaton().accepting(
                run(so.automaton(), out.text.encode())), out.text
        else:
            assert check_json_object(out.text) and valid(parsed(out.text), so.json or {}, so.json or {})
        free = tiny.generate([prompt], dataclasses.replace(params, structured_outputs=None))[0]
        assert free.token_ids != out.token_ids and not check_json_object(free.text)
        assert not (so.regex and re.fullmatch(so.regex, free.text))
        if so.grammar:
            state = run(so.automaton(), free.text.encode())
            assert state is None or not so.automaton().accepting(state)


def test_a_structured_step_is_sampled_once_the_token_before_is_read_back(tiny, monkeypatch):
    """While a structured request decodes, each step's forward is launched before the step in flight is read back
    (the device stays busy while the host reads back and computes the mask) and its sampling after the mask of
    that token is written; split_structured_steps off, the step in flight is read back before anything is launched.
    The tokens are the same either way (sampled, seeded, batched with a free request), and the regex matches."""
    runner = tiny.engine.runner
    log = []
    launch, sample = runner.launch_decode, runner.sample_decode

    def logged_launch(*args):  # "forward": launched up to its sampling; "step": launched whole
        launched = launch(*args)
        log.append("forward" if isinstance(launched, model_runner.DecodeForward) else "step")
        return launched
    monkeypatch.setattr(runner, "launch_decode", logged_launch)
    monkeypatch.setattr(runner, "sample_decode", lambda forward: (log.append("sample"), sample(forward))[1])
    set_allowed = tiny.engine.sampler.set_allowed
    monkeypatch.setattr(tiny.engine.sampler, "set_allowed", lambda *a: (log.append("mask"), set_allowed(*a)))
    monkeypatch.setattr(model_runner.Launched, "token_ids",
                        lambda self, real=model_runner.Launched.token_ids: (log.append("read"), real(self))[1])
    pattern = r"[a-z]{3,6}(, [a-z]{3,6}){2,3}\."
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=4, structured_outputs=StructuredOutputs(
        regex=pattern)), SamplingParams(max_tokens=40, temperature=1.0, seed=5, ignore_eos=True)]
    runs = {}
    for split in (True, False):
        monkeypatch.setattr(tiny.engine, "split_structured_steps", split)  # (the default again after the test)
        seqs = [tiny.new_request(p, q) for p, q in zip(("A", "B"), params)]
        tiny.submit(seqs)
        calls = []
        while tiny.has_unfinished():
            log.clear()
            tiny.step()
            calls.append(" ".join(log))
        runs[split] = [s.output_ids for s in seqs], calls
        assert re.fullmatch(pattern, tiny.tokenizer.decode(seqs[0].output_ids[:-1])), seqs[0].output_ids
        assert seqs[0].finish_reason == "stop" and 10 < len(seqs[0].output_ids) < 40
    assert runs[True][0] == runs[False][0]
    # the first call admits both (the structured one's first mask), launches their prefill (not logged) and reads
    # it back; the calls after it read back a decode step of both, up to the structured request's eos
    both = len(runs[True][0][0]) - 1
    split_calls, serial_calls = runs[True][1], runs[False][1]
    assert split_calls[:both] == ["mask forward read mask sample"] + ["forward read mask sample"] * (both - 1)
    assert serial_calls[:both] == ["mask read mask"] + ["step read mask"] * (both - 1)
    # then the free request alone: launched a step ahead in both modes
    assert split_calls[-2:] == serial_calls[-2:] == ["step read", "read"]


def test_a_sampling_half_that_fails_to_launch_ends_its_batch_and_the_engine_goes_on(tiny, monkeypatch):
    """The sampling of a step launched in halves raises (a device error surfacing there): the step's sequences end
    (aborted: their token was planned as launched), their blocks go back, and the engine serves the next request."""
    free = SamplingParams(max_tokens=12, temperature=0.8, seed=2, ignore_eos=True)
    alone = tiny.generate("other", free)[0].token_ids
    seqs = [tiny.new_request("x", SamplingParams(max_tokens=30, structured_outputs=StructuredOutputs(
        regex="[a-z]{20}"))), tiny.new_request("other", free)]
    tiny.submit(seqs)
    tiny.step()
    calls, sample = [], tiny.engine.runner.sample_decode

    def failing(forward):
        calls.append(len(forward.seqs))
        if len(calls) == 2:
            raise RuntimeError("device error")
        return sample(forward)
    monkeypatch.setattr(tiny.engine.runner, "sample_decode", failing)
    with pytest.raises(RuntimeError, match="device error"):
        for _ in range(5):
            tiny.step()
    assert calls == [2, 2] and [s.finish_reason for s in seqs] == ["abort", "abort"]
    assert 1 < len(seqs[0].output_ids) < 5 and not tiny.has_unfinished()
    assert tiny.kv_cache.num_free_blocks == tiny.kv_cache.num_blocks
    assert tiny.generate("other", free)[0].token_ids == alone


def test_a_failed_read_back_is_the_error_raised_when_the_sampling_half_fails_too(tiny, monkeypatch):
    """The read-back raises (an interrupt) and the sampling half launched after it fails too (a broken device): the
    read-back's error is the one raised, every request of both steps ends, and the engine goes on."""
    seqs = [tiny.new_request("x", SamplingParams(max_tokens=30, structured_outputs=StructuredOutputs(
        regex="[a-z]{20}"))), tiny.new_request("other", SamplingParams(max_tokens=12, ignore_eos=True))]
    tiny.submit(seqs)
    tiny.step()
    monkeypatch.setattr(model_runner.Launched, "token_ids", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(tiny.engine.runner, "sample_decode", lambda forward: 1 / 0)
    with pytest.raises(KeyboardInterrupt):
        tiny.step()
    monkeypatch.undo()
    assert [s.finish_reason for s in seqs] == ["abort", "abort"] and not tiny.has_unfinished()
    assert tiny.kv_cache.num_free_blocks == tiny.kv_cache.num_blocks
    assert len(tiny.generate("other", SamplingParams(max_tokens=5, ignore_eos=True))[0].token_ids) == 5


def test_sampled_outputs_complete_and_batch_with_free_requests(tiny):
    """Sampled structured requests (n choices, penalties, top-p) all complete (JSON objects, or one of the
    choices, several of them drawn), and batched with unconstrained requests they are what they are alone
    (seeded), and so are the unconstrained ones; json.loads reads each object."""
    json_params = SamplingParams(max_tokens=120, temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=3, n=4,
                                 logit_bias=CLOSE, structured_outputs=JSON)
    choice = StructuredOutputs(choice=["red", "green", "blue", "\u00e9t\u00e9"])
    choice_params = SamplingParams(max_tokens=20, temperature=1.5, seed=11, n=6, structured_outputs=choice)
    free = SamplingParams(max_tokens=30, temperature=1.0, seed=5, ignore_eos=True)
    alone = [tiny.generate("A", json_params)[0], tiny.generate("B", choice_params)[0], tiny.generate("C", free)[0]]
    together = tiny.generate(["A", "B", "C"], [json_params, choice_params, free])
    for a, b in zip(alone, together):
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    objects = together[0].outputs
    assert all(o.finish_reason == "stop" and check_json_object(o.text) for o in objects)
    assert all(isinstance(json.loads(o.text), dict) for o in objects) and len({o.text for o in objects}) > 1
    tree = SamplingParams(max_tokens=150, temperature=1.0, seed=8, n=4, logit_bias=CLOSE,
                          structured_outputs=StructuredOutputs(json=TREE))
    trees = [o for o in tiny.generate("T", tree)[0].outputs if o.finish_reason == "stop"]
    assert len(trees) >= 2 and all(valid(parsed(o.text), TREE, TREE) for o in trees)
    picked = [o.text for o in together[1].outputs]
    assert set(picked) <= set(choice.choice) and len(set(picked)) > 1
    assert all(o.finish_reason == "stop" for o in together[1].outputs)


def test_structured_requests_through_preemption():
    """A cache too small for four structured requests at once preempts some (they recompute their tokens); their
    outputs equal those of a cache large enough for all."""
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=s, logit_bias={34: 3.0}, structured_outputs=JSON)
              for s in range(4)]
    prompts = [[1 + i] * 20 for i in range(4)]
    small = LLM("tiny", device="cpu", max_seq_len=256, max_batch_size=4, num_kv_blocks=12, block_size=8)
    roomy = LLM("tiny", device="cpu", max_seq_len=256, max_batch_size=4, num_kv_blocks=64, block_size=8)
    outs = small.generate(prompts, params)
    assert small.engine.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy.generate(prompts, params)]
    assert all(check_json_object(o.text) or o.finish_reason == "length" for o in outs)


def test_a_grammar_that_cannot_go_on_ends_its_request_alone(tiny, monkeypatch):
    """A structured request whose grammar fails (here, made to) is aborted alone with the reason in seq.error
    (generate raises it); the request beside it runs to its end with its tokens alone; the engine stays usable.
    And a schema too ambiguous at depth: past MAX_CONFIGURATIONS parses the byte that would open more is refused."""
    real = Matcher.advance

    def advance(self, token):
        if self.grammar.key == ("choice", (b"bang", b"boom")):
            raise RuntimeError("structured outputs: made to fail")
        real(self, token)

    monkeypatch.setattr(Matcher, "advance", advance)
    free = SamplingParams(max_tokens=12, temperature=0.8, seed=2, ignore_eos=True)
    alone = tiny.generate("other", free)[0].token_ids
    doomed = tiny.new_request("x", SamplingParams(max_tokens=5, structured_outputs=StructuredOutputs(
        choice=["boom", "bang"])))
    other = tiny.new_request("other", free)
    tiny.submit([doomed, other])
    while not (doomed.finished and other.finished):
        tiny.step()
    assert doomed.finish_reason == "abort" and doomed.error == "structured outputs: made to fail"
    assert len(doomed.output_ids) == 1 and other.output_ids == alone and tiny.kv_cache.num_free_blocks == \
        tiny.kv_cache.num_blocks
    with pytest.raises(RuntimeError, match="the request failed: structured outputs: made to fail"):
        tiny.generate("x", SamplingParams(max_tokens=5, structured_outputs=StructuredOutputs(choice=["boom", "bang"])))
    assert tiny.generate("other", free)[0].token_ids == alone
    from qwen2rt.json_schema import MAX_CONFIGURATIONS

    expr = {"$ref": "#/$defs/e", "$defs": {"e": {"anyOf": [
        {"type": "object", "properties": {"op": {"const": op}, "left": {"$ref": "#/$defs/e"}}, "required": ["op"]}
        for op in ("add", "mul")] + [{"type": "integer"}]}}}
    grammar = JsonSchemaGrammar(expr)
    state, sizes = grammar.start, []
    for depth in range(1, 11):  # each level doubles the parses (add or mul), up to the bound
        state = run(grammar, b'{"left":', state)
        sizes.append(len(state))
    assert sizes == [min(2 ** d, MAX_CONFIGURATIONS) for d in range(1, 11)]
    state = run(grammar, b"7", state)  # a number (it may go on: twice the parses) is still allowed
    for _ in range(10):  # and some op closes each level: the parses kept can all end
        state = next(s for s in (run(grammar, f',"op":"{op}"}}'.encode(), state) for op in ("add", "mul")) if s)
    assert grammar.accepting(state)


def test_wide_unions_are_followed_exactly():
    """Under the bound on parses: an anyOf of 500 constants is one parse (merged), so every value stays possible;
    a flat anyOf of 100 objects told apart by a constant (a forced call of 100 tools) keeps all of them until the
    constant does; a cut keeps the complete value and the shallowest parses first."""
    consts = JsonSchemaGrammar({"oneOf": [{"const": f"country_{i:03d}", "description": "x"} for i in range(300)]
                                + [{"const": i} for i in range(1, 200)]})
    assert all(completes(json.dumps(f"country_{i:03d}"), consts) for i in range(300))
    assert all(completes(str(i), consts) for i in range(1, 200)) and not completes("200", consts)
    tools = JsonSchemaGrammar({"anyOf": [{"type": "object", "required": ["name", "q"], "properties": {
        "name": {"const": f"tool_{i}"}, "q": {"type": "string"}}} for i in range(100)]}, blocks=1)
    assert all(completes(f'<tool_call>\n{{"name": "tool_{i}", "q": "x"}}\n</tool_call>', tools) for i in range(100))
    from qwen2rt.json_schema import _order

    deep = [(("obj", 9, "open", frozenset({b'"a"'}), None), ("str", "in")), (("arr", 3, "open", 0),), ()]
    assert sorted(deep, key=_order) == deep[::-1]  # a cut keeps a complete value (()) and the shallowest first


def test_structured_outputs_errors(tiny, hf_checkpoints, monkeypatch):
    for kwargs, words in [(dict(), "exactly one"), (dict(choice=["a"], json_object=True), "exactly one"),
                          (dict(json={}, json_object=True), "exactly one"),
                          (dict(choice=[]), "non-empty list"), (dict(choice=["a", ""]), "'' is not a non-empty"),
                          (dict(choice=["a", 3]), "3 is not"), (dict(json_object="yes"), "must be a bool"),
                          (dict(regex="a", json_object=True), "exactly one"),
                          (dict(regex="(a"), r"StructuredOutputs.regex: regex '\(a': missing '\)'"),
                          (dict(regex=["a"]), "a regex must be a string")]:
        with pytest.raises(ValueError, match=words):
            StructuredOutputs(**kwargs)
    for kwargs, words in [(dict(ignore_eos=True), "ignore_eos = True: cannot be combined"),
                          (dict(min_tokens=2), "min_tokens = 2: cannot be combined"),
                          (dict(allowed_token_ids=[1, 2]), "allowed_token_ids: cannot be combined")]:
        with pytest.raises(ValueError, match=f"SamplingParams.{words}"):
            SamplingParams(structured_outputs=JSON, **kwargs)
    with pytest.raises(ValueError, match="SamplingParams.structured_outputs = .*must be None or"):
        SamplingParams(structured_outputs={"json_object": True})
    with monkeypatch.context() as patch:  # a tokenizer without eos, and no stop_token_ids
        patch.setattr(tiny, "eos_token_ids", frozenset())
        with pytest.raises(ValueError, match="no stop token id"):
            tiny.generate("x", SamplingParams(structured_outputs=JSON))
        assert tiny.generate("x", SamplingParams(structured_outputs=JSON, stop_token_ids=[257], max_tokens=2))
    with pytest.raises(ValueError, match=r"stop_token_ids: 125 is a text token \(b'}'\)"):
        tiny.generate("x", SamplingParams(structured_outputs=JSON, stop_token_ids=[125]))
    no_tokenizer = LLM(hf_checkpoints["dense_gqa"][0], device="cpu", max_seq_len=64)
    with pytest.raises(ValueError, match="ships no tokenizer.json"):
        no_tokenizer.generate([[1, 2]], SamplingParams(structured_outputs=JSON))
    assert len(tiny.generate("x", SamplingParams(max_tokens=3, temperature=0))[0].token_ids) == 3  # still usable


def test_structured_outputs_with_qwens_tokenizer(real_tok_dir):
    """The whole path with Qwen's byte-level BPE vocabulary (151,936 ids, eos from generation_config.json): seeded
    sampled outputs of a regex and of a schema of a pattern, bounds, a length and a boolean all complete with eos,
    match or validate, and every token was one its mask allowed (replayed); greedy too."""
    llm = LLM(real_tok_dir, device="cpu", max_seq_len=512, max_batch_size=4)
    schema = {"type": "object", "additionalProperties": False, "required": ["code", "n", "ok", "name"],
              "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"},
                             "n": {"type": "integer", "minimum": 1, "maximum": 99}, "ok": {"type": "boolean"},
                             "name": {"type": "string", "maxLength": 5}}}

    def validates(text: str) -> bool:
        value = json.loads(text)
        return (set(value) == {"code", "n", "ok", "name"} and re.fullmatch(r"[A-Z]{2}-\d{3}", value["code"])
                and 1 <= value["n"] <= 99 and isinstance(value["ok"], bool) and len(value["name"]) <= 5)

    pattern = r"(yes|no), [a-z\u00e9]{1,8}\."
    index = TokenIndex(llm.tokenizer.token_bytes(), llm.config.vocab_size)
    for so, check in [(StructuredOutputs(regex=pattern), lambda t: re.fullmatch(pattern, t)),
                      (StructuredOutputs(json=schema), validates)]:
        for params in (SamplingParams(max_tokens=400, temperature=1.0, seed=3, n=3, structured_outputs=so),
                       SamplingParams(max_tokens=400, temperature=0, structured_outputs=so)):
            for out in llm.generate("Answer:", params)[0].outputs:
                assert out.finish_reason == "stop" and out.token_ids[-1] in llm.eos_token_ids, out.text
                assert check(out.text), out.text
                matcher = Matcher(so.automaton(), index, llm.eos_token_ids)
                for token in out.token_ids:
                    assert matcher.mask()[token]
                    matcher.advance(token)
                assert matcher.complete


def whitespace_outside_strings(text: str) -> bool:
    inside = escaped = False
    for c in text:
        if inside:
            inside, escaped = (escaped or c != '"'), (not escaped and c == "\\")
        elif c == '"':
            inside = True
        elif c in " \t\n\r":
            return True
    return False


def test_disable_any_whitespace(tiny):
    """vLLM's disable_any_whitespace: compact JSON only (no whitespace between tokens; inside strings as ever), for
    a schema and JSON mode; the allowed sets agree with a token-by-token check; greedy outputs of the tiny model,
    which fills whitespace runs when it may, come out compact and valid."""
    compact = StructuredOutputs(json=PERSON, disable_any_whitespace=True)
    grammar = compact.automaton()
    value = {"name": "a b\n", "age": 1, "address": {"street": "s t", "zip": ""}, "tags": ["a", 7]}
    assert completes(json.dumps(value, separators=(",", ":"), ensure_ascii=False), grammar)
    assert not completes(json.dumps(value, ensure_ascii=False), grammar)  # ", " and ": "
    assert not completes(json.dumps(value, indent=1, separators=(",", ":"), ensure_ascii=False), grammar)
    for gap in ('["a", 7]', '[ "a",7]', '["a",7 ]', '["a" ,7]'):  # inside an array alone
        assert not completes('{"name":"x","age":1,"address":{"street":"","zip":""},"tags":' + gap + "}", grammar)
    assert completes(json.dumps(value, indent=1, ensure_ascii=False), StructuredOutputs(json=PERSON).automaton())
    json_mode = StructuredOutputs(json_object=True, disable_any_whitespace=True).automaton()
    assert completes('{"a":[1,{"b":" "}]}', json_mode) and not completes('{"a": 1}', json_mode)
    rng = random.Random(4)
    index = TokenIndex([bytes((i,)) for i in range(256)] + [b" {", b'" ', b'":', b", ", b"[\n", b"a b"], 262)
    texts = [json.dumps(generate(PERSON, PERSON, rng), separators=(",", ":"), ensure_ascii=False) for _ in range(6)]
    for state in reachable_states(rng, grammar, texts, 25):
        assert (index.allowed(grammar, state) == brute_allowed(index, grammar, state)).all()
    for so, bias in ((compact, {**CLOSE, ord(","): 6.0}), (StructuredOutputs(json_object=True,
                                                                              disable_any_whitespace=True), CLOSE)):
        params = SamplingParams(max_tokens=150, temperature=0, logit_bias=bias, structured_outputs=so)
        out = tiny.generate([[3, 1]], params)[0]
        assert out.finish_reason == "stop" and check_json_object(out.text) and not whitespace_outside_strings(out.text)
        loose = tiny.generate([[3, 1]], dataclasses.replace(params, structured_outputs=dataclasses.replace(
            so, disable_any_whitespace=False)))[0]
        assert whitespace_outside_strings(loose.text)  # (the same request fills whitespace when it may)
    for kwargs in (dict(choice=["a"], disable_any_whitespace=True), dict(json_object=True, disable_any_whitespace=1)):
        with pytest.raises(ValueError, match="disable_any_whitespace = .*true only with json or json_object"):
            StructuredOutputs(**kwargs)

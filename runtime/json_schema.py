"""JSON schemas for structured outputs (StructuredOutputs(json=schema), OpenAI's response_format json_schema): the
schema compiled into nodes, and a byte-level grammar that follows them.

The grammar is a nondeterministic pushdown automaton: a configuration is a stack of frames (an object waiting for
a key, a string, a number ...), and the grammar's state is the set of configurations the bytes so far allow, so an
`anyOf`, a number that may go on or end, or an enum whose values share a prefix need no lookahead. A value that is
complete pops its frame; a number or a literal that may also go on keeps both. The state is hashable (frozensets of
tuples), so TokenIndex caches its allowed tokens like any grammar's. At compile time what no finite value can
complete is pruned (`_Compiler.prune`), so every configuration kept can still end and a masked request never gets
stuck; a state keeps at most MAX_CONFIGURATIONS configurations.

The schema subset (what OpenAI's strict structured outputs and most tool definitions use), each keyword checked:
`type` (a name or a list; without one, object or array keywords make it that type, and no keyword any value),
`properties`, `required`, `additionalProperties` (false, or with no `properties` a schema or true), `items`,
`minItems`, `maxItems`, `enum` and `const` (_Compiler._constant), `anyOf`, `oneOf` (as anyOf: one match is not
enforced), `allOf` of one schema, local `$ref`s ("#", "#/$defs/...", any JSON pointer into the schema; recursion
included), `prefixItems` (or draft 4-2019's `items` as a list, with `additionalItems`; `items: false` for none past
them), strings' `pattern` (a whole match: regex.py), `format` (FORMATS, each as a regex) and `minLength` /
`maxLength` (characters; beside a pattern or format only where it implies them), numbers' `minimum`, `maximum`,
`exclusiveMinimum` and `exclusiveMaximum` (exact comparisons: _Compiler._number; a bounded number takes no exponent),
and annotations (title, description, default, examples, ...). Without a `type`, string keywords make it a string and
number keywords a number. An object with `properties` takes only those keys (as OpenAI's strict outputs and
xgrammar's strict mode; `additionalProperties` beside them may only be false), in any order, each once, the
`required` ones before it closes; an object of any keys may repeat one (its keys are not remembered). A key is
written as json.dumps writes it (with or without ensure_ascii). A string without a pattern, format or length is any
JSON string (bytes >= 0x80 as they come); one with them is read as the characters it spells (escapes decoded,
surrogate pairs joined, valid UTF-8 only). Any other keyword (multipleOf, uniqueItems, minProperties, ...) is a
ValueError naming it and where it is, not a constraint silently dropped. JSON's whitespace may go between tokens (at
most MAX_NEWLINES line breaks in a row, each followed by at most MAX_INDENT other whitespace bytes), not before or
after the whole value.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

from .regex import compiled, utf8_sequences

WHITESPACE = frozenset(b" \t\n\r")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPED = frozenset(b'"\\/bfnrt')
DIGITS = frozenset(b"0123456789")

ANNOTATIONS = frozenset(("title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly", "$defs", "definitions",
                         "discriminator"))  # (OpenAPI's, beside a oneOf: pydantic's tagged unions; it adds no rule)
STRING_KEYWORDS = frozenset(("pattern", "format", "minLength", "maxLength"))
NUMBER_KEYWORDS = frozenset(("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"))
KEYWORDS = frozenset(("type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "properties", "required",
                      "additionalProperties", "items", "prefixItems", "additionalItems", "minItems", "maxItems")
                     ) | STRING_KEYWORDS | NUMBER_KEYWORDS
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
ANY = 0  # every compiled schema's node 0: any JSON value
# whitespace between two tokens of a value: at most MAX_NEWLINES line breaks in a row (a blank line), each followed
# by at most MAX_INDENT other whitespace bytes (16 levels of 4-space indentation), so that any pretty-printing fits
# and a model that would write only whitespace (they do, under a mask: vLLM added disable_any_whitespace for it)
# must go on
MAX_NEWLINES, MAX_INDENT = 2, 64
# the most parses (configurations) one state keeps open at once. An anyOf keeps one per alternative until a byte tells
# them apart (an anyOf of constants is one parse: prune merges it), so a flat one of up to this many alternatives
# (forced calls of as many tools) is followed exactly; an anyOf of objects that begin with the same keys (keys come
# in any order) keeps one per alternative per level of nesting: 2^depth for a recursive one. Past the bound a state
# keeps the shallowest parses first (a complete value before anything) in a fixed order and drops the rest: each
# one kept can still end (prune), so the output stays a valid instance and never reaches a dead end, and the walk
# over the vocabulary stays bounded; what the dropped parses alone would have allowed later is no longer allowed
MAX_CONFIGURATIONS = 128
# a string's `format`, as the regex its value must match: each one a subset of the format's strings (RFC 3339 dates
# and times without leap days or leap seconds, an email's dot-atom local part, a hostname's labels of at most 63, a
# uri as an http(s) URL; a hostname's total length (253) and an email's local part's (64) are not bounded)
ANY_TEXT = compiled(r"[\x00-\U0010FFFF]*")  # any characters (valid UTF-8): a string with lengths alone
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DATE = (r"[0-9]{4}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
         r"|02-(0[1-9]|1[0-9]|2[0-8]))")
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_URI_CHAR = r"[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2}"
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": _DATE + "T" + _TIME,
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "ipv4": rf"({_OCTET}\.){{3}}{_OCTET}",
    "email": rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~-]+)*@{_LABEL}(\.{_LABEL})+",
    "hostname": rf"{_LABEL}(\.{_LABEL})*",
    # an http(s) URL: host, port, path, query and fragment of RFC 3986's characters, %-escapes well formed
    "uri": rf"https?://{_LABEL}(\.{_LABEL})*(:[0-9]{{1,5}})?(/({_URI_CHAR})*)*(\?({_URI_CHAR}|[/?])*)?(#({_URI_CHAR}|[/?])*)?",
}


def _encoded(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _aliases(keys) -> dict[bytes, bytes]:
    """{a key as json.dumps writes it with ensure_ascii: the key encoded}, for the keys where the two differ."""
    return {json.dumps(k).encode(): _encoded(k) for k in keys if json.dumps(k).encode() != _encoded(k)}


class _Compiler:
    """Schema -> nodes (tuples, referring to each other by index):
    ("union", alternatives), ("object", {encoded key: node}, required encoded keys, free node or None, {a key as
    json.dumps writes it with ensure_ascii, where that differs: its encoded key}),
    ("array", item node or None, min items, max items or None, the first items' nodes), ("string",), ("pstring",
    min characters, max characters or None, Regex), ("number", integer only), ("bnum", integer only, lower end, upper
    end), ("literal", sorted encoded values); and ("blocks", value node, most blocks or 0) for tool-call blocks
    (JsonSchemaGrammar)."""

    def __init__(self, root: dict):
        self.root = root
        self.nodes: list = [None]
        self.refs: dict[str, int] = {}
        any_object = self.add(("object", {}, frozenset(), ANY, {}))
        any_array = self.add(("array", ANY, 0, None, ()))
        scalars = [self.add(("string",)), self.add(("number", False)),
                   self.add(("literal", tuple(sorted((b"true", b"false", b"null")))))]
        self.nodes[ANY] = ("union", (any_object, any_array, *scalars))

    def add(self, node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def node(self, schema, path: str) -> int:
        if schema is True:
            return ANY
        if not isinstance(schema, dict):
            raise ValueError(f"json schema at {path}: {str(schema)[:40]!r} is not a schema (a dict or true)"
                             if schema is not False else f"json schema at {path}: false matches nothing")
        unknown = sorted(set(schema) - KEYWORDS - ANNOTATIONS)
        if unknown:
            raise ValueError(f"json schema keyword {unknown[0]!r} at {path} is not implemented (structured outputs "
                             f"take: {', '.join(sorted(KEYWORDS))})")
        rules = {k: v for k, v in schema.items() if k in KEYWORDS}
        if "$ref" in rules:
            if len(rules) > 1:
                raise ValueError(f"json schema at {path}: $ref beside {sorted(set(rules) - {'$ref'})[0]!r} is not "
                                 "implemented")
            return self._ref(rules["$ref"], path)
        if "enum" in rules or "const" in rules:
            values = rules["enum"] if "enum" in rules else [rules["const"]]
            if not isinstance(values, list) or not values:
                raise ValueError(f"json schema at {path}: enum must be a non-empty list")
            return self.add(("union", tuple(self._constant(v, path) for v in values)))
        for word in ("anyOf", "oneOf", "allOf"):
            if word in rules:
                subs = rules[word]
                if not isinstance(subs, list) or not subs:
                    raise ValueError(f"json schema at {path}: {word} must be a non-empty list of schemas")
                if len(rules) > 1:
                    raise ValueError(f"json schema at {path}: {word} beside {sorted(set(rules) - {word})[0]!r} is "
                                     "not implemented")
                if word == "allOf" and len(subs) > 1:
                    raise ValueError(f"json schema at {path}: allOf of more than one schema is not implemented")
                return self.add(("union", tuple(self.node(s, f"{path}/{word}/{i}") for i, s in enumerate(subs))))
        kinds = rules.get("type")
        if kinds is None:  # the type from the keywords, or any value
            kinds = ("object" if {"properties", "required", "additionalProperties"} & set(rules) else
                     "array" if {"items", "prefixItems", "additionalItems", "minItems", "maxItems"} & set(rules) else
                     "string" if STRING_KEYWORDS & set(rules) else "number" if NUMBER_KEYWORDS & set(rules) else None)
            if kinds is None:
                return ANY
        if isinstance(kinds, list):
            if not kinds:
                raise ValueError(f"json schema at {path}: type must be a type name or a non-empty list of them")
            return self.add(("union", tuple(self._typed(k, rules, path) for k in kinds)))
        return self._typed(kinds, rules, path)

    def _constant(self, value, path: str) -> int:
        """A node that takes exactly `value`: a string, number, true, false or null as json.dumps writes it (a
        string with or without ensure_ascii), an object's keys in any order, whitespace between tokens as anywhere
        (prune merges a union of literals into one)."""
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise ValueError(f"json schema at {path}: a constant object's keys must be strings")
            index = self.add(None)
            fields = {_encoded(k): self._constant(v, path) for k, v in value.items()}
            self.nodes[index] = ("object", fields, frozenset(fields), None, _aliases(value))
            return index
        if isinstance(value, list):
            return self.add(("array", None, len(value), len(value), tuple(self._constant(v, path) for v in value)))
        forms = {_encoded(value)} | ({json.dumps(value).encode()} if isinstance(value, str) else set())
        return self.add(("literal", tuple(sorted(forms))))

    def _typed(self, kind, rules: dict, path: str) -> int:
        if kind not in TYPES:
            raise ValueError(f"json schema at {path}: type {kind!r} is not one of {', '.join(TYPES)}")
        if kind == "object":
            return self._object(rules, path)
        if kind == "array":
            return self._array(rules, path)
        if kind == "string":
            return self._string(rules, path)
        if kind in ("number", "integer"):
            return self._number(kind == "integer", rules, path)
        return self.add(("literal", (b"false", b"true") if kind == "boolean" else (b"null",)))

    def _array(self, rules: dict, path: str) -> int:
        """An array node: the items at the first positions each of its own schema (`prefixItems`, or draft 4-2019's
        `items` as a list with `additionalItems`), the rest of `items` (false: none)."""
        lo, hi = rules.get("minItems", 0), rules.get("maxItems")
        if not _natural(lo) or not (hi is None or (_natural(hi) and hi >= lo)):
            raise ValueError(f"json schema at {path}: minItems / maxItems must be integers, 0 <= min <= max")
        items, firsts, where = rules.get("items", True), rules.get("prefixItems", []), "items"
        if isinstance(items, list):
            if "prefixItems" in rules:
                raise ValueError(f"json schema at {path}: items as a list beside prefixItems")
            firsts, items, where = items, rules.get("additionalItems", True), "additionalItems"
        elif "additionalItems" in rules:
            raise ValueError(f"json schema at {path}: additionalItems without items as a list (it would have no "
                             "effect)")
        if not isinstance(firsts, list):
            raise ValueError(f"json schema at {path}: prefixItems must be a list of schemas")
        prefix = tuple(self.node(s, f"{path}/{'prefixItems' if where == 'items' else 'items'}/{i}")
                       for i, s in enumerate(firsts))
        item = None if items is False else self.node(items, f"{path}/{where}")
        if item is None:
            hi = len(prefix) if hi is None else min(hi, len(prefix))
            if lo > hi:
                raise ValueError(f"json schema at {path}: minItems {lo} is more than the {hi} items it may have")
        return self.add(("array", item, lo, hi, prefix))

    def _string(self, rules: dict, path: str) -> int:
        """A string node: ("string",) if nothing constrains it, else ("pstring", min characters, max characters or
        None, Regex) (its pattern or format, or ANY_TEXT for lengths alone, which counts characters of valid UTF-8;
        the lengths beside a pattern only where it implies them)."""
        lo, hi = rules.get("minLength", 0), rules.get("maxLength")
        if not _natural(lo) or not (hi is None or (_natural(hi) and hi >= lo)):
            raise ValueError(f"json schema at {path}: minLength / maxLength must be integers, 0 <= min <= max")
        if "pattern" in rules and "format" in rules:
            raise ValueError(f"json schema at {path}: pattern beside format is not implemented")
        regex = None
        if "format" in rules:
            if not isinstance(rules["format"], str) or rules["format"] not in FORMATS:
                raise ValueError(f"json schema at {path}: format {str(rules['format'])[:40]!r} is not implemented "
                                 f"(formats: {', '.join(FORMATS)})")
            regex = compiled(FORMATS[rules["format"]])
        elif "pattern" in rules:
            if not isinstance(rules["pattern"], str):
                raise ValueError(f"json schema at {path}: pattern must be a string")
            try:
                regex = compiled(rules["pattern"])
            except ValueError as e:
                raise ValueError(f"json schema at {path}: pattern: {e}") from None
        if regex is not None:
            if regex.min_chars < lo or (hi is not None and (regex.max_chars is None or regex.max_chars > hi)):
                most = "any number of" if regex.max_chars is None else f"at most {regex.max_chars}"
                raise ValueError(f"json schema at {path}: minLength / maxLength beside a pattern or format are "
                                 f"implemented only where it implies them (its matches have at least "
                                 f"{regex.min_chars} and {most} characters)")
            lo, hi = 0, None
        if regex is None and lo == 0 and hi is None:
            return self.add(("string",))
        return self.add(("pstring", lo, hi, regex or ANY_TEXT))

    def _number(self, integer: bool, rules: dict, path: str) -> int:
        """A number node: ("number", integer only) if nothing bounds it, else ("bnum", integer only, lower end,
        upper end), each end (value as a Fraction, inclusive) or None (an integer's: its integer ends, inclusive).
        An integer's bounds are their exact values (a float bound's binary value: Python compares an int with a float
        exactly); a number's float bounds are the decimals they print as (json.loads reads "0.1" as the float 0.1):
        a value written with more than 15 significant digits within a float's rounding of a bound may parse onto
        it, which a validator comparing floats would judge otherwise."""
        ends = {}
        for word in sorted(NUMBER_KEYWORDS & set(rules)):
            value = rules[word]
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or (isinstance(value, float) and not math.isfinite(value))):
                raise ValueError(f"json schema at {path}: {word} must be a finite number"
                                 + (" (draft 4's boolean exclusiveMinimum / exclusiveMaximum is not implemented)"
                                    if isinstance(value, bool) else ""))
            ends[word] = Fraction(repr(value)) if isinstance(value, float) and not integer else Fraction(value)
        if not ends:
            return self.add(("number", integer))
        lower = upper = None
        for word, inclusive in (("minimum", True), ("exclusiveMinimum", False)):
            if word in ends:
                lower = _tighter(lower, (ends[word], inclusive), 1)
        for word, inclusive in (("maximum", True), ("exclusiveMaximum", False)):
            if word in ends:
                upper = _tighter(upper, (ends[word], inclusive), -1)
        if integer:
            if lower is not None:
                lower = (Fraction(math.ceil(lower[0]) if lower[1] else math.floor(lower[0]) + 1), True)
            if upper is not None:
                upper = (Fraction(math.floor(upper[0]) if upper[1] else math.ceil(upper[0]) - 1), True)
        if not _meets(lower, upper, None, None):
            raise ValueError(f"json schema at {path}: no {'integer' if integer else 'number'} is within its "
                             "minimum / maximum")
        return self.add(("bnum", integer, lower, upper))

    def _object(self, rules: dict, path: str) -> int:
        props, required = rules.get("properties", {}), rules.get("required", [])
        extra = rules.get("additionalProperties", None)
        if not isinstance(props, dict) or not isinstance(required, list):
            raise ValueError(f"json schema at {path}: properties must be a dict and required a list")
        missing = [k for k in required if k not in props]
        if props and extra not in (None, False):
            raise ValueError(f"json schema at {path}: additionalProperties beside properties is not implemented "
                             "(only the listed keys, as OpenAI's strict schemas)")
        if missing and (props or extra is False):
            raise ValueError(f"json schema at {path}: required key {missing[0]!r} is not in properties")
        if missing:
            raise ValueError(f"json schema at {path}: required keys without properties are not implemented")
        free = None if props or extra is False else (ANY if extra in (None, True) else
                                                     self.node(extra, f"{path}/additionalProperties"))
        index = self.add(None)  # (before its children: a $ref inside may come back to it)
        fields = {_encoded(k): self.node(v, f"{path}/properties/{k}") for k, v in props.items()}
        self.nodes[index] = ("object", fields, frozenset(_encoded(k) for k in required), free, _aliases(props))
        return index

    def prune(self, root: int) -> None:
        """Drop what no finite value can complete, so that every configuration the grammar keeps can still end:
        union alternatives and object keys that recurse forever go, an array whose items cannot end takes none.
        A ValueError if the root itself cannot end (e.g. {"$ref": "#"}, or a required key that nests itself)."""
        done = [False] * len(self.nodes)
        changed = True
        while changed:  # the least fixpoint: a node can end once its parts can
            changed = False
            for i, node in enumerate(self.nodes):
                kind = node[0]
                ends = (kind in ("string", "pstring", "number", "bnum", "literal")
                        or (kind == "union" and any(done[a] for a in node[1]))
                        or (kind == "object" and all(done[node[1][k]] for k in node[2]))
                        or (kind == "array" and all(done[_item(node, k)] for k in range(node[2])))
                        or (kind == "blocks" and done[node[1]]))
                if ends and not done[i]:
                    done[i] = changed = True
        if not done[root]:
            raise ValueError("the json schema has no finite instance (every way through it nests itself forever)")
        for i, node in enumerate(self.nodes):
            if node[0] == "union":
                alts = tuple(a for a in node[1] if done[a])
                if all(self.nodes[a][0] == "literal" for a in alts):  # one parse, not one per constant
                    self.nodes[i] = ("literal", tuple(sorted({c for a in alts for c in self.nodes[a][1]})))
                else:
                    self.nodes[i] = ("union", alts)
            elif node[0] == "object":
                free = node[3] if node[3] is not None and done[node[3]] else None
                fields = {k: v for k, v in node[1].items() if done[v]}
                self.nodes[i] = ("object", fields, node[2], free, {a: k for a, k in node[4].items() if k in fields})
            elif node[0] == "array":  # no more items than those that can end
                _, item, lo, hi, prefix = node
                cut = next((k for k in range(len(prefix) + (item is not None)) if not done[_item(node, k)]), None)
                if cut is not None:
                    self.nodes[i] = ("array", item, lo, cut if hi is None else min(hi, cut), prefix)

    def _ref(self, ref, path: str) -> int:
        if ref in self.refs:
            return self.refs[ref]
        target = self.root
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise ValueError(f"json schema at {path}: $ref {str(ref)[:60]!r}: only local refs (#...) are implemented")
        for part in (p for p in ref[1:].split("/") if p):
            part = part.replace("~1", "/").replace("~0", "~")
            index = part.isascii() and part.isdigit() and (part == "0" or part[0] != "0")  # (RFC 6901's form)
            if isinstance(target, list) and index and int(part) < len(target):
                target = target[int(part)]  # (a list's item: "#/anyOf/1", "#/prefixItems/0")
            elif isinstance(target, dict) and part in target:
                target = target[part]
            else:
                raise ValueError(f"json schema at {path}: $ref {ref!r} points at nothing")
        index = self.add(None)  # the ref's own node first: recursion through it ends here
        self.refs[ref] = index
        self.nodes[index] = ("union", (self.node(target, ref),))
        return index


# frames: ("lit", choices, bytes so far), ("str", phase), ("pstr", node, phase, characters so far, regex state,
# \u code so far) (a string with a pattern, format or length), ("num", integer only, part), ("bnum", node, part,
# bytes so far) (a number with bounds), ("obj", node, phase, keys seen, current key), ("arr", node, phase, items so
# far), ("ws", line breaks, bytes since the last one) (a run of whitespace in the container under it), ("blk", node,
# phase, tag bytes matched, blocks so far); a configuration is a tuple of frames, innermost last
_NUMBER_NEXT = {("minus", 0x30): "zero", ("zero", 0x2E): "dot", ("int", 0x2E): "dot", ("zero", 0x65): "e",
                ("zero", 0x45): "e", ("int", 0x65): "e", ("int", 0x45): "e", ("frac", 0x65): "e", ("frac", 0x45): "e",
                ("e", 0x2B): "esign", ("e", 0x2D): "esign"}
_NUMBER_DIGIT = {"start": "int", "minus": "int", "int": "int", "dot": "frac", "frac": "frac", "e": "exp",
                 "esign": "exp", "exp": "exp"}
_NUMBER_ENDS = frozenset(("zero", "int", "frac", "exp"))
# inside a JSON string: the bytes that stand for themselves (1), and what each one-letter escape stands for
PLAIN = bytes(int(b >= 0x20 and b != 0x22 and b != 0x5C) for b in range(256))
_ESCAPES = {0x22: 0x22, 0x5C: 0x5C, 0x2F: 0x2F, 0x62: 0x08, 0x66: 0x0C, 0x6E: 0x0A, 0x72: 0x0D, 0x74: 0x09}
# a tool-call block (Qwen's Hermes format: tool_calls.py) and the separator before each one after the first
TOOL_OPEN, TOOL_CLOSE = b"<tool_call>\n", b"\n</tool_call>"
_TAGS = {"open": TOOL_OPEN, "close": TOOL_CLOSE, "again": b"\n" + TOOL_OPEN}


def _item(array, k: int) -> int:
    """The node of an array node's item at position k."""
    return array[4][k] if k < len(array[4]) else array[1]


def _natural(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _tighter(a, b, sign: int):
    """Of two ends (value, inclusive) or None, the tighter: the larger lower end (sign 1) or the smaller upper end
    (sign -1); at the same value an exclusive one."""
    if a is None or b is None:
        return b if a is None else a
    if a[0] != b[0]:
        return a if (a[0] - b[0]) * sign > 0 else b
    return (a[0], a[1] and b[1])


def _meets(lo, hi, bound_lo, bound_hi) -> bool:
    """Whether the interval lo..hi meets the interval bound_lo..bound_hi (each end (value, inclusive) or None for
    an infinite one)."""
    lo, hi = _tighter(lo, bound_lo, 1), _tighter(hi, bound_hi, -1)
    return lo is None or hi is None or lo[0] < hi[0] or (lo[0] == hi[0] and lo[1] and hi[1])


def _number_can_end(text: bytes, integer: bool, lo, hi) -> bool:
    """Whether a number that begins with `text` (JSON's syntax without an exponent; at least one byte) can end
    within lo..hi (ends as in _meets; an integer's are integers, inclusive)."""
    neg = text[:1] == b"-"
    body = text[neg:].decode()

    def meets(a, b) -> bool:  # values of magnitude a..b (b not included), with the text's sign
        return _meets((-b, False), (-a, True), lo, hi) if neg else _meets((a, True), (b, False), lo, hi)

    if not body:  # "-": any value <= 0 (-0 is 0)
        return _meets(None, (Fraction(0), True), lo, hi)
    if "." in body:
        whole, frac = body.split(".")
        v = int(whole) + Fraction(int(frac or "0"), 10 ** len(frac))
        return meets(v, v + Fraction(1, 10 ** len(frac)))  # v and what more digits give
    d = int(body)
    value = Fraction(-d if neg else d)
    if _meets((value, True), (value, True), lo, hi):  # the number ends here
        return True
    if not integer and meets(d, d + 1):  # d.xxx
        return True
    if d == 0:  # no digit after a leading 0
        return False
    k = 10
    while True:  # d followed by more digits: d*10^j .. (d+1)*10^j, j = 1, 2, ...
        if (lo if neg else hi) is None:
            return True
        if (neg and -d * k < lo[0]) or (not neg and d * k > hi[0]):
            return False
        if meets(d * k, (d + 1) * k):
            return True
        k *= 10


def _number_part(part: str, b: int, integer: bool):
    """A number's part after byte b (JSON's number syntax), or None."""
    if part == "start":
        return "minus" if b == 0x2D else "zero" if b == 0x30 else "int" if b in DIGITS else None
    if b in DIGITS and part != "zero" and not (part == "minus" and b == 0x30):
        return _NUMBER_DIGIT[part]
    nxt = _NUMBER_NEXT.get((part, b))
    return None if integer and nxt in ("dot", "e") else nxt


def _some_code(regex, state, lo: int, hi: int) -> bool:
    """Whether some character lo..hi (not a surrogate) can follow `state` of `regex`."""
    pieces = [(a, b) for a, b in ((lo, min(hi, 0xD7FF)), (max(lo, 0xE000), hi)) if a <= b]

    def walk(s, seq) -> bool:
        if not seq:
            return True
        a, b = seq[0]
        return any((t := regex.step(s, x)) is not None and walk(t, seq[1:]) for x in range(a, b + 1))

    return any(walk(state, seq) for a, b in pieces for seq in utf8_sequences(a, b))


def _spellable(regex, state, lo: int, hi: int) -> bool:
    """Whether a \\u escape of a code unit in lo..hi can begin a character that may follow `state`: a character
    itself, or a high surrogate (U+D800-U+DBFF) whose pairs spell one (a low surrogate alone: never)."""
    if _some_code(regex, state, lo, hi):
        return True
    a, b = max(lo, 0xD800), min(hi, 0xDBFF)
    return a <= b and _some_code(regex, state, 0x10000 + (a - 0xD800) * 0x400, 0x10000 + (b - 0xD800) * 0x400 + 0x3FF)


def _whitespace(run, b: int):
    """A whitespace run's frame after byte b (run None: b starts it), or None past the bounds."""
    lines, column = run[1:] if run is not None else (0, 0)
    if b == 0x0A:
        return ("ws", lines + 1, 0) if lines < MAX_NEWLINES else None
    return ("ws", lines, column + 1) if column < MAX_INDENT else None


def _order(config) -> tuple[int, str]:
    """A sort key of a configuration: the shallowest first, then an order that is the same in every process (a
    frozenset's order is not)."""
    return len(config), repr([[sorted(x) if isinstance(x, frozenset) else x for x in frame] for frame in config])


class JsonSchemaGrammar:
    """A JSON value that a schema (the subset in the module's docstring) accepts, byte by byte."""

    def __init__(self, schema: dict, blocks: int | None = None, whitespace: bool = True):
        """blocks: None, the value alone; else the output is 1 to `blocks` (0: any number of) tool-call blocks in
        Qwen's Hermes format, each a value of the schema: "<tool_call>\\n" value "\\n</tool_call>", joined by
        "\\n" (tool_calls.py reads them back). whitespace=False: none between tokens either (compact JSON, vLLM's
        disable_any_whitespace)."""
        if not isinstance(schema, dict):
            raise ValueError(f"a json schema must be a dict, got {type(schema).__name__}")
        try:
            key = json.dumps(schema, sort_keys=True)
        except (TypeError, ValueError) as e:  # (an enum value or a key json cannot write)
            raise ValueError(f"the json schema is not JSON: {e}") from None
        compiler = _Compiler(schema)
        root = compiler.node(schema, "#")
        if blocks is not None:
            root = compiler.add(("blocks", root, blocks))
        compiler.prune(root)
        self.nodes = compiler.nodes
        self.whitespace = whitespace
        self.key = ("json_schema", key, blocks, whitespace)
        self._escapes: dict = {}  # ("escape", string node, regex state) -> whether an escape may follow
        self.start = frozenset(self._expand([(frame,) for frame in self._starts(root)]))

    # ---- the grammar's interface (structured.py) --------------------------------------------------------------
    @staticmethod
    def accepting(state) -> bool:
        return () in state

    def shortcut(self, state):
        """Inside a string in every configuration, with the same bytes leaving each as it is (a string with lengths
        only once it counts no more: past its minLength, with no maxLength): those bytes (1 each in 256), for
        TokenIndex to take a run of them at once. Else None."""
        loops = None
        for config in state:
            frame = config[-1] if config else None
            if frame == ("str", "in"):
                mine = PLAIN
            elif (frame is not None and frame[0] == "pstr" and frame[2] == "in" and self.nodes[frame[1]][2] is None
                  and frame[3] >= self.nodes[frame[1]][1]):
                mine = self.nodes[frame[1]][3].loops(frame[4], PLAIN)
            else:
                return None
            if loops is not None and mine != loops:
                return None
            loops = mine
        return loops if loops is not None and any(loops) else None

    def dfa(self, state):
        """One configuration, inside a string with a pattern or lengths: (its regex, the regex's state, the bytes that
        go through it (plain string bytes), the most characters more or None, and a function of a regex state and a
        number of characters more -> the grammar's state), for TokenIndex to run the regex over many tokens at
        once. Else None."""
        if len(state) != 1:
            return None
        (config,) = state
        frame = config[-1] if config else None
        if frame is None or frame[0] != "pstr" or frame[2] != "in":
            return None
        node, count, rest = frame[1], frame[3], config[:-1]
        _, lo, hi, regex = self.nodes[node]

        def resume(rstate, chars: int):  # the state after `chars` more characters that left the regex in rstate
            n = count + chars if hi is not None else min(count + chars, lo)
            return frozenset((rest + (("pstr", node, "in", n, rstate, 0),),))

        return regex, frame[4], PLAIN, None if hi is None else hi - count, resume

    def step(self, state, b: int):
        """The next state (at most MAX_CONFIGURATIONS configurations), or None: no configuration takes the byte."""
        out = set()
        for config in state:
            if config:
                out.update(self._expand(self._step(config, b)))
        if len(out) > MAX_CONFIGURATIONS:  # the first ones in an order that does not depend on hashing
            out = sorted(out, key=_order)[:MAX_CONFIGURATIONS]
        return frozenset(out) if out else None

    # ---- configurations ---------------------------------------------------------------------------------------
    def _starts(self, node: int, seen=None) -> list:
        """The frames a value of `node` starts with (a union: each alternative's)."""
        kind = self.nodes[node]
        if kind[0] == "union":
            seen = set() if seen is None else seen
            if node in seen:
                return []
            seen.add(node)
            return [f for alt in kind[1] for f in self._starts(alt, seen)]
        if kind[0] == "literal":
            return [("lit", kind[1], b"")]
        if kind[0] == "string":
            return [("str", "start")]
        if kind[0] == "pstring":
            return [("pstr", node, "start", 0, kind[3].start, 0)]
        if kind[0] == "number":
            return [("num", kind[1], "start")]
        if kind[0] == "bnum":
            return [("bnum", node, "start", b"")]
        if kind[0] == "object":
            return [("obj", node, "start", frozenset(), None)]
        if kind[0] == "blocks":
            return [("blk", node, "open", 0, 0)]
        return [("arr", node, "start", 0)]

    def _expand(self, configs):
        """Each configuration, and where its innermost value may be complete, the configuration with that value
        popped (its container moves on; the outermost value popped leaves ()); a value that must be complete (a
        closed string, object or array, a literal no longer one can extend) only popped."""
        todo, out = list(configs), []
        while todo:
            config = todo.pop()
            if not config:
                out.append(config)
                continue
            done = self._complete(config[-1])
            if done != "must":
                out.append(config)
            if done:
                todo.append(self._pop(config))
        return out

    def _complete(self, frame):
        """None (not a whole value yet), "may" (whole, and may go on) or "must" (whole, and can take no more)."""
        kind = frame[0]
        if kind == "lit":
            choices, sofar = frame[1], frame[2]
            if sofar not in choices:
                return None
            return "may" if any(len(c) > len(sofar) and c.startswith(sofar) for c in choices) else "must"
        if kind == "num":
            return "may" if frame[2] in _NUMBER_ENDS else None
        if kind == "bnum":
            if frame[2] not in _NUMBER_ENDS:
                return None
            _, _, lo, hi = self.nodes[frame[1]]
            value = Fraction(frame[3].decode())
            return "may" if _meets((value, True), (value, True), lo, hi) else None
        if kind == "pstr":
            return None
        if kind == "str":
            return "must" if frame[1] == "end" else None
        if kind == "ws":
            return None
        if kind == "blk":  # after a block's closing tag: whole, and another block may follow unless at the limit
            if frame[2] != "after":
                return None
            limit = self.nodes[frame[1]][2]
            return "must" if limit and frame[4] >= limit else "may"
        return "must" if frame[2] == "end" else None

    def _pop(self, config):
        child, rest = config[-1], config[:-1]
        if not rest:
            return ()
        parent = rest[-1]
        if parent[0] == "blk":  # the block's value: its closing tag next
            return rest[:-1] + (("blk", parent[1], "close", 0, parent[4]),)
        if parent[0] == "arr":
            return rest[:-1] + (("arr", parent[1], "after", parent[3] + 1),)
        _, node, phase, seen, key = parent
        if phase == "key":  # the key's bytes: a declared key's literal, as encoded (a free key is not kept)
            key = self.nodes[node][4].get(child[2], child[2]) if child[0] == "lit" else None
            return rest[:-1] + (("obj", node, "colon", seen, key),)
        return rest[:-1] + (("obj", node, "after", seen | {key} if key is not None else seen, None),)

    def _push(self, rest, parent, node_or_frames, b: int) -> list:
        """The parent (now waiting on its child) with a child value's first frames, each stepped with byte b."""
        frames = self._starts(node_or_frames) if isinstance(node_or_frames, int) else node_or_frames
        out = []
        for frame in frames:
            out += self._step(rest + (parent, frame), b)
        return out

    def _pstring(self, frame, rest, b: int) -> list:
        """A string with a pattern (format) or lengths: its characters, each escape decoded, go through the regex
        and are counted; it closes only where both allow. A \\u escape takes a hex digit only if some character it
        can still spell may follow: a character of U+0000-U+FFFF, or past them as a surrogate pair (a high surrogate,
        then "\\u" and a low one; a lone surrogate is not taken)."""
        _, node, phase, count, rstate, code = frame
        _, lo, hi, regex = self.nodes[node]
        if phase == "start":
            return [rest + (("pstr", node, "in", 0, rstate, 0),)] if b == 0x22 else []
        if phase == "in":
            if b == 0x22:
                return [rest + (("str", "end"),)] if count >= lo and regex.accepting(rstate) else []
            if b == 0x5C:  # an escape: only where one more character may come, and one an escape can spell
                return [rest + (("pstr", node, "esc", count, rstate, 0),)] if self._escapable(frame) else []
            return self._character(rest, node, count + (b & 0xC0 != 0x80), rstate, bytes((b,))) if b >= 0x20 else []
        if phase == "esc":
            if b == 0x75:
                return [rest + (("pstr", node, 4, count, rstate, 0),)]
            char = _ESCAPES.get(b)
            return self._character(rest, node, count + 1, rstate, bytes((char,))) if char is not None else []
        if phase == "pair":  # after a high surrogate: the low one's "\\u"
            return [rest + (("pstr", node, "pairu", count, rstate, code),)] if b == 0x5C else []
        if phase == "pairu":
            return [rest + (("pstr", node, -4, count, rstate, code << 16),)] if b == 0x75 else []
        if b not in HEX:
            return []
        if phase < 0:  # the low surrogate's digits: code is high << 16 | the low one's digits so far
            high, low, left = code >> 16, (code & 0xFFFF) * 16 + int(chr(b), 16), -phase - 1
            first, last = max(low << 4 * left, 0xDC00), min((low << 4 * left) + (1 << 4 * left) - 1, 0xDFFF)
            base = 0x10000 + (high - 0xD800) * 0x400 - 0xDC00
            if first > last or not _some_code(regex, rstate, base + first, base + last):
                return []
            if left:
                return [rest + (("pstr", node, phase + 1, count, rstate, high << 16 | low),)]
            return self._character(rest, node, count + 1, rstate, chr(base + low).encode("utf-8"))
        code = code * 16 + int(chr(b), 16)
        if phase > 1:
            span = 16 ** (phase - 1)
            if not _spellable(regex, rstate, code * span, code * span + span - 1):
                return []
            return [rest + (("pstr", node, phase - 1, count, rstate, code),)]
        if 0xD800 <= code <= 0xDBFF:
            spells = _spellable(regex, rstate, code, code)
            return [rest + (("pstr", node, "pair", count, rstate, code),)] if spells else []
        if 0xDC00 <= code <= 0xDFFF:
            return []
        return self._character(rest, node, count + 1, rstate, chr(code).encode("utf-8"))

    def _escapable(self, frame) -> bool:
        _, node, _, count, rstate, _ = frame
        _, _, hi, regex = self.nodes[node]
        if hi is not None and count >= hi:
            return False
        key = ("escape", node, rstate)
        if key not in self._escapes:
            if len(self._escapes) >= 4096:
                self._escapes.clear()
            self._escapes[key] = _spellable(regex, rstate, 0, 0xFFFF)
        return self._escapes[key]

    def _character(self, rest, node: int, count: int, rstate, data: bytes) -> list:
        _, lo, hi, regex = self.nodes[node]
        if hi is not None and count > hi:
            return []
        for x in data:
            rstate = regex.step(rstate, x)
            if rstate is None:
                return []
        if hi is None and count > lo:
            count = lo  # (past its minimum with no maximum: the count no longer matters)
        return [rest + (("pstr", node, "in", count, rstate, 0),)]

    def _step(self, config, b: int) -> list:
        frame, rest = config[-1], config[:-1]
        kind = frame[0]
        if kind == "ws":  # a run of whitespace in a container, then its next token
            if b in WHITESPACE:
                run = _whitespace(frame, b)
                return [rest + (run,)] if run is not None else []
            return self._step(rest, b)
        if kind == "lit":
            nxt = frame[2] + bytes((b,))
            return [rest + (("lit", frame[1], nxt),)] if any(c.startswith(nxt) for c in frame[1]) else []
        if kind == "str":
            phase = frame[1]
            if phase == "start":
                return [rest + (("str", "in"),)] if b == 0x22 else []
            if phase == "in":
                if b == 0x22:
                    return [rest + (("str", "end"),)]
                if b == 0x5C:
                    return [rest + (("str", "esc"),)]
                return [config] if b >= 0x20 else []
            if phase == "esc":
                if b in ESCAPED:
                    return [rest + (("str", "in"),)]
                return [rest + (("str", 4),)] if b == 0x75 else []
            if isinstance(phase, int) and b in HEX:
                return [rest + (("str", "in" if phase == 1 else phase - 1),)]
            return []
        if kind == "num":
            nxt = _number_part(frame[2], b, frame[1])
            return [rest + (("num", frame[1], nxt),)] if nxt is not None else []
        if kind == "bnum":  # no exponent; only bytes after which the number can still end within its bounds
            _, node, part, text = frame
            _, integer, lo, hi = self.nodes[node]
            nxt = _number_part(part, b, integer)
            if nxt is None or nxt == "e" or not _number_can_end(text + bytes((b,)), integer, lo, hi):
                return []
            return [rest + (("bnum", node, nxt, text + bytes((b,))),)]
        if kind == "pstr":
            return self._pstring(frame, rest, b)
        if kind == "blk":
            _, node, phase, pos, count = frame
            if phase == "value":
                return self._push(rest, ("blk", node, "call", 0, count), self.nodes[node][1], b)
            if phase == "after":
                phase, pos = "again", 0
            tag = _TAGS[phase]
            if b != tag[pos]:
                return []
            if pos + 1 < len(tag):
                return [rest + (("blk", node, phase, pos + 1, count),)]
            return [rest + (("blk", node, "after" if phase == "close" else "value", 0, count + (phase == "close")),)]
        if kind == "arr":
            _, node, phase, count = frame
            _, _, lo, hi, _ = self.nodes[node]
            if phase == "start":
                return [rest + (("arr", node, "open", 0),)] if b == 0x5B else []
            if b in WHITESPACE and phase in ("open", "after", "comma") and self.whitespace:
                return [config + (_whitespace(None, b),)]
            if phase == "open" and b == 0x5D:
                return [rest + (("arr", node, "end", 0),)] if lo == 0 else []
            if phase == "comma" or (phase == "open" and hi != 0):
                return self._push(rest, ("arr", node, "item", count), _item(self.nodes[node], count), b)
            if phase == "after":
                if b == 0x2C and (hi is None or count < hi):
                    return [rest + (("arr", node, "comma", count),)]
                if b == 0x5D and count >= lo:
                    return [rest + (("arr", node, "end", count),)]
            return []
        # an object
        _, node, phase, seen, key = frame
        _, fields, required, free, aliases = self.nodes[node]
        if phase == "start":
            return [rest + (("obj", node, "open", seen, None),)] if b == 0x7B else []
        if b in WHITESPACE and phase in ("open", "colon", "value", "after", "comma") and self.whitespace:
            return [config + (_whitespace(None, b),)]
        if phase in ("open", "comma") and b == 0x22:
            waiting = ("obj", node, "key", seen, None)
            left = tuple(sorted([k for k in fields if k not in seen]
                                + [a for a, k in aliases.items() if k not in seen]))  # (either form of a key)
            keys = ([("lit", left, b"")] if left else []) + ([("str", "start")] if free is not None else [])
            return self._push(rest, waiting, keys, b)
        if phase == "open" and b == 0x7D:
            return [rest + (("obj", node, "end", seen, None),)] if not required else []
        if phase == "colon":
            return [rest + (("obj", node, "value", seen, key),)] if b == 0x3A else []
        if phase == "value":
            return self._push(rest, ("obj", node, "field", seen, key), fields[key] if key is not None else free, b)
        if phase == "after":
            if b == 0x2C and (free is not None or len(seen) < len(fields)):
                return [rest + (("obj", node, "comma", seen, None),)]
            if b == 0x7D and required <= seen:
                return [rest + (("obj", node, "end", seen, None),)]
        return []


JSON_OBJECT = JsonSchemaGrammar({"type": "object"})  # StructuredOutputs(json_object=True): any JSON object
COMPACT_JSON_OBJECT = JsonSchemaGrammar({"type": "object"}, whitespace=False)  # ... with disable_any_whitespace

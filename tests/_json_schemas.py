"""JSON schemas for tests/test_structured_output.py: nested objects, arrays, enums, anyOf,
string formats and patterns, bounded numbers. Each bounds its strings and arrays, so that even
a random-weight model ends every output within the tests' token budget; the formats are those
that both xgrammar enforces exactly and jsonschema checks (docs/structured_output.md lists the
others)."""
from __future__ import annotations


def S(n: int = 8) -> dict:
    return {"type": "string", "maxLength": n}


SCHEMAS = [
    # flat objects, bounded scalars
    {"type": "object", "properties": {"name": S(), "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "none": {"type": "null"}}, "required": ["ok", "none"]},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.5}}, "required": ["x"]},
    {"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20}},
     "required": ["n"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": -999, "maximum": -100}}, "required": ["n"]},
    {"type": "object", "properties": {"s": {"type": "string", "minLength": 3, "maxLength": 5}}, "required": ["s"]},
    {"type": "object", "properties": {"a": S(4), "b": S(4), "c": S(4)}, "required": ["a", "c"]},
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9},
                                       "note": S(6)}, "required": ["id"], "additionalProperties": False},
    # enums and consts
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"v": {"enum": [1, "two", None, True, 3.5]}}, "required": ["v"]},
    {"type": "object", "properties": {"kind": {"const": "point"}, "x": {"type": "integer", "minimum": 0, "maximum": 9}},
     "required": ["kind", "x"]},
    {"enum": ["alpha", "beta", "gamma"]},
    # arrays
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 4},
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 3},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S(5), "maxItems": 3}}, "required": ["tags"]},
    {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}],
     "items": False},
    {"type": "object", "properties": {"m": {"type": "array", "items": {"type": "array", "items": {
        "type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2}, "maxItems": 2}}, "required": ["m"]},
    # nested objects
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": S(), "id": {"type": "string", "format": "uuid"}}, "required": ["name"]}},
     "required": ["user"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "integer", "minimum": 0, "maximum": 5}}, "required": ["c"]}}, "required": ["b"]}},
     "required": ["a"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": S(5), "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"]}}}, "required": ["items"]},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                       "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                      "required": ["x", "y"]}},
     "type": "object", "properties": {"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}},
     "required": ["from", "to"]},
    # anyOf / oneOf / nullable
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 3}]},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "null"}, {"type": "boolean"},
                                                      {"enum": ["x", "y"]}]}}, "required": ["v"]},
    {"type": "object", "properties": {"shape": {"oneOf": [
        {"type": "object", "properties": {"r": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["r"]},
        {"type": "object", "properties": {"w": {"type": "integer", "minimum": 10, "maximum": 19}}, "required": ["w"]}]}},
     "required": ["shape"]},
    {"type": "object", "properties": {"maybe": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}},
     "required": ["maybe"]},
    # string formats and patterns
    {"type": "object", "properties": {"ip": {"type": "string", "format": "ipv6"}}, "required": ["ip"]},
    {"type": "object", "properties": {"u": {"type": "string", "format": "uuid"}}, "required": ["u"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}, "required": ["code"]},
    {"type": "object", "properties": {"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}, "required": ["hex"]},
    {"type": "object", "properties": {"flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
                                       "level": {"enum": ["low", "high"]}}, "required": ["flags", "level"]},
    {"type": "integer", "minimum": 0, "maximum": 1000000},
    {"type": "object", "properties": {"opt": S(3), "num": {"type": "integer", "minimum": 0, "maximum": 9}}},
    {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "string", "format": "uuid"},
                                             "minItems": 1, "maxItems": 2}}, "required": ["ids"]},
]

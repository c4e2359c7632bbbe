"""The JSON Schema subset check and the schema → grammar cache of router/structured.py."""

from __future__ import annotations

import pytest

from llamapool import errors
from llamapool.router import structured

P = "response_format.json_schema.schema"


def test_a_supported_schema_converts_once():
    schema = {
        "title": "Person",
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 40},
            "age": {"type": "integer", "description": "years"},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 4},
            "born": {"type": "string", "format": "date"},
        },
        "required": ["name", "age"],
        "$defs": {"tag": {"enum": ["a", "b"]}},
    }
    structured._grammar_of.cache_clear()
    grammar = structured.schema_grammar(schema, P)
    assert "root ::=" in grammar
    assert structured.schema_grammar(dict(schema), P) == grammar
    info = structured._grammar_of.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    assert schema["properties"]["tags"]["items"] == {"$ref": "#/$defs/tag"}  # not resolved in place


def test_property_order_is_part_of_the_cache_key():
    props = {"x": {"type": "integer"}, "y": {"type": "integer"}}
    a = {"type": "object", "properties": props, "required": ["x", "y"]}
    b = {"type": "object", "properties": dict(reversed(props.items())), "required": ["x", "y"]}

    def root(schema) -> str:
        (line,) = [r for r in structured.schema_grammar(schema, P).splitlines() if r[:4] == "root"]
        return line

    assert root(a).index("x-kv") < root(a).index("y-kv")
    assert root(b).index("y-kv") < root(b).index("x-kv")


def test_json_strings_exclude_control_characters():
    grammar = structured.schema_grammar({"type": "string"}, P)
    assert r"\x00-\x1F" in grammar


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"type": "integer", "minimum": 0}, ".minimum"),
        ({"type": "object", "properties": {"a": {"multipleOf": 2}}}, ".properties.a.multipleOf"),
        ({"anyOf": [{"type": "string"}, {"uniqueItems": True}]}, ".anyOf[1].uniqueItems"),
        ({"type": "array", "items": {"type": "thing"}}, ".items.type"),
        ({"$ref": "other.json#/a"}, ".$ref"),
        ({"type": "string", "format": "email"}, ".format"),
        ({"type": "object", "required": ["a"]}, ".required"),
        ({"type": "array", "maxItems": -1}, ".maxItems"),
        ([1, 2], ""),
    ],
)
def test_unsupported_keywords_are_refused_by_path(schema, where):
    with pytest.raises(errors.InvalidRequest) as e:
        structured.schema_grammar(schema, P)
    assert e.value.param == P + where


def test_a_schema_the_converter_rejects_is_a_400():
    with pytest.raises(errors.InvalidRequest) as e:
        structured.schema_grammar({"type": "string", "pattern": "(unclosed"}, P)
    assert e.value.param == P and "grammar" in e.value.message

"""Structured outputs: JSON mode and JSON Schema, as grammars the worker samples under.

A JSON Schema becomes GBNF through llama-cpp-python's converter (a port of llama.cpp's
json_schema_to_grammar.py), once per distinct schema: the grammar text travels in the
request and the worker parses each distinct text once. The converter ignores keywords it
does not know, so a schema is first checked against the subset it enforces and anything
else is refused with a 400 naming the keyword's path: a schema the output might not
satisfy is never accepted silently.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from llamapool import errors
from llamapool.config import ModelSpec
from llamapool.pool import llama_adapter
from llamapool.pool.prepare import chats_through_handler
from llamapool.router.schemas import ResponseFormat

# What the grammar enforces, and what only annotates (both accepted anywhere).
SUPPORTED_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "$defs",
        "definitions",
        "pattern",
        "format",
        "minLength",
        "maxLength",
    }
)
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
    }
)
TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid3", "uuid4", "uuid5"})
_MAX_DEPTH = 64
# JSON mode: any JSON object (llama-server builds it from the same schema).
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


def check_schema(schema: Any, param: str, *, refs: bool = True) -> None:
    """Refuse (400 naming the path) what the grammar would not enforce in `schema`."""
    _check(schema, param, refs, 0)


def _refuse(param: str, message: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(f"`{param}` {message}", param=param)


def _check(node: Any, path: str, refs: bool, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise _refuse(path, f"is nested deeper than {_MAX_DEPTH} levels")
    if not isinstance(node, dict):
        raise _refuse(path, "must be a JSON Schema object")
    for key, value in node.items():
        at = f"{path}.{key}"
        if key in ANNOTATIONS:
            continue
        if key not in SUPPORTED_KEYWORDS:
            raise _refuse(
                at,
                "is not supported in JSON Schemas here (the output could not be held to it); "
                f"supported: {', '.join(sorted(SUPPORTED_KEYWORDS))}",
            )
        if key == "type":
            names = value if isinstance(value, list) else [value]
            if not names or not all(isinstance(n, str) and n in TYPES for n in names):
                raise _refuse(at, f"must be one of {', '.join(sorted(TYPES))} (or a list of them)")
        elif key in ("properties", "$defs", "definitions"):
            if not isinstance(value, dict):
                raise _refuse(at, "must be an object of schemas")
            for name, sub in value.items():
                _check(sub, f"{at}.{name}", refs, depth + 1)
        elif key == "required":
            known = node.get("properties") or {}
            if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
                raise _refuse(at, "must be a list of property names")
            if missing := [n for n in value if n not in known]:
                raise _refuse(at, f"names {missing[0]!r}, which `properties` does not define")
        elif key == "additionalProperties":
            if not isinstance(value, bool):
                _check(value, at, refs, depth + 1)
        elif key in ("items", "prefixItems", "anyOf", "oneOf", "allOf"):
            subs = value if isinstance(value, list) else [value]
            if key != "items" and (not isinstance(value, list) or not value):
                raise _refuse(at, "must be a non-empty list of schemas")
            for i, sub in enumerate(subs):
                _check(sub, f"{at}[{i}]" if isinstance(value, list) else at, refs, depth + 1)
        elif key in ("minItems", "maxItems", "minLength", "maxLength"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _refuse(at, "must be a non-negative integer")
        elif key == "$ref":
            if not refs:
                raise _refuse(at, "is not supported here; write the schema inline")
            if not isinstance(value, str) or not value.startswith("#/"):
                raise _refuse(at, "must be a local reference (starting with `#/`)")
        elif key == "format":
            if value not in FORMATS:
                raise _refuse(at, f"must be one of {', '.join(sorted(FORMATS))}")
        elif key == "pattern" and not isinstance(value, str):
            raise _refuse(at, "must be a string")


def schema_grammar(schema: dict[str, Any], param: str) -> str:
    """The GBNF for `schema` (checked first); a 400 naming `param` if it cannot convert."""
    check_schema(schema, param)
    key = msgspec.json.encode(schema)  # property order matters to the grammar: not sorted
    try:
        return _grammar_of(key)
    except Exception as exc:  # the converter's assertions and ValueErrors
        raise _refuse(param, f"cannot be turned into a grammar: {exc}") from None


@functools.lru_cache(maxsize=256)
def _grammar_of(schema_json: bytes) -> str:
    return llama_adapter.json_schema_grammar(msgspec.json.decode(schema_json))


def check_constrainable(spec: ModelSpec, param: str) -> None:
    """Refuse constrained output for models the one-at-a-time engine serves."""
    cfg = spec.config
    if cfg.embedding or chats_through_handler(cfg):
        raise errors.InvalidRequest(
            f"model {spec.id!r} cannot constrain its output (it runs through "
            "llama-cpp-python's own chat handler or is an embedding model)",
            param=param,
        )


def response_grammar(fmt: ResponseFormat | None) -> str | None:
    """The grammar a chat request's `response_format` asks for; None for plain text."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object" or fmt.json_schema is None or fmt.json_schema.schema is None:
        return schema_grammar(JSON_OBJECT_SCHEMA, "response_format")
    return schema_grammar(fmt.json_schema.schema, "response_format.json_schema.schema")

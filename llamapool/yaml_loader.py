"""models.yaml's YAML: PyYAML's safe loader, without duplicate keys, with YAML 1.2 floats."""

from __future__ import annotations

import re
from typing import Any

import yaml

# YAML 1.2 floats; PyYAML (YAML 1.1) reads `1e3` and `1.0e3` as strings.
# A point or an exponent is required: `0800` stays what PyYAML made of it.
_YAML12_FLOAT = re.compile(
    r"^[-+]?(?:(?:\.[0-9]+|[0-9]+\.[0-9]*)(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)$"
)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys and reading YAML 1.2 floats (`1e3`)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                # Keys merged in with `<<:` may be overridden; that is the point of them.
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:
                    continue  # an unhashable key; the base class reports it
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


# Appended after PyYAML's int resolver, so `10` stays an int.
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+.0123456789"))


def read_yaml(text: str) -> Any:
    """The document in `text`; yaml.YAMLError names what is wrong and where."""
    return yaml.load(text, Loader=_Loader)

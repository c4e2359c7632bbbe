"""The adapter is llamapool's only contact with llama-cpp-python, and what it offers works."""

from __future__ import annotations

import ast
import pathlib

import pytest

import llamapool
from llamapool.config import parse_config
from llamapool.pool import llama_adapter

PACKAGE = pathlib.Path(llamapool.__file__).parent
ADAPTER = pathlib.Path(llama_adapter.__file__)
# Attributes llama-cpp-python keeps private on Llama and its internal wrappers.
PRIVATE = {"_model", "_ctx", "_chat_handlers", "_input_ids", "_batch", "_n_vocab", "_internals"}


def _contacts(path: pathlib.Path) -> list[str]:
    """Where a module imports llama_cpp or reads one of its private attributes."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        found += [
            f"{path.name}:{node.lineno} imports {n}" for n in names if n.startswith("llama_cpp")
        ]
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE:
            found.append(f"{path.name}:{node.lineno} reads .{node.attr}")
        if isinstance(node, ast.Attribute) and node.attr == "__closure__":
            found.append(f"{path.name}:{node.lineno} reads .__closure__")
    return found


def test_only_the_adapter_touches_llama_cpp():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert ADAPTER in modules
    elsewhere = [c for m in modules if m != ADAPTER for c in _contacts(m)]
    assert elsewhere == []
    # The scan itself sees what it looks for.
    assert any("imports llama_cpp" in c for c in _contacts(ADAPTER))
    assert any("reads ._model" in c for c in _contacts(ADAPTER))


@pytest.fixture(scope="module")
def llama(tiny_gguf):
    cfg = parse_config({"models": [{"id": "t", "config": {"model_path": str(tiny_gguf)}}]})
    llm = llama_adapter.open_llama(cfg.models["t"].config, n_ctx=64)
    yield llm
    llm.close()


def test_the_gguf_template_gives_the_formatter(llama):
    formatter = llama_adapter.chat_formatter(llama)
    prompt = formatter(messages=[{"role": "user", "content": "hi"}]).prompt
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_named_formats_with_and_without_a_formatter():
    assert not llama_adapter.handler_only("chatml")
    assert llama_adapter.handler_only("chatml-function-calling")
    assert not llama_adapter.handler_only("no-such-format")

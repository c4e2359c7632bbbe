"""The adapter is llamapool's only contact with llama-cpp-python, and what it offers works."""

from __future__ import annotations

import ast
import pathlib

import llama_cpp
import pytest

import llamapool
from llamapool.config import load_config, parse_config
from llamapool.pool import llama_adapter
from llamapool.pool.batch import BatchEngine
from llamapool.pool.engine import Engine

PACKAGE = pathlib.Path(llamapool.__file__).parent
ADAPTER = pathlib.Path(llama_adapter.__file__).parent  # the adapter package
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
    inside = [m for m in modules if ADAPTER in m.parents]
    assert len(inside) > 1
    elsewhere = [c for m in modules if m not in inside for c in _contacts(m)]
    assert elsewhere == []
    # The scan itself sees what it looks for.
    contacts = [c for m in inside for c in _contacts(m)]
    assert any("imports llama_cpp" in c for c in contacts)
    assert any("reads ._model" in c for c in contacts)


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


def _spec(path, **config):
    entry = {"id": "t", "config": {"model_path": str(path), "n_ctx": 128, **config}}
    return parse_config({"models": [entry]}).models["t"]


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("auto", llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO),
        ("on", llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED),
        ("off", llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED),
    ],
)
def test_flash_attn_reaches_every_context(tiny_gguf, setting, expected):
    batching = BatchEngine(_spec(tiny_gguf, flash_attn=setting, n_parallel=2))
    try:
        assert batching.context.flash_attn_type == expected
        assert llama_adapter.context_flash_attn_type(batching.llama) == expected
    finally:
        batching.close()
    single = Engine(_spec(tiny_gguf, flash_attn=setting, embedding=True))
    assert llama_adapter.context_flash_attn_type(single.llama) == expected
    # The context it decodes in works: the embedding goes through it.
    assert single.llama.embed("hello")


def test_flash_attn_defaults_to_auto_and_takes_yaml_booleans(tmp_path, tiny_gguf):
    assert _spec(tiny_gguf).config.flash_attn == "auto"
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        f"  - {{id: a, config: {{model_path: {tiny_gguf}, flash_attn: on}}}}\n"
        f"  - {{id: b, config: {{model_path: {tiny_gguf}, flash_attn: off}}}}\n"
        f"  - {{id: c, config: {{model_path: {tiny_gguf}, flash_attn: maybe}}}}\n"
    )
    cfg = load_config(path)
    assert cfg.models["a"].config.flash_attn == "on"
    assert cfg.models["b"].config.flash_attn == "off"
    assert cfg.broken["c"] == "model 'c': config.flash_attn: 'maybe' is not one of auto, on, off"
    entry = {"id": "d", "config": {"model_path": str(tiny_gguf), "flash_attn": 1}}
    assert "model 'd': config.flash_attn" in parse_config({"models": [entry]}).broken["d"]


def test_the_vocab_answers_as_llama_does_asked_twice(llama):
    vocab = llama_adapter.Vocab(llama)
    tokens = range(llama.n_vocab())
    for _ in range(2):  # the second pass answers from what the first one kept
        assert [vocab.detokenize(t) for t in tokens] == [llama.detokenize([t]) for t in tokens]
        eog = [t for t in tokens if vocab.is_eog(t)]
        assert eog == [t for t in tokens if llama_cpp.llama_vocab_is_eog(llama._model.vocab, t)]
        assert eog, "the tiny model has end-of-generation tokens"

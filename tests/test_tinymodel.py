from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest
from llama_cpp import Llama
from tinymodel import BOS_ID, EOS_ID, IM_END_ID, N_CTX_TRAIN, N_EMBD, N_VOCAB, write_tiny_llama


@pytest.fixture(scope="module")
def llm(tiny_gguf: pathlib.Path) -> Iterator[Llama]:
    llm = Llama(model_path=str(tiny_gguf), n_ctx=512, n_threads=1, seed=1, verbose=False)
    yield llm
    llm.close()


def test_file_is_small_and_reproducible(tiny_gguf: pathlib.Path, tmp_path: pathlib.Path) -> None:
    assert tiny_gguf.stat().st_size < 2_000_000
    again = write_tiny_llama(tmp_path / "again.gguf")
    assert again.read_bytes() == tiny_gguf.read_bytes()


def test_hyperparameters_reach_llama_cpp(llm: Llama) -> None:
    assert (llm.n_embd(), llm.n_vocab()) == (N_EMBD, N_VOCAB)
    assert int(llm.metadata["llama.context_length"]) == N_CTX_TRAIN
    assert (llm.token_bos(), llm.token_eos()) == (BOS_ID, EOS_ID)


@pytest.mark.parametrize("text", ["hello world", "héllo wörld ✓ 日本語 🙂", "\t\n<|im_end|>\x00"])
def test_tokenizes_any_text(llm: Llama, text: str) -> None:
    tokens = llm.tokenize(text.encode(), add_bos=False)
    # SentencePiece prepends a space to the input; byte fallback makes the rest exact.
    assert llm.detokenize(tokens).decode() == " " + text


def test_streaming_completion_runs_to_max_tokens(llm: Llama) -> None:
    chunks = list(llm.create_completion("hello", max_tokens=200, stream=True))
    # Every sampled token is printable ASCII, so each streams as its own chunk.
    *pieces, last = [chunk["choices"][0] for chunk in chunks]
    assert last["finish_reason"] == "length"
    assert len(pieces) == 200
    text = "".join(piece["text"] for piece in pieces)
    assert text.isascii() and text.isprintable()


def test_completion_counts_tokens_and_reuses_prefix(llm: Llama) -> None:
    first = llm.create_completion("the quick brown fox", max_tokens=32)
    second = llm.create_completion("the quick brown dog", max_tokens=32)
    for completion in (first, second):
        assert completion["usage"]["completion_tokens"] == 32
        assert completion["choices"][0]["finish_reason"] == "length"


def test_logit_bias_forces_eos(llm: Llama) -> None:
    completion = llm.create_completion("hello", max_tokens=16, logit_bias={EOS_ID: 100.0})
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["usage"]["completion_tokens"] == 0


def test_streaming_chat_uses_embedded_template(llm: Llama) -> None:
    assert llm.chat_format == "chat_template.default"
    chunks = list(
        llm.create_chat_completion(
            messages=[{"role": "user", "content": "hi"}], max_tokens=16, stream=True
        )
    )
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def test_chat_stops_at_im_end(llm: Llama) -> None:
    reply = llm.create_chat_completion(
        messages=[{"role": "user", "content": "hi"}], max_tokens=16, logit_bias={IM_END_ID: 100.0}
    )
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_embedding_is_one_vector_per_token(tiny_gguf: pathlib.Path) -> None:
    llm = Llama(model_path=str(tiny_gguf), embedding=True, n_threads=1, verbose=False)
    try:
        vectors = llm.create_embedding("hello")["data"][0]["embedding"]
        # A llama GGUF without llama.pooling_type gets pooling NONE: per-token vectors.
        assert len(vectors) == len(llm.tokenize(b"hello"))
        assert all(len(vector) == N_EMBD for vector in vectors)
    finally:
        llm.close()

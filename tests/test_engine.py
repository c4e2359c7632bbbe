"""The engine on real llama.cpp (tiny random model): token loop, stops, cancel, cache reuse."""

from __future__ import annotations

import threading

import pytest
from tinymodel import IM_END_ID, N_EMBD

from llamapool.config import parse_config
from llamapool.ipc.protocol import Request, SamplingParams
from llamapool.pool.engine import (
    Cancelled,
    Engine,
    Prepared,
    RequestFailed,
    TextOut,
    _find_stop,
    _held_back,
    _llama_seed,
    _temperature,
)


def _engine(path, **config) -> Engine:
    cfg = {"model_path": str(path), "n_ctx": 512, "n_threads": 1, **config}
    return Engine(parse_config({"models": [{"id": "t", "config": cfg}]}).models["t"])


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    return _engine(tiny_gguf)


def _run(engine, req, cancel=None):
    pieces = []
    result = engine.run(req, lambda text, n: pieces.append((text, n)), cancel or threading.Event())
    return result, pieces


def _chat(content="hello", **params):
    return Request(
        request_id="r",
        kind="chat",
        messages=[{"role": "user", "content": content}],
        params=SamplingParams(**params),
    )


def test_exact_token_count_and_chunk_accounting(engine):
    result, pieces = _run(engine, _chat(max_tokens=33))
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 33
    assert sum(n for _, n in pieces) == 33
    assert result.usage.prompt_tokens > 5


def test_eos_gives_stop_and_no_tokens(engine):
    result, pieces = _run(engine, _chat(max_tokens=10, logit_bias={IM_END_ID: 100.0}))
    assert result.finish_reason == "stop"
    assert result.usage.completion_tokens == 0
    assert "".join(t for t, _ in pieces) == ""


def test_stop_sequence_is_never_emitted(engine):
    base, pieces = _run(
        engine,
        Request(
            request_id="r",
            kind="completion",
            prompt="ab",
            params=SamplingParams(max_tokens=40, temperature=0),
        ),
    )
    text = "".join(t for t, _ in pieces)
    stop = text[5:8]
    result, pieces = _run(
        engine,
        Request(
            request_id="r",
            kind="completion",
            prompt="ab",
            params=SamplingParams(max_tokens=40, temperature=0, stop=[stop]),
        ),
    )
    out = "".join(t for t, _ in pieces)
    assert result.finish_reason == "stop"
    assert out == text[: text.index(stop)]
    assert stop not in out


def test_cancel_stops_and_resets(engine):
    cancel = threading.Event()
    seen = []

    def emit(text, n):
        seen.append(text)
        if len(seen) == 3:
            cancel.set()

    with pytest.raises(Cancelled):
        engine.run(_chat(max_tokens=400), emit, cancel)
    assert len(seen) == 3
    assert engine.llama.n_tokens == 0  # reset after a cancel
    result, _ = _run(engine, _chat(max_tokens=5))
    assert result.usage.completion_tokens == 5


def test_prefix_cache_is_reused_between_requests(engine):
    _run(engine, _chat("a long shared question about the sea", max_tokens=4))
    result, _ = _run(engine, _chat("a long shared question about the sea", max_tokens=4))
    assert result.timings.cached_tokens > 10


def test_reset_each_request_disables_reuse(tiny_gguf):
    eng = _engine(tiny_gguf, reset_each_request=True)
    _run(eng, _chat("same prompt", max_tokens=4))
    result, _ = _run(eng, _chat("same prompt", max_tokens=4))
    assert result.timings.cached_tokens == 0


def test_prompt_over_context_is_refused(engine):
    with pytest.raises(RequestFailed) as e:
        _run(engine, _chat("word " * 600))
    assert e.value.code == "context_length_exceeded"
    assert "512" in e.value.message


def test_max_tokens_is_clamped_to_the_context_left(engine):
    result, _ = _run(
        engine,
        Request(
            request_id="r",
            kind="completion",
            prompt="x" * 20,
            params=SamplingParams(max_tokens=10_000),
        ),
    )
    assert result.usage.prompt_tokens + result.usage.completion_tokens == 512


def test_embeddings_are_mean_pooled(tiny_gguf):
    eng = _engine(tiny_gguf, embedding=True)
    result, _ = _run(eng, Request(request_id="r", kind="embedding", inputs=["hello", "a b c"]))
    assert [len(v) for v in result.embeddings] == [N_EMBD, N_EMBD]
    assert result.usage.prompt_tokens > 2


def test_embeddings_need_embedding_true(engine):
    with pytest.raises(RequestFailed, match="embedding: true"):
        _run(engine, Request(request_id="r", kind="embedding", inputs=["x"]))


def test_named_chat_format(tiny_gguf):
    eng = _engine(tiny_gguf, chat_format="chatml")
    result, _ = _run(eng, _chat(max_tokens=3))
    assert result.usage.completion_tokens == 3


def test_custom_jinja_template(tiny_gguf, tmp_path):
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    )
    eng = _engine(tiny_gguf, chat_format_template=template)
    prompt = eng._formatter(messages=[{"role": "user", "content": "hey"}]).prompt
    assert prompt == "[user] hey\n[assistant] "
    path = tmp_path / "t.jinja"
    path.write_text(template)
    eng = _engine(tiny_gguf, chat_format_template=str(path))
    assert (
        eng._formatter(messages=[{"role": "user", "content": "x"}]).prompt
        == "[user] x\n[assistant] "
    )


def test_unknown_chat_format_fails_to_boot(tiny_gguf):
    with pytest.raises(ValueError, match="unknown chat_format"):
        _engine(tiny_gguf, chat_format="no-such-format")


def test_stop_helpers():
    assert _find_stop("hello world", ["wor", "lo"]) == 3
    assert _find_stop("hello", ["xyz"]) is None
    assert _held_back("hello wo", ["world"]) == 2
    assert _held_back("hello", ["world"]) == 0
    assert _held_back("abc", ["c", "bcd"]) == 2


class _Pieces:
    """Token ids standing for byte strings: what TextOut needs of an engine, for text cases
    no vocabulary here can produce (a stop sequence and a split character in one token)."""

    def __init__(self, pieces: dict[int, bytes]):
        self.llama = self
        self._pieces = pieces

    def detokenize(self, tokens: list[int]) -> bytes:
        return b"".join(self._pieces[t] for t in tokens)

    def is_eog(self, token: int) -> bool:
        return token == 0


def _text_out(pieces: dict[int, bytes], stops: list[str]):
    emitted: list[str] = []
    prep = Prepared(
        tokens=[], max_tokens=10, stops=stops, seed=0, top_k=40, top_p=1.0, min_p=0.0,
        temperature=0.0, repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
        logit_bias={},
    )  # fmt: skip
    return TextOut(_Pieces(pieces), prep, lambda text, n: emitted.append(text)), emitted


def test_bytes_after_a_stop_sequence_are_dropped():
    out, emitted = _text_out({1: b"abX", 2: b"Y\xf0\x9f"}, ["XZ", "Y"])
    assert not out.push(1)
    assert out.push(2)
    out.result(1, 0, 0.0, None)
    assert "".join(emitted) == "abX"  # no U+FFFD from the emoji's first half after "Y"
    assert out.finish == "stop"


def test_a_split_character_at_the_end_is_replaced_not_lost():
    out, emitted = _text_out({1: b"ok\xf0\x9f", 0: b""}, [])
    assert not out.push(1)
    assert out.push(0)  # end of generation with half a character held
    out.result(1, 0, 0.0, None)
    assert "".join(emitted) == "ok\ufffd"


def test_seeds_and_temperatures_as_llama_cpp_takes_them():
    # 32-bit seeds; 0xFFFFFFFF would mean "random": every other seed maps below it.
    assert _llama_seed(None) is None
    assert _llama_seed(5) == 5
    assert _llama_seed(0xFFFFFFFF) == 0 and _llama_seed(0xFFFFFFFF + 7) == 7
    assert _llama_seed(-1) is None  # random, as in llama-cpp-python
    assert 0 <= _llama_seed(-2) < 0xFFFFFFFF
    assert _temperature(1e-40) == 0.0 and _temperature(0.0) == 0.0
    assert _temperature(0.7) == 0.7

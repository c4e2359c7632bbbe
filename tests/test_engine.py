"""The engine on real llama.cpp (tiny random model): token loop, stops, cancel, cache reuse."""

from __future__ import annotations

import threading

import pytest
from tinymodel import IM_END_ID, N_EMBD

from llamapool.config import parse_config
from llamapool.ipc.protocol import Request, SamplingParams
from llamapool.pool.engine import Cancelled, Engine
from llamapool.pool.prepare import RequestFailed


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


def test_embeddings_of_token_ids_are_those_of_their_text(tiny_gguf):
    eng = _engine(tiny_gguf, embedding=True)
    tokens = eng.llama.tokenize(b"a b c", add_bos=True)
    result, _ = _run(eng, Request(request_id="r", kind="embedding", inputs=["a b c", tokens]))
    text, ids = result.embeddings
    assert ids == pytest.approx(text, abs=1e-5)
    assert result.usage.prompt_tokens == 2 * len(tokens)
    with pytest.raises(RequestFailed) as refused:
        _run(eng, Request(request_id="r", kind="embedding", inputs=[[1, eng.llama.n_vocab()]]))
    assert refused.value.param == "input"


@pytest.mark.parametrize("param", ["logprobs", "echo"])
def test_logprobs_and_echo_are_refused_by_name(engine, param):
    req = Request(request_id="r", kind="completion", prompt="ab")
    setattr(req, param, 1 if param == "logprobs" else True)
    with pytest.raises(RequestFailed) as refused:
        _run(engine, req)
    assert refused.value.param == param


def test_max_tokens_zero_generates_nothing(engine):
    req = Request(
        request_id="r", kind="completion", prompt=[1, 40, 41], params=SamplingParams(max_tokens=0)
    )
    result, pieces = _run(engine, req)
    assert result.usage.completion_tokens == 0 and result.usage.prompt_tokens == 3
    assert pieces == []


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
    prompt = eng.preparer.formatter(messages=[{"role": "user", "content": "hey"}]).prompt
    assert prompt == "[user] hey\n[assistant] "
    path = tmp_path / "t.jinja"
    path.write_text(template)
    eng = _engine(tiny_gguf, chat_format_template=str(path))
    assert (
        eng.preparer.formatter(messages=[{"role": "user", "content": "x"}]).prompt
        == "[user] x\n[assistant] "
    )


def test_unknown_chat_format_fails_to_boot(tiny_gguf):
    with pytest.raises(ValueError, match="unknown chat_format"):
        _engine(tiny_gguf, chat_format="no-such-format")

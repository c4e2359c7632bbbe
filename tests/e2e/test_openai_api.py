"""The OpenAI API end to end: the official client against a real server and real llama.cpp."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import running_server
from serverutil import model_entry
from tinymodel import EOS_ID, IM_END_ID, N_EMBD


@pytest.fixture(scope="module")
def server(tiny_gguf, tmp_path_factory):
    models = [
        model_entry("tiny", tiny_gguf, min_instances=2),
        model_entry("tiny-embed", tiny_gguf, min_instances=1, config={"embedding": True}),
    ]
    with running_server(tmp_path_factory.mktemp("api"), models) as srv:
        yield srv


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_chat_non_stream(client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=12
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    # llama-server's `timings` extension, from the worker's own clock.
    timings = r.model_extra["timings"]
    assert timings["predicted_n"] == 12
    assert timings["prompt_n"] + timings["cache_n"] == r.usage.prompt_tokens
    assert timings["prompt_ms"] > 0 and timings["predicted_ms"] > 0


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    (final,) = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert final.model_extra["timings"]["predicted_n"] == 20
    assert chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].choices == []
    assert text


def test_chat_stops_on_eos(client):
    # A strong bias makes the end-of-turn token certain: finish_reason "stop", nothing leaks.
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=50,
        logit_bias={str(IM_END_ID): 100},
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 0
    assert "<|im_end|>" not in r.choices[0].message.content


def test_seed_makes_sampling_repeatable(client):
    def once() -> str:
        r = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "seeded"}],
            max_tokens=16,
            temperature=1.0,
            seed=1234,
        )
        return r.choices[0].message.content

    assert once() == once()


def test_stop_sequence_cuts_output(client):
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=0, seed=1)
    text = r.choices[0].text
    assert len(text) > 3
    stop = text[2:4]
    r2 = client.completions.create(
        model="tiny", prompt="abc", max_tokens=30, temperature=0, seed=1, stop=[stop]
    )
    assert r2.choices[0].finish_reason == "stop"
    assert r2.choices[0].text == text[: text.index(stop)]


def test_completions_stream_and_non_stream(client):
    r = client.completions.create(model="tiny", prompt="once upon", max_tokens=7)
    assert r.object == "text_completion"
    assert r.usage.completion_tokens == 7
    assert r.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="tiny", prompt="once", max_tokens=5, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks)


def test_completions_default_max_tokens_is_16(client):
    r = client.completions.create(model="tiny", prompt="x")
    assert r.usage.completion_tokens == 16


def test_embeddings_float_and_base64(client, server):
    # The official client asks for base64 by default and decodes it.
    r = client.embeddings.create(model="tiny-embed", input=["hello", "world wide"])
    assert [d.index for d in r.data] == [0, 1]
    assert all(len(d.embedding) == N_EMBD for d in r.data)
    assert r.usage.prompt_tokens > 0
    raw = httpx.post(
        f"{server.url}/v1/embeddings",
        json={"model": "tiny-embed", "input": "hello", "encoding_format": "float"},
    ).json()
    assert raw["data"][0]["embedding"] == pytest.approx(r.data[0].embedding, rel=1e-5)
    # Unit length, as OpenAI's and llama-server's: a dot product is the cosine.
    for d in r.data:
        assert sum(x * x for x in d.embedding) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("text", ["", ["hello", ""]])
def test_an_empty_embedding_input_is_400(client, text):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="tiny-embed", input=text)
    assert e.value.body["param"] == "input" and "empty" in e.value.body["message"]


def test_embeddings_on_a_generation_model_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="tiny", input="x")
    assert "embedding" in e.value.body["message"]


def test_models_lists_configured(client):
    ids = {m.id for m in client.models.list()}
    assert ids == {"tiny", "tiny-embed"}
    model = client.models.retrieve("tiny-embed")
    assert model.id == "tiny-embed" and model.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found" and "tiny" in e.value.body["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    assert "nope" in e.value.body["message"] and "tiny" in e.value.body["message"]


def test_negative_max_tokens_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=-5
        )
    assert e.value.body["param"] == "max_tokens"
    assert "max_tokens" in e.value.body["message"]


def _msg(extra: bytes) -> bytes:
    return b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], ' + extra + b"}"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "empty"),
        (b'{"model": "tiny"}', "messages"),
        (b'{"model": "tiny", "messages": [], "max_tokens": 1}', "messages"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "bogus": 1}', "bogus"),
        (b'{"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}', "role"),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 9}',
            "temperature",
        ),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 0}', "`n`"),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
            b'"logit_bias": {"a": 1}}',
            "logit_bias",
        ),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], '
            b'"logit_bias": {"99999": 1}}',
            "vocabulary",
        ),
        (b"[1, 2]", "Expected `object`"),
        # Integers past what the worker protocol carries: 400s, not a slot lost for good.
        (_msg(b'"max_tokens": 99999999999999999999999'), "max_tokens"),
        (_msg(b'"seed": 99999999999999999999999'), "seed"),
        (_msg(b'"top_k": 99999999999999999999999'), "top_k"),
        (_msg(b'"logit_bias": {"99999999999999999999999": 1}'), "logit_bias"),
        (_msg(b'"logit_bias": {"-3": 1}'), "not a token id"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff"}]}', "UTF-8"),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", '
            b'"text": "x", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}]}",
            "deeply",
        ),
        (_msg(b'"stream_options": {"include_usage": true}'), "stream_options"),
        (_msg(b'"top_logprobs": 2'), "logprobs"),
        (_msg(b'"response_format": {"type": "xml"}'), "xml"),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text"}]}]}',
            "without a string `text`",
        ),
    ],
)
def test_bad_bodies_are_clear_400s(server, body, needle):
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"]
    assert err["type"] == "invalid_request_error"
    assert "Traceback" not in r.text


def test_bad_bodies_leave_every_slot_free(server):
    # An integer too big to encode once took a worker slot for good (the request was
    # booked to the worker before its send failed); now it is a 400 and nothing is held.
    for _ in range(4):
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            content=_msg(b'"seed": 99999999999999999999999'),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400
    assert all(not w["in_flight"] for w in server.pool()["workers"])
    assert (
        httpx.post(
            f"{server.url}/v1/chat/completions", content=_msg(b'"max_tokens": 2'), timeout=30
        ).json()["usage"]["completion_tokens"]
        == 2
    )


def test_openai_defaults_sent_as_null_or_no_ops_are_accepted(server):
    extras = [
        b'"presence_penalty": null, "frequency_penalty": null, "n": null, "stream": null',
        b'"logprobs": false, "top_logprobs": null, "response_format": {"type": "text"}',
        b'"seed": -1, "temperature": 1e-40',
        b'"stream": true, "stream_options": {"include_usage": null}',
    ]
    for extra in extras:
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            content=_msg(b'"max_tokens": 3, ' + extra),
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert r.status_code == 200, (extra, r.text)
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "tiny", "prompt": "x", "max_tokens": 2, "logprobs": None, "echo": False,
              "suffix": None, "best_of": 1},
        timeout=30,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    r = httpx.post(
        f"{server.url}/v1/embeddings",
        json={"model": "tiny-embed", "input": "x", "encoding_format": None},
        timeout=30,
    )
    assert r.status_code == 200 and isinstance(r.json()["data"][0]["embedding"], list)


def test_a_tiny_temperature_samples_greedily(client):
    def text(temperature: float) -> str:
        r = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "greedy"}],
            max_tokens=12,
            temperature=temperature,
        )
        return r.choices[0].message.content

    # 1e-40 divided the logits into overflow: garbage instead of the greedy text.
    assert text(1e-40) == text(0.0)


def test_completion_prompts_may_carry_special_tokens(client):
    # A hand-templated prompt means what it says: <|im_end|> is one token, not nine.
    plain = client.completions.create(model="tiny", prompt="a b", max_tokens=1)
    special = client.completions.create(model="tiny", prompt="a b<|im_end|>", max_tokens=1)
    assert special.usage.prompt_tokens == plain.usage.prompt_tokens + 1


def test_prompt_longer_than_context_is_400(server):
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "tiny", "prompt": "word " * 3000, "max_tokens": 4},
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert "2048" in err["message"]


def test_body_over_limit_is_413(server):
    r = httpx.post(
        f"{server.url}/v1/completions",
        content=b'{"model": "tiny", "prompt": "' + b"x" * (2 << 20) + b'"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_unknown_route_and_method_are_openai_shaped(server):
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{server.url}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_health_and_ready(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/ready").json()
    assert ready["status"] == "ready"
    assert ready["models"]["tiny"]["instances_ready"] == 2


def test_eos_suppressed_runs_to_max_tokens(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "go"}],
        max_tokens=64,
        logit_bias={str(EOS_ID): -100, str(IM_END_ID): -100},
    )
    assert r.usage.completion_tokens == 64

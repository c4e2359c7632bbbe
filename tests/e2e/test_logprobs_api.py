"""Logprobs and echo through the HTTP API and the `openai` client, on a real server with
the tiny model."""

from __future__ import annotations

import httpx
import llama_cpp
import openai
import pytest
from conftest import running_server
from serverutil import model_entry

GREEDY = {"temperature": 0, "extra_body": {"repeat_penalty": 1.0}}


@pytest.fixture(scope="module")
def server(tiny_gguf, tmp_path_factory):
    models = [
        model_entry("tiny", tiny_gguf, min_instances=1, config={"n_parallel": 4}),
        model_entry("tiny-embed", tiny_gguf, min_instances=1, config={"embedding": True}),
    ]
    with running_server(tmp_path_factory.mktemp("logprobs"), models) as srv:
        yield srv


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def tokenize(tiny_gguf):
    llama = llama_cpp.Llama(model_path=str(tiny_gguf), vocab_only=True, verbose=False)
    return lambda text: llama.tokenize(text.encode(), add_bos=True, special=True)


def _ask(content: str = "hello") -> list[dict]:
    return [{"role": "user", "content": content}]


def test_chat_logprobs_whole_and_streamed(client):
    r = client.chat.completions.create(
        model="tiny", messages=_ask(), max_tokens=6, logprobs=True, top_logprobs=2, **GREEDY
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 2
        assert c.top_logprobs[0].token == c.token
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob)
        assert bytes(c.bytes).decode() == c.token
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=_ask(),
            max_tokens=6,
            logprobs=True,
            top_logprobs=2,
            stream=True,
            **GREEDY,
        )
    )
    streamed = [
        c
        for ch in chunks
        if ch.choices and ch.choices[0].logprobs
        for c in ch.choices[0].logprobs.content
    ]
    # The second request evaluates only its prompt's last token (the rest is cached): its
    # logits round a little differently.
    assert [c.token for c in streamed] == [c.token for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-3)


def test_chat_without_logprobs_has_null_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=_ask(), max_tokens=2)
    assert r.choices[0].logprobs is None


def test_completion_logprobs_whole_and_streamed(client):
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=5, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == 5 and all(x <= 0 for x in lp.token_logprobs)
    assert lp.text_offset[0] == len("abc")
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert max(top.values()) == pytest.approx(logprob) and top[token] == pytest.approx(logprob)
        assert len(top) <= 4  # the 3 best and the token itself
    chunks = list(
        client.completions.create(
            model="tiny", prompt="abc", max_tokens=5, logprobs=3, stream=True, **GREEDY
        )
    )
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [
        o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset
    ]
    assert tokens == lp.tokens and offsets == lp.text_offset


def test_echo_with_max_tokens_zero_scores_the_prompt(client, tokenize):
    prompt = "one two three four"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = r.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    lp = choice.logprobs
    assert len(lp.tokens) == len(tokenize(prompt)) - 1  # the BOS is not echoed
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(tokenize(prompt))
    # the same numbers streamed
    chunks = list(
        client.completions.create(
            model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1, stream=True
        )
    )
    streamed = [
        x
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for x in c.choices[0].logprobs.token_logprobs
    ]
    assert streamed[0] is None
    assert streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-3)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("completions", {"prompt": "x", "logprobs": 6}, "logprobs"),
        ("completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ("completions", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("completions", {"model": "tiny-embed", "prompt": "x", "echo": True}, "echo"),
        ("completions", {"model": "tiny-embed", "prompt": "x", "logprobs": 1}, "logprobs"),
        ("chat/completions", {"messages": _ask(), "top_logprobs": 2}, "top_logprobs"),
        (
            "chat/completions",
            {"messages": _ask(), "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
    ],
)
def test_bad_inputs_are_400s_naming_the_field(server, path, body, param):
    r = httpx.post(f"{server.url}/v1/{path}", json={"model": "tiny", **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert "Traceback" not in r.text

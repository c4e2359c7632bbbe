"""Logprobs, echo, token and list prompts, and n through the HTTP API and the `openai`
client, on a real server with the tiny model."""

from __future__ import annotations

import httpx
import llama_cpp
import openai
import pytest
from conftest import running_server
from serverutil import model_entry
from tinymodel import IM_END_ID

GREEDY = {"temperature": 0, "extra_body": {"repeat_penalty": 1.0}}
MAX_CHOICES = 6


@pytest.fixture(scope="module")
def server(tiny_gguf, tmp_path_factory):
    models = [
        model_entry("tiny", tiny_gguf, min_instances=1, config={"n_parallel": 4}),
        model_entry("tiny-embed", tiny_gguf, min_instances=1, config={"embedding": True}),
        model_entry("tiny-seeded", tiny_gguf, min_instances=1, config={"n_parallel": 2, "seed": 5}),
        # 2 slots and a queue of 1: 3 choices at once, whatever max_choices says.
        model_entry("tiny-small", tiny_gguf, max_queue=1, config={"n_parallel": 2}),
    ]
    extra = {"server": {"max_choices": MAX_CHOICES}}
    with running_server(tmp_path_factory.mktemp("logprobs"), models, extra=extra) as srv:
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
    # the same numbers streamed, for the prompt as token ids: echoed as given, its BOS too,
    # so the first text token has a logprob now
    chunks = list(
        client.completions.create(
            model="tiny", prompt=tokenize(prompt), max_tokens=0, echo=True, logprobs=1, stream=True
        )
    )
    streamed = [
        x
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for x in c.choices[0].logprobs.token_logprobs
    ]
    assert len(streamed) == len(lp.tokens) + 1
    assert streamed[0] is None and streamed[1] <= 0
    assert streamed[2:] == pytest.approx(lp.token_logprobs[1:], abs=1e-3)


def test_a_token_prompt_gives_the_text_of_its_string(client, tokenize):
    text = client.completions.create(model="tiny", prompt="once upon", max_tokens=8, **GREEDY)
    ids = client.completions.create(
        model="tiny", prompt=tokenize("once upon"), max_tokens=8, **GREEDY
    )
    assert ids.choices[0].text == text.choices[0].text


def test_several_prompts_and_n_give_choices_in_order(client, tokenize):
    prompts = ["abc", "xyz"]
    singles = [
        client.completions.create(model="tiny", prompt=p, max_tokens=4, seed=7, temperature=1)
        for p in prompts
    ]
    r = client.completions.create(
        model="tiny", prompt=[prompts[0], tokenize(prompts[1])], n=2, max_tokens=4, seed=7,
        temperature=1,
    )  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    # sample 0 of each prompt is that prompt alone with the seed; sample 1 has seed + 1
    assert r.choices[0].text == singles[0].choices[0].text
    assert r.choices[2].text == singles[1].choices[0].text
    second = client.completions.create(
        model="tiny", prompt="abc", max_tokens=4, seed=8, temperature=1
    )
    assert r.choices[1].text == second.choices[0].text
    assert r.usage.completion_tokens == 16
    assert r.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_n_samples_differ_on_a_model_with_a_configured_seed(client, endpoint):
    # The model's `seed` stands in for a request's: sample j takes it + j, as it would
    # take a request's own seed, not that seed n times over.
    ask = {"model": "tiny-seeded", "max_tokens": 8, "temperature": 1}
    if endpoint == "chat":
        texts = [
            c.message.content
            for c in client.chat.completions.create(messages=_ask(), n=3, **ask).choices
        ]
        second = client.chat.completions.create(messages=_ask(), seed=6, **ask)
        assert texts[1] == second.choices[0].message.content
    else:
        texts = [c.text for c in client.completions.create(prompt="abc", n=3, **ask).choices]
        second = client.completions.create(prompt="abc", seed=6, **ask)
        assert texts[1] == second.choices[0].text
    assert len(set(texts)) == 3, texts


def test_n_streamed_chat_gives_every_choice_its_role_text_and_finish(client):
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=_ask(),
            n=3,
            max_tokens=5,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
            logit_bias={str(IM_END_ID): -100},
        )
    )
    texts, finishes, roles = {}, {}, set()
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.delta.role:
                roles.add(c.index)
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert roles == {0, 1, 2} and finishes == {0: "length", 1: "length", 2: "length"}
    assert all(texts.values())
    assert chunks[-1].usage.completion_tokens == 15


def test_a_stream_of_more_choices_than_slots_starts_at_once(server):
    # 5 choices, 4 slots: the fifth waits in the queue for a free slot, and the stream
    # does not wait for it (its first event comes after a whole choice of 1000 tokens).
    body = {"model": "tiny", "prompt": "abc", "n": 5, "max_tokens": 1000, "stream": True}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{server.url}/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        assert server.model_ready("tiny")["queue_depth"] == 1
    # Hung up: the running choices are cancelled, the queued one is dropped.
    server.wait_for(
        lambda: all(not w["in_flight"] for w in server.pool()["workers"]), what="free slots"
    )
    assert server.model_ready("tiny")["queue_depth"] == 0


def test_n_whole_chat_with_logprobs(client):
    r = client.chat.completions.create(
        model="tiny", messages=_ask(), n=2, max_tokens=3, logprobs=True, seed=3
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert all(len(c.logprobs.content) == 3 for c in r.choices)
    assert r.usage.completion_tokens == 6


def test_embeddings_of_token_ids(client, tokenize):
    r = client.embeddings.create(model="tiny-embed", input=[tokenize("a b"), tokenize("c")])
    assert [d.index for d in r.data] == [0, 1]
    text = client.embeddings.create(model="tiny-embed", input="a b")
    assert r.data[0].embedding == pytest.approx(text.data[0].embedding, abs=1e-5)
    one = client.embeddings.create(model="tiny-embed", input=tokenize("a b"))
    assert len(one.data) == 1


def test_more_choices_than_a_model_ever_holds_is_a_400(server):
    body = {"model": "tiny-small", "prompt": "x", "max_tokens": 1, "n": 4}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "n" and "holds at most 3 at once" in err["message"], err
    body["n"] = 3
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("completions", {"prompt": [1, "a"]}, "prompt"),
        ("completions", {"prompt": [1, 99999]}, "prompt"),
        ("completions", {"prompt": [[1, 2], [1, 99999]]}, "prompt"),
        ("completions", {"prompt": [-1]}, "prompt[0]"),
        ("completions", {"prompt": "x", "logprobs": 6}, "logprobs"),
        ("completions", {"prompt": "x", "n": MAX_CHOICES + 1}, "n"),
        ("completions", {"prompt": ["x"] * (MAX_CHOICES + 1)}, "prompt"),
        ("completions", {"prompt": ["x", "y"], "n": MAX_CHOICES}, "n"),
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
        ("chat/completions", {"messages": _ask(), "n": MAX_CHOICES + 1}, "n"),
        ("embeddings", {"model": "tiny-embed", "input": [1, 99999]}, "input"),
        ("embeddings", {"model": "tiny-embed", "input": [[1], "a", 2]}, "input"),
    ],
)
def test_bad_inputs_are_400s_naming_the_field(server, path, body, param):
    r = httpx.post(f"{server.url}/v1/{path}", json={"model": "tiny", **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert "Traceback" not in r.text


def test_a_refused_choice_refuses_the_request_and_frees_the_others(server):
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "tiny", "prompt": [[1, 40], [1, 99999]], "max_tokens": 2, "stream": True},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    server.wait_for(
        lambda: all(not w["in_flight"] for w in server.pool()["workers"]), what="free slots"
    )

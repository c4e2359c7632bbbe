"""The constrained sampler's shortcut (llama_adapter.Sampler._among_best) changes no token.

On SmolLM2 (49k tokens) a token the grammar refuses is re-sampled among the 512 highest
logits when that is provably what the whole vocabulary would give; the same requests with
the shortcut off must produce byte-identical text.
"""

from __future__ import annotations

import queue

import pytest

from llamapool.config import parse_config
from llamapool.ipc.protocol import Request, SamplingParams
from llamapool.pool import llama_adapter
from llamapool.pool.batch import BatchEngine
from llamapool.router.structured import schema_grammar

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"enum": ["Madrid", "Paris"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "tags"],
}


class _Text:
    def __init__(self) -> None:
        self.text = ""

    def start(self, rid: str) -> None: ...

    def flush(self) -> None:
        pass

    def chunk(self, rid: str, text: str, tokens: int) -> None:
        self.text += text

    def done(self, rid: str, result: object) -> None: ...

    def error(self, rid: str, code: str, message: str, param: str | None = None) -> None:
        pytest.fail(f"{code}: {message}")


@pytest.fixture(scope="module")
def engine(smollm2_gguf):
    cfg = {"model_path": str(smollm2_gguf), "n_ctx": 512, "n_threads": 1,
           "reset_each_request": True}  # fmt: skip
    engine = BatchEngine(parse_config({"models": [{"id": "m", "config": cfg}]}).models["m"])
    yield engine
    engine.close()


def _run(engine: BatchEngine, **params) -> str:
    sink, jobs = _Text(), queue.Queue()
    messages = [
        {"role": "system", "content": "Extract the person as JSON."},
        {"role": "user", "content": "Maria Lopez, 34, lives in Madrid; she likes chess and jazz."},
    ]
    grammar = schema_grammar(PERSON, "s")
    p = SamplingParams(max_tokens=40, grammar=grammar, **params)
    jobs.put(Request(request_id="r", kind="chat", messages=messages, params=p))
    jobs.put(None)
    engine.serve(jobs, sink)
    return sink.text


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0},
        {"temperature": 0, "logit_bias": {33: 5.0, 28: -3.0}},
        {"temperature": 0.8, "seed": 5},
        {"temperature": 0.8, "seed": 6, "repeat_penalty": 1.3},
    ],
)
def test_the_shortcut_gives_the_same_text(engine, monkeypatch, params):
    fast = _run(engine, **params)
    monkeypatch.setattr(llama_adapter.Sampler, "_among_best", lambda self, logits: None)
    assert _run(engine, **params) == fast
    assert fast.startswith("{")

"""OpenAI's response shapes rendered from the worker's events (router/render.py)."""

from __future__ import annotations

from llamapool.ipc.protocol import TokenLogprob, TopLogprob
from llamapool.router.render import completion_logprobs


def test_completion_top_logprobs_keep_the_likeliest_of_tokens_spelled_alike():
    # Two byte tokens of a split character both read "\ufffd": the key keeps the likelier
    # one, so a greedy token still has the best value of its position (lm-evaluation-
    # harness's is_greedy: token_logprob == max(top_logprobs.values())).
    entry = TokenLogprob(
        b"\xe4",
        -0.5,
        [TopLogprob(b"\xe4", -0.5), TopLogprob(b"a", -1.0), TopLogprob(b"\xe5", -2.0)],
        0,
    )
    rendered = completion_logprobs([entry])
    (top,) = rendered["top_logprobs"]
    assert top == {"\ufffd": -0.5, "a": -1.0}
    assert max(top.values()) == rendered["token_logprobs"][0]

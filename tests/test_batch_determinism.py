"""Issue #12: a request's text does not depend on what else its batching engine decodes.

Each scenario serves the same requests twice on real llama.cpp: one at a time in an engine
that starts every request from an empty sequence (the reference), and together in one
engine with `n_parallel: 4`, requests joining as others generate and leave. Greedy text
must be byte-identical, and so must a seeded request's text at temperature 0.8.
"""

from __future__ import annotations

from engineutil import Texts, alone, ask, copy_requests, together

from llamapool.config import parse_config
from llamapool.ipc.protocol import Request, SamplingParams
from llamapool.pool.batch import BatchEngine

QUESTIONS = [
    "hello there",
    "what is the capital of France?",
    "tell me a story about a dragon",
    "2 + 2 = ?",
    "name three colours",
    "why is the sky blue",
    "write a haiku about the sea",
    "list prime numbers below 20",
]


def _engine(path, **config) -> BatchEngine:
    cfg = {"model_path": str(path), "n_ctx": 512, "n_threads": 1, "n_parallel": 4, **config}
    return BatchEngine(parse_config({"models": [{"id": "m", "config": cfg}]}).models["m"])


def _chat(rid: str, messages: list[dict], **params) -> Request:
    return Request(request_id=rid, kind="chat", messages=messages, params=SamplingParams(**params))


def _reference(path, requests: list[Request], **config) -> Texts:
    """Each request alone, from an empty sequence, in an engine of its own."""
    engine = _engine(path, reset_each_request=True, **config)
    try:
        return alone(engine, requests)
    finally:
        engine.close()


def test_tiny_greedy_and_seeded_text_is_the_same_alone_and_under_load(tiny_gguf):
    greedy = [
        ask(f"g{i}", q, temperature=0, max_tokens=24 + 7 * i) for i, q in enumerate(QUESTIONS)
    ]
    seeded = [
        ask(f"s{i}", q, temperature=0.8, seed=1000 + i, max_tokens=40)
        for i, q in enumerate(QUESTIONS[:2])
    ]
    reference = _reference(tiny_gguf, greedy + seeded)

    engine = _engine(tiny_gguf)
    # Two start together; the rest join while others are mid-prompt or mid-generation,
    # and as slots free up, so the batch's make-up keeps changing.
    loaded = together(
        engine,
        greedy[:2],
        {
            ("g0", 3): [greedy[2]],
            ("g1", 10): [seeded[0]],
            ("g0", "done"): [greedy[3]],
            ("g2", "done"): [greedy[4]],
            ("g1", "done"): [greedy[5]],
            ("s0", "done"): [seeded[1]],
            ("g3", "done"): [greedy[6]],
            ("g4", "done"): [greedy[7]],
        },
    )
    engine.close()
    for rid, text in reference.text.items():
        assert len(text) > 10, rid
        assert loaded.text[rid] == text, f"{rid} differs under load"


def test_tiny_second_turn_with_a_cached_prefix_matches_it_evaluatedalone(tiny_gguf):
    first = [ask(f"t{i}", q, temperature=0, max_tokens=20) for i, q in enumerate(QUESTIONS[:4])]
    engine = _engine(tiny_gguf)
    turn1 = together(engine, first, {})  # slot i now holds first turn t{i}
    second = [
        _chat(
            f"u{i}",
            [
                {"role": "user", "content": QUESTIONS[i]},
                {"role": "assistant", "content": turn1.text[f"t{i}"]},
                {"role": "user", "content": "and then?"},
            ],
            temperature=0,
            max_tokens=30 + 5 * i,
        )
        for i in range(3)
    ]
    # They share t3's prompt most, so they take its slot and leave the others' history be.
    others = [
        ask(f"o{i}", f"{QUESTIONS[3]} {extra}", temperature=0, max_tokens=25)
        for i, extra in enumerate(["and 3 + 3?", "and 4 + 4?"])
    ]
    reference = _reference(tiny_gguf, second)

    loaded = together(
        engine,
        [second[0], others[0]],
        {("u0", 4): [second[1]], ("o0", 6): [second[2]], ("o0", "done"): [others[1]]},
    )
    engine.close()
    for i in range(3):
        rid = f"u{i}"
        assert reference.results[rid].usage.cached_tokens == 0
        # The whole first turn's prompt came from the slot's cache.
        reused = loaded.results[rid].usage.cached_tokens
        assert reused >= turn1.results[f"t{i}"].usage.prompt_tokens, rid
        assert loaded.text[rid] == reference.text[rid], f"{rid} differs under load"


def test_smollm2_greedy_text_is_the_same_alone_and_under_load(smollm2_gguf):
    path = str(smollm2_gguf)
    greedy = [ask(f"g{i}", q, temperature=0, max_tokens=16) for i, q in enumerate(QUESTIONS[:6])]
    reference = _reference(path, greedy, n_ctx=256)
    engine = _engine(path, n_ctx=256)
    # Four prompts evaluated in one decode, then two joining as slots free up.
    loaded = together(
        engine, greedy[:4], {("g0", "done"): [greedy[4]], ("g1", "done"): [greedy[5]]}
    )
    engine.close()
    for rid, text in reference.text.items():
        assert text, rid
        assert loaded.text[rid] == text, f"{rid} differs under load"


def _second_turns(first: Texts, questions: list[str], **params) -> list[Request]:
    return [
        _chat(
            f"u{i}",
            [
                {"role": "user", "content": q},
                {"role": "assistant", "content": first.text[f"t{i}"]},
                {"role": "user", "content": "and then?"},
            ],
            **params,
        )
        for i, q in enumerate(questions)
    ]


def test_tiny_a_history_restored_from_ram_gives_the_same_text(tiny_gguf):
    # Two slots, four conversations: by their second turns the first two histories are
    # held only in the RAM prompt cache.
    first = [ask(f"t{i}", q, temperature=0, max_tokens=20) for i, q in enumerate(QUESTIONS[:4])]
    engine = _engine(tiny_gguf, n_parallel=2)
    turn1 = alone(engine, first)
    second = _second_turns(turn1, QUESTIONS[:4], temperature=0, max_tokens=30)
    reference = _reference(tiny_gguf, second)
    # u0 and u1 restore side by side; u2 and u3 join as they end (two slots: no more).
    loaded = together(
        engine, second[:2], {("u0", "done"): [second[2]], ("u1", "done"): [second[3]]}
    )
    engine.close()
    restored = [rid for rid, r in loaded.results.items() if r.timings.cache_ram_n > 0]
    assert len(restored) >= 2, {rid: r.timings for rid, r in loaded.results.items()}
    for rid in restored:
        assert (
            loaded.results[rid].usage.cached_tokens
            >= turn1.results[f"t{rid[1:]}"].usage.prompt_tokens
        )
    for rid, text in reference.text.items():
        assert len(text) > 10, rid
        assert loaded.text[rid] == text, f"{rid} differs after a restore"


SYSTEM = "You answer questions about sailing boats, kayaks and paddle boards, briefly. " * 2


def _with_system(rid: str, question: str, **params) -> Request:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return _chat(rid, messages, **params)


def test_tiny_a_prefix_copied_from_another_slot_gives_the_same_text(tiny_gguf):
    requests = [
        _with_system(f"s{i}", q, temperature=0, max_tokens=25) for i, q in enumerate(QUESTIONS[:4])
    ]
    reference = _reference(tiny_gguf, requests)
    engine = _engine(tiny_gguf)
    # s0 evaluates the system prompt; s1 joins while s0 generates, s2 and s3 as s0 and s1
    # end: each copies it from a slot that holds it (generating or idle).
    loaded = together(engine, [requests[0]], {("s0", 2): [requests[1]], ("s1", 4): requests[2:]})
    engine.close()
    n_system = len(SYSTEM)  # one token per character in the tiny model
    shared = [rid for rid, r in loaded.results.items() if r.timings.cache_shared_n > n_system]
    assert len(shared) == 3, {rid: r.timings for rid, r in loaded.results.items()}
    for rid, text in reference.text.items():
        assert len(text) > 10, rid
        assert loaded.text[rid] == text, f"{rid} differs with a copied prefix"


def test_smollm2_restored_and_copied_prefixes_give_the_same_text(smollm2_gguf):
    path = str(smollm2_gguf)
    # Questions long enough (over MIN_TOKENS) that a slot giving one up saves it in RAM.
    detail = " Explain it step by step, with one example, for someone who has never sailed."
    first = [
        _with_system(f"t{i}", q + detail, temperature=0, max_tokens=8)
        for i, q in enumerate(QUESTIONS[:3])
    ]
    second = [
        _chat(
            f"u{i}",
            [
                *r.messages,
                {"role": "assistant", "content": "I see."},
                {"role": "user", "content": "more?"},
            ],
            temperature=0,
            max_tokens=8,
        )
        for i, r in enumerate(first)
    ]
    reference = _reference(path, first + second, n_ctx=256)
    engine = _engine(path, n_ctx=256, n_parallel=2)
    # t1 copies the system prompt from t0's slot; t2 overwrites a slot (its history goes to
    # RAM), so a second turn restores it.
    loaded = alone(engine, first + second)
    engine.close()
    timings = {rid: r.timings for rid, r in loaded.results.items()}
    assert timings["t1"].cache_shared_n > 0, timings
    assert any(timings[f"u{i}"].cache_ram_n > 0 for i in range(3)), timings
    for rid, text in reference.text.items():
        assert text, rid
        assert loaded.text[rid] == text, f"{rid} differs with a cached prefix"


def test_tiny_requests_arriving_together_evaluate_their_system_prompt_once(tiny_gguf):
    requests = [
        _with_system(f"w{i}", q, temperature=0, max_tokens=20) for i, q in enumerate(QUESTIONS[:3])
    ]
    reference = _reference(tiny_gguf, requests)
    engine = _engine(tiny_gguf)
    # All three admitted at once: the first evaluates the system prompt, the others wait
    # for it and copy it.
    loaded = together(engine, requests, {})
    engine.close()
    shared = sorted(r.timings.cache_shared_n for r in loaded.results.values())
    assert shared[0] == 0 and all(n > len(SYSTEM) for n in shared[1:]), shared
    for rid, text in reference.text.items():
        assert loaded.text[rid] == text, f"{rid} differs after waiting for a shared prefix"


def test_smollm2_a_prompt_evaluated_after_a_copied_prefix_keeps_its_text(smollm2_gguf):
    path = str(smollm2_gguf)
    requests = copy_requests()
    reference = _reference(path, requests, n_ctx=1024)
    engine = _engine(path, n_ctx=1024)
    # g0 evaluates; the others wait for it and copy: s0 and c0 all but their last prompt
    # token, g1 only the chat template's system prompt, then evaluates its own 60 tokens
    # beside the others' first steps. Its text differed when those shared one decode.
    loaded = together(engine, requests, {})
    engine.close()
    shared = {rid: r.timings.cache_shared_n for rid, r in loaded.results.items()}
    assert shared["g0"] == 0 and min(shared[r] for r in ("g1", "s0", "c0")) > 0, shared
    for rid, text in reference.text.items():
        assert loaded.text[rid] == text, f"{rid} differs after a copied prefix"

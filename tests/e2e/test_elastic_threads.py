"""Elastic threads against a real pool: a lone stream widens onto the idle instance's
core, and gives it back when that instance gets work."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import httpx
import psutil
import pytest
from serverutil import (
    SMOLLM2_EOG,
    chat_body,
    is_content_line,
    model_entry,
    skip_to_first_token,
)

pytestmark = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="elastic threads need two cores"
)


def _two_elastic_instances(serve, gguf):
    """A pool of two SmolLM2 instances, one core each, lending and borrowing."""
    return serve([model_entry("m", gguf, min_instances=2)], pool={"elastic_threads": True})


def _affinities(pid: int) -> list[set[int]]:
    """The CPU affinity of each of a process's threads, as the kernel reports it."""
    return [set(os.sched_getaffinity(t.id)) for t in psutil.Process(pid).threads()]


def _sleeps(pid: int) -> dict[int, int]:
    """Per thread of a process, how often it has blocked (voluntary context switches)."""
    out = {}
    for t in psutil.Process(pid).threads():
        with open(f"/proc/{pid}/task/{t.id}/status") as status:
            for line in status:
                if line.startswith("voluntary_ctxt_switches:"):
                    out[t.id] = int(line.split()[1])
    return out


def _drain(lines, closing: threading.Event) -> None:
    """Read a stream to its end, or until the test closes it."""
    try:
        for _ in lines:
            pass
    except (httpx.HTTPError, httpx.StreamError):
        if not closing.is_set():
            raise


def _workers(server) -> dict[str, dict]:
    return {w["id"]: w for w in server.pool()["workers"]}


def _stream(server, content: str):
    body = chat_body("m", content, 2000, logit_bias=SMOLLM2_EOG, stream=True)
    return httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60)


def test_a_lone_stream_borrows_the_idle_core_and_gives_it_back(serve, smollm2_gguf):
    server = _two_elastic_instances(serve, smollm2_gguf)
    workers = _workers(server)
    assert sorted(w["cores"] for w in workers.values()) == [[0], [1]]
    both = {0, 1}
    with _stream(server, "Write a long story.") as first:
        first_lines = first.iter_lines()  # kept: a dropped iterator closes the stream
        skip_to_first_token(first_lines)
        busy = first.headers["x-llamapool-worker"].split()[0]
        a = next(w for w in workers.values() if w["id"] == busy)
        b = next(w for w in workers.values() if w["id"] != busy)

        def widened():
            now = _workers(server)
            return now[a["id"]]["elastic"]["cores"] == [0, 1] and now

        now = server.wait_for(widened, what="the busy worker widened")
        assert now[a["id"]]["elastic"]["state"] == "borrowing"
        assert now[a["id"]]["elastic"]["n_threads"] == 2
        assert now[b["id"]]["elastic"]["state"] == "lent"
        # Seen from the process: no thread of the busy worker is pinned to one core any
        # more, and it runs a second (OpenMP) decode thread; the lender stays pinned.
        assert all(aff == both for aff in _affinities(a["pid"]))
        assert set(b["cores"]) in _affinities(b["pid"])

        with _stream(server, "Write another long story.") as second:
            second_lines = second.iter_lines()
            skip_to_first_token(second_lines)
            assert second.headers["x-llamapool-worker"].split()[0] == b["id"]
            now = _workers(server)
            # b's request was held until a confirmed its shrink: one core each, and the
            # kernel says so for a's decode threads.
            assert now[a["id"]]["elastic"]["state"] == "own"
            assert now[a["id"]]["elastic"]["cores"] == a["cores"]
            assert now[a["id"]]["elastic"]["n_threads"] == 1
            assert now[b["id"]]["elastic"]["state"] == "own"
            assert {frozenset(aff) for aff in _affinities(a["pid"]) if aff != both} == {
                frozenset(a["cores"])
            }
    assert f"worker {b['id']} cores lent → reclaiming" in server.log_text()


def _streaming_worker(server, stream, lines) -> dict:
    """The worker serving `stream`, once it has sent a token."""
    skip_to_first_token(lines)
    return _workers(server)[stream.headers["x-llamapool-worker"].split()[0]]


def _decode_threads(server, worker: dict) -> int | None:
    """The threads a worker's decodes run, as its last heartbeat said."""
    return _workers(server)[worker["id"]]["elastic"].get("decode_threads")


def test_a_widened_decode_spins_between_its_threads_instead_of_sleeping(serve, smollm2_gguf):
    # OpenMP (libgomp) counts its CPUs from the thread that loads it. Loaded by an engine
    # thread already pinned to one core, it counted one; a decode widened to two threads
    # then had more threads than CPUs, and each thread slept at nearly every barrier of
    # the graph (~245 times a token) instead of spinning for the other: ~20% slower.
    server = _two_elastic_instances(serve, smollm2_gguf)
    with _stream(server, "Write a long story.") as stream:
        lines = stream.iter_lines()
        busy = _streaming_worker(server, stream, lines)
        server.wait_for(
            lambda: _decode_threads(server, busy) == 2, what="a widened decode", every=0.5
        )
        skip_to_first_token(lines)  # a step that started after the widening has ended
        before, tokens = _sleeps(busy["pid"]), 0
        for line in lines:
            tokens += is_content_line(line)
            if tokens == 64:
                break
        after = _sleeps(busy["pid"])
    per_token = {tid: (after[tid] - before.get(tid, 0)) / tokens for tid in after}
    # A thread that forwards tokens wakes about once a token; a decode thread that sleeps
    # at its barriers, hundreds of times.
    assert max(per_token.values()) < 20, per_token


def test_a_widened_decode_leaves_a_lent_core_that_other_work_keeps_busy(serve, smollm2_gguf):
    # The supervisor sees idle instances, not idle cores: with a busy loop on the lent core,
    # a two-thread decode waits at every barrier for the thread that shares it, up to
    # seconds a token. The worker sees the other work (or the slow decodes), decodes on its
    # own thread, and tries the lent core again later.
    server = _two_elastic_instances(serve, smollm2_gguf)
    with _stream(server, "Write a long story.") as stream:
        lines = stream.iter_lines()
        a = _streaming_worker(server, stream, lines)
        lent = ({0, 1} - set(a["cores"])).pop()
        # A client reading as it comes, as any would; the checks poll gently (each poll is
        # work on these two cores too).
        closing = threading.Event()
        reader = threading.Thread(target=_drain, args=(lines, closing), daemon=True)
        reader.start()

        def decode_threads():
            return _decode_threads(server, a)

        server.wait_for(lambda: decode_threads() == 2, what="a widened decode", every=0.5)
        loop = f"import os\nos.sched_setaffinity(0, {{{lent}}})\nwhile True: pass"
        hog = subprocess.Popen([sys.executable, "-c", loop])
        try:
            server.wait_for(lambda: decode_threads() == 1, what="the widening declined", every=0.5)
        finally:
            hog.kill()
            hog.wait()
        elastic = _workers(server)[a["id"]]["elastic"]
        assert (elastic["state"], elastic["cores"], elastic["n_threads"]) == (
            "borrowing",
            [0, 1],
            2,
        )
        # The core is free again: a retry finds two threads faster and keeps them.
        server.wait_for(lambda: decode_threads() == 2, timeout=60, what="the retry", every=0.5)
        closing.set()
    reader.join(timeout=10)
    log = server.log_text()
    assert "decode threads wide → declined" in log or "decode threads trial → declined" in log

"""The data channel between the router and a worker's engine, over a real socket pair,
and over a TLS connection as a worker that dials back has (ipc.remote).

The router's end (`DataChannel`, on an asyncio loop) and the engine's end (`Inbox`,
read like a queue by `serve`) talk to each other here exactly as they do in the pool.
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import ssl
import threading

import pytest

from llamapool.ipc import protocol as P
from llamapool.ipc.channel import DataChannel
from llamapool.ipc.remote import make_certificate
from llamapool.pool.engine_io import Inbox
from llamapool.pool.worker import Worker


class _Engineside:
    """The parts of Worker the inbox calls, recording what it did."""

    def __init__(self, accept: bool = True):
        self.worker_id = "m-1"
        self.wake_r, self.wake_w = os.pipe()
        self.stopping = False
        self.accepting = accept
        self.accepted: list[str] = []
        self.refused: list[str] = []
        self.cancelled: list[str] = []

    def accept(self, msg: P.Request, inbox: Inbox) -> bool:
        (self.accepted if self.accepting else self.refused).append(msg.request_id)
        return self.accepting

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    def stop(self) -> None:
        self.stopping = True
        os.write(self.wake_w, b"x")

    def close(self) -> None:
        os.close(self.wake_r)
        os.close(self.wake_w)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    cert, key, _ = make_certificate(str(tmp_path_factory.mktemp("wire")))
    return cert, key


def _tls_pair(certificate: tuple[str, str]) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """Both ends of a socket pair wrapped in TLS 1.3, as the router and a worker hold them."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(*certificate)
    server.num_tickets = 0
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    ends: list = []
    thread = threading.Thread(target=lambda: ends.append(client.wrap_socket(b)))
    thread.start()
    router_end = server.wrap_socket(a, server_side=True)
    thread.join(10)
    return router_end, ends[0]


@pytest.fixture(params=["socketpair", "tls"])
def pair(request, certificate):
    if request.param == "tls":
        router_end, engine_end = _tls_pair(certificate)
    else:
        router_end, engine_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    worker = _Engineside()
    yield router_end, Inbox(worker, engine_end), worker  # type: ignore[arg-type]
    engine_end.close()
    router_end.close()
    worker.close()


def _request(rid: str, prompt: str = "hi") -> P.Request:
    return P.Request(request_id=rid, kind="completion", prompt=prompt)


def _get(inbox: Inbox, timeout: float = 10.0):
    """inbox.get(), failing after `timeout` instead of hanging the suite."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(inbox.get()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert result, f"inbox.get() returned nothing within {timeout} s"
    return result[0]


def test_requests_reach_the_engine_and_output_reaches_the_router(pair):
    router_end, inbox, worker = pair

    async def scenario() -> list:
        received: list = []
        got_done = asyncio.Event()

        def on_message(msg):
            received.append(msg)
            if isinstance(msg, P.Done):
                got_done.set()

        channel = DataChannel(asyncio.get_running_loop(), router_end, on_message, pytest.fail)
        assert channel.send(_request("r-1"))

        def engine() -> None:
            req = inbox.get()
            inbox.send(P.Chunk(request_id=req.request_id, text="a", tokens=1))
            inbox.send(P.Done(request_id=req.request_id, finish_reason="stop", usage=P.Usage(1, 1)))

        thread = threading.Thread(target=engine)
        thread.start()
        await asyncio.wait_for(got_done.wait(), 10)
        thread.join()
        channel.close()
        return received

    received = asyncio.run(scenario())
    assert [type(m).__name__ for m in received] == ["Chunk", "Done"]
    assert worker.accepted == ["r-1"]


def test_a_cancel_is_applied_in_order_and_a_refused_request_never_returned(pair):
    router_end, inbox, worker = pair
    router_end.sendall(P.pack(_request("r-1")) + P.pack(P.Cancel(request_id="r-1")))
    assert _get(inbox).request_id == "r-1"
    assert worker.cancelled == []  # not read yet: the engine reads between steps
    with pytest.raises(queue.Empty):
        inbox.get_nowait()
    assert worker.cancelled == ["r-1"]
    worker.accepting = False
    router_end.sendall(P.pack(_request("r-2")))
    with pytest.raises(queue.Empty):
        inbox.get_nowait()
    assert worker.refused == ["r-2"]


def test_stop_ends_a_blocked_get_once(pair):
    _, inbox, worker = pair
    result: list = []
    thread = threading.Thread(target=lambda: result.append(inbox.get()), daemon=True)
    thread.start()
    worker.stop()
    thread.join(10)
    assert result == [None]
    with pytest.raises(queue.Empty):  # like a queue: the sentinel is said once
        inbox.get_nowait()


def test_the_router_going_away_ends_the_engine(pair):
    router_end, inbox, _ = pair
    router_end.close()
    assert _get(inbox) is None


def test_a_ping_waits_for_its_own_pong_and_keeps_what_came_before_it(pair):
    router_end, inbox, worker = pair
    # A stale PONG (of an earlier fault that gave up) does not count.
    router_end.sendall(P.pack(P.Pong(seq=9)) + P.pack(_request("r-1")) + P.pack(P.Pong(seq=1)))
    inbox.ping(10)
    assert P.FrameReader().feed(router_end.recv(1024)) == [P.Ping(seq=1)]
    assert worker.accepted == []
    assert _get(inbox).request_id == "r-1"


def test_a_full_socket_buffers_and_flushes_without_blocking_the_loop(pair):
    router_end, inbox, _ = pair
    router_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = _request("r-big", prompt="x" * (1 << 20))

    async def scenario() -> DataChannel:
        channel = DataChannel(asyncio.get_running_loop(), router_end, pytest.fail, pytest.fail)
        assert channel.send(big)  # returns at once: the rest waits in the channel
        assert channel.out
        assert channel.send(_request("r-2"))
        got = await asyncio.to_thread(lambda: [_get(inbox), _get(inbox)])
        assert [r.request_id for r in got] == ["r-big", "r-2"]
        assert got[0].prompt == big.prompt
        assert not channel.out  # the engine has every byte, so nothing is left to flush
        return channel

    asyncio.run(scenario()).close()


def test_a_malformed_frame_closes_the_channel_after_what_came_before(pair):
    router_end, inbox, _ = pair
    done = P.Done(request_id="r-1", finish_reason="stop", usage=P.Usage(1, 1))

    async def scenario() -> tuple[list, list[str], DataChannel]:
        received: list = []
        broken: list[str] = []
        reported = asyncio.Event()

        def on_broken(why: str) -> None:
            broken.append(why)
            reported.set()

        channel = DataChannel(asyncio.get_running_loop(), router_end, received.append, on_broken)
        inbox.sock.sendall(P.pack(done) + b"\x00\x00\x00\x00")
        await asyncio.wait_for(reported.wait(), 10)
        return received, broken, channel

    received, broken, channel = asyncio.run(scenario())
    assert received == [done]
    assert broken == ["bad frame length 0"]
    assert channel.closed
    assert not channel.send(_request("r-1"))


def test_sending_to_a_gone_worker_says_so(pair):
    router_end, inbox, _ = pair

    async def scenario() -> bool:
        channel = DataChannel(asyncio.get_running_loop(), router_end, pytest.fail, pytest.fail)
        inbox.sock.close()
        ok = channel.send(_request("r-1"))
        channel.close()
        return ok

    assert asyncio.run(scenario()) is False


# -- admission against a drain (the request and the SHUTDOWN use different sockets) ----


class _Admission:
    """The state Worker.accept and Worker.stop_accepting share."""

    def __init__(self) -> None:
        self.worker_id = "m-1"
        self.active: set[str] = set()
        self.active_lock = threading.Lock()
        self.draining = False
        self.busy_since = 0.0
        self.engine = type("E", (), {"capacity": 2})()


def test_a_request_that_beat_the_drain_is_waited_for(pair):
    router_end, inbox, _ = pair
    w = _Admission()
    assert Worker.accept(w, _request("r-1"), inbox)
    assert Worker.stop_accepting(w, drain=True) is False  # r-1 runs to its end first
    assert Worker.stop_accepting(w, drain=False) is True  # a hard stop does not wait


def test_a_request_after_the_drain_is_refused_as_retryable(pair):
    router_end, inbox, _ = pair
    w = _Admission()
    assert Worker.stop_accepting(w, drain=True) is True  # idle: may exit at once
    assert not Worker.accept(w, _request("r-1"), inbox)
    (refusal,) = P.FrameReader().feed(router_end.recv(4096))
    assert refusal.code == "worker_busy" and refusal.retryable
    assert "draining" in refusal.message
    assert w.active == set()


def test_a_full_engine_refuses_with_what_it_is_busy_with(pair):
    router_end, inbox, _ = pair
    w = _Admission()
    assert Worker.accept(w, _request("r-1"), inbox)
    assert Worker.accept(w, _request("r-2"), inbox)
    assert not Worker.accept(w, _request("r-3"), inbox)
    (refusal,) = P.FrameReader().feed(router_end.recv(4096))
    assert refusal.message == "worker m-1 is busy with ['r-1', 'r-2']"


def test_a_done_over_the_frame_limit_becomes_an_error_for_that_request(pair, monkeypatch):
    from llamapool.pool.engine import Result
    from llamapool.pool.engine_io import DataSink

    router_end, inbox, _ = pair
    seen: list = []
    worker = type(
        "W",
        (),
        {
            "faults": None,
            "finished": lambda self, rid: seen.append(("finished", rid)),
            "notify": lambda self, notice: seen.append(("notify", notice)),
        },
    )()
    monkeypatch.setattr(P, "MAX_FRAME", 4096)
    vectors = [[0.25] * 1024]  # ~9 KiB of msgpack floats
    DataSink(worker, inbox).done("r-1", Result("stop", P.Usage(3, 0), embeddings=vectors))
    (error,) = P.FrameReader().feed(router_end.recv(4096))
    assert error.request_id == "r-1" and error.code == "generation_failed"
    assert "over the 4096-byte frame limit" in error.message
    assert seen == [("finished", "r-1"), ("notify", b"finished")]


def test_held_chunks_leave_together_before_the_next_frame_or_wait(pair):
    from llamapool.errors import ErrorCode
    from llamapool.pool.engine_io import DataSink

    router_end, inbox, _ = pair
    worker = type(
        "W",
        (),
        {"faults": type("F", (), {"kind": None})(), "finished": id, "notify": id},
    )()
    sink = DataSink(worker, inbox, hold_chunks=True)  # type: ignore[arg-type]
    sink.chunk("r-1", "a", 1)
    sink.chunk("r-2", "b", 1)
    router_end.setblocking(False)
    with pytest.raises((BlockingIOError, ssl.SSLWantReadError)):
        router_end.recv(4096)  # held: nothing is written before the step ends
    router_end.setblocking(True)
    with pytest.raises(queue.Empty):
        inbox.get_nowait()  # the engine asks for work between steps: the held frames go
    reader = P.FrameReader()
    got: list = []
    while len(got) < 2:
        got += reader.feed(router_end.recv(4096))
    assert got == [P.Chunk("r-1", "a", 1), P.Chunk("r-2", "b", 1)]
    sink.chunk("r-1", "c", 1)
    sink.error("r-1", ErrorCode.CANCELLED, "gone")  # an end goes at once, after its text
    while len(got) < 4:
        got += reader.feed(router_end.recv(4096))
    assert [type(m) for m in got[2:]] == [P.Chunk, P.Error]

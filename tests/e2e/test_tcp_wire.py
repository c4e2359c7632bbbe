"""Workers that dial back over TCP (`placement: {transport: tcp}`): CURVE control, TLS
data, a one-time token; real processes on one machine, as a Ray node's would run."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import time

import httpx
import psutil
import zmq
from serverutil import chat, chat_body, model_entry, skip_to_first_token, tagged_processes

from llamapool.ipc import protocol as P
from llamapool.ipc.remote import WIRE_ENV, WireTicket

TCP = {"placement": {"backend": "local", "transport": "tcp"}}
FAST = {"heartbeat_interval": 0.5, "backoff_initial": 0.05}


def _ports(log: str) -> tuple[int, int, bytes]:
    """(control port, data port, CURVE server key) from the router's start-up line."""
    m = re.search(r"control tcp://[\d.]+:(\d+) \(CURVE, server key (\S+)\), data [\d.]+:(\d+)", log)
    assert m, log
    return int(m.group(1)), int(m.group(3)), m.group(2).encode()


def _tcp_peers(proc: psutil.Process) -> set[int]:
    return {c.raddr.port for c in proc.net_connections("tcp") if c.status == "ESTABLISHED"}


def test_tcp_workers_serve_chats_and_crash_like_local_ones(serve, tiny_gguf, tmp_path):
    server = serve(
        [model_entry("m", tiny_gguf)],
        pool=FAST,
        extra=TCP,
        env={"LLAMAPOOL_TEST_FAULT": "stall:1", "LLAMAPOOL_TEST_FAULT_FILE": str(tmp_path / "f")},
    )
    control, data, _ = _ports(server.log_text())
    (worker,) = server.workers()
    assert _tcp_peers(worker) == {control, data}
    assert not [c for c in worker.net_connections("unix")]  # no socket pair

    # The stall fault: the first request's engine sends one token (and a PING through
    # TLS), then hangs; a SIGKILL then ends the stream as it would locally.
    body = chat_body("m", "x", 64, stream=True)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        skip_to_first_token(lines)
        # The token reaches the client before the engine hears the router's PONG and the
        # fault counts itself; killed earlier, the replacement would stall instead.
        fired = tmp_path / "f"
        server.wait_for(lambda: fired.exists() and fired.stat().st_size, what="the stall fault")
        os.kill(worker.pid, signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    error = json.loads(rest[-2][len("data: ") :])["error"]
    assert error["code"] == "worker_crashed" and "SIGKILL" in error["message"]

    r = chat(server.url, max_tokens=8)  # the replacement dials back with a fresh ticket
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8
    text = ""
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                text += delta.get("content") or ""
    assert text
    (replacement,) = server.workers()
    assert _tcp_peers(replacement) == {control, data}


def test_strangers_are_refused_and_the_worker_still_works(serve, tiny_gguf):
    server = serve([model_entry("m", tiny_gguf)], pool=FAST, extra=TCP)
    control, data, server_key = _ports(server.log_text())
    (worker,) = server.workers()
    ticket = WireTicket.decode(worker.environ()[WIRE_ENV])
    silent = socket.create_connection(("127.0.0.1", data))  # never says a word

    # A control connection with a key the router never issued: no READY gets through.
    ctx = zmq.Context()
    stranger = ctx.socket(zmq.DEALER)
    public, secret = zmq.curve_keypair()
    stranger.setsockopt(zmq.CURVE_SERVERKEY, server_key)
    stranger.setsockopt(zmq.CURVE_PUBLICKEY, public)
    stranger.setsockopt(zmq.CURVE_SECRETKEY, secret)
    stranger.setsockopt(zmq.IDENTITY, b"m-9")
    stranger.setsockopt(zmq.LINGER, 0)
    stranger.connect(f"tcp://127.0.0.1:{control}")
    stranger.send_multipart(
        P.encode(P.Ready(worker_id="m-9", pid=1, model_id="m", n_ctx=1, capacity=1))
    )

    # Data connections: a wrong token, and the real worker's token used a second time.
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    for token in (b"\0" * 32, bytes.fromhex(ticket.token)):
        with tls.wrap_socket(socket.create_connection(("127.0.0.1", data), timeout=10)) as s:
            s.sendall(b"LPW1" + token)
            assert s.recv(1) == b""  # closed, nothing accepted

    # A control connection with the real worker's key, speaking as another worker: ZAP
    # lets the key in, the router refuses every message whose key is not its identity's.
    impostor = ctx.socket(zmq.DEALER)
    impostor.setsockopt(zmq.CURVE_SERVERKEY, server_key)
    impostor.setsockopt(zmq.CURVE_PUBLICKEY, ticket.public_key.encode())
    impostor.setsockopt(zmq.CURVE_SECRETKEY, ticket.secret_key.encode())
    impostor.setsockopt(zmq.IDENTITY, b"m-7")
    impostor.setsockopt(zmq.LINGER, 0)
    impostor.connect(f"tcp://127.0.0.1:{control}")
    impostor.send_multipart(
        P.encode(P.Ready(worker_id="m-7", pid=1, model_id="m", n_ctx=1, capacity=1))
    )

    server.wait_for(
        lambda: f"unknown CURVE key {public.decode()}" in server.log_text(), what="CURVE refusal"
    )
    server.wait_for(
        lambda: "identity m-7 sent with the CURVE key of m-1" in server.log_text(),
        what="User-Id refusal",
    )
    log = server.log_text()
    assert log.count("wrong or already used token") == 2
    assert chat(server.url, max_tokens=4).status_code == 200
    assert [w["pid"] for w in server.pool()["workers"]] == [worker.pid]

    silent.settimeout(10)
    assert silent.recv(1) == b""  # closed by the router
    assert "no token within 5 s" in server.log_text()
    silent.close()
    stranger.close()
    impostor.close()
    ctx.term()


def test_tcp_worker_exits_when_the_router_is_killed(serve, tiny_gguf):
    server = serve([model_entry("m", tiny_gguf)], pool=FAST, extra=TCP)
    (worker,) = server.workers()
    server.proc.kill()
    server.proc.wait()
    deadline = time.monotonic() + 10
    while tagged_processes(server.tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not tagged_processes(server.tag)
    assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE


def test_tcp_worker_exits_when_the_router_falls_silent(serve, tiny_gguf):
    # A stopped router keeps its TCP connections open, as a remote node's view of a hung
    # or partitioned router would: only the heartbeat silence check can end the worker.
    server = serve([model_entry("m", tiny_gguf)], pool=FAST, extra=TCP)
    (worker,) = server.workers()
    server.proc.send_signal(signal.SIGSTOP)
    try:
        # A zombie until its stopped parent reaps it.
        server.wait_for(
            lambda: worker.status() == psutil.STATUS_ZOMBIE, timeout=10, what="the worker's exit"
        )
    finally:
        server.proc.send_signal(signal.SIGCONT)
    # 0.5 s × 5 of silence at least; a loaded box notices a check or two later.
    silent = re.search(r"no message from the router for (\d+\.\d) s", server.log_text())
    assert silent and float(silent.group(1)) >= 2.5, server.log_text()
    assert chat(server.url, max_tokens=4).status_code == 200  # served by a replacement

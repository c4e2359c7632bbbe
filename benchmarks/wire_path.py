"""The data path's own cost: a socket pair vs TCP vs the TLS wire of workers that dial back.

The router's `DataChannel` on an event loop and a worker's `Inbox` in a thread, as in the
pool, with no model: the round trip of a REQUEST and its first CHUNK, and how many CHUNKs
a second the router takes from one worker. `python -m benchmarks.wire_path`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import tempfile
import threading
import time

import zmq

from llamapool.ipc import protocol as P
from llamapool.ipc.channel import DataChannel
from llamapool.ipc.remote import RemoteWire, dial_data
from llamapool.pool.engine_io import Inbox

ROUND_TRIPS = 2000
STREAM = 20000


class _Worker:
    """What Inbox needs of a Worker."""

    worker_id = "bench-1"

    def __init__(self) -> None:
        self.wake_r, self.wake_w = os.pipe()
        self.stopping = False

    def accept(self, msg: P.Request, inbox: Inbox) -> bool:
        return True

    def cancel(self, request_id: str) -> None:
        pass


def _engine(inbox: Inbox) -> None:
    """Answer each request with one chunk; a request for "stream" with STREAM chunks."""
    while (req := inbox.get()) is not None:
        n = STREAM if req.prompt == "stream" else 1
        for i in range(n):
            inbox.send(P.Chunk(request_id=req.request_id, text=" token", tokens=i + 1))


async def _measure(router_end: socket.socket, engine_end: socket.socket) -> tuple[float, float]:
    worker = _Worker()
    inbox = Inbox(worker, engine_end)  # type: ignore[arg-type]
    thread = threading.Thread(target=_engine, args=(inbox,), daemon=True)
    thread.start()
    loop = asyncio.get_running_loop()
    got: asyncio.Queue = asyncio.Queue()
    channel = DataChannel(loop, router_end, got.put_nowait, print)
    rtts = []
    for i in range(ROUND_TRIPS):
        t0 = time.perf_counter()
        channel.send(P.Request(request_id=f"r-{i}", kind="completion", prompt="x"))
        await got.get()
        rtts.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    channel.send(P.Request(request_id="s", kind="completion", prompt="stream"))
    for _ in range(STREAM):
        await got.get()
    rate = STREAM / (time.perf_counter() - t0)
    worker.stopping = True
    os.write(worker.wake_w, b"x")
    thread.join(5)
    channel.close()
    engine_end.close()
    return statistics.median(rtts) * 1e6, rate


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
    for s in (client, conn):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn, client


async def _tls_pair(
    ctx: zmq.Context, runtime: str
) -> tuple[RemoteWire, socket.socket, socket.socket]:
    wire = RemoteWire(ctx, runtime, "127.0.0.1")
    arrived: asyncio.Future = asyncio.get_running_loop().create_future()
    wire.start(asyncio.get_running_loop(), lambda worker_id, tls: arrived.set_result(tls))
    worker_end = await asyncio.to_thread(dial_data, wire.issue("bench-1"))
    return wire, await arrived, worker_end


async def main() -> None:
    print(f"{'path':<12} {'round trip p50':>15} {'chunks/s':>10}")
    for name in ("socketpair", "tcp", "tls"):
        wire = None
        ctx = zmq.Context()
        with tempfile.TemporaryDirectory() as runtime:
            if name == "socketpair":
                router_end, engine_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            elif name == "tcp":
                router_end, engine_end = _tcp_pair()
            else:
                wire, router_end, engine_end = await _tls_pair(ctx, runtime)
            rtt, rate = await _measure(router_end, engine_end)
            if wire is not None:
                wire.close()
        ctx.term()
        print(f"{name:<12} {rtt:>12.1f} µs {rate:>10.0f}")


if __name__ == "__main__":
    try:
        import uvloop  # the router's loop when installed

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())

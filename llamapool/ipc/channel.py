"""The router's end of a worker's data socket, driven by the asyncio loop.

Frames in are read by a loop reader and handed over one message at a time; frames out
are written at once and, if the socket is full, buffered until it drains. Nothing here
ever blocks the loop.

The socket is a socket pair's end, or a worker's TLS connection (ipc.remote): TLS says
"try again" with SSLWantReadError / SSLWantWriteError, which are OSErrors, not
BlockingIOErrors, and holds decrypted bytes the descriptor no longer shows.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from llamapool.ipc import protocol as P

log = logging.getLogger("llamapool.channel")

_READ_SIZE = 1 << 16
_AGAIN = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class DataChannel:
    """One worker's data socket, seen from the router's loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_message: Callable[[Any], None],
        on_broken: Callable[[str], None],
    ):
        sock.setblocking(False)
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.on_message = on_message
        self.on_broken = on_broken
        self.reader = P.FrameReader()
        self.out = bytearray()
        self.closed = False
        self.eof = False
        self.tls = isinstance(sock, ssl.SSLSocket)
        loop.add_reader(self.fd, self.read)

    def send(self, message: Any) -> bool:
        """Queue one message; False when the worker's end is gone."""
        if self.closed or self.eof:
            return False
        data = P.pack(message)
        if not self.out:
            try:
                sent = self.sock.send(data)
            except _AGAIN:
                # TLS: a retry must offer the same bytes first, and `out` starts with them.
                sent = 0
            except OSError:
                return False
            if sent == len(data):
                return True
            data = data[sent:]
            self.loop.add_writer(self.fd, self._flush)
        self.out += data
        return True

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except _AGAIN:
            return
        except OSError:
            sent = len(self.out)  # the worker is gone; its reaping tells the story
        del self.out[:sent]
        if not self.out:
            self.loop.remove_writer(self.fd)

    def read(self, *, to_the_end: bool = False) -> None:
        """Handle what the socket holds now: the loop's reader callback, or with
        `to_the_end` a last drain until the socket is empty."""
        while not self.closed and not self.eof:
            try:
                data = self.sock.recv(_READ_SIZE)
            except _AGAIN:
                return
            except OSError:
                data = b""
            if not data:
                # The worker closed its end or died; the supervisor reaps the process.
                self.eof = True
                self.loop.remove_reader(self.fd)
                return
            for message in self.reader.feed(data):
                try:
                    self.on_message(message)
                except Exception:  # one bad message must not lose the ones after it
                    log.exception("failed to handle %s from a worker", type(message).__name__)
            if self.reader.error is not None:
                self.close()
                self.on_broken(str(self.reader.error))
                return
            if len(data) < _READ_SIZE and not to_the_end:
                # A short read emptied the socket (spare the EAGAIN syscall), unless TLS
                # holds decrypted bytes: one TLS read returns at most one record.
                if not (self.tls and self.sock.pending()):
                    return

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        self.sock.close()

"""The TCP wire for workers that dial back: CURVE on the control socket, TLS for data.

The router is the CURVE server and knows every worker's public key: `RemoteWire.issue`
makes a key pair and a one-time token per worker and hands them out as a `WireTicket`
(the launcher passes it to the worker in its environment). A launcher on another machine
makes them there instead (`make_secrets`) and hands the router only the public key and
the token's SHA-256 (`RemoteWire.admit`), so no secret crosses the launcher's own
channels. A ZAP handler refuses any other key; each control message's ZAP User-Id (the
sender's key) must belong to the worker its ZeroMQ identity names (`owner_of`).

The data connection is TCP wrapped in TLS 1.3 with a self-signed certificate the router
makes at start in its 0700 runtime directory; the worker pins the certificate's SHA-256
and then proves who it is with its token, the first bytes it sends. The router maps the
connection to the worker by the token's hash, once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import socket
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import zmq
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("llamapool.wire")

WIRE_ENV = "LLAMAPOOL_WORKER_WIRE"
ZAP_DOMAIN = "llamapool"
# The first bytes on a data connection: a version tag, then the worker's token.
_MAGIC = b"LPW1"
_TOKEN_BYTES = 32
_HELLO = len(_MAGIC) + _TOKEN_BYTES
_ACCEPTED = b"\x01"
# A connection that has not finished its handshake and sent its token by then is closed.
HELLO_TIMEOUT = 5.0


class RouterAddress(msgspec.Struct, frozen=True):
    """The public half of a ticket: where the router listens and how to recognise it."""

    data_host: str
    data_port: int
    cert_sha256: str
    server_key: str


class WireTicket(msgspec.Struct, frozen=True):
    """What one worker needs to dial back: keys, token and where to find the router."""

    data_host: str
    data_port: int
    cert_sha256: str  # hex; the worker pins the router's certificate to it
    token: str  # hex, good for one data connection
    server_key: str  # z85 CURVE keys
    public_key: str
    secret_key: str

    def encode(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def decode(cls, text: str) -> WireTicket:
        return msgspec.json.decode(text.encode(), type=cls)


def make_secrets(router: RouterAddress) -> tuple[WireTicket, str, str]:
    """A worker's ticket made where it runs: (ticket, public key, token SHA-256 hex).

    The caller hands the router the last two (`RemoteWire.admit`) and the ticket to the
    worker; the secret key and the token never leave this machine.
    """
    public, secret = zmq.curve_keypair()
    token = secrets.token_bytes(_TOKEN_BYTES)
    ticket = WireTicket(
        data_host=router.data_host,
        data_port=router.data_port,
        cert_sha256=router.cert_sha256,
        token=token.hex(),
        server_key=router.server_key,
        public_key=public.decode(),
        secret_key=secret.decode(),
    )
    return ticket, public.decode(), hashlib.sha256(token).hexdigest()


def make_certificate(directory: str) -> tuple[str, str, str]:
    """A self-signed P-256 certificate and key in `directory`: (cert, key, sha256 hex)."""
    cert, key = os.path.join(directory, "wire.crt"), os.path.join(directory, "wire.key")
    # The openssl CLI rather than a new dependency: Python's ssl cannot make certificates.
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "3650",
            "-subj", "/CN=llamapool-router", "-keyout", key, "-out", cert,
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    os.chmod(key, 0o600)
    with open(cert) as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    return cert, key, hashlib.sha256(der).hexdigest()


@dataclass
class _Hello:
    """A data connection that has not yet proved whose it is."""

    tls: ssl.SSLSocket
    peer: str
    buf: bytearray = field(default_factory=bytearray)
    shaken: bool = False  # the TLS handshake is done
    timer: asyncio.TimerHandle | None = None


class RemoteWire:
    """The router's side of the TCP wire: keys, tokens, the TLS data listener."""

    def __init__(self, ctx: zmq.Context, runtime_dir: str, host: str, data_port: int = 0):
        self.host = host
        self.server_public, self.server_secret = zmq.curve_keypair()
        # Written by the launcher (perhaps from another thread), read by the ZAP thread and
        # the loop: single dict operations only, never an iteration over a live table.
        self.keys: dict[bytes, str] = {}  # allowed client public key (z85) → worker id
        self.tokens: dict[bytes, str] = {}  # SHA-256 of an unused token → worker id
        self.refused = 0
        cert, key, self.cert_sha256 = make_certificate(runtime_dir)
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.minimum_version = ssl.TLSVersion.TLSv1_3
        self.tls.load_cert_chain(cert, key)
        # No session tickets: a worker's blocking read must only ever meet application data.
        self.tls.num_tickets = 0
        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("llamapool.wire.zap"))
        self.auth.start()
        self.auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self)
        self.listener = socket.create_server((host, data_port))
        self.listener.setblocking(False)
        self.data_port = self.listener.getsockname()[1]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_connected: Callable[[str, ssl.SSLSocket], None] = lambda w, s: s.close()
        self._hellos: set[int] = set()

    # -- CURVE (called by the ZAP thread) -----------------------------------------

    def callback(self, domain: str, key: bytes) -> bool:
        """Whether a control connection's CURVE key belongs to a live worker."""
        if key in self.keys:
            return True
        self.refused += 1
        log.warning("refused a control connection: unknown CURVE key %s", key.decode())
        return False

    # -- tickets ---------------------------------------------------------------------

    def address(self) -> RouterAddress:
        """What a worker needs to find and recognise this router (nothing secret)."""
        return RouterAddress(
            data_host=self.host,
            data_port=self.data_port,
            cert_sha256=self.cert_sha256,
            server_key=self.server_public.decode(),
        )

    def issue(self, worker_id: str) -> WireTicket:
        """Keys and a one-time token for a worker about to start on this machine."""
        ticket, public, token_sha256 = make_secrets(self.address())
        self.admit(worker_id, public, token_sha256)
        return ticket

    def admit(self, worker_id: str, public_key: str, token_sha256: str) -> None:
        """Accept a worker's control key and, once, the token with this SHA-256."""
        self.keys[public_key.encode()] = worker_id
        self.tokens[bytes.fromhex(token_sha256)] = worker_id

    def owner_of(self, user_id: str | None) -> str | None:
        """The worker whose key a control message's ZAP User-Id (its z85 key) is."""
        return self.keys.get(user_id.encode()) if user_id else None

    def revoke(self, worker_id: str) -> None:
        """Forget a gone worker's key and unused token: nothing can use them again."""
        for table in (self.keys, self.tokens):
            for k in [k for k, w in list(table.items()) if w == worker_id]:
                table.pop(k, None)

    # -- data connections ----------------------------------------------------------

    def start(
        self, loop: asyncio.AbstractEventLoop, on_connected: Callable[[str, ssl.SSLSocket], None]
    ) -> None:
        """Accept data connections from the loop; `on_connected(worker_id, tls)` per worker."""
        self._loop = loop
        self._on_connected = on_connected
        loop.add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._loop is not None
        while True:
            try:
                conn, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("data listener: accept failed: %s", exc)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            hello = _Hello(tls, f"{addr[0]}:{addr[1]}")
            hello.timer = self._loop.call_later(
                HELLO_TIMEOUT, self._refuse, hello, f"no token within {HELLO_TIMEOUT:g} s"
            )
            self._hellos.add(tls.fileno())
            self._step(hello)

    def _wait(self, hello: _Hello, readable: bool) -> None:
        assert self._loop is not None
        fd = hello.tls.fileno()
        self._loop.remove_reader(fd)
        self._loop.remove_writer(fd)
        if readable:
            self._loop.add_reader(fd, self._step, hello)
        else:
            self._loop.add_writer(fd, self._step, hello)

    def _step(self, hello: _Hello) -> None:
        """Drive one connection's handshake and token read as far as its bytes allow."""
        tls = hello.tls
        try:
            if not hello.shaken:
                tls.do_handshake()
                hello.shaken = True
            while len(hello.buf) < _HELLO:
                data = tls.recv(_HELLO - len(hello.buf))
                if not data:
                    self._refuse(hello, "closed before sending its token")
                    return
                hello.buf += data
        except ssl.SSLWantReadError:
            self._wait(hello, readable=True)
            return
        except ssl.SSLWantWriteError:
            self._wait(hello, readable=False)
            return
        except OSError as exc:
            self._refuse(hello, f"TLS failed: {exc}")
            return
        # Looked up by its SHA-256: the table holds no token, and a lookup's timing says
        # nothing useful about a hash's preimage.
        digest = hashlib.sha256(bytes(hello.buf[len(_MAGIC) :])).digest()
        worker_id = self.tokens.pop(digest, None) if hello.buf.startswith(_MAGIC) else None
        if worker_id is None:
            self._refuse(hello, "wrong or already used token")
            return
        self._forget(hello)
        try:
            tls.send(_ACCEPTED)  # one byte into an empty socket buffer: never blocks
        except OSError as exc:
            log.warning("data connection of worker %s lost at once: %s", worker_id, exc)
            tls.close()
            return
        log.debug("data connection from %s is worker %s", hello.peer, worker_id)
        self._on_connected(worker_id, tls)

    def _forget(self, hello: _Hello) -> None:
        assert self._loop is not None
        fd = hello.tls.fileno()
        if fd in self._hellos:
            self._hellos.discard(fd)
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        if hello.timer is not None:
            hello.timer.cancel()

    def _refuse(self, hello: _Hello, why: str) -> None:
        if hello.tls.fileno() < 0:
            return  # already settled
        self.refused += 1
        log.warning("refused a data connection from %s: %s", hello.peer, why)
        self._forget(hello)
        hello.tls.close()

    def close(self) -> None:
        """Stop listening, close connections still saying hello, stop the ZAP thread."""
        if self._loop is not None:
            self._loop.remove_reader(self.listener.fileno())
            for fd in list(self._hellos):
                self._loop.remove_reader(fd)
                self._loop.remove_writer(fd)
        self.listener.close()
        self.auth.stop()


def dial_data(ticket: WireTicket, timeout: float = 10.0) -> ssl.SSLSocket:
    """The worker's data connection: TLS to the pinned router certificate, token sent,
    the router's acceptance read. A blocking socket, like a socket pair's end."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # Verified by pinning below, not by a CA: the router made the certificate itself.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection((ticket.data_host, ticket.data_port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tls = ctx.wrap_socket(raw)
    try:
        der = tls.getpeercert(binary_form=True) or b""
        if not hmac.compare_digest(hashlib.sha256(der).hexdigest(), ticket.cert_sha256):
            raise ConnectionError("the data listener's certificate is not the router's")
        tls.sendall(_MAGIC + bytes.fromhex(ticket.token))
        if tls.recv(1) != _ACCEPTED:
            raise ConnectionError("the router refused the data connection")
    except BaseException:
        tls.close()
        raise
    tls.settimeout(None)
    return tls


def curve_keys(ticket: WireTicket) -> tuple[bytes, bytes, bytes]:
    """(server public, own public, own secret) for the worker's DEALER socket."""
    return ticket.server_key.encode(), ticket.public_key.encode(), ticket.secret_key.encode()

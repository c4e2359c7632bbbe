"""ZeroMQ socket factories: a private ipc:// directory, ROUTER_MANDATORY, no linger."""

from __future__ import annotations

import os
import shutil
import tempfile

import zmq

# Generous high-water marks: a token stream is many small messages, and a
# dropped CHUNK would be a silent hole in a client's answer.
_HWM = 100_000


def make_ipc_dir() -> str:
    """A fresh directory only this user can enter (mkdtemp creates it 0700)."""
    path = tempfile.mkdtemp(prefix="llamapool-")
    os.chmod(path, 0o700)
    return path


def remove_ipc_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def broker_endpoint(ipc_dir: str) -> str:
    return f"ipc://{os.path.join(ipc_dir, 'broker')}"


def router_socket(ctx: zmq.Context, endpoint: str, curve_secret: bytes | None = None) -> zmq.Socket:
    """The router's ROUTER socket; a send to a gone worker raises EHOSTUNREACH.

    With `curve_secret` it is a CURVE server whose clients ZAP checks (ipc.remote).
    """
    sock = ctx.socket(zmq.ROUTER)
    if curve_secret is not None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve_secret)
        sock.setsockopt_string(zmq.ZAP_DOMAIN, "llamapool")
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, _HWM)
    sock.setsockopt(zmq.RCVHWM, _HWM)
    sock.bind(endpoint)
    return sock


def dealer_socket(
    ctx: zmq.Context,
    endpoint: str,
    identity: str,
    curve: tuple[bytes, bytes, bytes] | None = None,
) -> zmq.Socket:
    """A worker's DEALER socket whose identity is its worker id.

    `curve`: (server public, own public, own secret) keys for a CURVE-encrypted link.
    """
    sock = ctx.socket(zmq.DEALER)
    if curve is not None:
        server, public, secret = curve
        sock.setsockopt(zmq.CURVE_SERVERKEY, server)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, _HWM)
    sock.setsockopt(zmq.RCVHWM, _HWM)
    sock.connect(endpoint)
    return sock

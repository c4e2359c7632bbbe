"""The TCP wire's router side in one process: tokens, certificate pinning, CURVE keys."""

from __future__ import annotations

import asyncio
import socket
import ssl

import msgspec
import pytest
import zmq

from llamapool.ipc import remote
from llamapool.ipc.remote import RemoteWire, dial_data


@pytest.fixture
def wire(tmp_path):
    ctx = zmq.Context()
    w = RemoteWire(ctx, str(tmp_path), "127.0.0.1")
    yield w
    w.close()
    ctx.term()


def _run(wire: RemoteWire, scenario):
    """Run `scenario(connected)` on a loop the wire accepts on; `connected` collects
    (worker id, socket) pairs."""

    async def main():
        connected: list = []
        wire.start(asyncio.get_running_loop(), lambda w, s: connected.append((w, s)))
        try:
            return await scenario(connected)
        finally:
            for _, s in connected:
                s.close()

    return asyncio.run(main())


def test_a_token_opens_one_connection_and_only_once(wire):
    ticket = wire.issue("m-1")

    async def scenario(connected):
        tls = await asyncio.to_thread(dial_data, ticket)
        assert [w for w, _ in connected] == ["m-1"]
        tls.sendall(b"over tls")
        assert connected[0][1].recv(64) == b"over tls"
        tls.close()
        with pytest.raises(ConnectionError, match="refused"):
            await asyncio.to_thread(dial_data, ticket)  # the token is spent
        return len(connected)

    assert _run(wire, scenario) == 1
    assert wire.refused == 1


def test_a_wrong_certificate_gets_no_token(wire):
    ticket = msgspec.structs.replace(wire.issue("m-1"), cert_sha256="00" * 32)

    async def scenario(connected):
        with pytest.raises(ConnectionError, match="not the router's"):
            await asyncio.to_thread(dial_data, ticket)
        await asyncio.sleep(0.1)
        return connected

    assert _run(wire, scenario) == []
    assert wire.tokens  # never sent, still unused


def test_silence_and_revoked_tokens_are_refused(wire, monkeypatch):
    monkeypatch.setattr(remote, "HELLO_TIMEOUT", 0.2)
    ticket = wire.issue("m-1")
    wire.revoke("m-1")
    assert not wire.keys and not wire.tokens

    async def scenario(connected):
        silent = socket.create_connection(("127.0.0.1", wire.data_port))
        silent.settimeout(5)
        assert await asyncio.to_thread(silent.recv, 1) == b""
        silent.close()
        with pytest.raises(ConnectionError, match="refused"):
            await asyncio.to_thread(dial_data, ticket)
        return connected

    assert _run(wire, scenario) == []
    assert wire.refused == 2


def test_zap_knows_only_issued_keys(wire):
    ticket = wire.issue("m-1")
    assert wire.callback("llamapool", ticket.public_key.encode())
    stranger, _ = zmq.curve_keypair()
    assert not wire.callback("llamapool", stranger)
    wire.revoke("m-1")
    assert not wire.callback("llamapool", ticket.public_key.encode())


def test_the_key_file_is_private(wire, tmp_path):
    assert (tmp_path / "wire.key").stat().st_mode & 0o077 == 0
    assert ssl.PEM_cert_to_DER_cert((tmp_path / "wire.crt").read_text())


def test_secrets_made_elsewhere_admit_one_connection_by_the_tokens_hash(wire):
    # A launcher on another machine makes the ticket there: the router sees only the
    # public key and the token's SHA-256, and still admits exactly that worker, once.
    ticket, public, token_sha256 = remote.make_secrets(wire.address())
    assert token_sha256 != ticket.token and public == ticket.public_key
    wire.admit("m-2", public, token_sha256)
    assert wire.owner_of(public) == "m-2" and wire.owner_of("x" * 40) is None

    async def scenario(connected):
        tls = await asyncio.to_thread(dial_data, ticket)
        tls.close()
        with pytest.raises(ConnectionError, match="refused"):
            await asyncio.to_thread(dial_data, ticket)
        return [w for w, _ in connected]

    assert _run(wire, scenario) == ["m-2"]
    wire.revoke("m-2")
    assert wire.owner_of(public) is None

"""Bearer tokens: the admin token (from env, a file, or generated at start) and API keys.

A generated admin token is new at every start (a leaked token dies with the process) and is
written to `<state_dir>/admin.token` with mode 0600, where `llamapool ps` finds it. To keep
one token across restarts, set `LLAMAPOOL_ADMIN_TOKEN` or point at a token file.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from llamapool import errors
from llamapool.config import ConfigError

log = logging.getLogger("llamapool.auth")

ADMIN_TOKEN_ENV = "LLAMAPOOL_ADMIN_TOKEN"
ADMIN_TOKEN_FILE = "admin.token"
DEFAULT_STATE_DIR = (
    Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "llamapool"
)

ADMIN_PREFIX = "/admin"
API_PREFIX = "/v1"


def load_admin_token(token_file: str | None, *, state_dir: str | Path) -> tuple[str, Path | None]:
    """The admin token and, when it was generated here, the file it was written to.

    Order: `$LLAMAPOOL_ADMIN_TOKEN`, then `token_file` (must exist and not be empty), else a
    fresh `secrets.token_urlsafe(32)` written to `<state_dir>/admin.token` (mode 0600).
    Raises `ConfigError` for a missing, unreadable or empty token file.
    """
    from_env = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    if from_env:
        return from_env, None
    if token_file is not None:
        return _read_token_file(Path(token_file)), None
    token = secrets.token_urlsafe(32)
    return token, write_token_file(Path(state_dir) / ADMIN_TOKEN_FILE, token)


def _read_token_file(path: Path) -> str:
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"admin token file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read admin token file {path}: {exc.strerror}") from None
    token = text.strip()
    if not token:
        raise ConfigError(f"admin token file {path} is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("admin token file %s is readable by others; chmod 600 it", path)
    return token


def write_token_file(path: Path, token: str) -> Path:
    """Write `token` to `path` with mode 0600, replacing any old file atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    # A fresh O_EXCL file gets 0600 from the start (an existing file would keep its old
    # mode under O_TRUNC); os.replace then swaps it in, so no reader sees half a token.
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def check_bearer(header: str | None, allowed: Sequence[str]) -> bool:
    """True when the header's bearer token equals one of `allowed`.

    Every candidate is compared in constant time, with no early exit, so the timing says
    nothing about which key (or how much of one) matched.
    """
    token = bearer_token(header)
    if token is None:
        return False
    given = token.encode()
    ok = False
    for candidate in allowed:
        if candidate:
            ok |= hmac.compare_digest(given, candidate.encode())
    return ok


class BearerAuth:
    """ASGI middleware: `/admin*` needs the admin token, `/v1*` an API key when any is set.

    The admin token is accepted on `/v1` too. Everything else (`/health`, `/ready`,
    `/metrics`) is open. Failures get a 401 with an OpenAI-shaped error body.
    """

    def __init__(self, app: ASGIApp, *, admin_token: str, api_keys: Sequence[str] | None = None):
        if not admin_token:
            raise ValueError("admin_token must not be empty")
        self.app = app
        self.admin_tokens = (admin_token,)
        self.api_keys = tuple(k for k in api_keys or () if k)

    def _allowed(self, path: str) -> tuple[str, ...] | None:
        """The tokens that may call `path`, or None when it is open."""
        if path.startswith(ADMIN_PREFIX):
            return self.admin_tokens
        if path.startswith(API_PREFIX) and self.api_keys:
            return (*self.api_keys, *self.admin_tokens)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        allowed = self._allowed(scope["path"])
        if allowed is None:
            await self.app(scope, receive, send)
            return
        header = _header(scope, b"authorization")
        if check_bearer(header, allowed):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await _unauthorized(send, _why(header, admin=scope["path"].startswith(ADMIN_PREFIX)))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _why(header: str | None, *, admin: bool) -> str:
    what = "the admin token" if admin else "an API key"
    if not header:
        return f"missing Authorization: Bearer header; this endpoint needs {what}"
    if bearer_token(header) is None:
        return f"malformed Authorization header; expected 'Bearer <token>' with {what}"
    if admin:
        return "invalid token; admin endpoints need the admin token (see the server log)"
    return "invalid token; this endpoint needs one of the configured API keys"


async def _unauthorized(send: Send, message: str) -> None:
    body = json.dumps(errors.Unauthorized(message).body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})

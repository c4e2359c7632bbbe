"""Bearer tokens: the admin token (from env, a file, or generated at start) and API keys.

A generated admin token is new at every start (a leaked token dies with the process) and is
written to `<state_dir>/admin.token` with mode 0600, where `llamapool ps` finds it. The
server holds an exclusive lock on the file while it runs, so a second server sharing the
state dir never replaces a live server's token: it writes `admin-<port>.token` instead. To
keep one token across restarts, set `LLAMAPOOL_ADMIN_TOKEN` or point at a token file.
"""

from __future__ import annotations

import fcntl
import hmac
import json
import logging
import os
import secrets
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from llamapool import errors
from llamapool.config import ConfigError, header_safe

log = logging.getLogger("llamapool.auth")

ADMIN_TOKEN_ENV = "LLAMAPOOL_ADMIN_TOKEN"
ADMIN_TOKEN_FILE = "admin.token"
DEFAULT_STATE_DIR = (
    Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "llamapool"
)

ADMIN_PREFIX = "/admin"
API_PREFIX = "/v1"


@dataclass
class AdminToken:
    """The admin token; `path` is the file it was generated into, locked while we live."""

    token: str
    path: Path | None = None
    _fd: int | None = field(default=None, repr=False)

    def release(self) -> None:
        """Unlock the generated file, so the next server may take it over."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def load_admin_token(
    token_file: str | None, *, state_dir: str | Path, port: int | None = None
) -> AdminToken:
    """The admin token: `$LLAMAPOOL_ADMIN_TOKEN`, then `token_file` (must exist and not be
    empty), else a fresh `secrets.token_urlsafe(32)` written to `<state_dir>/admin.token`.

    A generated token goes to the first of `admin.token` and `admin-<port>.token` that no
    live server has locked. Raises `ConfigError` for a missing, unreadable or empty token
    file, an unusable state dir, or when both files belong to live servers.
    """
    from_env = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    if from_env:
        return AdminToken(_usable(from_env, f"${ADMIN_TOKEN_ENV}"))
    if token_file is not None:
        return AdminToken(_usable(_read_token_file(Path(token_file)), f"file {token_file}"))
    state_dir = Path(state_dir)
    _make_state_dir(state_dir)
    names = [ADMIN_TOKEN_FILE] if port is None else [ADMIN_TOKEN_FILE, f"admin-{port}.token"]
    token = secrets.token_urlsafe(32)
    for name in names:
        path = state_dir / name
        fd = _claim(path)
        if fd is not None:
            _write_claimed(fd, path, token)
            return AdminToken(token, path, fd)
    taken = " and ".join(str(state_dir / name) for name in names)
    raise ConfigError(
        f"running llamapool servers hold the admin token file(s) {taken}; give this one "
        f"its own admin.state_dir, or set admin.token_file or {ADMIN_TOKEN_ENV}"
    )


def _make_state_dir(state_dir: Path) -> None:
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"admin.state_dir {state_dir} is not a directory") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot create admin.state_dir {state_dir}: {exc.strerror}; point it at a "
            "writable directory"
        ) from None


def _claim(path: Path) -> int | None:
    """An fd holding an exclusive lock on `path`, or None when a live process holds one."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot write admin token file {path}: {exc.strerror}") from None
    try:
        # flock, not fcntl locks: it belongs to this open file, so it lasts exactly as long
        # as the fd, and the kernel drops it when the process dies, however it dies.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as exc:  # a filesystem without locks: the file is ours, unguarded
        log.warning("cannot lock admin token file %s (%s); writing it unlocked", path, exc)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_claimed(fd: int, path: Path, token: str) -> None:
    # Written in place, not swapped in by rename: the lock lives on this inode. Whatever
    # the file held was the token of a server that is gone.
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (token + "\n").encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"cannot write admin token file {path}: {exc.strerror}") from None


def _usable(token: str, where: str) -> str:
    """`token`, if a client can send it: HTTP headers carry printable ASCII."""
    if not header_safe(token):
        raise ConfigError(
            f"the admin token in {where} is not printable ASCII, so no Authorization "
            "header could carry it; use letters, digits and punctuation"
        )
    return token


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


# Where the middleware reads the API keys at each request: the running config's, so a
# reload that changes them takes effect with no step of its own.
ApiKeySource = Callable[[], Sequence[str] | None]


class BearerAuth:
    """ASGI middleware: `/admin*` needs the admin token, `/v1*` an API key when any is set.

    The admin token is accepted on `/v1` too. Everything else (`/health`, `/ready`,
    `/metrics`) is open. Failures get a 401 with an OpenAI-shaped error body. `api_keys`
    is a fixed list or a function returning the current one.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        admin_token: str,
        api_keys: Sequence[str] | ApiKeySource | None = None,
    ):
        if not admin_token:
            raise ValueError("admin_token must not be empty")
        self.app = app
        self.admin_tokens = (admin_token,)
        if callable(api_keys):
            self._api_keys = api_keys
        else:
            fixed = tuple(api_keys or ())
            self._api_keys = lambda: fixed

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The API keys in force now (empty: `/v1` is open)."""
        return tuple(k for k in self._api_keys() or () if k)

    def _allowed(self, path: str) -> tuple[str, ...] | None:
        """The tokens that may call `path`, or None when it is open."""
        if path.startswith(ADMIN_PREFIX):
            return self.admin_tokens
        if path.startswith(API_PREFIX) and (keys := self.api_keys):
            return (*keys, *self.admin_tokens)
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

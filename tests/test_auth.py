from __future__ import annotations

import os
import stat

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from llamapool.config import ConfigError
from llamapool.router.auth import (
    ADMIN_TOKEN_ENV,
    BearerAuth,
    bearer_token,
    check_bearer,
    load_admin_token,
    write_token_file,
)

ADMIN = "admin-secret-token"
KEYS = ["key-one", "key-two"]


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch):
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- load_admin_token -----------------------------------------------------------


def test_generated_token_is_written_0600_in_a_0700_dir(tmp_path):
    state = tmp_path / "state" / "llamapool"
    token, path = load_admin_token(None, state_dir=state)
    assert path == state / "admin.token"
    assert path.read_text().strip() == token
    assert len(token) >= 40
    assert mode(path) == 0o600
    assert mode(state) == 0o700
    assert [p.name for p in state.iterdir()] == ["admin.token"]  # no temp file left


def test_generated_token_is_fresh_at_every_start(tmp_path):
    first, path = load_admin_token(None, state_dir=tmp_path)
    second, again = load_admin_token(None, state_dir=tmp_path)
    assert first != second and path == again
    assert path.read_text().strip() == second


def test_rewrite_tightens_a_loose_old_file(tmp_path):
    path = tmp_path / "admin.token"
    path.write_text("old")
    path.chmod(0o644)
    write_token_file(path, "new")
    assert path.read_text() == "new\n"
    assert mode(path) == 0o600


def test_token_file_is_read_and_stripped(tmp_path):
    f = tmp_path / "token"
    f.write_text("  from-file \n")
    f.chmod(0o600)
    assert load_admin_token(str(f), state_dir=tmp_path / "unused") == ("from-file", None)
    assert not (tmp_path / "unused").exists()


def test_token_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_admin_token(str(tmp_path / "nope"), state_dir=tmp_path)
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    with pytest.raises(ConfigError, match="is empty"):
        load_admin_token(str(empty), state_dir=tmp_path)


def test_env_wins_over_the_file(tmp_path, monkeypatch):
    f = tmp_path / "token"
    f.write_text("from-file")
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "from-env")
    assert load_admin_token(str(f), state_dir=tmp_path) == ("from-env", None)
    assert load_admin_token(None, state_dir=tmp_path / "s") == ("from-env", None)
    assert not (tmp_path / "s").exists()


# -- check_bearer ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer key-one", True),
        ("Bearer key-two", True),
        ("bearer key-two", True),
        ("Bearer  key-one ", True),
        ("Bearer key-on", False),
        ("Bearer key-one-and-more", False),
        ("Bearer ", False),
        ("Bearer", False),
        ("Basic key-one", False),
        ("key-one", False),
        ("Bearer ключ", False),  # non-ASCII must not raise
        ("", False),
        (None, False),
    ],
)
def test_check_bearer(header, expected):
    assert check_bearer(header, KEYS) is expected


def test_check_bearer_with_no_or_empty_candidates():
    assert check_bearer("Bearer x", []) is False
    assert check_bearer("Bearer x", [""]) is False


def test_bearer_token():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("Token abc") is None


# -- the middleware -------------------------------------------------------------


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


ROUTES = [
    Route(path, ok, methods=["GET", "POST"])
    for path in ("/admin/pool", "/v1/models", "/health", "/ready", "/metrics")
]


def client(api_keys=None) -> TestClient:
    app = Starlette(routes=ROUTES)
    return TestClient(BearerAuth(app, admin_token=ADMIN, api_keys=api_keys))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("api_keys", [None, [], KEYS])
@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/admin/pool", {}, 401),
        ("/admin/pool", bearer("wrong"), 401),
        ("/admin/pool", bearer(KEYS[0]), 401),  # an API key is not an admin token
        ("/admin/pool", bearer(ADMIN), 200),
        ("/admin/nowhere", {}, 401),  # no route leaks before auth
        ("/health", {}, 200),
        ("/ready", {}, 200),
        ("/metrics", {}, 200),
        ("/metrics", bearer("wrong"), 200),
    ],
)
def test_middleware_admin_and_open_paths(api_keys, path, headers, status):
    with client(api_keys) as c:
        assert c.get(path, headers=headers).status_code == status


@pytest.mark.parametrize(
    ("api_keys", "headers", "status"),
    [
        (None, {}, 200),
        ([], {}, 200),
        ([""], {}, 200),
        (KEYS, {}, 401),
        (KEYS, bearer("wrong"), 401),
        (KEYS, bearer(KEYS[0]), 200),
        (KEYS, bearer(KEYS[1]), 200),
        (KEYS, bearer(ADMIN), 200),
    ],
)
def test_middleware_api_keys(api_keys, headers, status):
    with client(api_keys) as c:
        assert c.get("/v1/models", headers=headers).status_code == status
        assert c.post("/v1/models", headers=headers).status_code == status


def test_401_is_openai_shaped_and_never_echoes_the_token():
    with client(KEYS) as c:
        missing = c.get("/admin/pool")
        wrong = c.get("/v1/models", headers=bearer("sk-leaky-guess"))
        malformed = c.get("/admin/pool", headers={"Authorization": "Basic abc"})
    for r in (missing, wrong, malformed):
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.headers["content-type"] == "application/json"
        error = r.json()["error"]
        assert error["type"] == "authentication_error"
        assert error["code"] == "invalid_api_key"
        assert error["param"] is None
    assert "missing Authorization: Bearer header" in missing.json()["error"]["message"]
    assert "admin token" in missing.json()["error"]["message"]
    assert "invalid token" in wrong.json()["error"]["message"]
    assert "API key" in wrong.json()["error"]["message"]
    assert "sk-leaky-guess" not in wrong.text
    assert "malformed" in malformed.json()["error"]["message"]


def test_empty_admin_token_is_refused():
    with pytest.raises(ValueError):
        BearerAuth(Starlette(), admin_token="")

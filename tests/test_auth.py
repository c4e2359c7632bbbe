from __future__ import annotations

import os
import re
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
    AdminToken,
    BearerAuth,
    bearer_token,
    check_bearer,
    load_admin_token,
)

ADMIN = "admin-secret-token"
KEYS = ["key-one", "key-two"]


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch):
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- load_admin_token -----------------------------------------------------------


@pytest.fixture
def load():
    """`load_admin_token`, releasing every generated file's lock after the test."""
    loaded = []

    def load(*args, **kwargs):
        admin = load_admin_token(*args, **kwargs)
        loaded.append(admin)
        return admin

    yield load
    for admin in loaded:
        admin.release()


def test_generated_token_is_written_0600_in_a_0700_dir(tmp_path, load):
    state = tmp_path / "state" / "llamapool"
    admin = load(None, state_dir=state)
    assert admin.path == state / "admin.token"
    assert admin.path.read_text().strip() == admin.token
    assert len(admin.token) >= 40
    assert mode(admin.path) == 0o600
    assert mode(state) == 0o700
    assert [p.name for p in state.iterdir()] == ["admin.token"]  # nothing else left


def test_generated_token_is_fresh_at_every_start(tmp_path, load):
    first = load(None, state_dir=tmp_path, port=8080)
    first.release()  # the first server has exited
    second = load(None, state_dir=tmp_path, port=8080)
    assert first.token != second.token and first.path == second.path
    assert second.path.read_text().strip() == second.token


def test_a_dead_servers_loose_file_is_rewritten_0600(tmp_path, load):
    path = tmp_path / "admin.token"
    path.write_text("an old, longer token of a server that has exited")
    path.chmod(0o644)
    admin = load(None, state_dir=tmp_path)
    assert path.read_text() == admin.token + "\n"
    assert mode(path) == 0o600


def test_a_live_servers_token_file_is_never_replaced(tmp_path, load):
    first = load(None, state_dir=tmp_path, port=8080)
    second = load(None, state_dir=tmp_path, port=8081)
    assert second.path == tmp_path / "admin-8081.token"
    assert second.path.read_text().strip() == second.token
    assert first.path.read_text().strip() == first.token
    # A third server on port 8081 (another host address) finds both files taken.
    with pytest.raises(ConfigError, match="running llamapool servers hold"):
        load(None, state_dir=tmp_path, port=8081)
    assert first.path.read_text().strip() == first.token
    assert second.path.read_text().strip() == second.token
    first.release()
    third = load(None, state_dir=tmp_path, port=8082)
    assert third.path == tmp_path / "admin.token"
    assert third.path.read_text().strip() == third.token


def test_a_symlinked_token_file_is_not_written_through(tmp_path, load):
    target = tmp_path / "elsewhere"
    target.write_text("keep me")
    (tmp_path / "admin.token").symlink_to(target)
    with pytest.raises(ConfigError, match="cannot write admin token file"):
        load(None, state_dir=tmp_path)
    assert target.read_text() == "keep me"


def test_unusable_state_dirs(tmp_path, load):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(
        ConfigError, match=re.escape(f"admin.state_dir {a_file} is not a directory")
    ):
        load(None, state_dir=a_file)
    with pytest.raises(ConfigError, match="admin.state_dir .*/a-file/sub is not a directory"):
        load(None, state_dir=a_file / "sub")
    with pytest.raises(ConfigError, match="cannot create admin.state_dir /proc/llamapool-nope"):
        load(None, state_dir="/proc/llamapool-nope")
    assert a_file.read_text() == "x"


def test_token_file_is_read_and_stripped(tmp_path, load):
    f = tmp_path / "token"
    f.write_text("  from-file \n")
    f.chmod(0o600)
    assert load(str(f), state_dir=tmp_path / "unused") == AdminToken("from-file")
    assert not (tmp_path / "unused").exists()


def test_token_file_errors(tmp_path, load):
    with pytest.raises(ConfigError, match="does not exist"):
        load(str(tmp_path / "nope"), state_dir=tmp_path)
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    with pytest.raises(ConfigError, match="is empty"):
        load(str(empty), state_dir=tmp_path)


def test_a_token_no_header_can_carry_is_refused(tmp_path, monkeypatch, load):
    f = tmp_path / "token"
    f.write_text("tökén")
    with pytest.raises(ConfigError, match=r"in file .*token is not printable ASCII"):
        load(str(f), state_dir=tmp_path)
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "a\tb")
    with pytest.raises(ConfigError, match=r"in \$LLAMAPOOL_ADMIN_TOKEN is not printable"):
        load(None, state_dir=tmp_path)


def test_env_wins_over_the_file(tmp_path, monkeypatch, load):
    f = tmp_path / "token"
    f.write_text("from-file")
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "from-env")
    assert load(str(f), state_dir=tmp_path) == AdminToken("from-env")
    assert load(None, state_dir=tmp_path / "s") == AdminToken("from-env")
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


def test_api_keys_are_read_from_their_source_at_each_request():
    # The app passes the running config's keys this way: a reload changes them at once.
    keys = ["first"]
    app = BearerAuth(Starlette(routes=ROUTES), admin_token=ADMIN, api_keys=lambda: keys)
    with TestClient(app) as c:
        assert c.get("/v1/models", headers=bearer("first")).status_code == 200
        keys[:] = ["second"]
        assert c.get("/v1/models", headers=bearer("first")).status_code == 401
        assert c.get("/v1/models", headers=bearer("second")).status_code == 200
        keys.clear()
        assert c.get("/v1/models").status_code == 200
